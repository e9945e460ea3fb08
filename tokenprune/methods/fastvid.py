"""FastVID: dynamic temporal segmentation of a video, then density-based spatio-temporal pruning in each
segment, with the anchor tokens merging their segment's other tokens.

Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models" (NeurIPS 2025).
Reference: github.com/LunarShen/FastVID (commit a40a109), its Qwen2.5-VL code:
``fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py``
(``Qwen2_5_VLForConditionalGeneration.forward``, the pruning block after ``get_rope_index``; the frame
saliency of ``Qwen2_5_VLVisionFlashAttention2.forward`` in the tower's last block), its defaults in
``fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwen2_5_vl.py`` (``Qwen2_5_VL.__init__``) and
``fastvid_qwen25vl/scripts/eval.sh``.
"""

from __future__ import annotations

import torch

from ..context import Merged, SelectionContext
from ..kernels import gather_tokens
from ..registry import register_method
from ._select import cosine_similarity_matrix

#: Neighbours of a token's local density (DPC-KNN), itself included, as in the reference.
NEIGHBOURS = 4


@register_method(
    "fastvid",
    stage="vision",
    needs=("encoder_attention",),
    encoder_queries="all",
    ranges={
        "min_segments": (1, None),
        "tau": (-1, 1),
        "duplicate": (-1, 1),
        "anchor_ratio": (0, 1),
        "anchor_stride": (1, None),
        "beta": (0, 1),
    },
    positions="original",
    projected=True,
)
def fastvid(
    ctx: SelectionContext,
    keep: int,
    *,
    min_segments: int = 8,
    tau: float = 0.84,
    duplicate: float = 0.95,
    anchor_ratio: float = 0.4,
    anchor_stride: int = 4,
    beta: float = 0.6,
) -> Merged | torch.Tensor:
    """Segment a video where its frames change, keep each segment's salient and density-peak tokens, the
    peaks merging the segment's rest (FastVID).

    As the reference's Qwen2.5-VL code (LunarShen/FastVID, ``Qwen2_5_VLForConditionalGeneration.forward``;
    tests/test_parity_fastvid.py), on the projected tokens of a video's ``T`` frames (``ctx.frames``):

    - DySeg: each frame's global feature is the mean of its tokens; the video is cut after each frame whose
      cosine similarity to the next is below ``tau`` (0.84) or among the ``min_segments - 1`` (7) lowest.
    - Each segment gets its frames' share of ``keep`` (``keep // T`` a frame, the remainder to the first
      frames), ``max(int(share * anchor_ratio), 1)`` of it anchors, the rest salient tokens. In a segment
      of several frames, a run of frames each at least ``duplicate`` (0.95) similar to the next is one
      frame, its last; the runs share the salient tokens evenly (the remainder to the first), and every
      ``anchor_stride``-th run (4) counted from the segment's last holds the anchors, shared evenly over
      those (the remainder to the last), at most half a frame each, the salient ones at most the rest of
      the frame.
    - STPrune, in each frame given tokens: its salient ones are those the tower's output block attends to
      most (``encoder_attention``); its anchors, of its other tokens, those of highest density-peak score
      (DPC-KNN: density ``exp(-mean squared distance to the 4 nearest)``, itself included, distances over
      ``sqrt(D)``, times the distance to the nearest denser token, the largest distance for the densest).
    - DTM: every token of the segment that is neither salient nor one of the frame's anchors joins the
      frame's anchor of largest cosine similarity (for each anchor frame of the segment: a token may join
      several frames' anchors); an anchor joined by ``c`` tokens becomes ``w`` times itself plus ``1 - w``
      times their mean, ``w = max(1 / (c + 1), beta)`` (0.6). Salient tokens are kept as they are.

    The kept tokens stay in place, at their original positions (the reference gathers their position
    ids). ``sizes`` is one plus the tokens that joined (a token joining several anchors counts in each).
    Everything runs batched on the device, segments and quotas as per-frame labels and counts: no read
    of the device.

    Deviations:
    - exact budget: ``keep`` tokens, not ``int(frame tokens * retention_ratio)`` per frame; where the
      quotas' caps (half a frame of anchors, a frame of tokens) leave some of the budget unspent (the
      reference keeps fewer), the most salient tokens left take it, as salient ones.
    - ``keep`` equal to the video's tokens keeps every token as it is (the reference at ratio 1 still merges
      anchors into other frames' anchors and skips near-duplicate frames).
    - saliency: the attention each token receives at the tower's output block, averaged over every query
      of its frame (Qwen-VL's full-attention blocks attend within a frame) and heads, summed over its
      merger group, whatever the attention implementation (what the adapters compute for a vision method;
      the reference, under FlashAttention only, attends from the frame's mean query to each group's mean
      key).
    - fewer than ``min_segments`` frames: every gap is cut (the reference's top-k fails); a segment whose
      frames have no share (``keep < T``) gets no tokens (the reference's quota would go negative).
    - density ties are broken by token order (the reference adds a 1e-6 random jitter); a frame with fewer
      than 4 candidate tokens averages over those it has (the reference fails).
    - global features, similarities, densities and merges in float32 (the reference's are in the model's
      dtype, the distances in float32).
    - an image (no ``frames``) is a one-frame video: its grid, or its ``N`` tokens as one row (an AnyRes
      image's packed tokens): one segment, ``keep - max(int(keep * anchor_ratio), 1)`` salient tokens and
      the rest anchors merging every other token (the reference prunes videos only).
    - any number of videos and images per prompt and batch (the reference: one video, batch size 1, its
      images unpruned: ``media="videos"`` does that here).
    - the reference's code for its other models (LLaVA-OneVision, LLaVA-Video) splits the budget otherwise
      (the same salient count in every frame, a segment's anchors over every 4th frame, uncapped, no
      near-duplicate runs): not followed.
    """
    features = ctx.features
    num_items, num_tokens, dim = features.shape
    device = features.device
    if keep >= num_tokens:
        return torch.arange(num_tokens, device=device).expand(num_items, -1)
    frames, rows, cols = ctx.frame_grid()
    per_frame = rows * cols
    attention = ctx.require("encoder_attention")
    saliency = attention[max(attention)].float().reshape(num_items * frames, per_frame)
    video = features.float().reshape(num_items, frames, per_frame, dim)
    segment, last = _segments(video.mean(dim=2), min_segments, tau, duplicate)
    salient_count, anchor_count = _quotas(segment, last, keep, per_frame, anchor_ratio, anchor_stride)
    salient = _first(saliency, salient_count.flatten())
    peaks = _density_peaks(video.reshape(num_items * frames, per_frame, dim), ~salient)
    anchor = _first(peaks, anchor_count.flatten()).view(num_items, num_tokens)
    salient = salient.view(num_items, num_tokens)
    chosen = salient | anchor
    short = keep - chosen.sum(dim=1, keepdim=True)  # the budget the quotas' caps left unspent
    salient |= _first(saliency.view(num_items, num_tokens).masked_fill(chosen, float("-inf")), short)
    kept = salient | anchor
    index = _positions(kept, keep)
    slots = min(keep, int(keep * anchor_ratio) + frames + 1)  # at least the anchors there can be
    anchors = _positions(anchor, slots)  # [I, slots], the anchors first, in order
    valid = torch.arange(slots, device=device) < anchor.sum(dim=1, keepdim=True)
    token_frame = torch.arange(num_tokens, device=device) // per_frame
    token_segment = segment.repeat_interleave(per_frame, dim=1)  # [I, N]
    anchor_frame = torch.where(valid, token_frame[anchors], frames)  # padding slots: a frame of none
    anchor_segment = torch.where(valid, torch.gather(token_segment, 1, anchors), -1)
    joins = _joins(features, anchors, anchor_frame, anchor_segment, token_segment, frames)
    # a token joins each anchor frame of its segment unless it is salient or one of that frame's anchors
    own = anchor[:, :, None] & (token_frame[None, :, None] == anchor_frame[:, None, :])
    joins = joins & ~salient[:, :, None] & ~own
    weights = joins.float()
    count = weights.sum(dim=1)  # [I, slots]
    w = (1 / (count + 1)).clamp(min=beta)[..., None]
    place = torch.gather(kept.cumsum(dim=1) - 1, 1, anchors).masked_fill(~valid, keep)  # spare row: padding

    def merge(tokens: torch.Tensor) -> torch.Tensor:  # these tokens ([I, N, D']) merged as the features are
        joined = weights.transpose(1, 2) @ tokens.float() / count.clamp(min=1)[..., None]
        merged = w * gather_tokens(tokens, anchors).float() + (1 - w) * joined
        out = torch.cat([gather_tokens(tokens, index), tokens.new_zeros(num_items, 1, tokens.shape[-1])], 1)
        out = out.scatter(1, place[..., None].expand(-1, -1, tokens.shape[-1]), merged.to(tokens.dtype))
        return out[:, :keep]

    sizes = features.new_ones(num_items, keep + 1).scatter(1, place, (count + 1).to(features.dtype))
    return Merged(index, merge(features), sizes[:, :keep], follow=merge)


def _segments(
    frame_features: torch.Tensor, min_segments: int, tau: float, duplicate: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DySeg on each video's frame features ``[I, T, D]``: each frame's segment ``[I, T]`` (0 for the first,
    counting up), and whether it is the last of its run of near-duplicate frames (the frame a run keeps)."""
    num_items, frames, _ = frame_features.shape
    unit = torch.nn.functional.normalize(frame_features, dim=-1)
    similarity = (unit[:, :-1] * unit[:, 1:]).sum(dim=-1)  # [I, T - 1], each frame to the next
    cut = similarity < tau
    lowest = similarity.topk(min(min_segments - 1, frames - 1), dim=1, largest=False).indices
    cut = cut.scatter(1, lowest, True)
    first = cut.new_zeros(num_items, 1, dtype=torch.long)
    segment = torch.cat([first, cut.long().cumsum(dim=1)], dim=1)
    last = torch.cat([cut | (similarity < duplicate), cut.new_ones(num_items, 1)], dim=1)
    return segment, last


def _quotas(
    segment: torch.Tensor,
    last: torch.Tensor,
    keep: int,
    per_frame: int,
    anchor_ratio: float,
    stride: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Salient and anchor tokens of each frame ``[I, T]``, from each frame's segment and whether it ends its
    run of near-duplicate frames (see :func:`_segments`), the reference's split of each segment's share."""
    num_items, frames = segment.shape
    device = segment.device
    share = torch.full((frames,), keep // frames, device=device)
    share = (share + (torch.arange(frames, device=device) < keep % frames)).expand(num_items, -1)
    zeros = segment.new_zeros(num_items, frames)  # per segment, padded to T

    def per_segment(value: torch.Tensor) -> torch.Tensor:  # summed over each segment, read per frame
        return torch.gather(zeros.scatter_add(1, segment, value), 1, segment)

    runs_per_segment = zeros.scatter_add(1, segment, last.long())
    retain, length = per_segment(share), per_segment(torch.ones_like(segment))
    runs = torch.gather(runs_per_segment, 1, segment)
    anchors = torch.floor(retain.double() * anchor_ratio).long().clamp(min=1).minimum(retain)
    salient = retain - anchors
    runs_before = runs_per_segment.cumsum(dim=1) - runs_per_segment  # in the segments before each
    run = last.long().cumsum(dim=1) - last.long() - torch.gather(runs_before, 1, segment)
    run_salient = salient // runs + (run < salient % runs).long()
    from_end = runs - 1 - run
    holders = (runs + stride - 1) // stride  # runs that hold anchors: every stride-th from the last
    run_anchors = anchors // holders + (from_end // stride < anchors % holders).long()
    run_anchors = torch.where(from_end % stride == 0, run_anchors.clamp(max=per_frame // 2), 0)
    run_salient = run_salient.minimum(per_frame - run_anchors)
    single = length == 1  # a one-frame segment takes its whole share, uncapped
    salient = torch.where(single, salient, run_salient) * last
    anchors = torch.where(single, anchors, run_anchors) * last
    return salient, anchors


def _first(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Whether each entry is among the ``counts [R]`` (or ``[R, 1]``) highest of its row of ``scores [R,
    M]`` (the earlier first among equal scores)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    return rank < counts.view(-1, 1)


def _positions(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the set entries of each row of ``mask [R, M]``, in order, then of the others ``[R,
    width]``."""
    return (~mask).to(torch.uint8).argsort(dim=1, stable=True)[:, :width]


def _density_peaks(tokens: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """DPC-KNN score of each ``candidate [F, P]`` among the candidates of its frame ``tokens [F, P, D]``
    (float32): local density times the distance to the nearest denser candidate; -inf elsewhere."""
    frames, per_frame, dim = tokens.shape
    distance = torch.cdist(tokens, tokens) / dim**0.5
    pair = candidate[:, :, None] & candidate[:, None, :]
    nearest = distance.masked_fill(~pair, float("inf"))
    nearest = nearest.topk(min(NEIGHBOURS, per_frame), dim=-1, largest=False).values
    present = nearest.isfinite()
    spread = nearest.square().where(present, 0).sum(dim=-1) / present.sum(dim=-1).clamp(min=1)
    density = (-spread).exp()  # [F, P]
    order = torch.arange(per_frame, device=tokens.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (order[None, :] < order[:, None])
    )  # [F, i, j]: j ranks above i
    farthest = distance.masked_fill(~pair, float("-inf")).amax(dim=(1, 2), keepdim=True)
    parent = torch.where(denser & pair, distance, farthest).amin(dim=-1)
    return (parent * density).masked_fill(~candidate, float("-inf"))


def _joins(
    features: torch.Tensor,
    anchors: torch.Tensor,
    anchor_frame: torch.Tensor,
    anchor_segment: torch.Tensor,
    token_segment: torch.Tensor,
    frames: int,
) -> torch.Tensor:
    """``[I, N, slots]``: whether each token's most cosine-similar anchor among those of each anchor frame
    of its segment is that slot's (the first among equals); padding slots (frame ``frames``) none."""
    similarity = cosine_similarity_matrix(features, gather_tokens(features, anchors))  # [I, N, slots]
    allowed = token_segment[:, :, None] == anchor_segment[:, None, :]
    similarity = similarity.masked_fill(~allowed, float("-inf"))
    num_items, num_tokens, slots = similarity.shape
    group = anchor_frame[:, None, :].expand(-1, num_tokens, -1)
    best = similarity.new_full((num_items, num_tokens, frames + 1), float("-inf"))
    best = best.scatter_reduce(2, group, similarity, "amax")
    top = (similarity == torch.gather(best, 2, group)) & allowed
    slot = torch.arange(slots, device=features.device).expand_as(similarity)
    slot = torch.where(top, slot, slots)
    winner = torch.full_like(best, slots, dtype=torch.long).scatter_reduce(2, group, slot, "amin")
    return top & (slot == torch.gather(winner, 2, group))
