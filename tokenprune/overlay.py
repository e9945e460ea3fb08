"""A picture of which visual tokens were kept: the image with its dropped patches darkened."""

from __future__ import annotations

import math
import os
import pathlib

import torch
from PIL import Image, ImageDraw, ImageFont

#: The short side of the drawn image is at least this many pixels (small images are upscaled).
MIN_SHORT_SIDE = 384
#: Height in pixels of the title band above the image.
TITLE_HEIGHT = 28
#: Brightness of a dropped patch, as a fraction of its greyscale value.
DROPPED_BRIGHTNESS = 0.3
KEPT_OUTLINE = (255, 210, 0)


def overlay_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """The ``(width, height)`` of the overlay drawn for an image of ``image_size`` (``(width, height)``).

    The image is scaled by ``max(1, MIN_SHORT_SIDE / short side)`` (rounded to whole pixels) and a
    ``TITLE_HEIGHT`` band is added on top.
    """
    width, height = image_size
    scale = max(1.0, MIN_SHORT_SIDE / min(width, height))
    return round(width * scale), round(height * scale) + TITLE_HEIGHT


def render_overlay(image: Image.Image, keep: torch.Tensor, grid: tuple[int, int]) -> Image.Image:
    """Draw ``image`` with the dropped patches of ``grid`` greyed and darkened and the kept ones outlined.

    Args:
        image: the image the tokens came from (the region the vision tower saw, e.g. its centre crop).
        keep: bool ``[rows * cols]``, one flag per visual token in row-major order, True where kept.
        grid: ``(rows, cols)`` of the image's tokens; the grid is laid evenly over the whole image.

    Returns:
        A new RGB image of size :func:`overlay_size`, titled ``"kept K/N"``.
    """
    rows, cols = grid
    keep = torch.as_tensor(keep).detach().cpu()
    if keep.dtype != torch.bool or keep.dim() != 1 or keep.numel() != rows * cols:
        raise ValueError(
            f"keep must be a bool tensor of {rows * cols} flags for a {rows}x{cols} grid, "
            f"got dtype {keep.dtype} and shape {tuple(keep.shape)}"
        )
    width, height = overlay_size(image.size)
    height -= TITLE_HEIGHT
    upscale = width / image.width
    resample = Image.Resampling.NEAREST if upscale >= 2 else Image.Resampling.BICUBIC
    picture = image.convert("RGB").resize((width, height), resample)
    dimmed = picture.convert("L").point(lambda v: int(v * DROPPED_BRIGHTNESS)).convert("RGB")

    xs = [round(c * width / cols) for c in range(cols + 1)]
    ys = [round(r * height / rows) for r in range(rows + 1)]
    flags = keep.view(rows, cols).tolist()
    for r in range(rows):
        for c in range(cols):
            if not flags[r][c]:
                box = (xs[c], ys[r], xs[c + 1], ys[r + 1])
                picture.paste(dimmed.crop(box), box[:2])
    draw = ImageDraw.Draw(picture)
    line = max(1, math.ceil(min(width / cols, height / rows) / 24))
    for r in range(rows):
        for c in range(cols):
            if flags[r][c]:
                draw.rectangle((xs[c], ys[r], xs[c + 1] - 1, ys[r + 1] - 1), outline=KEPT_OUTLINE, width=line)

    canvas = Image.new("RGB", (width, height + TITLE_HEIGHT), (24, 24, 24))
    canvas.paste(picture, (0, TITLE_HEIGHT))
    title = f"kept {int(keep.sum())}/{keep.numel()}"
    font = ImageFont.load_default(size=TITLE_HEIGHT - 10)
    ImageDraw.Draw(canvas).text((8, TITLE_HEIGHT // 2), title, fill=(240, 240, 240), font=font, anchor="lm")
    return canvas


def first_image_keep(stats, input_ids: torch.Tensor, image_token_id: int, per_image: int, sample: int = 0):
    """The keep flags (bool ``[per_image]``, on the CPU) of the first image of ``sample`` in the prefill
    that ``stats`` (a :class:`~tokenprune.pruner.PruneStats` with a ``keep_mask``) describes: the flags of
    the prompt's first ``per_image`` image-token positions, the layout a LLaVA-style prompt has."""
    image_positions = input_ids[sample] == image_token_id
    return stats.keep_mask[sample][image_positions][:per_image].cpu()


def save_overlay(
    image: Image.Image, keep: torch.Tensor, grid: tuple[int, int], path: str | os.PathLike
) -> pathlib.Path:
    """Save :func:`render_overlay` of ``image``, ``keep`` and ``grid`` as a PNG at ``path``.

    Dropped patches are greyed and darkened, kept ones outlined, under a ``"kept K/N"`` title; the file's
    size is :func:`overlay_size` of ``image.size`` (short side of the picture at least 384 px, plus a
    28 px title band). Parent directories are created. Returns the path written.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_overlay(image, keep, grid).save(path, format="PNG")
    return path
