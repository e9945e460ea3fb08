"""Density-peak clustering of tokens (DPC-KNN) and merging each cluster into its centre, batched over groups
of tokens of different sizes and cluster counts."""

from __future__ import annotations

import torch

from ..kernels import merge_tokens


def cluster_merge(
    features: torch.Tensor, valid: torch.Tensor, count: torch.Tensor, neighbours: int, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cluster the ``valid [G, S]`` tokens of each of ``G`` groups of ``features [G, S, D]`` around ``count
    [G]`` centres each (at most its valid tokens) by DPC-KNN, and merge each cluster into its centre.

    Distances are Euclidean over ``sqrt(D)`` (0 to itself); a token's density is ``exp(-mean squared
    distance)`` to its ``min(neighbours, count)`` nearest valid tokens (itself included); its score is the
    density times the distance to the nearest denser token (the largest distance of the group for the
    densest); the ``count`` highest scores are the centres (ties to the lower index). Every other valid token
    joins its nearest centre (ties to the lower index), and a centre that others joined becomes ``beta`` times
    itself plus ``1 - beta`` times their mean. Returns the centres ``[G, S]``, the tokens with each centre
    merged ``[G, S, D]`` (float32) and how many tokens each centre stands for ``[G, S]`` (itself and those
    that joined).
    """
    groups, places, dim = features.shape
    features = features.float()
    inf = float("inf")
    dist = torch.cdist(features, features) / dim**0.5  # [G, S, S]
    dist.diagonal(dim1=1, dim2=2).zero_()  # exactly: a matrix product leaves rounding there
    outside = ~valid[:, None, :]
    width = min(neighbours, places)
    nearest = dist.masked_fill(outside, inf).topk(width, dim=-1, largest=False).values  # [G, S, width]
    k = count.clamp(max=neighbours)[:, None, None]
    within = torch.arange(width, device=features.device) < k
    density = torch.exp(-torch.where(within, nearest.square(), 0).sum(dim=-1) / k[..., 0].clamp(min=1))
    farthest = dist.masked_fill(outside | ~valid[:, :, None], -inf).flatten(1).amax(dim=1)  # [G]
    denser = ~outside & (density[:, None, :] > density[:, :, None])  # [G, i, j]: j denser than i
    reach = torch.minimum(dist.masked_fill(~denser, inf).amin(dim=-1), farthest[:, None])
    score = torch.where(valid, reach * density, -inf)
    rank = score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    centres = valid & (rank < count[:, None])
    joins = dist.masked_fill(~centres[:, None, :], inf).argmin(dim=-1)  # [G, S] nearest centre
    dest = torch.where(valid & ~centres, joins, places)  # centres and padding: to a spare slot
    ones = torch.ones(groups, places, device=features.device)
    means, joined = merge_tokens(features, ones, dest, places + 1)
    means, joined = means[:, :places], joined[:, :places]
    merged = torch.where((joined > 0)[..., None], beta * features + (1 - beta) * means, features)
    return centres, merged, joined + 1
