"""Model architectures for timing: real configs with random weights (nothing is downloaded)."""

from __future__ import annotations

from transformers import LlavaConfig, ViTConfig

from tokenprune.testing import llava_config, tiny_config, tiny_encoder


def _llava(vision: dict, text: dict) -> LlavaConfig:
    return llava_config(vision, text, image_token_id=32000, projector_hidden_act="gelu")


def llava_15_7b() -> LlavaConfig:
    """LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 image tokens) and a Llama-2-7B decoder."""
    return _llava(
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
    )


def llava_small() -> LlavaConfig:
    """A LLaVA-1.5-shaped model small enough for CPU timing: 576 image tokens, an 8-layer 768-wide decoder."""
    return _llava(
        vision=dict(
            hidden_size=384,
            intermediate_size=1536,
            num_hidden_layers=6,
            num_attention_heads=6,
            image_size=336,
            patch_size=14,
            projection_dim=384,
        ),
        text=dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=8,
            num_attention_heads=12,
            num_key_value_heads=12,
            vocab_size=32064,
            max_position_embeddings=4096,
        ),
    )


ARCHS = {"tiny": tiny_config, "llava-small": llava_small, "llava-1.5-7b": llava_15_7b}


def vit_b16() -> ViTConfig:
    """ViT-B/16 at 224 px: 196 patches and a CLS token, 12 layers of width 768 with 12 heads."""
    return ViTConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
    )


def tiny_vit() -> ViTConfig:
    """The tiny ViT of :func:`tokenprune.testing.tiny_encoder`: 64 patches, 6 layers of width 32."""
    return tiny_encoder("vit").config


#: Image encoders for ``tokenprune bench-encoder``.
ENCODER_ARCHS = {"tiny-vit": tiny_vit, "vit-b16": vit_b16}
