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

    As in the reference: pruning at decoder layer K (default 2), the pivots are the image tokens whose
    key states at layer K-1 (RoPE applied, heads concatenated) have the largest L1 norm; then, pivot by
    pivot, the still-unselected tokens with the lowest cosine similarity to that pivot are kept, an equal
    share of the budget per pivot, and the pivots themselves stay. Deviations: (1) the reference adds 4
    text-token pivots to its 4 image pivots; here all ``pivots`` (8, the reference's total) are image
    tokens, so each pivot's share of the budget is the same. (2) Similarity is on the hidden states
    entering layer K; the reference first applies the model's final RMSNorm. (3) Shares are sized so that
    exactly ``keep`` tokens survive (the reference keeps a few more, e.g. 132 for a budget of 128).
    (4) Pivots are visited in order of position; the reference visits them in the order of a Python set
    of their indices (deterministic: by index modulo the set's table size, neither by position nor norm).
    At ``layer=0`` the keys are layer 0's projections of the input embeddings.
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
