"""FastV against a small re-implementation of its official selection code, written from reading that code,
on identical random inputs: the same tokens must be kept once the deviations of its docstring are applied."""

import math

import pytest
import torch

from tokenprune.attention import query_attention
from tokenprune.context import SelectionContext
from tokenprune.registry import get_method

SYSTEM, IMAGE = 35, 576  # LLaVA-1.5: the system prompt's tokens, then 24x24 image tokens, then the text


def fastv_reference(
    query: torch.Tensor, keys: torch.Tensor, image_start: int, image_length: int, ratio: float
) -> list[int]:
    """The image tokens pkunlp-icler/FastV keeps of one prompt (indices within the image).

    Re-implemented from commit d165972,
    ``src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py``:
    ``LlamaModel.forward`` (the ``fastv_config`` branch at ``layer_idx == FASTV_k``), fed the eager
    attention weights of layer K-1.
    ``query [H, L, d]`` and ``keys [H_kv, L, d]`` are that layer's states, RoPE applied. The causal attention
    map is averaged over heads; its last row, over the image tokens, ranks them; the top
    ``round(image_length * (1 - ratio))`` are kept.
    """
    keys = keys.repeat_interleave(query.shape[0] // keys.shape[0], dim=0)  # grouped-query heads shared
    length = query.shape[1]
    scores = query @ keys.transpose(1, 2) / math.sqrt(query.shape[-1])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    last_row = weights.mean(dim=0)[-1, image_start : image_start + image_length]
    return last_row.topk(round(image_length * (1 - ratio))).indices.tolist()


@pytest.mark.parametrize("keep", [64, 144, 192])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fastv_keeps_what_the_reference_keeps(keep, seed):
    """Two prompts of different text lengths, batched with left padding for ours and run alone for the
    reference; ``ctx.attention`` is what the decoder adapter computes from the same states (the last real
    token's query row against every key, heads averaged).

    Deviations (tokenprune/methods/fastv.py), applied:
    the attention row comes from one query row (``query_attention``), the reference's from the full map;
    the inputs are float32, so the reference scores in float32 too (in the model's dtype otherwise).
    """
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim, texts = 8, 4, 32, (20, 12)
    length = SYSTEM + IMAGE + max(texts)
    query = torch.randn(2, heads, length, head_dim, generator=g)
    keys = torch.randn(2, kv_heads, length, head_dim, generator=g)
    pads = [max(texts) - text for text in texts]  # left padding
    valid = torch.arange(length)[None] >= torch.tensor(pads)[:, None]
    row = query_attention(query[:, :, -1:], keys, valid, head_dim**-0.5)  # [2, L]
    starts = [pad + SYSTEM for pad in pads]
    attention = torch.stack([row[i, start : start + IMAGE] for i, start in enumerate(starts)])
    ctx = SelectionContext(
        features=torch.randn(2, IMAGE, 16, generator=g),
        grid=(24, 24),
        image_index=torch.zeros(2, dtype=torch.long),
        attention=attention,
    )
    kept = get_method("fastv").select(ctx, keep, {})
    for i, pad in enumerate(pads):
        expected = fastv_reference(query[i, :, pad:], keys[i, :, pad:], SYSTEM, IMAGE, 1 - keep / IMAGE)
        assert kept[i].tolist() == sorted(expected)
