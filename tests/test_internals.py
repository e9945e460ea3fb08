"""The transformers internals the adapters rely on are where they expect, and a move fails loudly."""

import pytest
import torch
from helpers import INVARIANT_FAMILIES
from torch import nn

import tokenprune as tp
from tokenprune.attention import query_attention
from tokenprune.patches import _internals as internals
from tokenprune.patches import adapter_for
from tokenprune.patches._cache_internals import output_cache
from tokenprune.testing import tiny_inputs, tiny_model


def test_internals_present_on_installed_transformers(model):
    internals.check_decoder_internals(model.model.language_model)


@pytest.mark.parametrize(
    ("break_it", "named"),
    [
        (lambda lm: delattr(lm.layers[0], "input_layernorm"), "input_layernorm"),
        (lambda lm: delattr(lm.layers[0].self_attn, "k_proj"), "self_attn.k_proj"),
        (lambda lm: delattr(lm.layers[0].self_attn, "scaling"), "scaling"),
        (lambda lm: setattr(lm, "layers", nn.ModuleList()), "layers"),
    ],
)
def test_a_moved_internal_is_named(break_it, named):
    model = tiny_model()
    break_it(model.model.language_model)
    with pytest.raises(internals.InternalsMovedError, match=named):
        adapter_for(model)


@pytest.mark.parametrize(
    ("name", "method"), [("apply_rotary_pos_emb", "fastv"), ("eager_attention_forward", "sparsevila")]
)
def test_a_moved_modeling_function_is_named_before_any_hook(monkeypatch, name, method):
    model = tiny_model()
    attention = model.model.language_model.layers[0].self_attn
    module = __import__(type(attention).__module__, fromlist=["x"])
    monkeypatch.delattr(module, name)
    with pytest.raises(internals.InternalsMovedError, match=name):
        tp.apply_pruner(model, method, keep_ratio=0.5)
    assert not hasattr(model, "_tokenprune_pruner") and attention.config is model.config.text_config


def test_recomputed_attention_row_equals_eager_weights():
    """The one query row FastV recomputes equals the eager attention weights of that layer."""
    model = tiny_model(attn_implementation="eager")
    inputs = tiny_inputs(model, (1, 2))
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    layer = model.model.language_model.layers[1]
    hidden = out.hidden_states[1]  # input of layer 1
    rotary = model.model.language_model.rotary_emb(hidden, inputs["position_ids"])
    last = torch.full((2,), hidden.shape[1] - 1)
    query, keys = internals.project_queries_keys(layer, hidden, rotary, last)
    from tokenprune.attention import query_attention

    got = query_attention(query, keys, inputs["attention_mask"].bool(), internals.attention_scaling(layer))
    expected = out.attentions[1][:, :, -1].mean(dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", INVARIANT_FAMILIES)
def test_recomputed_queries_and_keys_are_the_layers_own(family):
    """On every family (Qwen3-VL's per-head q/k norms, M-RoPE), the keys recomputed from a layer's input
    are those the layer cached, and the last query's attention row equals its eager attention weights."""
    model = tiny_model(family, attn_implementation="eager")
    inputs = tiny_inputs(model, (1, 2))
    layer = model.model.language_model.layers[1]
    seen = {}

    def record(module, args, kwargs):
        seen.update(hidden=internals.layer_hidden_states(args, kwargs), rotary=kwargs["position_embeddings"])

    handle = layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True, output_attentions=True)
    finally:
        handle.remove()
    last = torch.full((2,), seen["hidden"].shape[1] - 1)
    query, keys = internals.project_queries_keys(layer, seen["hidden"], seen["rotary"], last)
    torch.testing.assert_close(keys, output_cache(out).layers[1].keys, atol=1e-5, rtol=0)
    mask, scaling = inputs["attention_mask"].bool(), internals.attention_scaling(layer)
    expected = out.attentions[1][:, :, -1].mean(dim=1)
    torch.testing.assert_close(query_attention(query, keys, mask, scaling), expected, atol=1e-5, rtol=0)


def test_keys_are_those_cached_by_the_layer_before_pruning():
    """``ctx.keys`` at layer K equals what transformers itself cached for layer K-1 at the visual rows."""
    from tokenprune.methods._select import top_k
    from tokenprune.registry import _REGISTRY

    seen = []

    @tp.register_method("_record_keys", default_layer=2, needs=("keys",))
    def record_keys(ctx, keep):
        seen.append(ctx.keys)
        return top_k(ctx.keys.norm(dim=-1), keep)

    try:
        model = tiny_model()
        inputs = tiny_inputs(model, (1,))
        with tp.pruned(model, "_record_keys", keep_ratio=0.5), torch.no_grad():
            cache = output_cache(model(**inputs, use_cache=True))
        visual = inputs["input_ids"][0] == model.config.image_token_id
        cached = cache.layers[1].keys[0][:, visual]  # [H_kv, N, d], layer K-1 = 1
        torch.testing.assert_close(seen[0][0], cached.transpose(0, 1).flatten(1), atol=1e-5, rtol=0)
    finally:
        del _REGISTRY["_record_keys"]


@pytest.mark.parametrize("with_keys", [True, False])
def test_the_instruction_is_what_follows_the_images_in_each_prompt(with_keys):
    """``ctx.instruction`` at layer K: the keys transformers cached for layer K-1 (where the method needs
    keys; none where it does not) and the hidden states entering layer K at the real tokens after each
    prompt's last image token (a ragged, left-padded batch pads the shorter instruction), and
    ``ctx.final_norm`` the language model's own."""
    from tokenprune.methods._select import top_k
    from tokenprune.registry import _REGISTRY

    seen = []

    needs = ("instruction", "final_norm") + (("keys",) if with_keys else ())

    @tp.register_method("_record_instruction", default_layer=2, needs=needs)
    def record_instruction(ctx, keep):
        seen.append(ctx)
        return top_k(ctx.features.norm(dim=-1), keep)

    model = tiny_model()
    inputs = tiny_inputs(model, (1, 2), text_lengths=(12, 5))
    layer_input = {}
    hook = model.model.language_model.layers[2].register_forward_pre_hook(
        lambda module, args, kwargs: layer_input.update(hidden=internals.layer_hidden_states(args, kwargs)),
        with_kwargs=True,
    )
    try:
        with tp.pruned(model, "_record_instruction", keep_ratio=1.0), torch.no_grad():
            cache = output_cache(model(**inputs, use_cache=True))
    finally:
        hook.remove()
        del _REGISTRY["_record_instruction"]
    (ctx,) = seen
    assert ctx.final_norm is model.model.language_model.norm
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    positions = torch.arange(ids.shape[1])
    counts = []
    for image, row in enumerate([0, 1, 1]):  # the batch's images, row by row
        last_image = int(torch.where(ids[row] == model.config.image_token_id, positions, -1).max())
        rows = positions[(positions > last_image) & mask[row]]
        counts.append(len(rows))
        assert ctx.instruction.mask[image].tolist() == [
            i < len(rows) for i in range(ctx.instruction.mask.shape[1])
        ]
        cached = cache.layers[1].keys[row][:, rows].transpose(0, 1).flatten(1)
        if with_keys:
            torch.testing.assert_close(ctx.instruction.keys[image, : len(rows)], cached, atol=1e-5, rtol=0)
        else:
            assert ctx.instruction.keys is None
        torch.testing.assert_close(
            ctx.instruction.features[image, : len(rows)], layer_input["hidden"][row, rows]
        )
    assert counts[0] != counts[1]  # the batch pads the shorter instruction
