"""FEATHER-style ensemble: attention-selected tokens plus a uniform sample of the image.

Endo et al., "Feather the Throttle: Revisiting Visual Token Pruning for Vision-Language Model
Acceleration" (2024) found that the last token's attention at early layers favours the bottom of the
image (its tokens sit closest to the text), so FastV-style pruning drops the top; keeping a uniform
sample alongside the attention choice restores coverage.
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from ._select import top_k
from .baselines import spread


@register_method("feather", default_layer=2, needs=("attention",))
def feather(ctx: SelectionContext, keep: int, *, uniform_share: float = 0.5) -> torch.Tensor:
    """Keep a uniform grid sample (``uniform_share`` of the budget) and the most attended of the rest.

    Follows FEATHER's ensemble of the attention criterion with uniform sampling; combine it with a
    ``schedule`` (e.g. a light first stage, a heavier one deeper) for its multi-stage form. Deviation:
    the attention criterion is FastV's last-token row at layer K-1, as in ``fastv``.
    """
    if not 0.0 <= uniform_share <= 1.0:
        raise ValueError(f"feather: uniform_share must be in [0, 1], got {uniform_share}")
    scores = ctx.require("attention").float().clone()
    uniform = round(keep * uniform_share)
    if uniform > 0:
        scores[:, spread(ctx, uniform)] = float("inf")  # always kept
    return top_k(scores, keep)
