"""SparseVILA-style decode-time retrieval: every decode step attends to the visual KV entries its query
scores highest, in each layer, while the cache keeps them all.

"SparseVILA: Decoupling Visual Sparsity for Efficient VLM Inference" (2025).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from ._select import top_k


@register_method("sparsevila", stage="kv", needs=("attention",), attention_top_k=True)
def sparsevila(ctx: SelectionContext, keep: int) -> torch.Tensor:
    """At each decode step and layer, attend only to the visual KV entries the current query scores most.

    Prefill is not pruned and every visual token stays in the cache, so a later question can reach
    tokens an earlier one did not need. ``ctx.attention`` is the softmax attention of the step's (last)
    query over the cached keys, averaged over heads, taken at each image's tokens; the ``keep`` best of
    each image stay visible for that step and layer, text and generated tokens always. Our choices: the
    ranking is the step's own attention row, recomputed for the last query from the layer's projections
    (O(cache length) per layer, so sdpa and FlashAttention keep running), and the other visual entries
    are masked for the step, which is exact but saves no attention compute without a sparse kernel.
    Where Triton runs, each layer's selection is one kernel and its attention sdpa's
    (:func:`tokenprune.kernels.retrieval.attention_top_k`); this function is that kernel's reference.
    """
    return top_k(ctx.require("attention"), keep)
