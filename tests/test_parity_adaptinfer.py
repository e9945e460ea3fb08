"""AdaptInfer against a small re-implementation of its official selection code, written from reading that
code, on identical inputs: random attention maps, and a tiny model's own attention through the real hooks."""

import math

import pytest
import torch
from conftest import shared_model
from helpers import stage_attention_maps

import tokenprune as tp
from tokenprune.context import InstructionRows, SelectionContext
from tokenprune.registry import get_method
from tokenprune.testing import tiny_inputs

SYSTEM, IMAGE = 35, 576  # LLaVA-1.5: the system prompt's tokens, then 24x24 image tokens, then the text


def adaptinfer_reference(weights: torch.Tensor, image_start: int, image_length: int, keep: int) -> list[int]:
    """The image tokens weiczh02/AdaptInfer-base keeps of one prompt (indices within the image).

    Re-implemented from commit 9dac67c026b5a9f9b4f5bd294e3c8ed1b308976b,
    ``llava/model/language_model/score.py``: ``attn_postprocess_topk_with_t2t_weighting`` (``lb=1``, its
    default), fed, as ``LlamaDynamicvitModel.forward`` of ``modelling_sparse_llama.py`` (commit
    91b1784aea9f614c0e0e7f3c1990b0d163cfe52b) does at a pruning layer, that layer's causal softmax map
    ``weights [H, L, L]`` over the prompt. The text starts right after the image and runs to the end.
    """
    text_start = image_start + image_length
    t2t = weights[:, text_start:, text_start:]  # [H, T, T]
    symmetric = t2t + t2t.transpose(-1, -2) - torch.diag_embed(torch.diagonal(t2t, dim1=-2, dim2=-1))
    importance = symmetric.sum(dim=1)  # [H, T]: summed over the rows
    t2v = weights[:, text_start:, image_start:text_start]  # [H, T, V]
    scores = (importance[:, None, :] @ t2v).squeeze(1).sum(dim=0)  # [V]
    return scores.topk(keep).indices.tolist()


def causal_map(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The causal softmax attention map ``[H, L, L]`` of ``query [H, L, d]`` over ``keys [H_kv, L, d]``."""
    keys = keys.repeat_interleave(query.shape[0] // keys.shape[0], dim=0)
    length = query.shape[1]
    scores = query @ keys.transpose(1, 2) / math.sqrt(query.shape[-1])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


@pytest.mark.parametrize("keep", [64, 144, 192])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaptinfer_keeps_what_the_reference_keeps(keep, seed):
    """Two prompts of different text lengths, batched for ours (the shorter instruction padded and masked)
    and run alone for the reference; the instruction rows are those of each prompt's causal map.

    Deviations (tokenprune/methods/adaptinfer.py), applied: float32 inputs, so the reference scores in
    float32.
    """
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim, texts = 8, 4, 32, (20, 12)
    visual, text, mask = [], [], []
    expected = []
    for length in texts:
        total = SYSTEM + IMAGE + length
        weights = causal_map(
            torch.randn(heads, total, head_dim, generator=g),
            torch.randn(kv_heads, total, head_dim, generator=g),
        )
        rows = weights[:, SYSTEM + IMAGE :]  # [H, T, L]: the instruction's rows
        pad = max(texts) - length
        visual.append(torch.nn.functional.pad(rows[..., SYSTEM : SYSTEM + IMAGE], (0, 0, 0, pad)))
        text.append(torch.nn.functional.pad(rows[..., SYSTEM + IMAGE :], (0, pad, 0, pad)))
        mask.append(torch.arange(max(texts)) < length)
        expected.append(sorted(adaptinfer_reference(weights, SYSTEM, IMAGE, keep)))
    ctx = SelectionContext(
        features=torch.randn(2, IMAGE, 16, generator=g),
        grid=(24, 24),
        image_index=torch.zeros(2, dtype=torch.long),
        instruction_rows=InstructionRows(torch.stack(visual), torch.stack(text), torch.stack(mask)),
    )
    kept = get_method("adaptinfer").select(ctx, keep, {})
    assert [row.tolist() for row in kept] == expected


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("layer", [1, 2])
def test_the_hooks_keep_what_the_reference_keeps_from_the_models_own_attention(family, layer):
    """A tiny model's prompt with one image: the reference reads layer K-1's eager attention map (what the
    reference's pruning layer computes, tokenprune's layer pair) of the unpatched model; the pruner
    recomputes only the instruction's rows, with sdpa."""
    inputs = tiny_inputs(shared_model(family, "eager"), (1,))
    visual = (inputs["input_ids"][0] == shared_model(family, "eager").config.image_token_id).nonzero()[:, 0]
    start, count = int(visual[0]), len(visual)
    with torch.no_grad():
        out = shared_model(family, "eager")(**inputs, output_attentions=True, use_cache=False)
    expected = adaptinfer_reference(out.attentions[layer - 1][0].float(), start, count, 8)
    model = shared_model(family, "sdpa")
    with torch.no_grad(), tp.pruned(model, "adaptinfer", budget=8, layer=layer) as pruner:
        model(**inputs)
    kept = pruner.stats.keep_mask[0, start : start + count].nonzero()[:, 0]
    assert kept.tolist() == sorted(expected)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_renumbered_schedule_keeps_what_the_reference_keeps_at_each_stage(family):
    """The reference's own setting, several stages with renumbered positions: each stage's reference reads the
    eager attention map, at the layer before the stage, of the unpatched model with the tokens dropped by the
    stages before hidden and the kept ones renumbered, restricted to those kept tokens (a hidden key gets no
    weight, so this is the pruned sequence's own map)."""
    eager, model = shared_model(family, "eager"), shared_model(family, "sdpa")
    inputs = tiny_inputs(eager, (1,))
    schedule = ((1, 0.5), (3, 0.25))
    with torch.no_grad(), tp.pruned(model, "adaptinfer", schedule=schedule, positions="renumbered") as pruner:
        model(**inputs)
    image_tokens = int((inputs["input_ids"][0] == eager.config.image_token_id).sum())
    layers = [layer for layer, _ in schedule]
    maps = stage_attention_maps(eager, inputs, pruner.stats.keep_masks, layers)
    for (_, ratio), (_, weights, visual, kept) in zip(schedule, maps, strict=True):
        expected = adaptinfer_reference(weights, int(visual[0]), len(visual), round(ratio * image_tokens))
        assert kept.tolist() == sorted(expected)
