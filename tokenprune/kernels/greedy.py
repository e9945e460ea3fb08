"""Greedy subset selection in one kernel: max-min diversity (DivPrune) and maximal marginal relevance
(IDPruner), torch references and the dispatch to the Triton kernel.

A greedy pick depends on the one before it, so a torch loop dispatches a few small ops per kept token:
``keep`` rounds of launches on a GPU. The Triton kernel runs the whole loop in one program per image, the
image's running score in registers and one row of the pairwise matrix read per pick; it equals the
reference exactly (the same float32 arithmetic, ties to the lowest index as ``argmax``). The pairwise
matrix is one batched matmul before it, the same on both paths.
"""

from __future__ import annotations

import torch

from .gather import _triton, use_triton


def greedy_max_min_reference(distance: torch.Tensor, first: torch.Tensor, keep: int) -> torch.Tensor:
    """Torch reference of :func:`greedy_max_min`."""
    num_images, num_tokens = distance.shape[:2]
    rows = torch.arange(num_images, device=distance.device)
    selected = torch.zeros(num_images, num_tokens, dtype=torch.bool, device=distance.device)
    selected[rows, first] = True
    picks = [first]
    nearest = distance[rows, first]  # [I, N] distance to the nearest selected token
    for _ in range(keep - 1):
        pick = nearest.masked_fill(selected, float("-inf")).argmax(dim=1)
        selected[rows, pick] = True
        picks.append(pick)
        nearest = torch.minimum(nearest, distance[rows, pick])
    return torch.stack(picks, dim=1).sort(dim=1).values


def greedy_max_min(distance: torch.Tensor, first: torch.Tensor, keep: int) -> torch.Tensor:
    """Max-min diversity: from ``first [I]``, each next token is the one farthest from its nearest selected
    token, by ``distance [I, N, N]`` (float32). Returns the ``keep`` selected indices ``[I, keep]``,
    sorted."""
    if use_triton(distance):
        return _triton().greedy_select(distance, None, first, keep, 0.0)
    return greedy_max_min_reference(distance, first, keep)


def greedy_mmr_reference(
    similarity: torch.Tensor, relevance: torch.Tensor, penalty: float, first: torch.Tensor, keep: int
) -> torch.Tensor:
    """Torch reference of :func:`greedy_mmr`."""
    num_images, num_tokens = relevance.shape
    rows = torch.arange(num_images, device=relevance.device)
    selected = torch.zeros(num_images, num_tokens, dtype=torch.bool, device=relevance.device)
    selected[rows, first] = True
    picks = [first]
    redundancy = similarity[rows, first]  # [I, N] max similarity to the selected set
    for _ in range(keep - 1):
        pick = (relevance - penalty * redundancy).masked_fill(selected, float("-inf")).argmax(dim=1)
        selected[rows, pick] = True
        picks.append(pick)
        redundancy = torch.maximum(redundancy, similarity[rows, pick])
    return torch.stack(picks, dim=1).sort(dim=1).values


def greedy_mmr(
    similarity: torch.Tensor, relevance: torch.Tensor, penalty: float, first: torch.Tensor, keep: int
) -> torch.Tensor:
    """Maximal marginal relevance: from ``first [I]``, each next token maximises ``relevance [I, N]`` less
    ``penalty`` times its largest ``similarity [I, N, N]`` (float32) to a selected token. Returns the
    ``keep`` selected indices ``[I, keep]``, sorted."""
    if use_triton(similarity):
        return _triton().greedy_select(similarity, relevance, first, keep, penalty)
    return greedy_mmr_reference(similarity, relevance, penalty, first, keep)
