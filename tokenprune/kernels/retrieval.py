"""A decode step's per-image top-k of attention, written as the step's attention masks, in one kernel.

A ``kv`` method that keeps each image's ``keep`` most attended tokens (``sparsevila``) selects in every
layer of every decode step. As torch ops that is a score matmul, a softmax, a mean, a gather, a top-k and
the scatters that build the mask: a few dozen launches per layer, more than the layer's own attention.
The Triton kernel does it in one program per image: each head's softmax over the cache slots its last
query may see (online, block by block), averaged over the heads at the image's tokens, the ``keep``
largest found by a radix search on their float bits (ties to the lowest index), and the two masks
written in place. Where Triton cannot run, the hooks call the method itself: that torch path is the
reference this kernel equals (``tests/test_retrieval.py``), up to float32 rounding of the scores.
"""

from __future__ import annotations

import torch

from .gather import _triton


def attention_top_k(
    query: torch.Tensor,
    key: torch.Tensor,
    allowed: torch.Tensor,
    positions: torch.Tensor,
    sample: torch.Tensor,
    keep: int,
    scaling: float,
    attend: torch.Tensor,
    visible: torch.Tensor,
) -> None:
    """Hide each image's tokens outside its ``keep`` most attended from a decode step's queries.

    Args:
        query: the step's queries ``[B, H, T, d]``; the last one ranks.
        key: the layer's cached keys, this step's included ``[B, H_kv, C, d]`` (``H`` a multiple of ``H_kv``).
        allowed: the slots the last query may see ``[B, C]`` bool (contiguous).
        positions: the cache slot of each image's tokens ``[I, N]``; ``sample`` the batch row of each ``[I]``.
        keep: tokens kept per image; ``scaling`` the attention's score scale.
        attend: the step's attention mask ``[B, 1, T, C]`` bool (contiguous), set to False in place at every
            token of an image not kept.
        visible: ``[B, L]`` bool over the prompt (contiguous), set to True in place at every kept token.
    """
    if query.stride(3) != 1 or key.stride(3) != 1:
        raise ValueError("attention_top_k needs the head dimension of the query and keys contiguous")
    _triton().attention_top_k(query, key, allowed, positions, sample, keep, scaling, attend, visible)
