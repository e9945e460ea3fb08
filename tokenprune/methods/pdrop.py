"""PyramidDrop: a pyramid of stages, each dropping the visual tokens the last instruction token ignores.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction" (CVPR 2025). Reference: github.com/Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py``
(``LlamaModel.pdrop_forward`` and ``LlamaModel.pdrop_rank_drop``).
"""

from __future__ import annotations

import torch

from ..context import SelectionContext
from ..registry import register_method
from ._select import top_k


@register_method(
    "pdrop", default_layer=8, needs=("pruning_layer_attention",), positions="renumbered", pyramid=3
)
def pdrop(ctx: SelectionContext, keep: int) -> torch.Tensor:
    """Keep, at each of three layers, the tokens the prompt's last token attends to most (PyramidDrop).

    As in the reference (Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py``,
    ``LlamaModel.pdrop_rank_drop``; tests/test_parity_pdrop.py): before the layers of its ``layer_list``
    (8, 16 and 24 on LLaVA-1.5-7B's 32), the layer about to run projects its input to the prompt's last
    token's query and every token's keys (RoPE at the positions so far), softmax over the prompt, heads
    averaged; the image's tokens still kept with the highest attention are kept, at renumbered positions,
    and the stage's ratio of the image's original tokens (0.5, 0.25, 0.125: lambda = 0.5) is kept.

    Without a schedule, the stages are at ``layer``, ``2 * layer`` and ``3 * layer``, ``layer`` defaulting
    to a quarter of the language model's depth (8 of 32, as the reference; 1 of the tiny test models' 4);
    stage ``s`` keeps ``keep_ratio ** (s / 3)`` of each image's tokens (``keep_ratio=0.125`` is the
    reference's pyramid; ``budget / N`` in its place for a budget). ``schedule=`` sets any other pyramid.

    Deviations:
    - counts ``max(1, round(ratio * N))``, not ``int(ratio * N)`` (the same for LLaVA's 576 tokens).
    - the default layers scale with the model's depth (the reference takes its ``layer_list`` as given).
    - float32 attention (the reference rounds the softmax to the model's dtype before averaging heads).
    - only the last token's query row is computed (FlashAttention/SDPA give no weights).
    - several images in a prompt: each keeps its share, ranked alone (the reference takes one per prompt).
    """
    return top_k(ctx.require("pruning_layer_attention"), keep)
