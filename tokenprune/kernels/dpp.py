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
    """Torch reference of :func:`greedy_dpp`, in the order of operations of CDPruner's loop."""
    num_images, num_tokens = kernel.shape[:2]
    rows = torch.arange(num_images, device=kernel.device)
    factor = kernel.new_zeros(keep, num_images, num_tokens)  # [T, I, N] a row per pick, as CDPruner's
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # [I, N] each token's remaining gain
    selected = torch.zeros(num_images, num_tokens, dtype=torch.bool, device=kernel.device)
    picks = []
    for step in range(keep):
        score = torch.where(gains > LOWEST, gains, LOWEST).masked_fill(selected, float("-inf"))
        pick = score.argmax(dim=1)
        gain = gains[rows, pick]
        projection = torch.einsum("ti,tin->in", factor[:step, rows, pick], factor[:step])
        positive = gain > 0  # else the kernel's rank is spent: the pick updates nothing
        row = (kernel[rows, pick] - projection) / torch.where(positive, gain, 1.0).sqrt().unsqueeze(-1)
        row = torch.where(positive.unsqueeze(-1), row, 0.0)
        factor[step] = row
        gains = gains - row.square()
        selected[rows, pick] = True
        picks.append(pick)
    return torch.stack(picks, dim=1).sort(dim=1).values


def greedy_dpp(kernel: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` tokens of each image that greedy MAP inference of the DPP of ``kernel [I, N, N]``
    (symmetric positive semi-definite, float32) picks: each the token of largest remaining gain (the lowest
    index among equal ones), its gain then conditioned on it. A pick whose gain is not positive (the kernel's
    rank spent) conditions nothing. Returns ``[I, keep]``, sorted."""
    if use_triton(kernel):
        return _triton().greedy_dpp(kernel, keep)
    return greedy_dpp_reference(kernel, keep)
