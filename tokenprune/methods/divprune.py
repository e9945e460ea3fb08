"""DivPrune: keep the most diverse subset of visual tokens (max-min diversity).

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (CVPR 2025).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from ._select import cosine_similarity_matrix


@register_method("divprune")
def divprune(ctx: SelectionContext, keep: int) -> torch.Tensor:
    """Greedy max-min diversity over cosine distance of the projected visual tokens (DivPrune).

    As in the reference: distance is ``1 - cosine similarity`` of the visual tokens entering the language
    model; the first token is the one farthest from its nearest neighbour, and each next token is the one
    whose distance to the nearest already-selected token is largest.
    """
    distance = 1.0 - cosine_similarity_matrix(ctx.features, ctx.features)  # [I, N, N]
    num_images, num_tokens = distance.shape[:2]
    rows = torch.arange(num_images, device=distance.device)
    eye = torch.eye(num_tokens, dtype=torch.bool, device=distance.device)
    first = distance.masked_fill(eye, float("inf")).amin(dim=2).argmax(dim=1)  # [I]
    selected = torch.zeros(num_images, num_tokens, dtype=torch.bool, device=distance.device)
    selected[rows, first] = True
    nearest = distance[rows, first]  # [I, N] distance to the nearest selected token
    for _ in range(keep - 1):
        pick = nearest.masked_fill(selected, float("-inf")).argmax(dim=1)
        selected[rows, pick] = True
        nearest = torch.minimum(nearest, distance[rows, pick])
    return selected.nonzero()[:, 1].view(num_images, keep)
