"""VisPruner: important patches by the CLS attention, then diverse ones by removing near-duplicates.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs"
(ICCV 2025). Reference: github.com/Theia-4869/VisPruner, ``llava/model/llava_arch.py``
(``LlavaMetaForCausalLM.encode_images``) and ``llava/model/multimodal_encoder/clip_encoder.py``
(``CLIPVisionTower.feature_select``).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..kernels import gather_tokens
from ..registry import register_method

#: Near-duplicates removed per round at most (the reference's constant).
PER_ROUND = 8


@register_method(
    "vispruner",
    stage="vision",
    needs=("encoder_attention",),
    ranges={"important_ratio": (0, 1)},
    positions="renumbered",
)
def vispruner(ctx: SelectionContext, keep: int, *, important_ratio: float = 0.5) -> torch.Tensor:
    """Keep the patches the CLS token attends to most, then the least redundant of the others.

    As in the reference (Theia-4869/VisPruner, ``llava/model/llava_arch.py``,
    ``LlavaMetaForCausalLM.encode_images``; tests/test_parity_vispruner.py): at the encoder layer whose
    output the model uses, the patches are ranked by the CLS query's attention (heads averaged); the first
    ``int(keep * important_ratio)`` are the important tokens. The others, in that ranking, are the residual;
    in rounds, until ``keep`` minus the important count remain, the residual is split into its even and odd
    places, each even-place token is scored by its highest cosine similarity (on the output layer's patch
    features) to an odd-place one, and the ``min(8, excess)`` highest-scored are removed; the residual
    goes on as the other even-place tokens by falling score, then the odd-place ones. The important tokens
    and the residual are kept.

    Deviations:
    - float32 similarities and ranking (the reference computes them in the model's dtype).
    - attention recomputed from the output layer's queries and keys (FlashAttention/SDPA give no weights).
    - a round on an odd residual, or removing more than its even places hold, removes at most the even-place
      tokens (the reference's indexing fails there).
    - an encoder without a CLS token (SigLIP): every query's attention, averaged, at the output layer (the
      reference's SigLIP tower averages its last layer's).
    - LLaVA-NeXT/OneVision (the reference keeps ``keep`` tokens in every tile, each tile on its own, and
      packs without the unpadding and the newline tokens): one budget over the image's packed tokens, each
      tile's attention ranked together, newline tokens kept, forced by the exact budget and keep-all
      contract (see :mod:`tokenprune.patches.anyres_vision`).
    """
    (attention,) = ctx.require("encoder_attention").values()
    num_important = int(keep * important_ratio)
    num_diverse = keep - num_important
    ranked = attention.float().sort(dim=1, descending=True).indices
    residual = ranked[:, num_important:]
    if num_diverse == 0:
        return ranked[:, :num_important].sort(dim=1).values
    tokens = torch.nn.functional.normalize(gather_tokens(ctx.features.float(), residual), dim=-1)
    similarity = tokens @ tokens.transpose(1, 2)  # [I, R, R]: once, each round reads its even x odd block
    place = torch.arange(residual.shape[1], device=residual.device).expand_as(residual)  # in the first one
    flat = similarity.flatten(1)  # each round gathers its even x odd block by flat index, in one op
    while place.shape[1] > num_diverse:  # rounds known on the host: the shapes alone decide them
        removed = min(PER_ROUND, place.shape[1] - num_diverse)
        even, odd = place[:, ::2], place[:, 1::2]
        block = (even * similarity.shape[2]).unsqueeze(2) + odd.unsqueeze(1)  # [I, E, O]
        closest = flat.gather(1, block.flatten(1)).view_as(block).amax(dim=-1)
        distinct = closest.sort(dim=1, descending=True).indices[:, removed:]
        place = torch.cat([torch.gather(even, 1, distinct), odd], dim=1)
    kept = torch.cat([ranked[:, :num_important], torch.gather(residual, 1, place)], dim=1)
    return kept.sort(dim=1).values
