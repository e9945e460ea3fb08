"""Baselines every honest comparison needs: random and uniform spatial sampling."""

from __future__ import annotations

import math

import torch

from ..context import SelectionContext
from ..registry import register_method
from ._select import top_k

#: 31-bit arithmetic on int64 (no product overflows): the multiplier of the integer hash below.
_HASH_MULTIPLIER = 0x45D9F3B
_BITS31 = 2**31 - 1


def hashed_scores(seed: int, image_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Scores ``[I, N]`` in ``[0, 2**31)``, a hash of (``seed``, each image's ``image_index [I]``, token):
    random-looking, computed on the device, and the same for an image whatever else is in the batch."""
    token = torch.arange(num_tokens, device=image_index.device)
    x = (token + image_index[:, None] * 0x3C6EF37 + (seed % 2**31 + 1) * 0x1B87359) & _BITS31
    for _ in range(2):
        x = (((x >> 16) ^ x) * _HASH_MULTIPLIER) & _BITS31
    return (x >> 16) ^ x


@register_method("random", ranges={"seed": (0, 2**32 - 1)})
def random_selection(ctx: SelectionContext, keep: int, *, seed: int = 0) -> torch.Tensor:
    """Keep a seeded random subset of each image's tokens.

    The scores are a hash of ``seed``, the image's index in its prompt and the token's (see
    :func:`hashed_scores`), so the choice for an image does not depend on what else is in the batch, and
    nothing is read back from the device.
    """
    return top_k(hashed_scores(seed, ctx.image_index, ctx.features.shape[1]), keep)


def evenly_spaced(count: int, total: int) -> torch.Tensor:
    """``count`` indices spread evenly over ``range(total)``, at the centres of equal bins."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * total / count).floor().long()


def grid_sample(keep: int, rows: int, cols: int) -> torch.Tensor:
    """Sorted raster indices of ``keep`` cells spread evenly over a ``rows x cols`` grid.

    Picks a sub-grid with the grid's aspect ratio and at least ``keep`` cells (cell centres), then an
    evenly spaced subset of it when the sub-grid has more cells than asked for.
    """
    sub_rows = min(rows, max(1, round(math.sqrt(keep * rows / cols))))
    sub_cols = min(cols, math.ceil(keep / sub_rows))
    if sub_rows * sub_cols < keep:
        sub_rows = min(rows, math.ceil(keep / sub_cols))
    r = evenly_spaced(sub_rows, rows)
    c = evenly_spaced(sub_cols, cols)
    cells = (r[:, None] * cols + c[None, :]).flatten()
    return cells[evenly_spaced(keep, cells.numel())]


def spread(ctx: SelectionContext, keep: int) -> torch.Tensor:
    """Sorted indices ``[keep]`` spread evenly over the grid (or the token order when there is none)."""
    num_tokens = ctx.features.shape[1]
    index = evenly_spaced(keep, num_tokens) if ctx.grid is None else grid_sample(keep, *ctx.grid)
    return index.to(ctx.features.device)


@register_method("uniform")
def uniform_selection(ctx: SelectionContext, keep: int) -> torch.Tensor:
    """Keep tokens spread evenly over the image's patch grid (content-blind)."""
    return spread(ctx, keep).expand(ctx.features.shape[0], keep).contiguous()
