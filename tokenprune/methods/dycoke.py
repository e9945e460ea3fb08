"""DyCoke: temporal token merging of a video's frames before the language model, and dynamic pruning of the
visual KV cache at each decode step.

Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models" (CVPR 2025).
Reference: github.com/KD-TAO/DyCoke (commit dd74634), ``llava/model/llava_arch.py`` (``dycole_ttm``, called
in ``LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal`` for a video's frames, 196 tokens each
after LLaVA-OneVision's 2x2 pooling) and ``llava/model/language_model/modeling_qwen2.py``
(``PrunableDynamicCache.dycoke_pruning`` and ``update_cache``, called by ``Qwen2Model.forward`` before
layer ``dycoke_l``), run by ``eval.sh`` with ``lmms_eval/models/llava_onevision.py``'s defaults
(``dycoke_k=0.7``, ``dycoke_l=3``, ``dycoke_p=0.8``).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from ._select import top_k
from .baselines import grid_sample

#: The reference's first decoder layer whose decode steps attend to the selected visual entries only
#: (``dycoke_l``; LLaVA-OneVision-7B's Qwen2 has 28 layers).
KV_LAYER = 3


def reference_frames(frames: int) -> list[int | None]:
    """The frame each frame's tokens are compared with, ``None`` for a frame kept whole (an anchor).

    The reference's two passes over frames in windows of four ``a, b, c, d``: ``b`` against ``a`` and ``d``
    against ``c`` (every odd frame against the one before), then ``c`` against ``a``, except in the last
    window (its loop over windows stops at ``frames - 4``: ``c`` stays whole there). A last frame without
    a partner (an odd count) is an anchor here; the reference drops it."""
    refs: list[int | None] = []
    for f in range(frames):
        if f % 2:
            refs.append(f - 1)
        elif f % 4 == 2 and f < frames - 2:
            refs.append(f - 2)
        else:
            refs.append(None)
    return refs


def frame_budgets(refs: list[int | None], per_frame: int, keep: int) -> list[int]:
    """Tokens kept of each frame, ``keep`` in all: anchors whole and the compared frames an equal share of
    the rest (one more for the first ones where it does not divide), as the reference's ``1 - k`` of
    every compared frame; a ``keep`` below the anchors' tokens is shared by the anchors alone."""
    anchors = [f for f, ref in enumerate(refs) if ref is None]
    compared = [f for f, ref in enumerate(refs) if ref is not None]
    budgets = [0] * len(refs)
    whole = len(anchors) * per_frame
    takers, left = (compared, keep - whole) if keep >= whole else (anchors, keep)
    if keep >= whole:
        for f in anchors:
            budgets[f] = per_frame
    share, extra = divmod(left, len(takers)) if takers else (0, 0)
    for j, f in enumerate(takers):
        budgets[f] = share + (j < extra)
    return budgets


@register_method("dycoke", stage="vision", projected=True, positions="renumbered")
def dycoke(ctx: SelectionContext, keep: int) -> torch.Tensor:
    """Keep the tokens of each frame that changed most since the frame it is compared with (DyCoke's TTM).

    As the reference (KD-TAO/DyCoke, ``llava/model/llava_arch.py``, ``dycole_ttm``;
    tests/test_parity_dycoke.py), on the projected tokens of a video (``ctx.frames``: LLaVA-OneVision's
    pooled frames, Qwen-VL's temporal patches): in windows of four frames ``a, b, c, d``, ``a`` is kept whole
    and so is ``c`` of the last window; ``b`` and ``c`` are compared with ``a``, ``d`` with ``c`` (see
    :func:`reference_frames`), each token with the token of the same patch, by cosine similarity, and a
    compared frame keeps its tokens of lowest similarity. Nothing is averaged: the others are dropped. The
    kept tokens stay in frame and raster order, at renumbered positions (the reference hands the language
    model the kept features only).

    Ratio: the reference prunes ``dycoke_k`` (0.7) of each compared frame (keeps ``int(0.3 * 196)``, 58),
    so its video keeps about ``(A + 0.3 * C) / T`` of its tokens (``A`` anchors and ``C`` compared frames of
    ``T``: 9 and 23 of 32 frames, 49.4%); ``keep_ratio``/``budget`` is that count, the anchors whole and the
    compared frames an equal share of the rest (:func:`frame_budgets`), which is the reference's selection
    where the count is the reference's. An image (no ``frames``) is one frame, an anchor with nothing to
    compare: below all of its tokens it keeps tokens spread evenly over its grid, as ``uniform``; a video
    whose ``keep`` is below its anchors' tokens keeps none of the compared frames and spreads each anchor's
    share so. ``dycoke_kv`` is the reference's decode-time stage, a config of its own.

    Deviations:
    - exact budget of any size (the reference's count follows from ``dycoke_k`` alone); a share that does
      not divide gives the first compared frames one more token; below the anchors' tokens, see above.
    - the kept tokens of a compared frame stay in raster order (the reference's are in ascending
      similarity); ties broken by lower index.
    - a video of two to four frames is pruned by the same rule (the reference fails with no full window);
      a last frame without a partner (an odd count) is kept whole (the reference drops it).
    - float32 similarities (the reference's are in the model's dtype).
    - the decode-time stage is not run after this one: ``dycoke_kv`` is a separate config (a ``kv`` config
      takes no vision stage yet; docs/methods.md says what blocks it).
    - Qwen-VL: a frame is one temporal patch (two input frames) of merged tokens; the reference prunes
      LLaVA-OneVision's pooled frames, as tokenprune does on that model (the newline after the last frame
      kept, as the reference appends it after merging).
    """
    features = ctx.features
    num_items, num_tokens, _ = features.shape
    frames, rows, cols = ctx.frame_grid()
    per_frame = rows * cols
    if frames * per_frame != num_tokens:
        raise ValueError(f"dycoke: {num_tokens} tokens are not {frames} frames of {rows}x{cols}")
    refs = reference_frames(frames)
    budgets = frame_budgets(refs, per_frame, keep)
    device = features.device
    # host-built layout (ints only): each frame's reference and budget, and the spread cells of an anchor
    # that keeps part of itself
    source = torch.tensor([f if ref is None else ref for f, ref in enumerate(refs)], device=device)
    anchor = torch.tensor([ref is None for ref in refs], device=device)
    spread = torch.zeros(frames, per_frame)
    for f, ref in enumerate(refs):
        if ref is None and 0 < budgets[f] < per_frame:
            spread[f, grid_sample(budgets[f], rows, cols)] = 1.0
    x = features.float().view(num_items, frames, per_frame, -1)
    similarity = torch.nn.functional.cosine_similarity(x, x[:, source], dim=-1)  # [I, T, P]
    scores = torch.where(anchor[:, None], spread.to(device), -similarity)
    # each frame's top budget by its scores: rank within the frame, against the frame's budget
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(per_frame, device=device).expand_as(order)
    )
    kept = rank < torch.tensor(budgets, device=device)[:, None]
    # exactly ``keep`` per item: the kept ones first, in token order
    return (~kept).flatten(1).to(torch.int8).sort(dim=1, stable=True).indices[:, :keep]


@register_method("dycoke_kv", stage="kv", default_layer=KV_LAYER, needs=("attention",))
def dycoke_kv(ctx: SelectionContext, keep: int) -> torch.Tensor:
    """At each decode step, from a decoder layer on, attend only to the visual KV entries the step's token
    attended to most in the layer before (DyCoke's dynamic pruning).

    As the reference (KD-TAO/DyCoke, ``llava/model/language_model/modeling_qwen2.py``,
    ``PrunableDynamicCache.dycoke_pruning`` and ``update_cache``; tests/test_parity_dycoke.py): prefill is
    not pruned and the cache keeps every entry; at each decode step, layer ``layer - 1`` (default 2, the
    reference's ``dycoke_l=3``) ranks each image's or video's tokens by the attention of the step's token
    (softmax over the cache, heads averaged), and layers ``layer`` onward attend to its ``keep`` best and to
    every text and generated token; layers before attend to everything. Re-chosen at every step.

    Ratio: the reference keeps ``int((1 - dycoke_p) * n)`` of the ``n`` visual tokens in the prompt (20%);
    ``keep_ratio``/``budget`` counts them likewise. After ``dycoke``'s merging, the reference's pair is
    ``keep_ratio=0.2`` of what ``dycoke`` kept (not composed here: see docs/methods.md).

    Deviations:
    - ``round(keep_ratio * n)`` tokens (the reference's ``int((1 - dycoke_p) * n)`` floors, in floating
      point: 7 of 40 at 0.8).
    - the reference re-chooses only where the step's attention differs from the previous step's (cosine
      below 0.9); where it does not, its step attends to every entry (the kept set was reset before the
      test). Here every step chooses, so every step's count is ``keep``.
    - every visual token is a candidate (the reference's span, ``image_token_length``, leaves out the last
      video token, always visible; the OneVision newline after it is text here too) and each image or video
      of the prompt has its own ``keep`` (the reference takes one video at a fixed start index,
      ``image_token_start_index=14``).
    - the ranking attention is recomputed from the layer's queries and keys in float32, as the reference's
      SDPA path computes it (``calculate_attention_weights``), whatever the attention implementation.
    - the layers from ``layer`` on hide the other entries from the step's attention (the reference gathers
      the kept entries; the same output).
    """
    return top_k(ctx.require("attention"), keep)
