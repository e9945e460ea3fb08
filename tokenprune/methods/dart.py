"""DART: keep the visual tokens that duplicate a few pivot tokens least.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(2025).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from ._select import cosine_similarity_matrix


@register_method("dart", default_layer=2, needs=("keys",))
def dart(ctx: SelectionContext, keep: int, *, pivots: int = 8) -> torch.Tensor:
    """Keep pivot tokens and, per pivot, the tokens least similar to it (DART duplication criterion).

    As in the reference (ZichenWen1/DART, ``get_retained_image_token``; tests/test_parity_dart.py): the
    pivots are the image tokens whose key states at layer K-1 (RoPE applied, heads concatenated) have the
    largest L1 norm; then, pivot by pivot, the image tokens neither pivots nor kept yet whose hidden states
    entering layer K have the lowest cosine similarity to the pivot's are kept, and the pivots stay. The
    ``keep - pivots`` tokens are shared evenly, the first pivots taking one more where it does not divide.

    Deviations:
    - all 8 pivots are image tokens; the reference takes 4 of its 8 from the text after the image.
    - no final RMSNorm before the cosine (the reference's; only its per-channel weight changes a cosine).
    - exactly ``keep`` survive, pivots included; the reference keeps its pivots on top (132 for 128).
    - pivots are visited by position; the reference visits them in a Python set's order.
    - float32 scores (the reference's are in the model's dtype, fp16 in its runs).
    """
    features = ctx.features
    num_images, num_tokens = features.shape[:2]
    num_pivots = min(pivots, keep)
    key_norm = ctx.require("keys").float().abs().sum(dim=-1)  # [I, N]
    pivot_index = key_norm.topk(num_pivots, dim=1).indices.sort(dim=1).values  # [I, P], by position
    selected = torch.zeros(num_images, num_tokens, dtype=torch.bool, device=features.device)
    selected.scatter_(1, pivot_index, True)
    pivot_features = torch.gather(features, 1, pivot_index[..., None].expand(-1, -1, features.shape[-1]))
    similarity = cosine_similarity_matrix(pivot_features, features)  # [I, P, N]
    remaining = keep - num_pivots
    for p in range(num_pivots):
        share = remaining // num_pivots + (1 if p < remaining % num_pivots else 0)
        if share == 0:
            continue
        score = (-similarity[:, p]).masked_fill(selected, float("-inf"))
        selected.scatter_(1, score.topk(share, dim=1).indices, True)
    return selected.nonzero()[:, 1].view(num_images, keep)
