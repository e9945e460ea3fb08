"""Attention rows recomputed from projections, so that no attention kernel has to return weights."""

from __future__ import annotations

import torch


def query_attention(
    query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Softmax attention of a few query rows over all keys, averaged over heads and query rows.

    Args:
        query: ``[B, H, Q, d]`` query states (RoPE applied) of the rows of interest.
        keys: ``[B, H_kv, L, d]`` key states (RoPE applied); ``H`` must be a multiple of ``H_kv`` (GQA).
        key_mask: ``[B, L]`` bool, the keys each query may attend to (causal and padding).
        scaling: the layer's softmax scale (usually ``d ** -0.5``).

    Returns:
        ``[B, L]`` float32 attention weights; masked keys get 0. Costs O(B * H * Q * L), never O(L^2).
    """
    groups = query.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scaling  # [B, H, Q, L]
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=(1, 2))
