"""HiPrune: anchor, buffer and register tokens from the image encoder's hierarchical attention.

Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language
Models" (2025); reference code github.com/Danielement321/HiPrune (``LlavaMetaForCausalLM.encode_images``).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from ..sequence import grid_neighbours
from ._select import shallow_and_output_layers

#: The reference's object layer for CLIP (``HIPRUNE_OBJECT_LAYER=9``, counted from 1).
OBJECT_LAYER = 8


def _neighbours(ctx: SelectionContext, num_tokens: int) -> torch.Tensor | None:
    """Each token's flat neighbours ``[I, N, 4]`` at offsets -1, +1, -cols and +cols of its patch grid,
    clamped to it, as the reference computes HiPrune's buffers (so they wrap across rows at the grid's
    edges); ``None`` where the tokens form no grid."""
    if ctx.grid_neighbours is not None:
        return ctx.grid_neighbours
    if ctx.grid is None:
        return None
    whole = torch.full((num_tokens,), num_tokens, device=ctx.features.device)
    neighbours = grid_neighbours(torch.zeros_like(whole), whole, torch.full_like(whole, ctx.grid[1]))
    return neighbours.expand(ctx.features.shape[0], -1, -1)


def _anchors_and_buffers(
    attention: torch.Tensor, num_anchors: int, neighbours: torch.Tensor | None
) -> torch.Tensor:
    """Mask ``[I, N]`` of the ``num_anchors`` tokens of highest ``attention`` and of their buffers, their
    ``neighbours [I, N, 4]`` (none without them)."""
    num_images, num_tokens = attention.shape
    chosen = attention.topk(num_anchors, dim=1).indices
    if neighbours is not None:
        buffers = torch.gather(neighbours, 1, chosen[:, :, None].expand(-1, -1, neighbours.shape[2]))
        chosen = torch.cat([chosen, buffers.flatten(1)], dim=1)
    mask = torch.zeros(num_images, num_tokens, dtype=torch.bool, device=attention.device)
    return mask.scatter_(1, chosen, True)


def _first_then_best(
    first: torch.Tensor, first_score: torch.Tensor, then_score: torch.Tensor, keep: int
) -> torch.Tensor:
    """Sorted indices ``[I, keep]``: the tokens of mask ``first [I, N]`` (the best ``keep`` by
    ``first_score`` if there are more), then the rest of the budget by ``then_score`` among the others."""
    taken = first.sum(dim=1, keepdim=True).clamp(max=keep)
    firsts = first_score.float().masked_fill(~first, float("-inf")).topk(keep, dim=1).indices
    thens = then_score.float().masked_fill(first, float("-inf")).topk(keep, dim=1).indices
    slot = torch.arange(keep, device=first.device)[None]
    from_then = torch.gather(thens, 1, (slot - taken).clamp(min=0))
    return torch.where(slot < taken, firsts, from_then).sort(dim=1).values


@register_method(
    "hiprune",
    stage="vision",
    needs=("encoder_attention",),
    encoder_layers=shallow_and_output_layers("hiprune", "anchor_layer", OBJECT_LAYER),
    encoder_queries="all",
    ranges={"anchor_layer": (0, None), "alpha": (0, 1)},
    positions="renumbered",
)
def hiprune(
    ctx: SelectionContext, keep: int, *, anchor_layer: int | None = None, alpha: float = 0.1
) -> torch.Tensor:
    """Keep anchor tokens of a middle encoder layer, their neighbours, and the output layer's registers.

    As in the reference: attention is what each patch receives, averaged over heads and over every query
    (the CLS one included). Anchors are the ``round(keep * alpha / 5)`` patches most attended at
    ``anchor_layer`` (default 8, the reference's object layer 9 counted from 1, or the output layer of a
    shallower encoder); buffers are the patches at flat offsets -1, +1, -cols and +cols of each anchor
    (cols: the grid's width, the reference's 24), clamped to ``[0, N)``, so ``alpha`` counts anchors with
    their buffers; registers fill the rest of the budget with the other patches most attended at the
    output layer (the layer whose output the model uses).

    In a VLM the language model sees the kept patches at consecutive positions by default, as the
    reference's LLaVA code selects ``image_feature[index_mask]`` in ``prepare_inputs_labels_for_multimodal``
    before it builds the sequence and numbers it (``positions="original"`` keeps their places). Its
    Qwen2.5-VL script (``Qwen2_5_VL/qwen2_5_vl_HiPrune.py``) gathers the kept tokens' multimodal position
    ids instead: a method has one default rule, here its LLaVA code's, and ``positions="original"`` gives
    the Qwen script's.

    Deviations:
    - attention is recomputed in float32 from queries and keys (FlashAttention/SDPA give no weights).
    - exact budget: anchors and buffers beyond ``keep`` (the reference fails) keep the best at anchor_layer.
    - without a patch grid (an image size other than the encoder's) anchors get no buffers.
    - LLaVA-NeXT/OneVision (the reference's LLaVA-NeXT code splits the budget evenly over the tiles, keeps
      buffers in each tile's grid and packs without the unpadding and the newline tokens): one budget over
      the image's packed tokens, newline tokens kept, buffers in the base tile's grid or the stitched
      high-resolution one, forced by the exact budget and keep-all contract (see
      :mod:`tokenprune.patches.anyres_vision`).
    """
    attention = ctx.require("encoder_attention")
    anchor_attention, register_attention = attention[min(attention)], attention[max(attention)]
    neighbours = _neighbours(ctx, anchor_attention.shape[1])
    anchored = _anchors_and_buffers(anchor_attention, round(keep * alpha / 5), neighbours)
    return _first_then_best(anchored, anchor_attention, register_attention, keep)
