"""Token gathers and merges: torch references, and the dispatch to the Triton kernels.

Each public function runs the Triton kernel of :mod:`tokenprune.kernels.triton_kernels` when Triton can
run on the tensor (a CUDA tensor, or any tensor under the Triton interpreter, ``TRITON_INTERPRET=1``)
and its torch reference otherwise. Gathers are exact either way.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``: Triton installed, and a GPU tensor or the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _triton():
    from . import triton_kernels

    return triton_kernels


def gather_tokens_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`gather_tokens`."""
    if x.shape[0] == 1 and index.shape[0] > 1:
        x = x.expand(index.shape[0], *x.shape[1:])
    view = index.view(*index.shape, *([1] * (x.dim() - 2)))
    return torch.gather(x, 1, view.expand(*index.shape, *x.shape[2:])).contiguous()


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of each sample: ``x [B, L, *rest]``, ``index [B, L']`` -> contiguous ``[B, L', *rest]``.

    ``x`` may have batch size 1 and be broadcast over the batch of ``index`` (rotary tables often are).
    """
    if use_triton(x):
        return _triton().gather_tokens(x, index)
    return gather_tokens_reference(x, index)


def gather_sequence_reference(
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`gather_sequence`."""
    mask = gather_tokens_reference(attention_mask, index) * valid.to(attention_mask.dtype)
    return gather_tokens_reference(hidden, index), gather_tokens_reference(position_ids, index), mask


def gather_sequence(
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pruned batch in one pass: hidden states ``[B, L', D]``, position ids and 2-D mask ``[B, L']``.

    ``hidden [B, L, D]``, ``position_ids``/``attention_mask [B, L]``, ``index [B, L']`` source rows,
    ``valid [B, L']`` (False on re-padding slots, whose mask becomes 0).
    """
    if use_triton(hidden):
        return _triton().gather_sequence(hidden, position_ids, attention_mask, index, valid)
    return gather_sequence_reference(hidden, position_ids, attention_mask, index, valid)


def gather_kv_reference(
    keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`gather_kv`."""
    return tuple(
        gather_tokens_reference(t.transpose(1, 2), index).transpose(1, 2).contiguous() for t in (keys, values)
    )


def gather_kv(
    keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's keys and values ``[B, H, S, d]`` compacted to the rows ``index [B, S']``."""
    if use_triton(keys):
        return _triton().gather_kv(keys, values, index)
    return gather_kv_reference(keys, values, index)


def merge_tokens_reference(
    x: torch.Tensor, size: torch.Tensor, dest: torch.Tensor, num_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`merge_tokens`."""
    batch, _, dim = x.shape
    weighted = torch.zeros(batch, num_out, dim, dtype=torch.float32, device=x.device)
    weighted.scatter_add_(1, dest[..., None].expand(-1, -1, dim), x.float() * size[..., None].float())
    total = torch.zeros(batch, num_out, dtype=torch.float32, device=x.device).scatter_add_(
        1, dest, size.float()
    )
    return (weighted / total[..., None].clamp_min(1e-12)).to(x.dtype), total.to(size.dtype)


def merge_tokens(
    x: torch.Tensor, size: torch.Tensor, dest: torch.Tensor, num_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the tokens sent to each destination (ToMe's weighted merge).

    ``x [B, N, D]`` tokens, ``size [B, N]`` how many original tokens each stands for, ``dest [B, N]`` in
    ``[0, num_out)``. Returns the merged tokens ``[B, num_out, D]`` (dtype of ``x``, accumulated in
    float32) and their sizes ``[B, num_out]``; a destination nothing is sent to gets zeros.
    The Triton kernel accumulates with atomic adds: sums may differ from the reference in the last bits.
    """
    if use_triton(x):
        return _triton().merge_tokens(x, size, dest, num_out)
    return merge_tokens_reference(x, size, dest, num_out)
