"""TransPrune: keep the visual tokens that the decoder's sub-layers transform most, guided by the instruction.

Li et al., "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model" (CVPR 2026);
official code: github.com/liaolea/TransPrune (``LlamaModel.transprune_rank_drop``).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from ._select import top_k


def _share(scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each row of ``scores [I, N]`` divided by its sum (TransPrune's normalisation of both criteria)."""
    scores = scores.float()
    return scores / (scores.sum(dim=1, keepdim=True) + eps)


@register_method(
    "transprune", default_layer=3, needs=("transition", "instruction_attention"), ranges={"alpha": (0, 1)}
)
def transprune(ctx: SelectionContext, keep: int, *, alpha: float = 0.5) -> torch.Tensor:
    """Keep tokens with the largest token transition variation plus instruction attention (TransPrune).

    Token transition variation (TTV): each attention and MLP sub-layer, from the layer before the first
    pruning stage to the one before the last, scores each token by ``‖out‖ / ‖in‖`` (its output over its
    normalised input) times the softmax over the prompt's tokens of ``1 - cos(in, out)``; the scores add
    up over those sub-layers and across stages, the kept tokens carrying theirs on. Instruction-guided
    attention (IGA): the attention that every token after the image pays to each visual token at the
    pruning layer, averaged over heads and those queries. Each criterion is divided by its sum over the
    image's tokens, and they are mixed as ``alpha * TTV + (1 - alpha) * IGA``; the default 0.5 ranks as
    the reference's plain sum. Progressive pruning is a ``schedule``: the reference runs
    ``((7, 0.875), (9, 0.625), (12, 0.125))`` on LLaVA-1.5-7B.

    Deviations:
    - kept tokens keep their original positions by default; the reference renumbers the sequence after
      each stage, which changes the RoPE of a later stage's IGA (``positions="renumbered"`` does as it).
    - TTV's softmax spans each sample's own tokens; the reference's spans the whole batch, padding
      included (its code supports batch 1 only, where the two agree).
    - a stage keeps ``round(ratio * N)`` tokens (tokenprune's budget rule); the reference truncates.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"transprune: alpha must be in [0, 1], got {alpha}")
    ttv = _share(ctx.require("transition"))
    iga = _share(ctx.require("instruction_attention"))
    return top_k(alpha * ttv + (1.0 - alpha) * iga, keep)
