"""FastV: drop the visual tokens that the prompt's last token attends to least, at an early layer.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
Large Vision-Language Models" (ECCV 2024).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from ._select import top_k


@register_method("fastv", default_layer=2, needs=("attention",))
def fastv(ctx: SelectionContext, keep: int) -> torch.Tensor:
    """Keep the visual tokens the last prompt token attends to most at layer K-1 (FastV).

    As in the reference (pkunlp-icler/FastV, ``LlamaModel.forward`` with ``fastv_config``;
    tests/test_parity_fastv.py): layer K-1's attention map, averaged over heads, ranks the image tokens by
    its last row (the prompt's last token); the top ``keep`` are kept from layer K on, at their positions
    (the reference sets ``position_ids = keep_indexs``).

    Deviations:
    - only the last token's row is recomputed, from queries and keys (FlashAttention/SDPA give no weights).
    - float32 row (the reference casts the eager weights to the model's dtype before the head average).
    """
    return top_k(ctx.require("attention"), keep)
