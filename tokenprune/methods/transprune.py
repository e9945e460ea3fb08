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
    """Each row of ``scores [I, N]`` divided by its sum (+``eps``), in their dtype: TransPrune's
    normalisation of both criteria (float32 transitions, instruction attention in the model's dtype)."""
    return scores / (scores.sum(dim=1, keepdim=True) + eps)


@register_method(
    "transprune",
    default_layer=3,
    needs=("transition", "instruction_attention"),
    ranges={"alpha": (0, 1)},
    positions="renumbered",
)
def transprune(ctx: SelectionContext, keep: int, *, alpha: float = 0.5) -> torch.Tensor:
    """Keep tokens with the largest token transition variation plus instruction attention (TransPrune).

    Token transition variation (TTV): each attention and MLP sub-layer, from the layer before the first
    pruning stage to the one before the last, scores each token by ``‖out‖ / ‖in‖`` (its output over its
    normalised input) times ``exp(1 - cos(in, out))`` over its sum across the prompt's tokens; a layer's two
    add up in the model's dtype, and the layers' in float32, over those layers and across stages, the kept
    tokens carrying theirs on. Instruction-guided attention (IGA): the attention that every token after
    the image pays to each visual token at the pruning layer, averaged over heads and those queries, in the
    model's dtype (the softmax in float32). Each criterion is divided by its sum over the image's tokens, in
    its dtype, and they are mixed as ``alpha * TTV + (1 - alpha) * IGA``; the default 0.5 ranks as the
    reference's plain sum. Progressive pruning is a ``schedule``: the reference runs
    ``((7, 0.875), (9, 0.625), (12, 0.125))`` on LLaVA-1.5-7B. As the reference, the kept tokens are
    renumbered after each stage by default, which a later stage's IGA sees through RoPE
    (``positions="original"`` keeps their places instead). All as in the reference (liaolea/TransPrune,
    ``LlamaModel.transprune_rank_drop``; tests/test_parity_transprune.py).

    Returns the top ``keep`` tokens' indices ``[I, keep]``, sorted.

    Deviations:
    - TTV's softmax spans each sample's own tokens; the reference's spans the whole batch, padding
      included (batching: its code supports batch 1 only, where the two agree).
    - a stage keeps ``round(ratio * N)`` tokens where the reference truncates (``int``): the exact
      per-image budget is one count for every method at a given ratio, which the benchmarks' ideal row and
      their comparisons at equal budgets rely on (``keep_ratio=0.111`` of 576 would keep 63 here, 64 for
      every other method). The reference's own schedule counts the same either way (504, 360, 72 of 576);
      ``budget=`` gives any count.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"transprune: alpha must be in [0, 1], got {alpha}")
    ttv = _share(ctx.require("transition"))
    iga = _share(ctx.require("instruction_attention"))
    return top_k(alpha * ttv + (1.0 - alpha) * iga, keep)
