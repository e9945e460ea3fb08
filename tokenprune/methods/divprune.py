"""DivPrune: keep the most diverse subset of visual tokens (max-min diversity).

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (CVPR 2025).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..kernels import greedy_max_min
from ..registry import register_method
from ._select import cosine_similarity_matrix


@register_method("divprune", positions="renumbered")
def divprune(ctx: SelectionContext, keep: int) -> torch.Tensor:
    """Greedy max-min diversity over cosine distance of the projected visual tokens (DivPrune).

    As in the reference (vbdi/divprune, ``LlavaMetaForCausalLM.DivPrune``; tests/test_parity_divprune.py):
    distance is ``1 - cosine similarity`` of the visual tokens entering the language model; the first token
    is the one farthest from its nearest neighbour, and each next token is the one whose distance to the
    nearest already-selected token is largest. As the reference, the kept tokens get consecutive positions
    by default: its ``prepare_inputs_labels_for_multimodal`` slices the prompt's embeddings and mask, and
    ``generate`` numbers what is left from 0 (``positions="original"`` keeps their places).

    Deviations:
    - float32 distances (the reference's are in the model's dtype, fp16 in its runs).
    """
    distance = 1.0 - cosine_similarity_matrix(ctx.features, ctx.features)  # [I, N, N]
    eye = torch.eye(distance.shape[1], dtype=torch.bool, device=distance.device)
    first = distance.masked_fill(eye, float("inf")).amin(dim=2).argmax(dim=1)  # [I]
    return greedy_max_min(distance, first, keep)
