"""HoloV: the budget shared out over spatial crops by their attention and diversity, then the most attended
tokens of each crop.

Zou et al., "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context Retention"
(NeurIPS 2025). Reference: github.com/obananas/HoloV (commit 1d2e65e), ``llava/model/utils.py`` (``HoloV``),
called by ``llava/model/llava_arch.py`` (``prepare_inputs_labels_for_multimodal``) on the projected image
features and the CLS attention of ``llava/model/multimodal_encoder/clip_encoder.py``, and
``qwen-model-HoloV/utils.py`` (``HoloV``, its crop count by budget).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method

#: The reference's ``esp``: added to norms and denominators.
EPS = 1e-6

#: The reference's scale of the attention before it is summed with the rescaled variance.
ATTENTION_SCALE = 1e3


def crop_count(num_tokens: int, keep: int) -> int:
    """The reference's crops for ``keep`` of ``num_tokens`` tokens (its Qwen2.5-VL code): 16 for LLaVA-1.5's
    64 of 576, the constant of its LLaVA code."""
    return max(1, int(((1024 / 576) * num_tokens) / keep))


@register_method(
    "holov",
    stage="vision",
    needs=("encoder_attention",),
    ranges={"crops": (1, None), "alpha": (0, None)},
    positions="renumbered",
    projected=True,
)
def holov(ctx: SelectionContext, keep: int, *, crops: int | None = None, alpha: float = 0.09) -> torch.Tensor:
    """Share the budget over crops by attention plus similarity variance, then keep each crop's most attended.

    As in the reference (obananas/HoloV, ``HoloV`` in ``llava/model/utils.py``; tests/test_parity_holov.py):
    the image's tokens (projected, as the language model gets them) are cut, in sequence order, into ``crops``
    runs (default ``max(1, int(1024 / 576 * N / keep))``, 16 at 64 of 576), the first ``N % crops`` one token
    longer. In a run of ``n`` tokens, with ``S`` their cosine similarities (norms plus 1e-6), its diagonal
    zeroed, each token's variance is ``sum_j (S_ij - mean_i)^2 / (n - 1)`` (``mean_i``: its row's sum
    over ``n - 1``; the zeroed diagonal counted in the sum, as the reference does), its score its CLS
    attention times 1000 plus ``alpha`` times the variance rescaled to the mean of those (mean absolute
    attention over mean absolute variance plus 1e-6), and the run's score the mean of its tokens' (a run of
    one token: its attention); that rescaling makes the variance term's mean ``alpha`` times the run's mean
    scaled attention, so runs weigh as their mean attention, the variance acting through the 1e-6 and
    rounding only, as in the reference. A run gets ``floor(keep * score / (sum of scores + 1e-6))`` tokens,
    plus one for each of the runs of largest weight until the budget is shared out, and keeps its most
    attended tokens, or all of them where it got more. The kept tokens reach the language model in patch
    order, at consecutive positions by default (the reference hands LLaVA only the kept features).

    Deviations:
    - float32 similarities and scores (the reference's are in the model's dtype).
    - attention recomputed from the output layer's queries and keys (FlashAttention/SDPA give no weights).
    - a run allocated more tokens than it holds leaves the rest of the budget to the most attended tokens not
      kept (the reference pads the image with zero tokens): an exact budget.
    - the kept tokens in patch order (the reference's: run by run, each run's by falling attention).
    - Qwen-VL: every query's attention summed over each merger group, in the merger's order (the reference
      averages it, in window order), and positions renumbered by default (its Qwen code keeps the kept
      tokens' own: ``positions="original"``).
    - an encoder without a CLS token (SigLIP): every query's attention, averaged.
    - LLaVA-NeXT/OneVision (the reference runs on the base tile and the unpadded tiles, newline tokens
      dropped, at 64 tokens): one budget over those tokens, newline tokens kept (see
      :mod:`tokenprune.patches.anyres_vision`).
    """
    (attention,) = ctx.require("encoder_attention").values()
    attention = attention.float()
    features = ctx.features.float()
    num_images, num_tokens, _ = features.shape
    device = features.device
    count = min(crop_count(num_tokens, keep) if crops is None else crops, num_tokens)  # no empty crop
    size, longer = divmod(num_tokens, count)  # the first `longer` crops hold size + 1 tokens
    width = size + (longer > 0)

    crop = torch.arange(count, device=device)
    sizes = size + (crop < longer).long()  # [C]
    starts = crop * size + crop.clamp(max=longer)
    slot = torch.arange(width, device=device)
    valid = slot < sizes[:, None]  # [C, W]
    layout = (starts[:, None] + slot).clamp(max=num_tokens - 1)  # padding slots repeat the last token

    tokens = features[:, layout] * valid[..., None]  # [I, C, W, D]
    crop_attention = attention[:, layout] * valid  # [I, C, W]
    normalized = tokens / (tokens.norm(dim=-1, keepdim=True) + EPS)
    similarity = normalized @ normalized.transpose(-1, -2)  # [I, C, W, W], padding rows and columns 0
    masked = similarity * (1 - torch.eye(width, device=device))
    n = sizes.float()
    pairs = (n - 1).clamp(min=1)[:, None]
    mean = masked.sum(dim=-1) / pairs
    variance = (((masked - mean[..., None]) ** 2) * valid[:, None, :]).sum(dim=-1) / pairs  # [I, C, W]
    scaled = crop_attention * ATTENTION_SCALE
    rescale = (scaled.abs().sum(dim=-1) / n) / ((variance.abs() * valid).sum(dim=-1) / n + EPS)  # [I, C]
    token_scores = scaled + alpha * (variance * rescale[..., None])
    score = (token_scores * valid).sum(dim=-1) / n
    score = torch.where(sizes > 1, score, crop_attention.sum(dim=-1) / n)  # a crop of one token: attention

    weights = score / (score.sum(dim=1, keepdim=True) + EPS)  # [I, C]
    allocated = (weights * keep).floor().long()
    remaining = keep - allocated.sum(dim=1, keepdim=True)
    allocated = allocated + (_ranks(weights) < remaining).long()

    # each crop's most attended tokens, by their rank in it, in token order
    ranks = _ranks(crop_attention.masked_fill(~valid, float("-inf"))).flatten(1)  # [I, C * W]
    token = torch.arange(num_tokens, device=device)
    first_short = longer * (size + 1)  # the first token of the first crop of `size` tokens
    of_crop = torch.where(token < first_short, token // (size + 1), longer + (token - first_short) // size)
    place = of_crop * width + token - starts[of_crop]  # each token's slot in the [C, W] layout, flattened
    kept = ranks[:, place] < torch.gather(allocated, 1, of_crop.expand(num_images, -1))  # [I, N]
    return attention.masked_fill(kept, float("inf")).topk(keep, dim=1).indices.sort(dim=1).values


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each entry's place in its row of ``scores [..., K]`` sorted by falling score (0: the highest)."""
    order = scores.argsort(dim=-1, descending=True)
    places = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, places)
