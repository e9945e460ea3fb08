"""AdaptInfer: rank visual tokens by the instruction's attention, each text token weighted by how much the
instruction's own attention makes of it.

Zhang et al., "AdaptInfer: Adaptive Token Pruning for Vision-Language Model Inference with Dynamical Text
Guidance" (arXiv 2508.06084); official code: github.com/weiczh02/AdaptInfer-base
(``llava/model/language_model/score.py``, ``attn_postprocess_topk_with_t2t_weighting``).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from ._select import top_k


def text_guided_scores(visual: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """AdaptInfer's score of each visual token ``[I, N]`` (float32).

    Args:
        visual: attention of each instruction query to each visual token, by head ``[I, H, Q, N]``.
        text: attention of each instruction query (dim 2) to each instruction token (dim 3) ``[I, H, Q, Q]``.
        mask: the instruction tokens that count ``[I, Q]`` (the rest pad a shorter instruction).

    The text-to-text attention, made symmetric (``A + Aᵀ - diag A``), summed over its queries gives each
    instruction token a weight per head: the attention it receives from the instruction plus the attention
    it pays to it, itself counted once. A visual token scores the weighted sum, over instruction queries and
    heads, of the attention it receives.
    """
    counted = mask[:, None, :].float()  # [I, 1, Q]
    text = text.float() * counted[..., None] * counted[:, :, None, :]
    received, paid = text.sum(dim=2), text.sum(dim=3)  # [I, H, Q] each
    weight = (received + paid - torch.diagonal(text, dim1=-2, dim2=-1)) * counted
    return (weight[..., None] * visual.float()).sum(dim=(1, 2))


@register_method("adaptinfer", default_layer=2, needs=("instruction_rows",), positions="renumbered")
def adaptinfer(ctx: SelectionContext, keep: int) -> torch.Tensor:
    """Keep the visual tokens the instruction attends to most, weighted by its own attention (AdaptInfer).

    As in the reference (weiczh02/AdaptInfer-base; tests/test_parity_adaptinfer.py): at the scoring layer,
    each instruction token (every token after the image, to the prompt's end) attends causally over the
    prompt; the text-to-text block of those rows, made symmetric and summed over queries, weighs each
    instruction token, per head, and the visual tokens are ranked by the weighted sum of the attention they
    receive from the instruction, summed over heads; the top ``keep`` stay. The reference prunes three times
    in LLaVA-1.5-7B, after layers 1, 10 and 20, where the text's attention to the image shifts; it keeps
    133, 27 and 3 tokens for its average of 64 (290, 72 and 18 for 128): here
    ``schedule=((2, 0.231), (11, 0.047), (21, 0.005))``. Alone, it acts at layer 2 (the reference's first
    stage). As the reference, the kept tokens are renumbered after each stage by default
    (``positions="original"`` keeps their places).

    Deviations:
    - scored at layer K-1 and pruned from layer K on, tokenprune's convention (the reference scores layer
      K's own attention and drops its output: the same layer pair).
    - only the instruction's rows are computed, from queries and keys (FlashAttention/SDPA give no weights);
      the reference builds the whole causal map.
    - float32 scores (the reference's are in the model's dtype).
    - a stage keeps ``round(ratio * N)`` or ``budget`` tokens per image, not the reference's table of counts.
    - several images in a prompt are each scored by the instruction after the last one (the reference
      takes one image); its clustering of pruned tokens (``s_flag``, off in its runs) and its blend of the
      text weights with their mean (``lb``, 1 in its runs: off) are not offered.
    """
    rows = ctx.require("instruction_rows")
    return top_k(text_guided_scores(rows.visual, rows.text, rows.mask), keep)
