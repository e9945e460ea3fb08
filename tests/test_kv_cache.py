"""``drop_early_kv``: after prefill every layer's cache holds only the kept tokens, and decode agrees."""

import pytest
import torch
from helpers import ATOL, assert_generate_matches_reference, greedy_with_logits

import tokenprune as tp
from tokenprune.patches._cache_internals import output_cache
from tokenprune.testing import tiny_inputs

LLM_METHODS = ["dart", "fastv"]
RAGGED = (1, 2, 1)


@pytest.fixture
def model(any_model):
    """Every VLM family."""
    return any_model


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("method", LLM_METHODS)
def test_cache_length_per_layer_after_prefill(model, method, drop):
    inputs = tiny_inputs(model, RAGGED)
    length = inputs["input_ids"].shape[1]
    with tp.pruned(model, method, budget=10, drop_early_kv=drop) as pruner, torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    k = pruner.config.acting_layer
    pruned_length = int(pruner.stats.keep_mask.sum(dim=1).max())
    # rows are re-padded to the longest kept row: its prompt tokens less 64 - 10 per image
    real = inputs["attention_mask"].sum(dim=1)
    assert pruned_length == int((real - (64 - 10) * torch.tensor(RAGGED)).max())
    layers = range(len(model.model.language_model.layers))
    rows = [cache.layers[i].keys.shape[2] for i in layers]
    early = pruned_length if drop else length
    assert rows == [early] * k + [pruned_length] * (len(rows) - k)
    # what generate reads to know how many tokens are done: the whole prompt, in every layer
    assert [cache.get_seq_length(i) for i in layers] == [length] * len(rows)


@pytest.mark.parametrize("method", LLM_METHODS)
def test_generate_with_dropped_early_kv_equals_recomputation(model, method):
    inputs = tiny_inputs(model, RAGGED)
    with tp.pruned(model, method, keep_ratio=0.25, drop_early_kv=True) as pruner, torch.no_grad():
        out = greedy_with_logits(model, inputs)
    keep = pruner.stats.keep_mask
    assert_generate_matches_reference(
        model, inputs, out, pruner.stats.keep_masks, early_from_query=inputs["input_ids"].shape[1]
    )
    # the first token comes from the prompt, which the option does not change
    with tp.pruned(model, method, keep_ratio=0.25) as plain, torch.no_grad():
        first = model(**inputs).logits[:, -1]
    assert torch.equal(plain.stats.keep_mask, keep)
    torch.testing.assert_close(out.logits[0], first, atol=ATOL, rtol=0)


def test_drop_early_kv_must_be_a_bool(model):
    with pytest.raises(TypeError, match="drop_early_kv must be a bool"):
        tp.apply_pruner(model, "dart", keep_ratio=0.5, drop_early_kv="yes")
