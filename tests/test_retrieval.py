"""The ``kv`` stage: decode steps attend to the visual entries their query selects, in every layer, while
the cache keeps them all."""

import pytest
import torch
from helpers import ATOL, cache_kwarg, greedy_with_logits, select_sample, tokenprune_hooks
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

import tokenprune as tp
from tokenprune.testing import tiny_inputs, tiny_model

RAGGED = (1, 2, 1)
NEW_TOKENS = 4


def step_masks(
    attention_mask: torch.Tensor, prompt_length: int, steps: list[dict[int, torch.Tensor]], layer: int
):
    """Additive 4-D mask of the unpatched model over the prompt and generated tokens: causal and padding,
    and the row of decode step ``s`` (token ``prompt_length + s - 1``) sees only the prompt tokens that
    step's selection left visible at ``layer``."""
    length = attention_mask.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & attention_mask.bool()[:, None, :]
    for s, visible in enumerate(steps, start=1):
        allowed[:, prompt_length + s - 1, :prompt_length] &= visible[layer]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def masked_recomputation(
    model, inputs: dict, sequences: torch.Tensor, steps: list, upto: int
) -> torch.Tensor:
    """Last-row logits of the unpatched model, without a cache, on the prompt and the first ``upto``
    generated tokens, each decode row restricted as its step was (see :func:`step_masks`)."""
    prompt_length = inputs["input_ids"].shape[1]
    batch = sequences.shape[0]
    ids = sequences[:, : prompt_length + upto]
    mask = torch.cat([inputs["attention_mask"], torch.ones(batch, upto, dtype=torch.long)], dim=1)
    positions = torch.cat(
        [inputs["position_ids"], inputs["position_ids"][:, -1:] + torch.arange(1, upto + 1)], dim=1
    )
    handles = []
    for i, layer in enumerate(model.model.language_model.layers):
        dense = step_masks(mask, prompt_length, steps[:upto], i)
        hook = lambda module, args, kwargs, dense=dense: (args, {**kwargs, "attention_mask": dense})  # noqa: E731
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                pixel_values=inputs["pixel_values"],
                use_cache=False,
            )
    finally:
        for handle in handles:
            handle.remove()
    return out.logits[:, -1]


def test_keep_all_generates_what_the_unpatched_model_does(model):
    inputs = tiny_inputs(model, RAGGED)
    with torch.no_grad():
        expected = greedy_with_logits(model, inputs, NEW_TOKENS)
    with tp.pruned(model, "sparsevila", keep_ratio=1.0) as pruner:
        got = greedy_with_logits(model, inputs, NEW_TOKENS)
    assert torch.equal(got.sequences, expected.sequences)
    for g, e in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)
    assert len(pruner.stats.decode_keep_masks) == NEW_TOKENS - 1


@pytest.mark.parametrize("keep_ratio", [0.25, 0.05])
def test_each_step_equals_recomputation_with_its_selection_masked(model, keep_ratio):
    inputs = tiny_inputs(model, RAGGED)
    with tp.pruned(model, "sparsevila", keep_ratio=keep_ratio) as pruner:
        out = greedy_with_logits(model, inputs, NEW_TOKENS)
    steps = pruner.stats.decode_keep_masks
    assert len(steps) == NEW_TOKENS - 1
    for upto in range(1, NEW_TOKENS):
        expected = masked_recomputation(model, inputs, out.sequences, steps, upto)
        torch.testing.assert_close(out.logits[upto], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("keep_ratio", "cache"), [(0.25, "dynamic"), (0.05, "static")])
def test_the_selection_kernel_selects_what_the_method_selects(kernels, model, monkeypatch, keep_ratio, cache):
    """Each layer of each step selected in one Triton kernel, attention by sdpa (where Triton runs) against
    the method itself and eager attention over the same scores (elsewhere): the same tokens visible in
    every layer and step, and the same logits."""
    inputs = tiny_inputs(model, RAGGED)
    runs = []
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        with tp.pruned(model, "sparsevila", keep_ratio=keep_ratio) as pruner:
            out = greedy_with_logits(model, inputs, NEW_TOKENS, cache_implementation=cache)
        runs.append((out, pruner.stats.decode_keep_masks))
    (fused, fused_steps), (method, method_steps) = runs
    assert torch.equal(fused.sequences, method.sequences)
    for f, m in zip(fused.logits, method.logits, strict=True):
        torch.testing.assert_close(f, m, atol=1e-5, rtol=0)
    assert len(fused_steps) == len(method_steps) == NEW_TOKENS - 1
    for f, m in zip(fused_steps, method_steps, strict=True):
        assert sorted(f) == sorted(m) and all(torch.equal(f[layer], m[layer]) for layer in m)


def test_each_layer_selects_the_configured_count_per_image(model):
    inputs = tiny_inputs(model, RAGGED)
    visual = inputs["input_ids"] == model.config.image_token_id
    with tp.pruned(model, "sparsevila", budget=10) as pruner:
        greedy_with_logits(model, inputs, NEW_TOKENS)
    stats = pruner.stats
    assert stats.stage == "kv" and stats.kept_tokens == [10 * k for k in RAGGED]
    selections = set()
    for step in stats.decode_keep_masks:
        assert sorted(step) == list(range(len(model.model.language_model.layers)))
        for visible in step.values():
            assert (visible & visual).sum(dim=1).tolist() == [10 * k for k in RAGGED]
            assert bool(visible[~visual].all())  # text is never hidden
            selections.add(tuple((visible & visual).nonzero()[:, 1].tolist()))
    assert len(selections) > 1  # queries of different layers and steps choose differently


def test_the_cache_keeps_every_visual_entry(model):
    inputs = tiny_inputs(model, RAGGED)
    cache = DynamicCache(config=model.config.text_config)
    length = inputs["input_ids"].shape[1]
    with tp.pruned(model, "sparsevila", keep_ratio=0.25), torch.no_grad():
        model.generate(**inputs, **cache_kwarg(cache), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert [cache.get_seq_length(i) for i in range(len(cache.layers))] == [length + 2] * len(cache.layers)


def test_batch_equals_each_sample_alone(model):
    inputs = tiny_inputs(model, RAGGED)
    with tp.pruned(model, "sparsevila", keep_ratio=0.25):
        batched = greedy_with_logits(model, inputs, NEW_TOKENS)
        for b in range(len(RAGGED)):
            alone = greedy_with_logits(model, select_sample(inputs, b, RAGGED), NEW_TOKENS)
            assert torch.equal(batched.sequences[b, -NEW_TOKENS:], alone.sequences[0, -NEW_TOKENS:])
            for g, a in zip(batched.logits, alone.logits, strict=True):
                torch.testing.assert_close(g[b : b + 1], a, atol=ATOL, rtol=0)


def test_text_only_and_remove(model):
    text = tiny_inputs(model, (0, 0))
    inputs = tiny_inputs(model, RAGGED)
    with torch.no_grad():
        expected = greedy_with_logits(model, inputs, NEW_TOKENS)
        text_expected = model(**text).logits
    pruner = tp.apply_pruner(model, "sparsevila", keep_ratio=0.25)
    with torch.no_grad():
        assert torch.equal(model(**text).logits, text_expected)
    assert pruner.stats.visual_tokens == [0, 0]
    greedy_with_logits(model, inputs, NEW_TOKENS)
    tp.remove_pruner(model)
    assert not tokenprune_hooks(model)
    for layer in model.model.language_model.layers:  # each attention's own config and function again
        assert layer.self_attn.config is model.config.text_config
        assert not hasattr(layer.self_attn, "_tokenprune_attention")
    assert torch.equal(greedy_with_logits(model, inputs, NEW_TOKENS).sequences, expected.sequences)


def test_an_attention_that_reads_its_name_off_the_config_sees_its_own():
    """FlashAttention's function reads ``module.config._attn_implementation`` to pick its kernel: at a
    prefill, routed through the kv hooks, it still reads its own name, and computes what it did before."""
    seen = []

    def reads_its_name(module, *args, **kwargs):
        seen.append(module.config._attn_implementation)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, *args, **kwargs)

    AttentionInterface.register("name_reading_probe", reads_its_name)
    model = tiny_model("llava", attn_implementation="name_reading_probe")
    inputs = tiny_inputs(model, RAGGED)
    with torch.no_grad():
        expected = model(**inputs).logits
        with tp.pruned(model, "sparsevila", keep_ratio=0.25):
            got = model(**inputs).logits
    assert torch.equal(got, expected)
    assert set(seen) == {"name_reading_probe"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_ratio": 0.25, "layer": 2}, "acts at decode steps"),
        ({"keep_ratio": 0.25, "drop_early_kv": True}, "acts at decode steps"),
        ({"budget": 65}, "larger than the 64 visual tokens"),
    ],
)
def test_bad_kv_config(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tp.apply_pruner(model, "sparsevila", **kwargs)
    assert not tokenprune_hooks(model)


def test_a_static_cache_without_an_attention_mask_decodes_as_a_dynamic_one(model):
    """``generate`` with no mask (an unpadded prompt): each step's mask covers the static cache's slots."""
    unpadded = tiny_inputs(model, (2,))
    inputs = {k: v for k, v in unpadded.items() if k not in ("attention_mask", "position_ids")}
    with tp.pruned(model, "sparsevila", keep_ratio=0.25), torch.no_grad():
        dynamic = greedy_with_logits(model, inputs)
        static = greedy_with_logits(model, inputs, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    for s, d in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(s, d, atol=ATOL, rtol=0)
