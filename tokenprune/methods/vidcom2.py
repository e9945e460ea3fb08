"""VidCom2: per-frame budgets by how unique each frame is in its video, then each frame's most unique tokens.

Liu et al., "Video Compression Commander: Plug-and-Play Inference Acceleration for Video Large Language
Models" (EMNLP 2025). Reference: github.com/xuyang-liu16/VidCom2 (commit 944a17d),
``token_compressor/vidcom2/vidcom2.py`` (``select_low_var_channels``, ``compute_gaussian_scores``,
``compute_scales``, ``select_outlier_indices``, ``_map_linear_offset``), called per video by
``token_compressor/vidcom2/models/qwen2_5_vl.py`` (``_compute_keep_indices``, from
``Qwen2_5_VLModel_forward``) on the merger's output tokens.
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method

#: The reference's widths ``2 ** k``, ``k`` in -3..1, of the Gaussian kernels whose sum scores a token.
WIDTHS = (0.125, 0.25, 0.5, 1.0, 2.0)

#: The reference's softmax temperature of the frames' uniqueness.
TEMPERATURE = 0.01


@register_method("vidcom2", stage="vision", projected=True)
def vidcom2(ctx: SelectionContext, keep: int) -> torch.Tensor:
    """Give each frame a budget by its uniqueness in the video, then keep its most unique tokens (VidCom2).

    As in the reference (xuyang-liu16/VidCom2, ``token_compressor/vidcom2/vidcom2.py``;
    tests/test_parity_vidcom2.py), on a video's tokens (the merger's output, as the language model gets them)
    as ``T`` frames of ``S`` tokens (``ctx.frames``; a Qwen-VL frame is one temporal patch): the half of the
    channels that vary least over the video's tokens, each token's unit vector over them, and its similarity
    to the video's mean and to its frame's mean, each a sum of Gaussian kernels ``exp(-d^2 / 2a)`` of the
    squared distance, ``a`` in 1/8..2. A frame's weight is the softmax over frames (temperature 0.01) of
    minus its tokens' mean similarity to the video's mean; its share of the budget ``keep / N * (1 + weight -
    mean weight) * S`` (the shares add up to ``keep``), at least one token; in each frame, the tokens of
    lowest summed similarity (to the video's and the frame's mean) are kept. The kept tokens keep their
    original positions (the reference slices the prompt's position ids).

    An image, or a one-frame item, is one frame: its ``keep`` tokens least similar to its mean (the
    reference's rule with one frame; it compresses videos only).

    Deviations:
    - exact count: the frames' counts are the shares rounded by a divisor (Webster's method: a frame's
      ``r``-th token, from 0 by uniqueness, ranks by ``(r + 1/2) / share``, its first ahead of every other;
      a share half-way between two counts goes to the even one, as ``round``), so that they add up to
      ``keep``; they are the reference's ``round(share)`` (at least 1) wherever those add up to ``keep``,
      else a token more or fewer here and there. The reference keeps ``sum(round(share))``,
      drops the share a frame cannot hold (clamped to the frame) and keeps one token of every frame; here a
      frame's surplus goes to the others, and below one token per frame the frames of largest share keep one.
    - the budget is ``keep`` (of ``N = T * S`` tokens) where the reference takes the ratio ``R_RATIO``.
    - float32 scores (the reference's are in the tower's dtype); ties go to the earlier token.
    - items of the same shape batched; the reference compresses one video at a time, in a batch of one
      prompt (none in a larger batch).
    """
    frames, rows, cols = ctx.frame_grid()
    per_frame = rows * cols
    features = ctx.features.float()
    num_items, num_tokens, dim = features.shape
    # the least varying half of the channels, each token's unit vector over them
    channels = features.var(dim=1, unbiased=False).topk(dim // 2, dim=1, largest=False).indices
    chosen = features.gather(2, channels[:, None, :].expand(-1, num_tokens, -1))
    tokens = torch.nn.functional.normalize(chosen.view(num_items, frames, per_frame, -1), dim=-1)
    to_video = _gaussian_similarity(tokens, tokens.mean(dim=(1, 2), keepdim=True))  # [I, T, S]
    to_frame = _gaussian_similarity(tokens, tokens.mean(dim=2, keepdim=True))
    uniqueness = -to_video.mean(dim=2)  # [I, T]
    weight = ((uniqueness - uniqueness.amax(dim=1, keepdim=True)) / TEMPERATURE).softmax(dim=1)
    share = keep / num_tokens * (1 + weight - weight.mean(dim=1, keepdim=True)) * per_frame  # [I, T]
    # Webster's apportionment: the r-th most unique token of a frame ranks by (r + 1/2) / share, its first
    # ahead of every frame's others (by share); the keep of lowest rank are kept. Equal ranks are shares
    # half-way between two counts, which the reference rounds to the even count: an even r goes after
    order = (to_video + to_frame).argsort(dim=2, stable=True)  # [I, T, S] most unique first
    place = torch.arange(per_frame, device=features.device, dtype=share.dtype).expand_as(order)
    rank = (place + 0.5) / share[..., None]
    rank[..., 0] = -share
    ranks = torch.empty_like(rank).scatter_(2, order, rank).view(num_items, num_tokens)
    even = torch.empty_like(rank).scatter_(2, order, 1 - place % 2).view(num_items, num_tokens)
    odd_first = even.argsort(dim=1, stable=True)  # then by rank, stably: ties to odd r, then earlier tokens
    by_rank = ranks.gather(1, odd_first).argsort(dim=1, stable=True)
    return odd_first.gather(1, by_rank[:, :keep]).sort(dim=1).values


def _gaussian_similarity(tokens: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``sum_a exp(-|x - c|^2 / 2a)`` over :data:`WIDTHS` of each token ``x`` and its ``centre`` ``c``,
    summed in the reference's order."""
    distance = (tokens - centre).pow(2).sum(dim=-1)
    total = torch.zeros_like(distance)
    for width in WIDTHS:
        total = total + torch.exp(-distance / (2 * width))
    return total
