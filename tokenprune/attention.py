"""Attention rows recomputed from projections, so that no attention kernel has to return weights."""

from __future__ import annotations

import torch


def query_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_mask: torch.Tensor | None,
    scaling: float,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of a few query rows over all keys, averaged over heads and query rows.

    Args:
        query: ``[B, H, Q, d]`` query states (RoPE applied) of the rows of interest.
        keys: ``[B, H_kv, L, d]`` key states (RoPE applied); ``H`` must be a multiple of ``H_kv`` (GQA).
        key_mask: ``[B, L]`` bool, the keys each query may attend to (causal and padding); ``None``: all.
        scaling: the layer's softmax scale (usually ``d ** -0.5``).
        key_bias: ``[B, L]`` added to every query's logits (e.g. proportional attention's ``log(size)``).

    Returns:
        ``[B, L]`` float32 attention weights; masked keys get 0. Costs O(B * H * Q * L), never O(L^2).
    """
    scores = query_logits(query, keys, scaling)  # a new tensor: worked on in place from here
    if key_bias is not None:
        scores += key_bias[:, None, None, :]
    if key_mask is not None:
        scores.masked_fill_(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1, out=scores).mean(dim=(1, 2))


def query_logits(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Attention logits ``[B, H, Q, L]`` of the query rows ``[B, H, Q, d]`` over the keys
    ``[B, H_kv, L, d]``, each key head shared by ``H / H_kv`` query heads (GQA); computed in ``dtype``
    (float32 unless the caller follows a reference that computes them in the model's)."""
    groups = query.shape[1] // keys.shape[1]
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)
    return torch.matmul(query.to(dtype), keys.to(dtype).transpose(-1, -2)).mul_(scaling)


def causal_rows_attention(
    query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor, row_mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Softmax attention of several query rows, each over the keys it may see, averaged over heads and
    over the rows that ``row_mask`` counts, in the queries' dtype as TransPrune's reference computes its
    instruction attention (logits and averages in the model's dtype, the softmax in float32, then back).

    Args:
        query: ``[B, H, Q, d]`` query states (RoPE applied).
        keys: ``[B, H_kv, L, d]`` key states (RoPE applied).
        key_mask: ``[B, Q, L]`` bool, the keys each row may attend to (causal and padding); at least one.
        row_mask: ``[B, Q]`` bool, the rows averaged (the others fill a ragged batch); at least one.
        scaling: the layer's softmax scale.

    Returns:
        ``[B, L]`` attention weights in the queries' dtype. Costs O(B * H * Q * L).
    """
    dtype = query.dtype
    scores = query_logits(query, keys, scaling, dtype).masked_fill(~key_mask[:, None], float("-inf"))
    per_row = scores.softmax(dim=-1, dtype=torch.float32).to(dtype).mean(dim=1)  # [B, Q, L], heads averaged
    total = (per_row * row_mask[..., None]).sum(dim=1, dtype=torch.float32)
    return (total / row_mask.sum(dim=1, keepdim=True)).to(dtype)  # a mean over the rows, rounded once
