"""ToMe: merge the most similar tokens inside the image encoder's layers, tracking their sizes.

Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023).
"""

from __future__ import annotations

import torch

from ..context import Merged, SelectionContext
from ..kernels import merge_tokens
from ..merge import bipartite_soft_matching
from ..registry import register_method


@register_method(
    "tome", stage="vision", needs=("keys",), per_layer=True, ranges={"r": (0, None)}, positions="renumbered"
)
def tome(ctx: SelectionContext, keep: int, *, r: int | None = None, proportional: bool = True) -> Merged:
    """Merge similar tokens layer by layer with bipartite soft matching (ToMe), keeping token sizes.

    One call is one merge step, inside an encoder layer between its attention and its MLP, as ToMe's
    ``tome.patch`` block merges: ``ctx.features`` are the layer's tokens there (its input plus its
    attention's output), ``ctx.keys`` the keys that attention computed (averaged over heads, ToMe's
    metric) and ``ctx.sizes`` the patches each token stands for; the result has ``keep`` tokens,
    size-weighted averages, on which the layer's MLP runs. The adapter runs a step in every encoder layer
    up to the one whose output is used, merging ``r`` tokens per step (ToMe's constant schedule) or,
    without ``r``, as evenly as needed to end at ``keep_ratio``/``budget``. With ``proportional`` (ToMe's
    proportional attention) every later attention adds ``log(size)`` to each key's logits, so a merged
    token weighs as the patches it stands for. A CLS token is never merged. The merged tokens are laid out
    as ToMe lays them out (unmerged sources, then destinations; see
    :func:`~tokenprune.merge.bipartite_soft_matching`), so every step pairs the tokens ToMe's would on the
    same inputs (tests/test_parity_tome.py: tiny CLIP, SigLIP, ViT and LLaVA's tower against a
    re-implementation of ``tome.patch``'s block); a VLM's language model gets them back in patch order,
    each in its first patch's place, and a standalone encoder returns them in ToMe's layout. ToMe's code
    has no language model; in a VLM the merged tokens get consecutive positions by default, as an encoder
    handing LLaVA fewer features gets them (Turbo's LLaVA code, ``turbo``'s reference, merges this way and
    does so; the same rule keeps ``turbo`` with ``alpha=0`` equal to ``tome``), and ``positions="original"``
    puts each in its first patch's place.

    Returns the merged tokens, their places and sizes (a :class:`~tokenprune.context.Merged`).

    Deviations: the step's merged tokens are averaged in float32 (one kernel on a GPU) rather than in the
    model's dtype.
    """
    return merge_step(ctx, keep)


def merge_step(ctx: SelectionContext, keep: int, penalty: torch.Tensor | None = None) -> Merged:
    """One bipartite merge step of ``ctx.features`` down to ``keep`` tokens on ``ctx.keys``, sources ranked
    by their match minus ``penalty`` (see :func:`~tokenprune.merge.bipartite_soft_matching`); returns the
    size-weighted averages in ToMe's layout with their sizes."""
    num_tokens = ctx.features.shape[1]
    dest, kept = bipartite_soft_matching(ctx.require("keys"), num_tokens - keep, ctx.protected, penalty)
    sizes = ctx.sizes if ctx.sizes is not None else torch.ones_like(dest, dtype=ctx.features.dtype)
    features, merged_sizes = merge_tokens(ctx.features, sizes, dest, keep)
    return Merged(kept, features, merged_sizes)
