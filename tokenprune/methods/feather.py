"""FEATHER: a RoPE-free attention criterion, a uniform grid kept beside it, attention alone later on.

Endo et al., "Feather the Throttle: Revisiting Visual Token Pruning for Vision-Language Model
Acceleration" (ICCV 2025) found that FastV's criterion, the last token's attention at an early layer,
favours the bottom of the image because RoPE brings those tokens closest to the text, so the top is
pruned away. FEATHER scores with that attention computed without RoPE, keeps a strided grid of the
image beside the most attended tokens at its first stage, and prunes again deeper by attention alone.
The reference prunes a 32-layer model at layers 8 and 16: ``schedule=((8, 0.3), (16, 0.09))``.
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from ._select import top_k
from .baselines import evenly_spaced


@register_method(
    "feather", default_layer=2, needs=("unrotated_logits",), variable_count=True, ranges={"stride": (1, None)}
)
def feather(ctx: SelectionContext, keep: int, *, stride: int = 3, exact_budget: bool = True) -> torch.Tensor:
    """Keep a grid of every ``stride``-th row and column and the most attended tokens (RoPE-free attention).

    Follows the reference (markendo/FEATHER): tokens are scored by the prompt's last token's attention
    at layer K-1, computed without RoPE, softmax over the image's tokens, averaged over heads. The first
    stage keeps the union of the grid (rows and columns 0, ``stride``, 2 ``stride``... from the top
    left; every ``stride**2``-th token where there is no grid) and the most attended tokens; the later
    stages of a ``schedule`` keep the most attended tokens alone.

    With ``exact_budget`` (the default) every stage keeps exactly ``keep`` tokens: the first, the grid
    and the ``keep - len(grid)`` most attended other tokens, which is the reference's union at the
    attention count where that union holds ``keep`` tokens (a budget under the grid's size keeps
    ``keep`` grid cells spread evenly over it). ``exact_budget=False`` keeps what the reference keeps:
    the union of the grid and the top ``int(ratio * tokens)`` (``keep`` for a budget), between that
    count and that count plus the grid, per image; a later stage keeps ``int(ratio * tokens present)``.
    As the reference, the kept tokens keep their positions (its ``LlamaModel.forward`` gathers
    ``position_ids[:, keep_indexs]``).

    Deviations:
    - exact_budget (default): each stage keeps exactly ``keep``, not the reference's variable count.
    - float32 scores (the reference rounds the softmax to the model's dtype before averaging heads).
    - without a grid, every ``stride**2``-th token is the sample (the reference assumes a square grid).
    """
    scores = unrotated_attention(ctx)
    count = keep if exact_budget else reference_count(ctx, keep)
    if ctx.stage > 0:
        return top_k(scores, count)
    grid = grid_sample(ctx, stride)
    if not exact_budget:
        return union_rows(scores, grid, count)
    if keep < grid.numel():
        return grid[evenly_spaced(keep, grid.numel()).to(grid.device)].expand(scores.shape[0], keep)
    forced = scores.clone()
    forced[:, grid] = float("inf")  # scores are probabilities: the grid ranks first
    return top_k(forced, keep)


def unrotated_attention(ctx: SelectionContext) -> torch.Tensor:
    """FEATHER's criterion ``[I, N]``: RoPE-free logits, softmax over each image's tokens, heads averaged."""
    return ctx.require("unrotated_logits").float().softmax(dim=1).mean(dim=2)


def grid_sample(ctx: SelectionContext, stride: int) -> torch.Tensor:
    """Raster indices of every ``stride``-th row and column of the grid from the top left (without a
    grid, every ``stride**2``-th token from the first): the reference's uniform sample."""
    device = ctx.features.device
    if ctx.grid is None:
        return torch.arange(0, ctx.features.shape[1], stride * stride, device=device)
    rows, cols = ctx.grid
    row = torch.arange(0, rows, stride, device=device)
    col = torch.arange(0, cols, stride, device=device)
    return (row[:, None] * cols + col[None, :]).flatten()


def reference_count(ctx: SelectionContext, keep: int) -> int:
    """How many tokens the reference ranks by attention: ``int(ratio * tokens present)`` for a stage
    given as a ratio (at least 1), else the budget ``keep``."""
    if ctx.keep_ratio is None:
        return keep
    return max(1, int(ctx.keep_ratio * ctx.features.shape[1]))


def union_rows(scores: torch.Tensor, grid: torch.Tensor, count: int) -> torch.Tensor:
    """The union of ``grid`` and each row's ``count`` top ``scores``, sorted ``[I, W]``.

    Rows hold different numbers of tokens, so each is padded to ``W = min(N, count + len(grid))`` by
    repeating its last index (a repeat keeps nothing more): one width, with no read of the device.
    """
    num_images, num_tokens = scores.shape
    member = torch.zeros_like(scores, dtype=torch.bool)
    member.scatter_(1, torch.topk(scores, count, dim=1).indices, True)
    member[:, grid] = True
    positions = torch.arange(num_tokens, device=scores.device).expand(num_images, num_tokens)
    width = min(num_tokens, count + grid.numel())
    index = torch.where(member, positions, num_tokens).sort(dim=1).values[:, :width]
    last = torch.where(member, positions, -1).amax(dim=1, keepdim=True)
    return torch.where(index == num_tokens, last, index)
