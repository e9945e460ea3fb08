"""FastV: drop the visual tokens that the prompt's last token attends to least, at an early layer.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
Large Vision-Language Models" (ECCV 2024).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from ._select import top_k


@register_method("fastv", default_layer=2, needs=("attention",))
def fastv(ctx: SelectionContext, keep: int) -> torch.Tensor:
    """Keep the visual tokens the last prompt token attends to most at layer K-1 (FastV).

    Follows the reference: the attention map of layer K-1 (averaged over heads), the row of the last
    token, ranks the image tokens; the top ones are kept from layer K on (K=2 by default). Deviation:
    the row is recomputed from layer K-1's query/key projections and RoPE for that one query, so that
    sdpa and FlashAttention keep running; it equals the eager attention weights. At ``layer=0`` the map of
    layer 0 itself is used.
    """
    return top_k(ctx.require("attention"), keep)
