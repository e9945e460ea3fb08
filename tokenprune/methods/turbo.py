"""Turbo: merge the least informative tokens inside the image encoder's layers.

Ju et al., "Turbo: Informativity-Driven Acceleration Plug-In for Vision-Language Large Models" (ECCV
2024); reference code github.com/anakin-skywalker-Joseph/Folder (``BLIP_turbo/turbo/merge.py``,
``bipartite_unimodal_matching``, and ``BLIP_turbo/turbo/patch/turbo.py``, ``TurboBlock``).
"""

from __future__ import annotations

from ..context import Merged, SelectionContext
from ..registry import register_method
from .tome import merge_step

#: The reference's fixed factor on the semantic value (``alpha * 30 * a_cls``), so that ``alpha=1``
#: balances CLS attention (a probability, ~1/N) against cosine similarity (in [-1, 1]).
SEMANTIC_SCALE = 30.0


def _merging_layers(options: dict[str, object], output_layer: int) -> tuple[int, ...]:
    """The encoder layers whose keys and CLS attention a merge step reads (every layer up to the output
    layer: the step in layer ``i`` reads layer ``i``'s attention); ``alpha`` is checked by its declared
    range when the config is built."""
    return tuple(range(output_layer + 1))


@register_method(
    "turbo",
    stage="vision",
    needs=("keys", "encoder_attention"),
    per_layer=True,
    encoder_layers=_merging_layers,
    ranges={"r": (0, None), "alpha": (0, None)},
    positions="renumbered",
)
def turbo(
    ctx: SelectionContext, keep: int, *, r: int | None = None, proportional: bool = True, alpha: float = 1.0
) -> Merged:
    """Merge the least informative tokens layer by layer: redundant (ToMe's match) and little attended by CLS.

    One call is one merge step, as :func:`~tokenprune.methods.tome.tome`'s (inside each layer between
    its attention and its MLP, as the reference's ``TurboBlock``; same schedule, ``r``,
    ``keep_ratio``/``budget``, proportional attention, ToMe's layout; a CLS token is never merged), with
    Turbo's information degree in place of ToMe's similarity: each source token's mutual redundancy (its
    cosine similarity to its best destination, on the keys of the layer's attention averaged over heads)
    minus its semantic value, ``30 * alpha`` times the attention the CLS query pays it in that attention
    (heads averaged, with the ``log(size)`` bias where ``proportional``), from ``ctx.encoder_attention``
    (recomputed from the layer's query/key projections, so sdpa runs). The ``r`` sources of highest
    redundancy minus semantic value are merged into their matches. ``alpha=0`` is ToMe. In a VLM the
    language model sees the merged tokens at consecutive positions by default, as the reference's LLaVA-1.5
    code hands LLaVA fewer features (``llava/model/multimodal_encoder/clip_encoder.py`` patches the tower;
    ``llava_arch.py`` numbers the sequence from 0); ``positions="original"`` keeps their places.

    Returns the merged tokens, their places and sizes (a :class:`~tokenprune.context.Merged`).

    Deviations from the reference:

    * An encoder without a CLS token (SigLIP) uses the attention averaged over every query as the
      semantic value; the reference reads the first token's query row, a patch there.
    * The reference stops merging once fewer than 40 tokens remain (``r_threshold``) and lowers ``r``
      to half of the unprotected tokens; here each step merges what the schedule says, so that the
      budget is exact.
    * The reference's layer decay ``beta ** |gamma - step|`` (defaults ``beta=1``: no decay) is not
      offered; merged tokens are averaged in float32.
    * The scale and ``alpha`` are those of the repository's ``BLIP_turbo`` (30, 1). Its LLaVA-1.5 code
      (``llava/model/folder/merge.py``, shared with its successor FOLDER) scales by 100 and its tower sets
      ``alpha=5`` (``llava/model/multimodal_encoder/clip_encoder.py``): ``alpha=50/3`` here.
    * The repository has no variant inside a decoder-only language model (``BLIP_turbo``'s text side
      drops BLIP's cross-attention tokens by the text CLS's attention, which is ``fastv``'s criterion
      here), and none is offered.
    """
    (attention,) = ctx.require("encoder_attention").values()  # [I, n], CLS included
    return merge_step(ctx, keep, SEMANTIC_SCALE * alpha * attention)
