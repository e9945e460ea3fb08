"""Inputs for the tiny models: random pixels and left-padded prompts with images (and Qwen-VL videos)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .models import (
    ANYRES_FAMILIES,
    PAD_TOKEN_ID,
    QWEN_FAMILIES,
    QWEN_PATCHES_PER_SIDE,
    QWEN_VIDEO_TOKEN_ID,
    QWEN_VISION_END_ID,
    QWEN_VISION_START_ID,
)
from .processors import anyres_image_processor

#: Frames of a tiny LLaVA-OneVision video.
ONEVISION_VIDEO_FRAMES = 4


def tiny_pixels(model: PreTrainedModel, num_images: int = 2, seed: int = 0) -> torch.Tensor:
    """Random ``pixel_values`` of ``num_images`` images for ``model`` (an encoder or a VLM): ``[I, 3, H, W]``
    at its image size, or for Qwen2-VL the flattened patches ``[I * 16 * 16, 3 * 2 * 4 * 4]``."""
    config = getattr(model.config, "vision_config", model.config)
    generator = torch.Generator().manual_seed(seed)
    if model.config.model_type in QWEN_FAMILIES:
        patch = config.in_channels * config.temporal_patch_size * config.patch_size**2
        return torch.randn(num_images * QWEN_PATCHES_PER_SIDE**2, patch, generator=generator)
    return torch.randn(num_images, 3, config.image_size, config.image_size, generator=generator)


def tokens_per_image(model: PreTrainedModel) -> int:
    """Placeholder tokens of one image of the tiny inputs of ``model``."""
    vision = model.config.vision_config
    if model.config.model_type in QWEN_FAMILIES:
        return (QWEN_PATCHES_PER_SIDE // vision.spatial_merge_size) ** 2
    return (vision.image_size // vision.patch_size) ** 2


def tiny_inputs(
    model: PreTrainedModel,
    images_per_prompt: tuple[int, ...] = (1,),
    text_lengths: tuple[int, ...] | None = None,
    seed: int = 0,
    image_patches: tuple[tuple[int, int], ...] | None = None,
    videos_per_prompt: tuple[int, ...] | None = None,
    video_grid: tuple[int, int, int] = (2, 8, 8),
) -> dict[str, torch.Tensor]:
    """A left-padded batch for ``model``: one prompt per entry of ``images_per_prompt``.

    Prompt ``b`` is ``text_lengths[b]`` random text tokens (default 5 + 3b) split around its images, each
    image a run of placeholders followed by one text token. Returns ``input_ids``, ``attention_mask``,
    ``pixel_values`` (``None`` when no prompt has an image) and, for LLaVA, ``position_ids`` (counting real
    tokens only, as ``generate`` does); for Qwen2-VL, whose model computes its multimodal positions, each
    image is wrapped in vision start/end tokens and the batch has ``image_grid_thw`` and
    ``mm_token_type_ids`` instead. ``image_patches`` gives each Qwen2-VL image its own (rows, columns) of
    patches (even numbers; default 16 x 16, 64 tokens); ``videos_per_prompt`` adds Qwen-VL videos after
    the images (by default 4 frames of 8 x 8 patches: 32 tokens each; ``video_grid`` sets the temporal
    patches of two frames each, and the rows and columns of patches; ``pixel_values_videos``,
    ``video_grid_thw``; for Qwen3-VL each temporal patch is its own placeholder run after a timestamp-like
    word), or
    LLaVA-OneVision videos (:data:`ONEVISION_VIDEO_FRAMES` frames of 4 x 4 pooled tokens and a newline
    token: 65 placeholders each; ``pixel_values_videos [V, 4, 3, 32, 32]``).
    """
    if model.config.model_type in ANYRES_FAMILIES:
        return _anyres_inputs(model, images_per_prompt, text_lengths, seed, videos_per_prompt)
    generator = torch.Generator().manual_seed(seed)
    image_token = model.config.image_token_id
    qwen = model.config.model_type in QWEN_FAMILIES
    total_images = sum(images_per_prompt)
    if image_patches is None:
        image_patches = ((QWEN_PATCHES_PER_SIDE, QWEN_PATCHES_PER_SIDE),) * total_images
    elif not qwen or len(image_patches) != total_images:
        raise ValueError("image_patches gives one (rows, columns) per image, for Qwen2-VL only")
    videos_per_prompt = videos_per_prompt or (0,) * len(images_per_prompt)
    if any(videos_per_prompt) and not qwen:
        raise ValueError("tiny videos are built for the Qwen-VL families and LLaVA-OneVision only")
    frames_apart = model.config.model_type == "qwen3_vl"  # a timestamp and a placeholder run per frame
    merge = model.config.vision_config.spatial_merge_size if qwen else 1
    sizes = iter([rows * cols // merge**2 for rows, cols in image_patches] if qwen else [])
    if text_lengths is None:
        text_lengths = tuple(5 + 3 * b for b in range(len(images_per_prompt)))

    def words(count: int) -> torch.Tensor:  # below every special id of the tiny models
        return torch.randint(5, QWEN_VIDEO_TOKEN_ID, (count,), generator=generator)

    def media(token: int, count: int) -> torch.Tensor:
        run = torch.full((count,), token)
        if qwen:
            run = torch.cat([torch.tensor([QWEN_VISION_START_ID]), run, torch.tensor([QWEN_VISION_END_ID])])
        return run

    prompts = []
    for num_images, num_videos, text_length in zip(
        images_per_prompt, videos_per_prompt, text_lengths, strict=False
    ):
        text = words(text_length)
        pieces = [text[: text_length // 2]]
        for _ in range(num_images):
            pieces += [media(image_token, next(sizes) if qwen else tokens_per_image(model)), words(1)]
        for _ in range(num_videos):
            t, h, w = video_grid
            if frames_apart:
                for _ in range(t):
                    pieces += [words(1), media(QWEN_VIDEO_TOKEN_ID, h * w // merge**2)]
                pieces.append(words(1))
            else:
                pieces += [media(QWEN_VIDEO_TOKEN_ID, t * h * w // merge**2), words(1)]
        pieces.append(text[text_length // 2 :])
        prompts.append(torch.cat(pieces))
    input_ids, attention_mask = _left_padded(prompts)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if not qwen:
        inputs["pixel_values"] = tiny_pixels(model, total_images, seed) if total_images else None
        inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return inputs
    vision = model.config.vision_config
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    rows = sum(r * c for r, c in image_patches)
    inputs["pixel_values"] = torch.randn(rows, patch, generator=generator) if total_images else None
    videos = input_ids == QWEN_VIDEO_TOKEN_ID
    inputs["mm_token_type_ids"] = (input_ids == image_token).int() + 2 * videos.int()
    grid = torch.tensor([[1, r, c] for r, c in image_patches])
    inputs["image_grid_thw"] = grid if total_images else None
    total_videos = sum(videos_per_prompt)
    if total_videos:
        t, h, w = video_grid
        inputs["pixel_values_videos"] = torch.randn(total_videos * t * h * w, patch, generator=generator)
        inputs["video_grid_thw"] = torch.tensor([video_grid] * total_videos)
    return inputs


def _anyres_inputs(
    model: PreTrainedModel,
    images_per_prompt: tuple[int, ...],
    text_lengths: tuple[int, ...] | None,
    seed: int,
    videos_per_prompt: tuple[int, ...] | None,
) -> dict[str, torch.Tensor]:
    """Prompts for the tiny LLaVA-NeXT / OneVision: random words and images of three aspect ratios in turn
    (so their token counts differ), each image as many placeholders as the model packs features for it, then
    (OneVision) the prompt's videos."""
    from PIL import Image

    videos_per_prompt = videos_per_prompt or (0,) * len(images_per_prompt)
    video_tokens = 0
    if any(videos_per_prompt):
        if model.config.model_type != "llava_onevision":
            raise ValueError("tiny videos are built for the Qwen-VL families and LLaVA-OneVision only")
        vision = model.config.vision_config
        side = -(-vision.image_size // vision.patch_size // 2)  # a frame after the model's 2x2 pooling
        video_tokens = ONEVISION_VIDEO_FRAMES * side * side + 1  # and the newline

    generator = torch.Generator().manual_seed(seed)
    shapes = [(40, 80), (60, 60), (90, 30)]
    total = sum(images_per_prompt)
    images = []
    for i in range(total):
        width, height = shapes[i % len(shapes)]
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        images.append(Image.fromarray(pixels.numpy()))
    inputs: dict[str, torch.Tensor | None] = {"pixel_values": None, "image_sizes": None}
    counts: list[int] = []
    if images:
        pixels = anyres_image_processor(model.config)(images, return_tensors="pt")
        inputs.update(pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"])
        with torch.no_grad():
            packed = model.model.get_image_features(
                pixels["pixel_values"], pixels["image_sizes"]
            ).pooler_output
        counts = [int(feature.shape[0]) for feature in packed]
    if text_lengths is None:
        text_lengths = tuple(5 + 3 * b for b in range(len(images_per_prompt)))
    sizes = iter(counts)
    prompts = []
    for num_images, num_videos, length in zip(
        images_per_prompt, videos_per_prompt, text_lengths, strict=False
    ):
        text = torch.randint(5, QWEN_VIDEO_TOKEN_ID, (length,), generator=generator)
        pieces = [text[: length // 2]]
        for _ in range(num_images):
            pieces += [torch.full((next(sizes),), model.config.image_token_id), text[:1]]
        for _ in range(num_videos):
            pieces += [torch.full((video_tokens,), model.config.video_token_id), text[:1]]
        pieces.append(text[length // 2 :])
        prompts.append(torch.cat(pieces))
    input_ids, attention_mask = _left_padded(prompts)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if video_tokens:
        size = model.config.vision_config.image_size
        shape = (sum(videos_per_prompt), ONEVISION_VIDEO_FRAMES, 3, size, size)
        inputs["pixel_values_videos"] = torch.randn(shape, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **inputs}


def _left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` as a left-padded batch: ``input_ids [B, L]`` and its ``attention_mask``."""
    length = max(p.numel() for p in prompts)
    input_ids = torch.full((len(prompts), length), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        input_ids[b, length - prompt.numel() :] = prompt
        attention_mask[b, length - prompt.numel() :] = 1
    return input_ids, attention_mask
