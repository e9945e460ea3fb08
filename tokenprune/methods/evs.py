"""EVS: Efficient Video Sampling, the first frame whole, then the tokens that changed most since the frame
before.

NVIDIA, "Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM Inference" (2025),
as vLLM ships it (``--video-pruning-rate``). Reference: github.com/vllm-project/vllm
(commit 926c71f), ``vllm/multimodal/evs.py`` (``compute_retained_tokens_count``, ``compute_retention_mask``,
``compute_mrope_for_media``), called per video by ``vllm/model_executor/models/qwen2_5_vl.py`` (commit
002d181, ``_postprocess_video_embeds_evs``) on the merger's output tokens.
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from .baselines import grid_sample


@register_method("evs", stage="vision", projected=True)
def evs(ctx: SelectionContext, keep: int) -> torch.Tensor:
    """Keep a video's first frame, then the tokens least like the same patch of the frame before (EVS).

    As vLLM's ``compute_retention_mask`` (``vllm/multimodal/evs.py``; tests/test_parity_evs.py): a video's
    tokens (the merger's output, one per 2x2 patch group, as the language model gets them) are ``T`` frames
    of ``rows x cols`` (``ctx.frames``; a Qwen-VL frame is one temporal patch). Each token of a later frame
    scores one minus its cosine similarity to the token at the same place in the frame before; the first
    frame's tokens score above any (the reference's 255). The ``keep`` tokens of highest score are kept, ties
    to the earlier token (the reference's stable sort), so the first frame is kept whole whenever the budget
    holds it. The kept tokens keep their original positions (vLLM gives each its mrope position in the
    unpruned video).

    Below one frame's worth (``keep < rows * cols``), and for an image or a one-frame item, which has no
    frame before to differ from: the ``keep`` tokens of the first frame spread evenly over its grid, as
    ``uniform`` spreads them (content-blind).

    Deviations:
    - exact count: the config's ``max(1, round(keep_ratio * N))`` (or ``budget``); the reference keeps
      ``max(rows * cols, int(N * (1 - q)))``, ``q`` the pruning rate: at most one more here (``round``
      against ``int``), and no floor of one frame.
    - below one frame (the reference never keeps fewer) and for images and one-frame videos (vLLM prunes
      videos only, and keeps a one-frame video whole): the first frame's tokens spread over its grid.
    - float32 similarities (the reference's are in the tower's dtype).
    - items of the same shape batched; the reference loops over videos.
    - the text after a video keeps its original positions; vLLM's ``recompute_mrope_positions`` starts it
      at the video's start plus the width of its grid (the language model's positions are the adapter's,
      see ``positions``).
    """
    frames, rows, cols = ctx.frame_grid()
    per_frame = rows * cols
    features = ctx.features
    num_items, num_tokens, dim = features.shape
    if frames == 1 or keep < per_frame:
        index = grid_sample(keep, rows, cols).to(features.device)
        return index.expand(num_items, keep).contiguous()
    video = features.float().view(num_items, frames, per_frame, dim)
    similarity = torch.nn.functional.cosine_similarity(video[:, 1:], video[:, :-1], dim=-1)  # [I, T-1, S]
    first = similarity.new_full((num_items, 1, per_frame), float("inf"))
    dissimilarity = torch.cat([first, 1 - similarity], dim=1).view(num_items, num_tokens)
    order = dissimilarity.sort(dim=1, descending=True, stable=True).indices
    return order[:, :keep].sort(dim=1).values
