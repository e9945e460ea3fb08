"""SparseVLM: text raters chosen by their relevance to the image rank the visual tokens at three layers.

Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference" (ICML
2025). Reference: github.com/Gumpest/SparseVLMs, its default branch (``main``) in its default mode
(``USE_VERSION`` unset: SparseVLM v1.5; ``2_0`` is SparseVLM+), commit 26a5f48 (2025-12-13),
``llava/model/language_model/``:
``modelling_sparse_llama.py`` (``LlamaDynamicvitModel.forward``), ``score.py`` (``attn_postprocess_topk``,
``sparse_token_list_*``) and ``utils.py`` (``cluster_and_merge``).
"""

from __future__ import annotations

import torch

from ..context import Embeddings, SelectionContext
from ..registry import register_method
from ._select import top_k

#: The image tokens the reference keeps of LLaVA-1.5's 576 after decoder layers 2, 6 and 15
#: (``score.py``, ``sparse_token_list_192/128/96/64``: its settings of 192, 128, 96 and 64 tokens, each
#: the count averaged over the 32 layers), ordered by the last stage's count.
REFERENCE_COUNTS = ((66, 30, 17), (238, 48, 26), (303, 110, 36), (300, 200, 110))
REFERENCE_TOKENS = 576


def stage_counts(num_tokens: int, kept: int) -> tuple[int, int, int]:
    """The image tokens each of SparseVLM's three stages keeps of ``num_tokens``, the last keeping ``kept``.

    The reference's counts where ``kept`` is the last of one of its rows at 576 tokens (17, 26, 36 and 110:
    its settings of 64, 96, 128 and 192); in between, the earlier stages' shares of the image are
    interpolated linearly in the last stage's share, between those rows, none kept (share 0) and all kept
    (share 1); each count at least the next one's."""
    knots = [(0, 0, 0), *REFERENCE_COUNTS, (REFERENCE_TOKENS,) * 3]
    finals = [row[-1] / REFERENCE_TOKENS for row in knots]
    share = kept / num_tokens
    right = 1
    while finals[right] < share:  # the first row that keeps as large a share at its last stage, or all
        right += 1
    left = right - 1
    span = finals[right] - finals[left]
    weight = (share - finals[left]) / span if span else 1.0
    counts = []
    for stage in range(2):
        low, high = knots[left][stage], knots[right][stage]
        counts.append(round((low + weight * (high - low)) / REFERENCE_TOKENS * num_tokens))
    first, second = (min(num_tokens, max(kept, count)) for count in counts)
    return max(first, second), second, kept


def text_raters(embeddings: Embeddings) -> torch.Tensor:
    """SparseVLM's raters ``[I, Q]``: the instruction tokens more relevant to the image than the average.

    Each of the image's tokens' input embedding is multiplied with each instruction token's, a softmax over
    the instruction is averaged over the image's tokens, and the instruction tokens above the mean are the
    raters (every instruction token, where none is above it: all alike). In float32."""
    visual, counted = embeddings.visual_mask, embeddings.mask
    logits = embeddings.visual.float() @ embeddings.instruction.float().transpose(1, 2)  # [I, M, Q]
    relevance = logits.masked_fill(~counted[:, None, :], float("-inf")).softmax(dim=2)
    relevance = (relevance * visual[..., None]).sum(dim=1) / visual.sum(dim=1, keepdim=True)  # [I, Q]
    mean = (relevance * counted).sum(dim=1, keepdim=True) / counted.sum(dim=1, keepdim=True)
    raters = counted & (relevance > mean)
    return torch.where(raters.any(dim=1, keepdim=True), raters, counted)


@register_method(
    "sparsevlm",
    default_layer=3,
    needs=("instruction_rows", "embeddings"),
    positions="renumbered",
    pyramid=(3, 7, 16),
    stage_counts=stage_counts,
)
def sparsevlm(ctx: SelectionContext, keep: int) -> torch.Tensor:
    """Keep, at three layers, the visual tokens the text raters attend to most (SparseVLM).

    As in the reference (Gumpest/SparseVLMs, default branch and mode: v1.5; tests/test_parity_sparsevlm.py):
    the raters are the instruction tokens (every token after the image) whose relevance to the image is
    above the mean: the softmax over the instruction of each image token's input embedding multiplied with
    the instruction's, averaged over the image (``LlamaDynamicvitModel.forward``, once per prompt). At each
    stage the scoring layer's attention (causal softmax over the prompt, heads averaged) from the raters to
    the image's tokens still kept is averaged over the raters, and the tokens with the most are kept
    (``attn_postprocess_topk``), at renumbered positions (the reference cuts its ``position_ids`` to the
    shorter sequence). The reference scores in layers 2, 6 and 15 of LLaVA-1.5-7B's 32 and drops their
    outputs' tokens: here stages 3, 7 and 16 (tokenprune's layer pair), scaled with the depth (1, 2 and 3
    of 4), or with ``layer`` as the first. Its table keeps 66, 30 and 17 of 576 tokens for its setting of
    64 (the count averaged over the layers), 238/48/26 for 96, 303/110/36 for 128 and 300/200/110 for 192:
    ``budget=17`` (or 26, 36, 110) is that setting; other counts interpolate the table (see
    :func:`stage_counts`); the last stage keeps ``keep_ratio``/``budget``.

    Deviations:
    - counts are the budget's, exactly, at the last stage (the reference's table has four settings, each
      at 576 tokens; others are interpolated): the contract's exact count per image.
    - no recycling: the reference also clusters the 30% best-scored of the dropped tokens (DPC-kNN, a
      tenth as many clusters) and inserts their means after the kept ones, 16/2/1 more tokens for its
      setting of 64; the decoder stage here keeps a fixed count of tokens and drops the others.
    - the default layers scale with the model's depth (the reference takes its ``pruning_loc`` as given).
    - float32 raters and attention (the reference's are in the model's dtype, float16).
    - only the instruction's rows of the attention are computed (FlashAttention/SDPA give no weights).
    - several images in a prompt: each is ranked alone by the raters of its own tokens and the
      instruction after the last image (the reference takes one image per prompt).
    - where no instruction token is above the mean (all alike, or one token), all rate (the reference's
      mean over no rater is NaN).
    """
    rows = ctx.require("instruction_rows")
    raters = text_raters(ctx.require("embeddings")).float()
    weights = raters / raters.sum(dim=1, keepdim=True)  # [I, Q]: a mean over the raters
    attention = rows.visual.float().mean(dim=1)  # [I, Q, N]: heads averaged
    return top_k((weights[..., None] * attention).sum(dim=1), keep)
