"""Triton kernels for :mod:`tokenprune.kernels.gather`: one program per output row and feature block.

Imported only when Triton can run (a GPU, or the interpreter under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_coverage import _greedy_coverage_kernel, greedy_coverage  # noqa: F401  (SCOPE's loop, its module)
from .triton_dpp import greedy_dpp  # noqa: F401  (CDPruner's loop: a module of its own)

BLOCK_D = 128


@triton.jit
def _gather_rows_kernel(
    x_ptr,
    index_ptr,
    out_ptr,
    out_len,
    dim,
    stride_xb,
    stride_xl,
    stride_xd,
    stride_ib,
    stride_il,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)  # b * out_len + j
    b = row // out_len
    j = row % out_len
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < dim
    src = tl.load(index_ptr + b * stride_ib + j * stride_il)
    values = tl.load(x_ptr + b * stride_xb + src * stride_xl + cols * stride_xd, mask=keep)
    tl.store(out_ptr + row * dim + cols, values, mask=keep)


@triton.jit
def _gather_sequence_kernel(
    hidden_ptr,
    pos_ptr,
    mask_ptr,
    index_ptr,
    valid_ptr,
    out_hidden_ptr,
    out_pos_ptr,
    out_mask_ptr,
    out_len,
    dim,
    stride_hb,
    stride_hl,
    stride_hd,
    stride_pb,
    stride_pl,
    stride_mb,
    stride_ml,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)  # b * out_len + j
    b = row // out_len
    block = tl.program_id(1)
    src = tl.load(index_ptr + row)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    keep = cols < dim
    values = tl.load(hidden_ptr + b * stride_hb + src * stride_hl + cols * stride_hd, mask=keep)
    tl.store(out_hidden_ptr + row * dim + cols, values, mask=keep)
    if block == 0:  # one program per row also writes its position and mask
        tl.store(out_pos_ptr + row, tl.load(pos_ptr + b * stride_pb + src * stride_pl))
        mask = tl.load(mask_ptr + b * stride_mb + src * stride_ml)
        valid = tl.load(valid_ptr + row).to(mask.dtype)
        tl.store(out_mask_ptr + row, mask * valid)


@triton.jit
def _gather_kv_kernel(
    k_ptr,
    v_ptr,
    index_ptr,
    out_k_ptr,
    out_v_ptr,
    heads,
    out_len,
    dim,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)  # (b * heads + h) * out_len + j
    j = row % out_len
    bh = row // out_len
    b = bh // heads
    h = bh % heads
    src = tl.load(index_ptr + b * out_len + j)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < dim
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + src * stride_ks + cols * stride_kd, mask=keep)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + src * stride_vs + cols * stride_vd, mask=keep)
    tl.store(out_k_ptr + row * dim + cols, k, mask=keep)
    tl.store(out_v_ptr + row * dim + cols, v, mask=keep)


@triton.jit
def _merge_kernel(
    x_ptr,
    size_ptr,
    dest_ptr,
    acc_ptr,
    total_ptr,
    num_in,
    num_out,
    dim,
    stride_xb,
    stride_xn,
    stride_xd,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)  # b * num_in + i
    b = row // num_in
    i = row % num_in
    block = tl.program_id(1)
    dest = tl.load(dest_ptr + row)
    size = tl.load(size_ptr + row).to(tl.float32)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    keep = cols < dim
    x = tl.load(x_ptr + b * stride_xb + i * stride_xn + cols * stride_xd, mask=keep).to(tl.float32)
    tl.atomic_add(acc_ptr + (b * num_out + dest) * dim + cols, x * size, mask=keep)
    if block == 0:
        tl.atomic_add(total_ptr + b * num_out + dest, size)


def _block(dim: int) -> int:
    return min(BLOCK_D, triton.next_power_of_2(dim))


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    batch, out_len = index.shape
    rest = x.shape[2:]
    flat = x.reshape(x.shape[0], x.shape[1], -1)  # a view when the trailing dims allow it
    dim = flat.shape[2]
    out = torch.empty(batch, out_len, *rest, dtype=x.dtype, device=x.device)
    stride_b = 0 if x.shape[0] == 1 else flat.stride(0)  # batch-broadcast rotary tables
    grid = (batch * out_len, triton.cdiv(dim, _block(dim)))
    _gather_rows_kernel[grid](
        flat,
        index,
        out,
        out_len,
        dim,
        stride_b,
        flat.stride(1),
        flat.stride(2),
        index.stride(0),
        index.stride(1),
        BLOCK=_block(dim),
    )
    return out


def gather_sequence(hidden, position_ids, attention_mask, index, valid):
    batch, out_len = index.shape
    dim = hidden.shape[2]
    index, valid = index.contiguous(), valid.contiguous()
    out_hidden = torch.empty(batch, out_len, dim, dtype=hidden.dtype, device=hidden.device)
    out_pos = torch.empty(batch, out_len, dtype=position_ids.dtype, device=hidden.device)
    out_mask = torch.empty(batch, out_len, dtype=attention_mask.dtype, device=hidden.device)
    mask = attention_mask.to(torch.int8) if attention_mask.dtype == torch.bool else attention_mask
    out = out_mask.to(torch.int8) if attention_mask.dtype == torch.bool else out_mask
    position_ids = position_ids.expand(batch, -1)
    grid = (batch * out_len, triton.cdiv(dim, _block(dim)))
    _gather_sequence_kernel[grid](
        hidden,
        position_ids,
        mask,
        index,
        valid,
        out_hidden,
        out_pos,
        out,
        out_len,
        dim,
        hidden.stride(0),
        hidden.stride(1),
        hidden.stride(2),
        position_ids.stride(0),
        position_ids.stride(1),
        mask.stride(0),
        mask.stride(1),
        BLOCK=_block(dim),
    )
    return out_hidden, out_pos, out.to(attention_mask.dtype)


def gather_kv(keys, values, index):
    batch, heads, _, dim = keys.shape
    out_len = index.shape[1]
    index = index.contiguous()
    out_k = torch.empty(batch, heads, out_len, dim, dtype=keys.dtype, device=keys.device)
    out_v = torch.empty(batch, heads, out_len, dim, dtype=values.dtype, device=values.device)
    grid = (batch * heads * out_len, triton.cdiv(dim, _block(dim)))
    _gather_kv_kernel[grid](
        keys,
        values,
        index,
        out_k,
        out_v,
        heads,
        out_len,
        dim,
        *keys.stride(),
        *values.stride(),
        BLOCK=_block(dim),
    )
    return out_k, out_v


def merge_tokens(x, size, dest, num_out):
    batch, num_in, dim = x.shape
    acc = torch.zeros(batch, num_out, dim, dtype=torch.float32, device=x.device)
    total = torch.zeros(batch, num_out, dtype=torch.float32, device=x.device)
    grid = (batch * num_in, triton.cdiv(dim, _block(dim)))
    _merge_kernel[grid](
        x,
        size.contiguous(),
        dest.contiguous(),
        acc,
        total,
        num_in,
        num_out,
        dim,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        BLOCK=_block(dim),
    )
    return (acc / total[..., None].clamp_min(1e-12)).to(x.dtype), total.to(size.dtype)


@triton.jit
def _larger(a, b):
    return tl.maximum(a, b)


@triton.jit
def _smaller(a, b):
    return tl.minimum(a, b)


@triton.jit
def _greedy_select_kernel(
    matrix_ptr,
    relevance_ptr,
    first_ptr,
    out_ptr,
    num_tokens,
    keep,
    penalty,
    MMR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One image's greedy loop. ``MMR``: pick the max of ``relevance - penalty * running max similarity``;
    else (max-min): the max of the running min distance. The running row starts at the first pick's row."""
    image = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < num_tokens
    matrix = matrix_ptr + image * num_tokens * num_tokens
    pick = tl.load(first_ptr + image).to(tl.int32)  # as the argmax below
    tl.store(out_ptr + image * keep, pick)
    selected = cols == pick
    running = tl.load(matrix + pick * num_tokens + cols, mask=inside, other=0.0)
    if MMR:
        relevance = tl.load(relevance_ptr + image * num_tokens + cols, mask=inside, other=0.0)
    for step in range(1, keep):
        score = relevance - penalty * running if MMR else running
        score = tl.where(selected | ~inside, float("-inf"), score)
        # reductions by combine functions of this module: in the test suite's process the interpreter
        # fails on tl.max / tl.min of triton.language.standard ("Cannot call @triton.jit'd outside of the
        # scope of a kernel")
        best = tl.reduce(score, 0, _larger)
        pick = tl.reduce(tl.where(score == best, cols, BLOCK), 0, _smaller)  # lowest index of the max: argmax
        tl.store(out_ptr + image * keep + step, pick)
        selected = selected | (cols == pick)
        row = tl.load(matrix + pick * num_tokens + cols, mask=inside, other=0.0)
        running = tl.maximum(running, row) if MMR else tl.minimum(running, row)


def greedy_select(matrix, relevance, first, keep, penalty):
    """Triton version of :func:`~tokenprune.kernels.greedy.greedy_mmr` (``relevance`` given) and
    :func:`~tokenprune.kernels.greedy.greedy_max_min` (``relevance`` None): one program per image."""
    num_images, num_tokens = matrix.shape[:2]
    matrix = matrix.float().contiguous()
    out = torch.empty(num_images, keep, dtype=torch.long, device=matrix.device)
    mmr = relevance is not None
    _greedy_select_kernel[(num_images,)](
        matrix,
        relevance.float().contiguous() if mmr else matrix,
        first.contiguous(),
        out,
        num_tokens,
        keep,
        penalty,
        MMR=mmr,
        BLOCK=triton.next_power_of_2(num_tokens),
        enable_fp_fusion=False,  # relevance - penalty * running rounded as torch rounds it, not fused
    )
    return out.sort(dim=1).values


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _slot_scores(keys, slots, sees, query, dims, in_dims, stride_kc, scaling):
    """The scaled scores of ``query`` (float32) against the keys of cache ``slots``: -inf where it does not
    see the slot."""
    block = tl.load(
        keys + slots[:, None] * stride_kc + dims[None, :], mask=sees[:, None] & in_dims[None, :], other=0.0
    )
    score = tl.reduce(block.to(tl.float32) * query[None, :], 1, _add) * scaling
    return tl.where(sees, score, float("-inf"))


@triton.jit
def _attention_top_k_kernel(
    query_ptr,
    key_ptr,
    allowed_ptr,
    positions_ptr,
    sample_ptr,
    attend_ptr,
    visible_ptr,
    num_slots,
    num_tokens,
    prompt_length,
    num_new,
    keep,
    scaling,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kc,
    HEADS: tl.constexpr,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One image: the softmax of each head's last query over the cache slots it may see, averaged over the
    heads at the image's tokens; the ``keep`` largest (ties to the lowest index) stay visible, every other
    token of the image is hidden from all the step's queries in ``attend [B, 1, T, C]`` and marked visible
    in ``visible [B, L]``."""
    image = tl.program_id(0).to(tl.int64)
    row = tl.load(sample_ptr + image)
    dims = tl.arange(0, BLOCK_D)
    in_dims = dims < HEAD_DIM
    tokens = tl.arange(0, BLOCK_N)
    in_image = tokens < num_tokens
    positions = tl.load(positions_ptr + image * num_tokens + tokens, mask=in_image, other=0)
    sees_token = tl.load(allowed_ptr + row * num_slots + positions, mask=in_image, other=0) != 0
    slots = tl.arange(0, BLOCK_C)
    attention = tl.full([BLOCK_N], 0.0, tl.float32)
    for head in range(HEADS):
        query = query_ptr + row * stride_qb + head * stride_qh + (num_new - 1) * stride_qt  # the last query
        query = tl.load(query + dims, mask=in_dims, other=0.0).to(tl.float32)
        keys = key_ptr + row * stride_kb + (head // GROUPS) * stride_kh
        top = tl.full([1], -1e30, tl.float32)  # finite: a block of hidden slots adds exp(-inf) = 0
        total = tl.full([1], 0.0, tl.float32)
        for start in range(0, num_slots, BLOCK_C):  # online softmax over the slots
            slot = start + slots
            sees = tl.load(allowed_ptr + row * num_slots + slot, mask=slot < num_slots, other=0) != 0
            score = _slot_scores(keys, slot, sees, query, dims, in_dims, stride_kc, scaling)
            new_top = tl.maximum(top, tl.reduce(score, 0, _larger))
            total = total * tl.exp(top - new_top) + tl.reduce(tl.exp(score - new_top), 0, _add)
            top = new_top
        score = _slot_scores(keys, positions, sees_token, query, dims, in_dims, stride_kc, scaling)
        attention += tl.exp(score - top) / total
    attention = attention / HEADS
    # the keep-th largest value by a radix search on its bits (non-negative floats order as their bits)
    bits = tl.where(in_image, attention.to(tl.int32, bitcast=True), -1)
    threshold = tl.full([1], 0, tl.int32)
    for step in range(31):
        candidate = threshold | (1 << (30 - step))
        count = tl.reduce((bits >= candidate).to(tl.int32), 0, _add)
        threshold = tl.where(count >= keep, candidate, threshold)
    above = bits > threshold
    tied = bits == threshold
    room = keep - tl.reduce(above.to(tl.int32), 0, _add)
    kept = above | (tied & (tl.associative_scan(tied.to(tl.int32), 0, _add) <= room))
    tl.store(visible_ptr + row * prompt_length + positions, kept, mask=in_image & kept)
    hidden = in_image & ~kept
    for new in range(num_new):
        tl.store(attend_ptr + (row * num_new + new) * num_slots + positions, False, mask=hidden)


def attention_top_k(query, key, allowed, positions, sample, keep, scaling, attend, visible):
    """Triton version of :func:`tokenprune.kernels.retrieval.attention_top_k`: one program per image. Returns
    ``attend`` and ``visible``, written in place."""
    heads, num_new, head_dim = query.shape[1:]
    num_images, num_tokens = positions.shape
    num_slots = key.shape[2]
    _attention_top_k_kernel[(num_images,)](
        query,
        key,
        allowed,
        positions,
        sample,
        attend,
        visible,
        num_slots,
        num_tokens,
        visible.shape[1],
        num_new,
        keep,
        scaling,
        query.stride(0),
        query.stride(1),
        query.stride(2),
        key.stride(0),
        key.stride(1),
        key.stride(2),
        HEADS=heads,
        GROUPS=heads // key.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_C=min(64, triton.next_power_of_2(num_slots)),
        BLOCK_N=triton.next_power_of_2(num_tokens),
    )
    return attend, visible
