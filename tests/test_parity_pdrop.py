"""PyramidDrop against a small re-implementation of its official rank-and-drop, written from reading that
code: on random query and key states over three stages of LLaVA-1.5's 576 image tokens, and through a tiny
LLaVA's real hooks, where each stage must keep what the reference keeps from that layer's own input."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import tokenprune as tp
from tokenprune.attention import query_attention
from tokenprune.context import SelectionContext
from tokenprune.registry import get_method
from tokenprune.testing import tiny_inputs, tiny_model

SYSTEM, IMAGE = 35, 576  # LLaVA-1.5: the system prompt's tokens, then 24x24 image tokens, then the text


def pdrop_reference(query: torch.Tensor, keys: torch.Tensor, image_start: int, image_tokens: int, keep: int):
    """The image tokens Cooperx521/PyramidDrop keeps at one stage of one prompt (indices within the image).

    Re-implemented from commit 6444f30, ``llava/model/modeling_llama_pdrop.py``:
    ``LlamaModel.pdrop_rank_drop`` (inference branch). ``query [H, L, d]`` and ``keys [H_kv, L, d]`` are
    the next layer's projections of its input, RoPE applied; the last prompt token's row, causal mask added,
    softmax in float32, is averaged over heads; the ``keep`` image tokens of highest attention are kept.
    """
    keys = keys.repeat_interleave(query.shape[0] // keys.shape[0], dim=0)
    last = query[:, -1:]  # the last instruction token: it sees every token before it
    weights = (last @ keys.transpose(1, 2) / math.sqrt(query.shape[-1])).softmax(dim=-1, dtype=torch.float32)
    scores = weights.mean(dim=0).mean(dim=0)[image_start : image_start + image_tokens]
    return scores.topk(keep).indices.sort().values


def reference_counts(ratios: list[float]) -> list[int]:
    """The reference's image token count at each stage: ``int(576 * ratio)``."""
    return [int(IMAGE * ratio) for ratio in ratios]


def test_default_pyramid_is_the_references_on_a_32_layer_model():
    """``keep_ratio=0.125`` on 32 layers: layers 8/16/24 keeping 288/144/72 (the reference's scripts)."""
    config = tp.PrunerConfig("pdrop", keep_ratio=0.125).for_depth(32)
    assert config.stages(IMAGE) == list(zip([8, 16, 24], reference_counts([0.5, 0.25, 0.125]), strict=True))
    assert tp.PrunerConfig("pdrop", keep_ratio=0.125).for_depth(40).stage_layers == [10, 20, 30]
    assert tp.PrunerConfig("pdrop", keep_ratio=0.125, layer=8).for_depth(40).stage_layers == [8, 16, 24]


@pytest.mark.parametrize("final", [64, 144, 192])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_stage_keeps_what_the_reference_keeps(final, seed):
    """Three stages on two prompts of different text lengths, batched with left padding for ours and run
    alone for the reference; at each, new random states over the tokens still kept.

    Deviations (tokenprune/methods/pdrop.py), applied: our counts (``round``) are given to the reference;
    the attention row comes from one query row (``query_attention``); the inputs are float32.
    """
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim, texts = 8, 4, 32, (20, 12)
    stages = tp.PrunerConfig("pdrop", budget=final).for_depth(32).stages(IMAGE)
    count = IMAGE
    for _, keep in stages:
        length = SYSTEM + count + max(texts)
        query = torch.randn(2, heads, length, head_dim, generator=g)
        keys = torch.randn(2, kv_heads, length, head_dim, generator=g)
        pads = [max(texts) - text for text in texts]
        valid = torch.arange(length)[None] >= torch.tensor(pads)[:, None]
        row = query_attention(query[:, :, -1:], keys, valid, head_dim**-0.5)
        starts = [pad + SYSTEM for pad in pads]
        ctx = SelectionContext(
            features=torch.randn(2, count, 16, generator=g),
            grid=None,
            image_index=torch.zeros(2, dtype=torch.long),
            pruning_layer_attention=torch.stack([row[i, s : s + count] for i, s in enumerate(starts)]),
        )
        kept = get_method("pdrop").select(ctx, keep, {})
        for i, pad in enumerate(pads):
            expected = pdrop_reference(query[i, :, pad:], keys[i, :, pad:], SYSTEM, count, keep)
            assert torch.equal(kept[i], expected)
        count = keep
    assert count == final


def test_tiny_llava_stages_rank_with_each_layers_own_input():
    """Tiny LLaVA (4 layers: stages at 1, 2, 3), one prompt: before each stage layer, the reference ranks the
    image tokens still there with that layer's own projections of its input and the positions it gets
    (renumbered by the stages before, as the reference renumbers them); ours keeps the same ones."""
    model = tiny_model("llava", "eager")
    inputs = tiny_inputs(model, (1,))
    layers = model.model.language_model.layers
    seen = {}  # by stage layer K: layer K-1's output and rotary tables, as the layers ran

    def record(index):
        def hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            seen[index + 1] = (hidden[0], kwargs["position_embeddings"])

        return hook

    with tp.pruned(model, "pdrop", keep_ratio=0.25) as pruner, torch.no_grad():
        handles = [layers[i].register_forward_hook(record(i), with_kwargs=True) for i in (0, 1, 2)]
        try:
            model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
    stats = pruner.stats
    assert sorted(stats.keep_masks) == [1, 2, 3]
    visual = inputs["input_ids"][0] == model.config.image_token_id
    present = torch.ones_like(visual)
    for layer, keep in pruner.stages:
        hidden, (cos, sin) = seen[layer]
        attn = layers[layer].self_attn
        with torch.no_grad():
            normed = layers[layer].input_layernorm(hidden)
            shape = (normed.shape[0], -1, attn.head_dim)
            query = attn.q_proj(normed).view(shape).transpose(0, 1)[None]
            keys = attn.k_proj(normed).view(shape).transpose(0, 1)[None]
            query, keys = apply_rotary_pos_emb(query, keys, cos[:1], sin[:1])
        image = visual[present]  # the image tokens among those present, in order
        start = int(image.float().argmax())
        expected = pdrop_reference(query[0], keys[0], start, int(image.sum()), keep)
        kept = stats.keep_masks[layer][0]
        got = (kept[present] & image).nonzero()[:, 0] - start
        assert torch.equal(got, expected), layer
        present = kept
