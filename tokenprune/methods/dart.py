"""DART: keep the visual tokens that duplicate a few pivot tokens least.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(2025).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from ..sequence import flagged
from ._select import cosine_similarity_matrix


def _visiting_order(places: torch.Tensor, is_pivot: torch.Tensor) -> torch.Tensor:
    """The order ``[I, P]`` in which the reference visits each image's pivots: of the pivot slots ``[I, P]``,
    those ``is_pivot`` flags, in the order a Python set of their prompt positions ``places [I, P]``, built
    in slot order (the reference's ``set(image_indices + query_indices)``), iterates them; then the others.

    The reference loops over that set, so which pivot chooses first (and takes a contested token) is the
    set's order, which for small ints is the same in every run. Built here with a set too, so that it is
    the reference's in whatever Python runs it: one read of the device, for the ``I * P`` positions.
    """
    orders = []
    for row in torch.where(is_pivot, places, -1).tolist():  # -1: not a pivot
        real = [i for i, place in enumerate(row) if place >= 0]
        slot = {row[i]: i for i in real}
        visited = [slot[place] for place in set([row[i] for i in real])]
        orders.append(visited + [i for i, place in enumerate(row) if place < 0])
    return torch.tensor(orders, dtype=torch.long, device=places.device).view(places.shape)


@register_method(
    "dart",
    default_layer=2,
    needs=("keys", "instruction", "final_norm", "prompt_positions"),
    ranges={"pivots": (1, None), "text_pivots": (0, "pivots")},
)
def dart(
    ctx: SelectionContext, keep: int, *, pivots: int = 8, text_pivots: int | None = None
) -> torch.Tensor:
    """Keep pivot tokens and, per pivot, the tokens least similar to it (DART duplication criterion).

    As in the reference (ZichenWen1/DART, ``get_retained_image_token``; tests/test_parity_dart.py): the
    pivots are the ``pivots - text_pivots`` image tokens and the ``text_pivots`` (default half: the
    reference's 4 of 8) instruction tokens, those after the image, whose key states at layer K-1 (RoPE
    applied, heads concatenated) have the largest L1 norm; then, pivot by pivot, in the order a Python set
    of their prompt positions iterates them (the reference's loop), the image tokens neither pivots nor
    kept yet whose hidden states entering layer K, through the model's final norm, have the lowest cosine
    similarity to the pivot's are kept, and the image pivots stay. The ``keep`` minus image pivots tokens
    are shared evenly over the pivots, the first visited taking one more where it does not divide; an
    instruction shorter than ``text_pivots`` gives fewer pivots. The kept tokens keep their positions, as
    the reference's ``DART_K_norm.forward`` sets ``position_ids = keep_indexs``.

    Returns the kept indices ``[I, keep]``, sorted. Reads the device once, for the pivots' positions (the
    set's order).

    Deviations:
    - exactly ``keep`` survive, pivots included (the contract's exact per-image budget); the reference
      keeps its image pivots on top (132 for 128).
    - float32 scores (the reference's are in the model's dtype, fp16 in its runs).
    - several images in a prompt share its instruction's text pivots (the reference takes one image).
    """
    text_pivots = pivots // 2 if text_pivots is None else text_pivots
    if not 0 <= text_pivots <= pivots:
        raise ValueError(f"dart: text_pivots must be in [0, pivots], got {text_pivots} of {pivots}")
    features = ctx.final_norm(ctx.features) if ctx.final_norm is not None else ctx.features
    num_images, num_tokens = features.shape[:2]
    device = features.device
    num_image_pivots = min(pivots - text_pivots, keep)
    key_norm = ctx.require("keys").float().abs().sum(dim=-1)  # [I, N]
    image_pivots = key_norm.topk(num_image_pivots, dim=1).indices  # [I, P], largest first as the reference's
    pivot_features = [torch.gather(features, 1, image_pivots[..., None].expand(-1, -1, features.shape[-1]))]
    places = [torch.gather(ctx.require("prompt_positions"), 1, image_pivots)]
    is_pivot = torch.ones(num_images, num_image_pivots, dtype=torch.bool, device=device)
    instruction = ctx.instruction
    if instruction is not None and text_pivots > 0:
        text = ctx.final_norm(instruction.features) if ctx.final_norm is not None else instruction.features
        count = min(text_pivots, instruction.mask.shape[1])
        text_norm = instruction.keys.float().abs().sum(dim=-1).masked_fill(~instruction.mask, float("-inf"))
        chosen = text_norm.topk(count, dim=1).indices  # [I, T], largest first
        pivot_features.append(torch.gather(text, 1, chosen[..., None].expand(-1, -1, text.shape[-1])))
        places.append(torch.gather(instruction.positions, 1, chosen))
        is_pivot = torch.cat([is_pivot, torch.gather(instruction.mask, 1, chosen)], dim=1)
    similarity = cosine_similarity_matrix(torch.cat(pivot_features, dim=1), features)  # [I, P, N]
    order = _visiting_order(torch.cat(places, dim=1), is_pivot)  # [I, P]
    similarity = torch.gather(similarity, 1, order[..., None].expand(-1, -1, num_tokens))  # in that order

    selected = torch.zeros(num_images, num_tokens, dtype=torch.bool, device=device)
    selected.scatter_(1, image_pivots, True)
    remaining = keep - num_image_pivots
    total = is_pivot.sum(dim=1, keepdim=True).clamp_min(1)  # pivots of each image
    turn = torch.arange(is_pivot.shape[1], device=device)[None]  # the real pivots come first in ``order``
    shares = torch.where(turn < total, remaining // total + (turn < remaining % total).long(), 0)  # [I, P]
    most = remaining // num_image_pivots + 1 if num_image_pivots else remaining  # the largest share
    slot = torch.arange(min(most, num_tokens), device=device)
    for p in range(is_pivot.shape[1]):
        score = (-similarity[:, p]).masked_fill(selected, float("-inf"))
        ranked = score.topk(slot.numel(), dim=1).indices
        taken = slot[None] < shares[:, p : p + 1]
        selected.scatter_(1, ranked, taken | torch.gather(selected, 1, ranked))
    return flagged(selected, keep)
