"""HiPrune: anchor, buffer and register tokens from the image encoder's hierarchical attention.

Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language
Models" (2025).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from ._select import top_k


def _anchor_and_output_layers(options: dict[str, object], output_layer: int) -> tuple[int, ...]:
    anchor = options.get("anchor_layer")
    anchor = output_layer // 2 if anchor is None else anchor
    if isinstance(anchor, bool) or not isinstance(anchor, int) or not 0 <= anchor <= output_layer:
        raise ValueError(
            f"hiprune anchor_layer must be an encoder layer in 0..{output_layer} (the layer whose output "
            f"the model uses), got {anchor!r}"
        )
    return (anchor, output_layer)


@register_method(
    "hiprune", stage="vision", needs=("encoder_attention",), encoder_layers=_anchor_and_output_layers
)
def hiprune(
    ctx: SelectionContext, keep: int, *, anchor_layer: int | None = None, anchor_share: float = 0.1
) -> torch.Tensor:
    """Keep anchor tokens of a middle encoder layer, their grid neighbours, and a deep layer's registers.

    The paper's three token kinds: anchors are the ``round(anchor_share * keep)`` tokens with the most
    attention at ``anchor_layer`` (default: half-way to the output layer, where attention is
    object-centric); buffers are the anchors' 4-neighbours on the patch grid (the best-attended ones if
    they do not all fit); registers fill the rest of the budget with the tokens most attended at the
    output layer (global context). Attention is the CLS query's where the encoder has one, else the
    mean over queries. Our defaults: the anchor layer and share; without a grid there are no buffers.
    """
    attention = ctx.require("encoder_attention")
    anchor_attention, register_attention = attention[min(attention)], attention[max(attention)]
    num_images, num_tokens = anchor_attention.shape
    device = anchor_attention.device
    num_anchors = max(1, min(keep, round(anchor_share * keep)))
    selected = torch.zeros(num_images, num_tokens, dtype=torch.bool, device=device)
    selected.scatter_(1, top_k(anchor_attention, num_anchors), True)

    if ctx.grid is not None and keep > num_anchors:
        rows, cols = ctx.grid
        anchors = selected.view(num_images, rows, cols)
        neighbours = torch.zeros_like(anchors)
        neighbours[:, 1:] |= anchors[:, :-1]
        neighbours[:, :-1] |= anchors[:, 1:]
        neighbours[:, :, 1:] |= anchors[:, :, :-1]
        neighbours[:, :, :-1] |= anchors[:, :, 1:]
        buffers = neighbours.view(num_images, num_tokens) & ~selected
        room = keep - num_anchors
        score = anchor_attention.float().masked_fill(~buffers, float("-inf"))
        fits = torch.minimum(buffers.sum(dim=1), torch.tensor(room, device=device))
        ranked = score.topk(room, dim=1).indices
        chosen = torch.arange(room, device=device)[None] < fits[:, None]
        selected.scatter_(1, ranked, chosen | torch.gather(selected, 1, ranked))

    room = keep - selected.sum(dim=1)
    score = register_attention.float().masked_fill(selected, float("-inf"))
    ranked = score.topk(keep, dim=1).indices
    chosen = torch.arange(keep, device=device)[None] < room[:, None]
    selected.scatter_(1, ranked, chosen | torch.gather(selected, 1, ranked))
    return selected.nonzero()[:, 1].view(num_images, keep)
