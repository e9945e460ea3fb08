"""The tiny random models: configs of every supported family and the models built from them.

VLM families (:data:`FAMILIES`) come from :func:`tiny_model`; standalone image encoders
(:data:`ENCODER_FAMILIES`) from :func:`tiny_encoder`.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next", "llava_onevision")
ANYRES_FAMILIES = ("llava_next", "llava_onevision")
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
ENCODER_FAMILIES = ("clip", "siglip", "vit", "vit-classifier")
#: The families with a tiny processor (:func:`~tokenprune.testing.tiny_processor`).
PROCESSOR_FAMILIES = ("llava", "llava_next")
PAD_TOKEN_ID = 0
IMAGE_TOKEN_ID = 3
VOCAB_SIZE = 256


def llava_config(vision: dict, text: dict, image_token_id: int, **extra: object) -> LlavaConfig:
    """A LLaVA-1.5-style config: a CLIP vision tower (CLS dropped, features of the second-to-last layer)
    and a Llama decoder, from the keyword arguments of ``CLIPVisionConfig`` and ``LlamaConfig``."""
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision).to_dict(),
        text_config=LlamaConfig(**text).to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **extra,
    )


#: Special ids of the tiny Qwen2-VL (``<image>`` is :data:`IMAGE_TOKEN_ID` as for LLaVA).
QWEN_VIDEO_TOKEN_ID, QWEN_VISION_START_ID, QWEN_VISION_END_ID = 250, 251, 252


#: Patches per side of a tiny Qwen2-VL image (16 x 16 patches of 4 px, merged 2 x 2 into 8 x 8 tokens).
QWEN_PATCHES_PER_SIDE = 16


#: The decoder of every tiny VLM: 4 layers of width 64, 4 query and 2 KV heads.
_TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=512,
    initializer_range=0.1,
)


#: The vision tower of the tiny LLaVA models: 32x32 images in an 8x8 grid of 4-pixel patches, 4 layers.
_TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_size=32,
    patch_size=4,
    projection_dim=32,
)


#: The AnyRes tilings of the tiny LLaVA-NeXT (32 x 32 tiles, as its vision tower).
LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def _anyres_config(family: str) -> LlavaNextConfig | LlavaOnevisionConfig:
    """LLaVA-NeXT (the tiny CLIP tower) or LLaVA-OneVision (a SigLIP tower of the same size, all its
    tokens used), both tiling 32x32 images by :data:`LLAVA_NEXT_PINPOINTS`."""
    text = dict(
        _TINY_TEXT, max_position_embeddings=2048, pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2
    )
    common = dict(
        image_token_id=IMAGE_TOKEN_ID, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, pad_token_id=PAD_TOKEN_ID
    )
    if family == "llava_onevision":
        vision = {k: v for k, v in _TINY_CLIP.items() if k != "projection_dim"}
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vision).to_dict(),
            text_config=LlamaConfig(**text).to_dict(),
            video_token_id=QWEN_VIDEO_TOKEN_ID,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            **common,
        )
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_TINY_CLIP).to_dict(),
        text_config=LlamaConfig(**text).to_dict(),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **common,
    )


def _qwen_config(family: str) -> Qwen2VLConfig | Qwen2_5_VLConfig | Qwen3VLConfig:
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = dict(_TINY_TEXT, rope_parameters=rope)
    vision = dict(num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if family == "qwen3_vl":  # DeepStack: features of both vision layers added to the first two LM layers
        vision.update(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            num_position_embeddings=256,
            deepstack_visual_indexes=[0, 1],
        )
        text.update(head_dim=16)
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
        config_class = Qwen3VLConfig
    elif family == "qwen2_5_vl":  # window attention over 2 x 2 merged tokens, the last layer full
        vision.update(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            window_size=16,
            fullatt_block_indexes=[1],
        )
        config_class = Qwen2_5_VLConfig
    else:
        vision.update(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2)
        config_class = Qwen2VLConfig
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=QWEN_VIDEO_TOKEN_ID,
        vision_start_token_id=QWEN_VISION_START_ID,
        vision_end_token_id=QWEN_VISION_END_ID,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_config(family: str = "llava", *, patches_per_side: int = 8, text_layers: int = 4):
    """The config of the tiny model of ``family``. LLaVA: 32x32 images in an 8x8 patch grid, a 6-layer
    vision tower (features of its fifth layer) and a 4-layer decoder. Qwen2-VL: 16x16 patches merged into
    8x8 tokens per image, a 2-layer vision tower (Qwen2.5-VL: window attention, then full) and a 4-layer
    decoder with multimodal RoPE.

    LLaVA only: ``patches_per_side`` (24: LLaVA-1.5's 576 image tokens) and ``text_layers`` change the grid
    (4-pixel patches) and the decoder's depth."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; tiny models exist for: {', '.join(FAMILIES)}")
    if family != "llava" and (patches_per_side, text_layers) != (8, 4):
        raise ValueError("patches_per_side and text_layers apply to the tiny LLaVA only")
    if family in QWEN_FAMILIES:
        return _qwen_config(family)
    if family in ANYRES_FAMILIES:
        return _anyres_config(family)
    text = dict(
        _TINY_TEXT, num_hidden_layers=text_layers, pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2
    )
    text["max_position_embeddings"] = max(text["max_position_embeddings"], 2 * patches_per_side**2)
    return llava_config(
        vision=dict(_TINY_CLIP, num_hidden_layers=6, image_size=4 * patches_per_side),
        text=text,
        image_token_id=IMAGE_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )


def tiny_model(
    family: str = "llava", attn_implementation: str = "sdpa", seed: int = 0, **sizes: int
) -> PreTrainedModel:
    """A tiny random model of ``family`` in eval mode, float32, on the CPU (``sizes``: see
    :func:`tiny_config`)."""
    config = tiny_config(family, **sizes)
    torch.manual_seed(seed)
    model_class = {
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": Qwen3VLForConditionalGeneration,
        "llava_next": LlavaNextForConditionalGeneration,
        "llava_onevision": LlavaOnevisionForConditionalGeneration,
    }.get(family, LlavaForConditionalGeneration)
    return model_class._from_config(config, attn_implementation=attn_implementation).eval()


_ENCODERS = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
    "vit": (ViTConfig, ViTModel),
    "vit-classifier": (ViTConfig, ViTForImageClassification),
}


def tiny_encoder(
    family: str = "clip",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    num_layers: int = 6,
    patches_per_side: int = 8,
) -> PreTrainedModel:
    """A tiny random image encoder of ``family`` (:data:`ENCODER_FAMILIES`) in eval mode, float32, on CPU.

    Images in a ``patches_per_side`` square grid of 4-pixel patches (32x32 in 8x8 by default; 24 gives
    CLIP-L/336's grid), ``num_layers`` layers of width 32 with 4 heads; CLIP and ViT prepend a CLS token,
    SigLIP does not. ``vit-classifier`` is ``ViTForImageClassification``.
    """
    if family not in _ENCODERS:
        raise ValueError(
            f"unknown encoder family {family!r}; tiny encoders exist for: {', '.join(_ENCODERS)}"
        )
    config_class, model_class = _ENCODERS[family]
    config = config_class(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        image_size=4 * patches_per_side,
        patch_size=4,
        num_channels=3,
    )
    torch.manual_seed(seed)
    return model_class._from_config(config, attn_implementation=attn_implementation).eval()
