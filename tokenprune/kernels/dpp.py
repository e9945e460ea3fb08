"""Greedy MAP inference of a determinantal point process (DPP) in one kernel: CDPruner's selection, the torch
reference and the dispatch to the Triton kernel.

Each pick is the token of largest remaining gain, its conditional variance given the tokens picked before;
the picks' Cholesky factor grows by one row per pick (Chen et al., "Fast Greedy MAP Inference for
Determinantal Point Process", NeurIPS 2018). A pick depends on the one before it, so a torch loop dispatches a
dozen small ops per kept token: ``keep`` rounds of launches on a GPU. The Triton kernel runs the whole loop
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
    """Torch reference of :func:`greedy_dpp`, in the order of operations of CDPruner's loop, nineteen ops per
    pick: the factor's rows not yet written are zeros, so that each pick projects on all ``keep`` of them
    (one ``bmm``, no slice whose length changes), every value keeps a pick's axis of size 1 (no reshapes),
    and a picked token's score is pushed to ``-inf`` by a penalty (no mask indexed)."""
    num_images, num_tokens = kernel.shape[:2]
    factor = kernel.new_zeros(num_images, keep, num_tokens)  # [I, T, N] a row per pick, as CDPruner's
    gains = torch.diagonal(kernel, dim1=1, dim2=2).unsqueeze(1).clone()  # [I, 1, N] remaining gains
    penalty = torch.zeros_like(gains)
    zero = kernel.new_zeros(())
    picks = []
    for step in range(keep):
        score = torch.nan_to_num(gains, nan=LOWEST, posinf=float("inf"), neginf=LOWEST) + penalty
        pick = score.argmax(dim=2, keepdim=True)  # [I, 1, 1]
        gain = gains.gather(2, pick)
        column = factor.gather(2, pick.expand(num_images, keep, 1))  # [I, T, 1]
        projection = torch.bmm(column.transpose(1, 2), factor)
        difference = kernel.gather(1, pick.expand(num_images, 1, num_tokens)) - projection
        # a gain that is not positive (the kernel's rank spent) updates nothing
        row = torch.where(gain > 0, difference / gain.sqrt(), zero, out=factor.narrow(1, step, 1))
        gains -= row.square()
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
