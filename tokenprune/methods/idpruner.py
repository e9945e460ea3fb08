"""IDPruner: importance and diversity balanced by maximal marginal relevance (MMR).

Tan et al., "IDPruner: Harmonizing Importance and Diversity in Visual Token Pruning for MLLMs" (2026).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..kernels import greedy_mmr
from ..registry import register_method
from ._select import cosine_similarity_matrix, min_max


@register_method("idpruner", ranges={"lam": (0, 1)})
def idpruner(ctx: SelectionContext, keep: int, *, lam: float = 0.5) -> torch.Tensor:
    """Greedy MMR: the next token maximises ``lam * importance - (1 - lam) * max similarity to the kept``.

    As in the reference (YF-T/IDPruner, ``idpruner`` with one token per round; tests/test_parity_idpruner.py):
    the first token is the most important, importance is min-max normalised to [0, 1], similarity is the
    cosine of the visual tokens entering the language model, both in float32, and ``lam`` defaults to 0.5.
    As the reference, the kept tokens keep their positions by default: its adapters gather the kept tokens'
    rotary tables (``Prunable_LlamaModel.forward``, ``Prunable_Qwen2_5_VLTextModel.forward``).

    Deviations:
    - importance is each token's L2 norm, not the reference's trained per-model scorer (no weights here).
    """
    features = ctx.features
    importance = min_max(features.float().norm(dim=-1))  # [I, N]
    similarity = cosine_similarity_matrix(features, features)  # [I, N, N]
    first = importance.argmax(dim=1)  # with nothing kept yet, MMR is importance alone
    return greedy_mmr(similarity, lam * importance, 1.0 - lam, first, keep)
