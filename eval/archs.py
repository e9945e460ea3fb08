"""Model architectures for timing: real configs with random weights (nothing is downloaded)."""

from __future__ import annotations

from transformers import LlavaConfig, Qwen2_5_VLConfig, ViTConfig

from tokenprune.testing import (
    IMAGE_TOKEN_ID,
    QWEN_VIDEO_TOKEN_ID,
    QWEN_VISION_END_ID,
    QWEN_VISION_START_ID,
    llava_config,
    tiny_config,
    tiny_encoder,
)


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


#: The decoder of the small CPU-timing architectures: 8 layers of width 768 with 12 heads.
_SMALL_TEXT = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=12,
    vocab_size=32064,
    max_position_embeddings=4096,
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
        text=_SMALL_TEXT,
    )


def qwen25_vl_small() -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL-shaped model small enough for CPU timing: a 4-layer window-attention tower (its last layer
    full) of 14-pixel patches merged 2x2 (a 448-pixel image: 256 tokens, see
    :data:`tokenprune.eval.bench.QWEN_IMAGE_PATCHES`) and an 8-layer 768-wide decoder with multimodal RoPE."""
    return Qwen2_5_VLConfig(
        vision_config=dict(
            depth=4,
            hidden_size=384,
            intermediate_size=1536,
            num_heads=6,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[3],
            out_hidden_size=768,
        ),
        text_config=dict(
            _SMALL_TEXT,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
        ),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=QWEN_VIDEO_TOKEN_ID,
        vision_start_token_id=QWEN_VISION_START_ID,
        vision_end_token_id=QWEN_VISION_END_ID,
        pad_token_id=0,
    )


ARCHS = {
    "tiny": tiny_config,
    "llava-small": llava_small,
    "llava-1.5-7b": llava_15_7b,
    "qwen2.5-vl-small": qwen25_vl_small,
}


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
