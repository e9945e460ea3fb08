"""Greedy MAP inference of a determinantal point process (DPP) in one kernel: CDPruner's selection, the torch
reference and the dispatch to the Triton kernel.

Each pick is the token of largest remaining gain, its conditional variance given the tokens picked before;
the picks' Cholesky factor grows by one row per pick (Chen et al., "Fast Greedy MAP Inference for
Determinantal Point Process", NeurIPS 2018). A pick depends on the one before it, so a torch loop dispatches
sixteen small ops per kept token: ``keep`` rounds of launches on a GPU. The Triton kernel runs the whole loop
in one program per image, the gains in registers and the factor's rows in a scratch buffer. It sums each new
row's projection on the earlier rows in blocks of rows where the reference calls ``einsum`` (the order of
CDPruner's code): the float32 rounding of the gains may differ, so the two keep the same tokens unless two
gains lie within that rounding (tests/test_kernels.py). The kernel matrix is computed before, the same on
both paths.
"""

from __future__ import annotations

import torch

from .gather import _triton, use_triton

#: The lowest finite float32: where a gain is NaN or -inf, so that no picked token is ever picked again.
LOWEST = torch.finfo(torch.float32).min


def greedy_dpp_reference(kernel: torch.Tensor, keep: int) -> torch.Tensor:
    """Torch reference of :func:`greedy_dpp`, in the order of operations of CDPruner's loop, sixteen small ops
    per pick and no allocation but their results: the factor's rows not yet written are zeros, so that each
    pick projects on all ``keep`` of them (one ``bmm``, no slice whose length changes), every value keeps a
    pick's axis of size 1 (no reshapes), each row is written in the factor's memory, and a picked token's
    score is pushed to ``-inf`` by a penalty (no mask indexed). The pick's gain is the maximum of the scores,
    which equals its gain wherever that is positive, the only case in which the gain is used."""
    num_images, num_tokens = kernel.shape[:2]
    factor = kernel.new_zeros(num_images, keep, num_tokens)  # [I, T, N] a row per pick, as CDPruner's
    by_token = factor.transpose(1, 2)  # [I, N, T] a token's column of the factor
    gains = torch.diagonal(kernel, dim1=1, dim2=2).unsqueeze(1).clone()  # [I, 1, N] remaining gains
    score, penalty = torch.empty_like(gains), torch.zeros_like(gains)
    zero = kernel.new_zeros(())
    picks = []
    for row in factor.split(1, dim=1):
        torch.nan_to_num(gains, nan=LOWEST, posinf=float("inf"), neginf=LOWEST, out=score)
        score += penalty
        gain, pick = score.max(dim=2, keepdim=True)  # [I, 1, 1] each, the lowest index among equal gains
        column = by_token.gather(1, pick.expand(num_images, 1, keep))
        difference = kernel.gather(1, pick.expand(num_images, 1, num_tokens))
        difference -= torch.bmm(column, factor)
        difference /= gain.sqrt()
        torch.where(gain > zero, difference, zero, out=row)  # a gain not positive (the rank spent): no update
        gains -= row * row
        penalty.scatter_(2, pick, float("-inf"))
        picks.append(pick)
    return torch.cat(picks, dim=1).view(num_images, keep).sort(dim=1).values


def greedy_dpp(kernel: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` tokens of each image that greedy MAP inference of the DPP of ``kernel [I, N, N]``
    (symmetric positive semi-definite, float32) picks: each the token of largest remaining gain (the lowest
    index among equal ones), its gain then conditioned on it. A pick whose gain is not positive (the kernel's
    rank spent) conditions nothing. Returns ``[I, keep]``, sorted."""
    if use_triton(kernel):
        return _triton().greedy_dpp(kernel, keep)
    return greedy_dpp_reference(kernel, keep)
