"""Token gather: pick rows of a sequence tensor by per-sample indices."""

from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of each sample: ``x [B, L, *rest]``, ``index [B, L']`` -> contiguous ``[B, L', *rest]``.

    ``x`` may have batch size 1 and be broadcast over the batch of ``index`` (rotary tables often are).
    """
    if x.shape[0] == 1 and index.shape[0] > 1:
        x = x.expand(index.shape[0], *x.shape[1:])
    view = index.view(*index.shape, *([1] * (x.dim() - 2)))
    return torch.gather(x, 1, view.expand(*index.shape, *x.shape[2:])).contiguous()
