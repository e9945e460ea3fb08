"""CDPruner: diverse visual tokens given the instruction, by a conditional determinantal point process.

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs"
(NeurIPS 2025). Reference: github.com/Theia-4869/CDPruner, ``llava/model/llava_arch.py``
(``LlavaMetaForCausalLM.encode_images``) and ``llava/model/multimodal_encoder/clip_encoder.py``
(``CLIPVisionTower.forward``).
"""

from __future__ import annotations

import torch

from ..context import Instruction, SelectionContext
from ..kernels import greedy_dpp
from ..registry import register_method


def instruction_relevance(tokens: torch.Tensor, instruction: Instruction, negative: bool) -> torch.Tensor:
    """Each visual token's relevance to the instruction ``[I, N]`` in float32, as CDPruner's: the cosine of
    the tokens (``tokens [I, N, D]``, normalised in float32) with the instruction's embedding (here the mean
    of its tokens' input embeddings), negated if ``negative``, rescaled by the image's minimum and maximum to
    (0, 1]."""
    mask = instruction.mask.unsqueeze(-1)
    text = (instruction.features.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)  # [I, D]
    text = torch.nn.functional.normalize(text.unsqueeze(1), dim=-1)  # [I, 1, D]: one text embedding
    relevance = (tokens @ text.transpose(1, 2))[..., 0]
    relevance = -relevance if negative else relevance
    low, high = relevance.amin(dim=1, keepdim=True), relevance.amax(dim=1, keepdim=True)
    spread = high - low
    return (relevance - low + 1e-6) / torch.where(spread > 0, spread, 1.0)


@register_method(
    "cdpruner",
    needs=("instruction",),
    ranges={"theta": (0, 0.95)},
    positions="renumbered",
)
def cdpruner(
    ctx: SelectionContext, keep: int, *, theta: float | None = None, negative_relevance: bool = False
) -> torch.Tensor:
    """Greedy MAP of a DPP whose kernel is similarity weighted by relevance to the instruction (CDPruner).

    As in the reference (Theia-4869/CDPruner, ``llava/model/llava_arch.py``,
    ``LlavaMetaForCausalLM.encode_images``; tests/test_parity_cdpruner.py): before the language model, the
    similarity is the cosine of the projected visual tokens; each token's relevance is its cosine with the
    instruction's embedding, averaged over the instruction's embeddings (one here) and rescaled to (0, 1] by
    ``(r - min + 1e-6) / (max - min)``; ``theta``, the reference's commented-out option, weights it as
    ``exp(theta / (2 * (1 - theta)) * r)`` (``None``: off, as the reference runs). The kernel is
    ``relevance_i * similarity_ij * relevance_j``; each pick is the token of largest remaining gain (its
    conditional variance), the gains updated by the pick's new row of the incremental Cholesky factor
    (:func:`~tokenprune.kernels.greedy_dpp`, one Triton program per image on a GPU). The kept tokens'
    positions are renumbered, as the reference's LLaVA builds its shortened sequence.

    Deviations:
    - relevance from the model's own input embeddings: the visual tokens entering the language model against
      the mean input embedding of the instruction's tokens (those after the images, the chat template's
      closing tokens included), as OpenVINO GenAI's CDPruner for Qwen2-VL; the reference compares CLIP's
      projected patch embeddings with CLIP's text tower's embedding of the question alone, a tower that
      transformers VLMs do not ship (LLaVA's checkpoints hold the vision tower only; SigLIP and Qwen-VL
      towers have none), while every model has its input embeddings, in the space its visual tokens are
      projected to.
    - relevance not negated by default (``negative_relevance=False``, OpenVINO GenAI's default): the reference
      negates its CLIP patch-text cosine, an inversion it found in CLIP's penultimate-layer patch features;
      ``negative_relevance=True`` negates as it does.
    - min-max rescaling of each image alone (the reference's spans its batch: one image for LLaVA-1.5, the
      tiles of one image for LLaVA-NeXT), so that a batch selects as each image alone; a constant relevance
      is divided by 1, not 0.
    - similarity of tokens normalised in float32 (the reference normalises in the model's dtype, then casts).
    - a pick whose remaining gain is not positive (the kernel's rank spent: more picks than the feature
      dimension) updates nothing, and picked tokens are never picked again (the reference takes the square
      root of a negative gain, and the NaNs that follow repeat tokens).
    - the Triton kernel adds the factor's earlier rows in order, the reference's ``einsum`` as BLAS does: the
      gains may differ in float32 rounding, so the picks too where two gains lie within it.
    - LLaVA-NeXT: one budget over the tokens of all an image's tiles, its newline tokens left out and kept
      (the reference keeps its count in every tile, the base one included), forced by the exact per-image
      budget over the tokens the model packs (see :mod:`tokenprune.patches.anyres_vision`); several images
      of a prompt each select against the same instruction (the reference's prompts hold one image).
    """
    instruction = ctx.require("instruction")
    tokens = torch.nn.functional.normalize(ctx.features.float(), dim=-1)  # once, for both cosines
    relevance = instruction_relevance(tokens, instruction, negative_relevance)  # [I, N]
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    # relevance_i * similarity_ij * relevance_j, in that order, in the similarity's own memory
    kernel = (tokens @ tokens.transpose(1, 2)).mul_(relevance.unsqueeze(2)).mul_(relevance.unsqueeze(1))
    return greedy_dpp(kernel, keep)
