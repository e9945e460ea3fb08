"""Triton kernel of :func:`tokenprune.kernels.dpp.greedy_dpp`: one program per image.

Imported only when Triton can run (a GPU, or the interpreter under ``TRITON_INTERPRET=1``), through
:mod:`tokenprune.kernels.triton_kernels`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Earlier factor rows read per iteration of the projection loop (their loads issued together).
UNROLL = 4


@triton.jit
def _dpp_argmax(value, index, other_value, other_index):
    """The larger value and its index; the lower index of equal values (``argmax``'s tie rule). Only
    ``triton.language.core`` in these kernels: under the interpreter, in a process that imported Triton
    before ``TRITON_INTERPRET`` was set (the test suite's), ``triton.language.standard`` (``tl.max``,
    ``tl.argmax``, ``tl.zeros``...) is compiled code the interpreter cannot call."""
    other = (other_value > value) | ((other_value == value) & (other_index < index))
    return tl.where(other, other_value, value), tl.where(other, other_index, index)


@triton.jit
def _greedy_dpp_kernel(
    kernel_ptr,
    factor_ptr,
    out_ptr,
    num_tokens,
    keep,
    BLOCK: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """One image's greedy MAP loop: pick the largest gain, write the factor's new row (the pick's kernel row
    less its projection on the earlier rows, over the root of its gain) and take its square off the gains.
    The projection adds the earlier rows one at a time, in order (no reduction: the interpreter runs a
    reduction by a combine function of ours element by element)."""
    image = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < num_tokens
    kernel = kernel_ptr + image * num_tokens * num_tokens
    factor = factor_ptr + image * keep * num_tokens  # [keep, N]: the factor's rows, one per pick
    gains = tl.load(kernel + cols * (num_tokens + 1), mask=inside, other=0.0)  # the diagonal
    selected = ~inside
    for step in range(keep):
        # NaN and -inf gains rank lowest, above the picked tokens; ties to the lowest index, as argmax
        score = tl.where(gains > -3.4028234663852886e38, gains, -3.4028234663852886e38)
        score = tl.where(selected, float("-inf"), score)
        gain, pick = tl.reduce((score, cols), 0, _dpp_argmax)  # the gain: the pick's, or lowest if not finite
        tl.store(out_ptr + image * keep + step, pick)
        projection = tl.full([BLOCK], 0.0, tl.float32)
        for start in range(0, step, UNROLL):
            for offset in tl.static_range(UNROLL):
                index = cols * 0 + start + offset  # as a block: a mask of the interpreter's dtype
                before = index < step
                earlier = factor + index * num_tokens
                at = tl.load(earlier + pick, mask=before, other=0.0)  # the earlier row at the pick
                projection += at * tl.load(earlier + cols, mask=inside & before, other=0.0)
        row = tl.load(kernel + pick.to(tl.int64) * num_tokens + cols, mask=inside, other=0.0)
        positive = gain > 0  # else the kernel's rank is spent: the pick updates nothing
        root = tl.sqrt_rn(tl.where(positive, gain, 1.0))
        row = tl.where(positive, tl.div_rn(row - projection, root), 0.0)
        tl.store(factor + step * num_tokens + cols, row, mask=inside)
        tl.debug_barrier()  # the row is read back by the next picks, by other threads
        gains = gains - row * row
        selected = selected | (cols == pick)


def greedy_dpp(kernel: torch.Tensor, keep: int) -> torch.Tensor:
    """Triton version of :func:`~tokenprune.kernels.dpp.greedy_dpp`: one program per image."""
    num_images, num_tokens = kernel.shape[:2]
    kernel = kernel.float().contiguous()
    out = torch.empty(num_images, keep, dtype=torch.long, device=kernel.device)
    factor = torch.empty(num_images, keep, num_tokens, dtype=torch.float32, device=kernel.device)
    block = triton.next_power_of_2(num_tokens)
    _greedy_dpp_kernel[(num_images,)](
        kernel,
        factor,
        out,
        num_tokens,
        keep,
        BLOCK=block,
        UNROLL=UNROLL,
        num_warps=min(16, max(4, block // 256)),
        enable_fp_fusion=False,  # each product rounded before it is added, as torch rounds it
    )
    return out.sort(dim=1).values
