"""Position ids after pruning: kept as they were, or renumbered so that the kept tokens close up.

tokenprune keeps each kept token's original position by default (``positions="original"``): RoPE then
sees the same distances between kept tokens as in the unpruned prompt. ``positions="renumbered"`` closes
the gaps that the dropped tokens leave, as the forks that prune by slicing the sequence and counting
positions again do: the layers after a pruning stage see the kept tokens as if the prompt had held only
them.

The rule, on positions of one or several axes (multimodal RoPE: time, height, width), within each prompt:
a kept token that starts (its smallest axis) more than one past the largest position of the kept tokens
before it moves down, on every axis alike, by that gap, and every token after it with it. With one axis the
kept tokens of a prompt get consecutive positions from its first one. With Qwen-VL's three, renumbering is
not per axis: an image's tokens all start at the image's first position (time axis), so the kept tokens of
an image keep their time/height/width offsets (their place in the image) and move with the image's start;
the text after the image follows the largest kept position, as the model's own rule places text after an
image's largest position. (A video frame whose kept tokens all lie more than one past the kept ones before
it closes that gap too.) Keeping every token moves nothing.
"""

from __future__ import annotations

import torch

#: Values of :attr:`tokenprune.PrunerConfig.positions`.
POSITIONS = ("original", "renumbered")

_PROMPT_STRIDE = 1 << 40  # positions of one prompt lie below it: prompts of a packed row kept apart


def renumbering_shift(
    positions: torch.Tensor, kept: torch.Tensor, sequence: torch.Tensor | None = None
) -> torch.Tensor:
    """How far each token's position moves down when the gaps between kept tokens close ``[B, L]``.

    Args:
        positions: ``[A, B, L]`` non-negative position ids on ``A`` axes (1 for RoPE, 3 for Qwen-VL's).
        kept: ``[B, L]`` the tokens that stay (real tokens only: padding and dropped tokens are False).
        sequence: ``[B, L]`` the prompt of each token in a padding-free row of several prompts (numbered
            from 0 along the row), or ``None`` for one prompt a row.

    Returns:
        ``[B, L]`` the shift, to subtract from every axis: the gaps (see the module) summed over the kept
        tokens of the prompt up to and including each token. Costs a fixed number of ops, whatever ``L``.
    """
    low, high = positions.amin(dim=0), positions.amax(dim=0)
    offset = (torch.zeros_like(low) if sequence is None else sequence) * _PROMPT_STRIDE
    reached = torch.where(kept, offset + high, -1).cummax(dim=1).values  # largest kept position so far
    before = torch.nn.functional.pad(reached[:, :-1], (1, 0), value=-1)
    follows = kept & (before >= offset)  # a kept token of its own prompt comes before it
    gap = torch.where(follows, (offset + low - before - 1).clamp_min(0), 0)
    total = gap.cumsum(dim=1)
    if sequence is None:
        return total
    # each prompt's own sum: less what the prompts before it in the row added (its first token adds none)
    start = torch.full_like(total, torch.iinfo(total.dtype).max).scatter_reduce(1, sequence, total, "amin")
    return total - torch.gather(start, 1, sequence)
