"""ToMe: merge the most similar tokens between the image encoder's layers, tracking their sizes.

Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023).
"""

from __future__ import annotations

import torch

from ..context import Merged, SelectionContext
from ..kernels import merge_tokens
from ..merge import bipartite_soft_matching
from ..registry import register_method


@register_method("tome", stage="vision", needs=("keys",), per_layer=True, ranges={"r": (0, None)})
def tome(ctx: SelectionContext, keep: int, *, r: int | None = None, proportional: bool = True) -> Merged:
    """Merge similar tokens layer by layer with bipartite soft matching (ToMe), keeping token sizes.

    One call is one merge step: ``ctx.features`` are the tokens entering an encoder layer, ``ctx.keys``
    the keys the previous layer computed for them (averaged over heads, as ToMe's metric) and
    ``ctx.sizes`` the patches each stands for; the result has ``keep`` tokens, size-weighted averages.
    The adapter runs a step before every encoder layer after the first, up to the layer whose output is
    used, merging ``r`` tokens per step (ToMe's constant schedule) or, without ``r``, as evenly as needed
    to end at ``keep_ratio``/``budget``. With ``proportional`` (ToMe's proportional attention) every later
    attention adds ``log(size)`` to each key's logits, so a merged token weighs as the patches it stands
    for. A CLS token is never merged. The merged tokens are laid out as ToMe lays them out (unmerged
    sources, then destinations; see :func:`~tokenprune.merge.bipartite_soft_matching`), so every step pairs
    the tokens ToMe's would on the same inputs; a VLM's language model gets them back in patch order, each
    in its first patch's place, and a standalone encoder returns them in ToMe's layout.

    Deviations: ToMe merges inside each layer, between attention and MLP, with that layer's keys; here
    the merge happens after the MLP (the same matching, half a layer later), so that only the layer inputs
    are touched. The step's merged tokens are averaged in float32 (one kernel on a GPU) rather than in the
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
