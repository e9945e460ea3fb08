"""TransPrune: keep the visual tokens that the decoder layers transform most, guided by the instruction.

Li et al., "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model" (CVPR 2026).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from ._select import min_max, top_k


@register_method("transprune", default_layer=3, needs=("transition", "attention"))
def transprune(ctx: SelectionContext, keep: int, *, alpha: float = 0.5) -> torch.Tensor:
    """Keep tokens with the largest transition variation plus instruction attention (TransPrune).

    As in the paper: token transition variation (TTV) adds up, over the layers since the previous
    pruning stage, the change of each visual token's hidden state in magnitude and in direction; it is
    combined with instruction-guided attention (IGA). Both are min-max normalised per image and mixed as
    ``alpha * TTV + (1 - alpha) * IGA``; ``alpha=1`` is TTV alone, which needs no attention at all.
    Progressive pruning is a ``schedule``; acts at layer 3 by default, so that TTV spans three layers.
    Deviation: IGA is the attention of the prompt's last token (recomputed for that one query row, as
    for FastV), not averaged over every instruction token.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"transprune: alpha must be in [0, 1], got {alpha}")
    score = alpha * min_max(ctx.require("transition"))
    if alpha < 1.0:
        score = score + (1.0 - alpha) * min_max(ctx.require("attention"))
    return top_k(score, keep)
