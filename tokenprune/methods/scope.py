"""SCOPE: patches chosen greedily for the coverage they add, weighted by their saliency.

Deng et al., "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodal LLMs" (NeurIPS 2025).
Reference: github.com/kinredon/SCOPE (commit 6bf7306), ``scope/clip_encoder.py`` (``CLIPVisionTower_SCOPE``
and ``SCOPE``) and ``scope/main.py`` (``SCOPE``, with the ``ALPHA`` and ``COMBINED`` its scripts set).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..kernels import greedy_coverage
from ..registry import register_method
from ._select import cosine_similarity_matrix


@register_method(
    "scope",
    stage="vision",
    needs=("encoder_attention",),
    ranges={"alpha": (0, None)},
    positions="renumbered",
)
def scope(ctx: SelectionContext, keep: int, *, alpha: float = 1.0) -> torch.Tensor:
    """Greedy saliency-coverage: each next patch maximises its CLS attention to the power ``alpha`` times the
    coverage it adds.

    As in the reference (kinredon/SCOPE, ``scope/clip_encoder.py``, ``SCOPE``; tests/test_parity_scope.py):
    at the encoder layer whose output the model uses, similarity is the cosine of the patches' features
    (that layer's output), saliency the CLS query's attention to each patch (heads averaged; the reference
    sums them, a constant factor per image that ranks alike). Each patch is covered by its largest
    similarity to a selected patch (0 before any); a candidate's gain is the sum over all patches of how much
    its similarity exceeds their coverage, and the next patch is the one of largest ``gain * saliency **
    alpha`` (the reference's default ``COMBINED=multi`` and ``ALPHA=1.0``), ties to the lowest index. The
    ``keep`` selected patches reach the language model in patch order, at consecutive positions by default
    (the reference hands LLaVA only the kept features).

    Deviations:
    - float32 similarities, gains and scores (the reference computes them in the model's dtype).
    - similarities rounded to multiples of 2**-24 and gains summed exactly in those units (the reference's
      float sum depends on its device's order; the one Triton program per image and the torch loop must pick
      alike).
    - attention recomputed from the output layer's queries and keys (FlashAttention/SDPA give no weights).
    - an encoder without a CLS token (SigLIP, Qwen-VL's tower): every query's attention, averaged.
    - LLaVA-NeXT/OneVision (the reference splits the budget evenly over the tiles, each chosen alone, and
      drops the newline tokens): one budget over an image's tokens that survive the unpadding, similarity of
      projected features, newline tokens kept (see :mod:`tokenprune.patches.anyres_vision`).
    """
    (attention,) = ctx.require("encoder_attention").values()
    saliency = attention.float() ** alpha
    similarity = cosine_similarity_matrix(ctx.features, ctx.features)  # [I, N, N]
    return greedy_coverage(similarity, saliency, keep)
