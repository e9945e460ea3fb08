"""Tiny random models and inputs for every supported family, built from configs (no downloads).

Used by the test-suite, the docs and the CLI's built-in default. The weights are random: outputs are
meaningless, but every code path (vision tower, projector, decoder, cache, generate) is the real one.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedModel

FAMILIES = ("llava",)
PAD_TOKEN_ID = 0
IMAGE_TOKEN_ID = 3
VOCAB_SIZE = 256


def tiny_config(family: str = "llava") -> LlavaConfig:
    """The config of the tiny model of ``family``: 32x32 images in an 8x8 patch grid, a 4-layer decoder."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; tiny models exist for: {', '.join(FAMILIES)}")
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=4, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=512,
        pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2, initializer_range=0.1,
    )
    return LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=PAD_TOKEN_ID,
    )


def tiny_model(family: str = "llava", attn_implementation: str = "sdpa", seed: int = 0) -> PreTrainedModel:
    """A tiny random model of ``family`` in eval mode, float32, on the CPU."""
    config = tiny_config(family)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def tokens_per_image(model: PreTrainedModel) -> int:
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def tiny_inputs(
    model: PreTrainedModel,
    images_per_prompt: tuple[int, ...] = (1,),
    text_lengths: tuple[int, ...] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A left-padded batch for ``model``: one prompt per entry of ``images_per_prompt``.

    Prompt ``b`` is ``text_lengths[b]`` random text tokens (default 5 + 3b) split around its images, each
    image a run of placeholders followed by one text token. Returns ``input_ids``, ``attention_mask``,
    ``position_ids`` (counting real tokens only, as ``generate`` does) and ``pixel_values`` (``None`` when
    no prompt has an image).
    """
    generator = torch.Generator().manual_seed(seed)
    n = tokens_per_image(model)
    image_token = model.config.image_token_id
    if text_lengths is None:
        text_lengths = tuple(5 + 3 * b for b in range(len(images_per_prompt)))
    prompts = []
    for num_images, text_length in zip(images_per_prompt, text_lengths):
        text = torch.randint(4, VOCAB_SIZE, (text_length,), generator=generator)
        pieces = [text[: text_length // 2]]
        for _ in range(num_images):
            pieces += [torch.full((n,), image_token), torch.randint(4, VOCAB_SIZE, (1,), generator=generator)]
        pieces.append(text[text_length // 2 :])
        prompts.append(torch.cat(pieces))
    length = max(p.numel() for p in prompts)
    input_ids = torch.full((len(prompts), length), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        input_ids[b, length - prompt.numel() :] = prompt
        attention_mask[b, length - prompt.numel() :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    total_images = sum(images_per_prompt)
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(total_images, 3, size, size, generator=generator) if total_images else None
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "pixel_values": pixel_values,
    }
