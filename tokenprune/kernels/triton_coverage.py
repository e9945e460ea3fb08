"""Triton kernel of SCOPE's greedy loop (:func:`tokenprune.kernels.greedy.greedy_coverage`): one program per
image. Re-exported by :mod:`tokenprune.kernels.triton_kernels`, through which the dispatcher runs it.

Imported only when Triton can run (a GPU, or the interpreter under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .greedy import coverage_units

#: Triton's own combine functions, for ``tl.reduce``: the interpreter reduces with numpy where it sees them
#: (it runs any other combine function element by element, in Python), and ``tl.sum``/``tl.max``/``tl.min``
#: fail under the interpreter in a process that imported Triton before switching it on (the test suite's).
_SUM, _MAX, _MIN = tl.standard._sum_combine, tl.standard._elementwise_max, tl.standard._elementwise_min


@triton.jit
def _greedy_coverage_kernel(
    matrix_ptr,
    saliency_ptr,
    covered_ptr,
    out_ptr,
    num_tokens,
    keep,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One image's SCOPE loop on the similarities in int32 units (:func:`.greedy.coverage_units`). Each step
    sums, for every candidate (a column), its coverage terms over the matrix's rows ``ROWS`` at a time, in
    int64; ``covered`` (a zeroed scratch row per image) holds each row's coverage, which the step after a
    pick reads in blocks of rows."""
    image = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < num_tokens
    rows = tl.arange(0, ROWS)
    matrix = matrix_ptr + image * num_tokens * num_tokens
    covered_row = covered_ptr + image * num_tokens
    saliency = tl.load(saliency_ptr + image * num_tokens + cols, mask=inside, other=0.0)
    covered = tl.full([BLOCK], 0, tl.int32)
    selected = cols >= num_tokens  # nothing yet
    for step in range(0, keep):
        gain = tl.full([BLOCK], 0, tl.int64)
        for start in range(0, num_tokens, ROWS):
            row = start + rows
            valid = row < num_tokens
            cover = tl.load(covered_row + row, mask=valid, other=0)
            tile = tl.load(
                matrix + row[:, None] * num_tokens + cols[None, :],
                mask=valid[:, None] & inside[None, :],
                other=0,
            )
            terms = tl.maximum(tile - cover[:, None], 0)
            gain += tl.reduce(terms.to(tl.int64), 0, _SUM)
        score = tl.where(selected | ~inside, float("-inf"), gain.to(tl.float32) * saliency)
        best = tl.reduce(score, 0, _MAX)
        pick = tl.reduce(tl.where(score == best, cols, BLOCK), 0, _MIN)  # lowest index of the max: argmax
        tl.store(out_ptr + image * keep + step, pick)
        selected = selected | (cols == pick)
        covered = tl.maximum(covered, tl.load(matrix + pick * num_tokens + cols, mask=inside, other=0))
        tl.debug_barrier()  # every thread is done reading this step's coverage before it changes
        tl.store(covered_row + cols, covered, mask=inside)
        tl.debug_barrier()  # and the next step reads it whole


def greedy_coverage(similarity, saliency, keep):
    """Triton version of :func:`~tokenprune.kernels.greedy.greedy_coverage`: one program per image."""
    num_images, num_tokens = similarity.shape[:2]
    units = coverage_units(similarity).contiguous()
    covered = torch.zeros(num_images, num_tokens, dtype=torch.int32, device=similarity.device)
    out = torch.empty(num_images, keep, dtype=torch.long, device=similarity.device)
    block = triton.next_power_of_2(num_tokens)
    _greedy_coverage_kernel[(num_images,)](
        units,
        saliency.float().contiguous(),
        covered,
        out,
        num_tokens,
        keep,
        ROWS=max(1, min(16, 8192 // block)),
        BLOCK=block,
        num_warps=8,
        enable_fp_fusion=False,  # the terms and scores rounded as torch rounds them, not fused
    )
    return out.sort(dim=1).values
