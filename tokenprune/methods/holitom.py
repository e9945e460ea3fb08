"""HoliTom: holistic token merging for video LLMs, before the language model (global temporal segmentation,
temporal then spatial merging) and inside it (attention-guided merging at one layer).

Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models" (NeurIPS 2025).
Reference: github.com/cokeshao/HoliTom (commit e9b2972), ``holitom/llava_arch.py``
(``LlavaMetaForCausalLM_holitom.prepare_inputs_labels_for_multimodal``, ``select_static_windows``,
``get_static_dynamic_features``, ``holitom``, ``merge_tokens_by_attention_density``,
``merge_tokens_by_density``, ``cluster_dpc_knn``, ``merge_tokens_by_clustering``) and
``holitom/modeling_qwen2.py`` (``Qwen2Model_holitom.forward``), run by ``scripts/eval_ov-7b_holitom.sh``
(``RETAIN_RATIO=0.15 T=0.80 HOLITOM_k=18 HOLITOM_r=0.5``; ``BETA=0.6 D=0 K=7`` by default).
"""

from __future__ import annotations

import torch

from ..context import Merged, SelectionContext
from ..kernels import gather_tokens, merge_tokens
from ..registry import register_method
from ..sequence import flagged
from ._dpc import cluster_merge
from ._select import cosine_similarity_matrix, top_k

#: The reference's language-model stage keeps half of what its outer stage hands on (``HOLITOM_r=0.5``).
ENCODER_FACTOR = 2

#: The reference's merging layer, 18 of LLaVA-OneVision-7B's 28, on the 32 layers the registry scales from.
LLM_LAYER = 21


@register_method(
    "holitom_llm", default_layer=LLM_LAYER, needs=("attention",), positions="original", pyramid=(LLM_LAYER,)
)
def holitom_llm(ctx: SelectionContext, keep: int) -> torch.Tensor | Merged:
    """Keep the tokens most attended at layer K-1, the others merged into their most similar kept (HoliTom).

    HoliTom's inner-LLM merging, as in the reference (cokeshao/HoliTom, ``holitom/modeling_qwen2.py``,
    ``Qwen2Model_holitom.forward``; tests/test_parity_holitom_llm.py): FastV's ranking (layer K-1's
    attention, heads averaged, the prompt's last row) keeps ``keep`` of the image's tokens; every other token,
    in order, is averaged into the kept token of highest cosine similarity of the hidden states entering
    layer K (``kept = (kept + other) / 2``, one after the other, so later ones weigh more), and the kept
    tokens go on at their positions. At layer 18 of
    LLaVA-OneVision-7B's 28 (``HOLITOM_k``): without ``layer``, 21 of 32 scaled to the model's depth.
    ``holitom`` runs it after its outer stage by itself.

    Deviations:
    - float32 similarities and merges (the reference's are in the model's dtype); the attention row is
      recomputed from queries and keys (FlashAttention/SDPA give no weights), as ``fastv``'s.
    - several images in a prompt: each keeps its share and merges alone (the reference takes one video).
    """
    attention, features = ctx.require("attention"), ctx.features
    num_images, num_tokens, _ = features.shape
    kept = top_k(attention, keep)
    if keep == num_tokens:
        return kept
    slots = torch.arange(keep, device=features.device).expand(num_images, -1)
    is_kept = torch.zeros(num_images, num_tokens, dtype=torch.bool, device=features.device)
    is_kept = is_kept.scatter(1, kept, True)
    nearest = cosine_similarity_matrix(features, gather_tokens(features, kept)).argmax(dim=-1)  # [I, N]
    dest = nearest.scatter(1, kept, slots)
    # the sequential halving: a token's weight is 1/2 per later arrival at its kept token, itself included
    arrivals = torch.zeros(num_images, num_tokens, keep + 1, device=features.device)
    arrivals = arrivals.scatter(2, torch.where(is_kept, keep, dest)[..., None], 1.0)[..., :keep]
    later = arrivals.flip(1).cumsum(dim=1).flip(1).gather(2, dest[..., None])[..., 0]  # arrivals from it on
    total = arrivals.sum(dim=1).gather(1, dest)  # each token's kept token's arrivals
    weight = torch.exp2(-torch.where(is_kept, total, later))
    merged, _ = merge_tokens(features.float(), weight, dest, keep)
    sizes = torch.ones(num_images, num_tokens, device=features.device)
    sizes = torch.zeros(num_images, keep, device=features.device).scatter_add(1, dest, sizes)
    return Merged(kept, merged, sizes)


@register_method(
    "holitom",
    stage="vision",
    needs=("encoder_attention",),
    encoder_queries="all",
    ranges={
        "threshold": (-1, 1),
        "beta": (0, 1),
        "contextual": (0, 1),
        "neighbours": (1, None),
        "max_window": (1, None),
    },
    positions="renumbered",
    projected=True,
    decoder_stage="holitom_llm",
    encoder_factor=ENCODER_FACTOR,
)
def holitom(
    ctx: SelectionContext,
    keep: int,
    *,
    threshold: float = 0.8,
    beta: float = 0.6,
    contextual: float = 0.0,
    neighbours: int = 7,
    max_window: int = 1024,
) -> Merged:
    """Merge what stays alike over a video's segments of frames, keep each frame's most attended (HoliTom).

    HoliTom's outer-LLM merging: it cuts the video into segments of frames that stay alike, merges what stays
    alike over a segment into one token, then keeps each frame's most attended tokens and clusters the rest.

    As in the reference (cokeshao/HoliTom, ``holitom/llava_arch.py``; tests/test_parity_holitom.py), on the
    projected tokens of a video's ``T`` frames (``ctx.frames``; an image is one frame, ``ctx.frame_grid()``,
    and only the last step applies to it):

    1. a token is alike in two consecutive frames where the cosine similarity of its features exceeds
       ``threshold`` (``T``). A segment of frames ``s..e`` merges each place alike in all its frames into
       one token, saving ``(e - s) x`` their count; a dynamic program over the frames picks the segments
       (at most ``max_window`` frames each) that save the most (``select_static_windows``).
    2. each place alike in a segment becomes the mean over its frames (a static token), the segment's other
       tokens stay one per frame (dynamic tokens). ``keep`` is shared among the segments' static groups and
       the frames' dynamic groups in proportion to their sizes (the reference's ``RETAIN_RATIO`` over the
       tokens left after step 1).
    3. a frame's dynamic share: its ``(1 - contextual)`` most attended tokens (attention each token receives
       at the encoder's output layer, heads and queries averaged: ``D=0`` keeps only these), the rest of the
       share cluster centres among its other dynamic tokens (DPC-KNN, ``neighbours`` nearest, ``K``); a
       segment's static share: cluster centres among its static tokens. A centre that gathers tokens becomes
       ``beta`` times itself plus ``1 - beta`` times their mean (``BETA``); tokens in no cluster are dropped.

    A static token takes the place (and position) of its first frame's token, so the kept tokens follow the
    frame order; the reference's LLaVA-OneVision hands the language model the kept features alone
    (renumbered positions). In a model with a language model, a config of ``holitom`` alone is both of
    HoliTom's stages: this one keeps ``2 * keep_ratio`` of each video's tokens (or ``2 * budget``; all at
    most), and ``holitom_llm`` the config's count from its layer (the reference's ``RETAIN_RATIO=0.15``
    with ``HOLITOM_r=0.5`` is ``keep_ratio=0.075``). Composed by hand (``vision=``), it is the outer stage
    alone (the reference's "w/o M").

    Deviations:
    - exact budget: each group's share by largest remainders (the reference rounds each frame's share up and
      each segment's to nearest, keeping a few tokens more or fewer); where the merges of step 1 would
      leave fewer tokens than ``keep``, no frames are merged (the reference keeps them all, fewer).
    - DPC-KNN without the reference's random noise on the densities (ties go to the lower index), float32.
    - no 2x2 pooling first (LLaVA-OneVision pools each frame's patches before HoliTom; a Qwen-VL tower's
      merger already groups them) and no newline tokens; Qwen-VL: each merged token's received attention
      (see :mod:`tokenprune.patches.qwen_vision`), where the reference averages SigLIP's.
    - in a composition both stages run under ``holitom_llm``'s position rule (original positions; the
      reference renumbers after its outer stage): pass ``positions="renumbered"`` for the outer stage's.
    - batched on the device, with no read of it: the dynamic program and the walk back through its choices
      are loops of ``T`` small steps each (the reference's loops read each choice back to the host).
    """
    attention = ctx.require("encoder_attention")
    features = ctx.features
    num_images, num_tokens, dim = features.shape
    frames, rows, cols = ctx.frame_grid()
    places = rows * cols
    x = features.float().view(num_images, frames, places, dim)
    received = attention[max(attention)].float().view(num_images, frames, places)
    device = features.device

    start, end, static = segment_frames(x, threshold, max_window)
    window = (end - start + 1)[..., None]  # [I, T, 1] frames of each frame's segment
    first = start == torch.arange(frames, device=device)  # [I, T] a segment's first frame
    # the static groups, at their segments' first frames, and the dynamic ones, frame by frame
    static_size = torch.where(first, static.sum(dim=-1), 0)
    dynamic_size = places - static.sum(dim=-1)
    left = static_size.sum(dim=1) + dynamic_size.sum(dim=1)  # [I] tokens after the temporal merges
    merging = (left >= keep)[:, None]  # else too few would be left: no temporal merging
    static = static & merging[..., None]
    static_size = torch.where(merging, static_size, 0)
    dynamic_size = torch.where(merging, dynamic_size, places)
    left = torch.where(merging[:, 0], left, num_tokens)
    share = _largest_remainders(torch.cat([static_size, dynamic_size], dim=1), keep, left)
    static_share, dynamic_share = share[:, :frames], share[:, frames:]

    # dynamic tokens: the most attended of each frame, then clusters of the others
    dominant = torch.round(dynamic_share.double() * (1 - contextual)).long()
    ranked = received.masked_fill(static, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    kept = ranked.argsort(dim=-1) < dominant[..., None]
    out = x
    sizes = torch.ones(num_images, frames, places, device=device)
    if contextual > 0:
        others = ~static & ~kept
        centres, merged, gathered = cluster_merge(
            x.flatten(0, 1), others.flatten(0, 1), (dynamic_share - dominant).flatten(), neighbours, beta
        )
        centres = centres.view_as(kept)
        kept = kept | centres
        out = torch.where(centres[..., None], merged.view_as(x), out)
        sizes = torch.where(centres, gathered.view_as(sizes), sizes)

    # static tokens: each segment's mean at its first frame, clustered
    slot = start[..., None] * places + torch.arange(places, device=device)  # [I, T, S] first frame's place
    means, _ = merge_tokens(
        x.flatten(1, 2), torch.ones_like(received.flatten(1)), slot.flatten(1), num_tokens
    )
    means = means.view_as(x)
    centres, merged, gathered = cluster_merge(
        means.flatten(0, 1),
        (static & first[..., None]).flatten(0, 1),
        static_share.flatten(),
        neighbours,
        beta,
    )
    centres = centres.view_as(kept)
    kept = kept | centres
    out = torch.where(centres[..., None], merged.view_as(x), out)
    sizes = torch.where(centres, gathered.view_as(sizes) * window, sizes)

    index = flagged(kept.view(num_images, num_tokens), keep)
    return Merged(
        index,
        gather_tokens(out.view(num_images, num_tokens, dim), index),
        sizes.view(num_images, -1).gather(1, index),
    )


def _largest_remainders(sizes: torch.Tensor, keep: int, total: torch.Tensor) -> torch.Tensor:
    """Each group's share ``[I, G]`` of ``keep`` tokens, in proportion to its ``sizes [I, G]`` (which sum to
    ``total [I]`` >= ``keep``): ``floor(keep * size / total)``, plus one for the groups of largest remainders
    (the first of equal ones) until the shares sum to ``keep``."""
    scaled = sizes * keep
    base = torch.div(scaled, total[:, None], rounding_mode="floor")
    remainder = scaled - base * total[:, None]
    missing = keep - base.sum(dim=1, keepdim=True)
    rank = remainder.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return base + (rank < missing).long()


def segment_frames(
    x: torch.Tensor, threshold: float, max_window: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HoliTom's global temporal segmentation of videos ``x [I, T, S, D]`` (``T`` frames of ``S`` tokens):
    each frame's segment's first and last frame ``[I, T]``, and which of its places are static over its
    segment ``[I, T, S]`` (alike, cosine similarity above ``threshold``, in each pair of consecutive frames
    of a segment of two frames or more).

    The segments of at most ``max_window`` frames that merge the most tokens, a segment ``s..e`` merging
    ``(e - s)`` times its static places: the reference's dynamic program over the frames, frame by frame
    (the shortest window first: a longer one only where it merges more), one step per frame.
    """
    num_images, frames, places, _ = x.shape
    device = x.device
    order = torch.arange(frames, device=device)
    normed = torch.nn.functional.normalize(x, dim=-1)
    alike = torch.nn.functional.cosine_similarity(normed[:, :-1], normed[:, 1:], dim=-1) > threshold
    # breaks[t]: places unlike somewhere before frame t; static over s..e where none broke in between
    breaks = torch.nn.functional.pad((~alike).long().cumsum(dim=1), (0, 0, 1, 0))  # [I, T, S]
    span = order[None, :] - order[:, None]  # [s, e]: e - s
    run = (breaks[:, None] == breaks[:, :, None]) & (span > 0)[..., None]  # [I, s, e, S]
    merged = run.sum(dim=-1) * span.clamp(min=0)  # [I, s, e] tokens a segment s..e merges away
    allowed = ((span > 0) & (span < max_window)) | (span == 0)
    best = torch.zeros(num_images, frames + 1, dtype=torch.long, device=device)  # best[j]: frames < j
    begin = torch.zeros(num_images, frames, dtype=torch.long, device=device)
    for e in range(frames):
        value = (best[:, : e + 1] + merged[:, : e + 1, e]).masked_fill(~allowed[: e + 1, e], -1)
        s = e - value.flip(1).argmax(dim=1)  # of equal ones, the latest start
        best[:, e + 1] = value.gather(1, s[:, None])[:, 0]
        begin[:, e] = s
    ends = torch.zeros(num_images, frames, dtype=torch.long, device=device)
    last = torch.full((num_images,), frames - 1, device=device)
    for _ in range(frames):  # back from the last frame, segment by segment
        live = last >= 0
        at = last.clamp(min=0)[:, None]
        ends.scatter_add_(1, at, live.long()[:, None])
        last = torch.where(live, begin.gather(1, at)[:, 0] - 1, last)
    is_end = ends > 0
    starts = torch.nn.functional.pad(is_end[:, :-1], (1, 0), value=True)
    start = torch.where(starts, order, 0).cummax(dim=1).values
    end = torch.where(is_end, order, frames).flip(1).cummin(dim=1).values.flip(1)
    static = run.flatten(1, 2).gather(1, (start * frames + end)[..., None].expand(-1, -1, places))
    return start, end, static
