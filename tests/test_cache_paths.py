"""The ways users run a pruned model beyond one cached ``generate``: a static cache, a compiled decode step,
generation continued from a returned cache, padding-free (packed) batches, ``inputs_embeds``, and the base
model classes; on every family, each against the plain path it must equal."""

import pytest
import torch
from conftest import shared_model
from helpers import ATOL, cache_kwarg, greedy_with_logits, masked_reference
from torch._dynamo.utils import counters
from transformers import CompileConfig, DynamicCache

import tokenprune as tp
from tokenprune.testing import ANYRES_FAMILIES, FAMILIES, tiny_inputs

STAGES = tp.list_methods()
DECODER_METHODS = sorted(m for m, (stage, _) in STAGES.items() if stage in ("pre_llm", "llm"))
#: (family, method, options): every decoder method on every family; on LLaVA also a schedule, the vision
#: and kv stages, and ``drop_early_kv`` and renumbered positions (everywhere)
CONFIGS = [
    *[(f, m, {}) for f in FAMILIES for m in DECODER_METHODS],
    *[(f, "fastv", {"drop_early_kv": True}) for f in FAMILIES],
    *[(f, "fastv", {"positions": "renumbered"}) for f in FAMILIES],
    ("llava", "dart", {"schedule": ((1, 0.5), (2, 0.25))}),
    *[("llava", m, {}) for m, (stage, _) in sorted(STAGES.items()) if stage in ("vision", "kv")],
]
IDS = [f"{f}-{m}{'-' + '-'.join(o) if o else ''}" for f, m, o in CONFIGS]


@pytest.fixture
def vlm(family, attn):
    """The tiny model of ``family`` (every VLM family) for ``attn``, shared; left unpatched by the test."""
    m = shared_model(family, attn)
    yield m
    assert not hasattr(m, "_tokenprune_pruner"), "test left a pruner on the shared model"


def prompts(model) -> dict:
    """A ragged batch: prompts of different lengths and image counts, left-padded."""
    return tiny_inputs(model, (1, 2) if model.config.model_type in ANYRES_FAMILIES else (1, 2, 1))


def pruner_kwargs(options: dict) -> dict:
    return options if "schedule" in options else {"keep_ratio": 0.25, **options}


def assert_same_generation(got, expected) -> None:
    assert torch.equal(got.sequences, expected.sequences)
    for got_step, expected_step in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(got_step, expected_step, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("family", "method", "options"), CONFIGS, ids=IDS)
def test_static_cache_generate_equals_dynamic(vlm, method, options):
    inputs = prompts(vlm)
    with tp.pruned(vlm, method, **pruner_kwargs(options)), torch.no_grad():
        dynamic = greedy_with_logits(vlm, inputs)
        static = greedy_with_logits(vlm, inputs, cache_implementation="static")
    assert_same_generation(static, dynamic)


@pytest.mark.parametrize(("family", "method", "options"), CONFIGS, ids=IDS)
def test_generation_continued_from_the_returned_cache_equals_one_shot(vlm, method, options):
    """``generate`` on the sequences and cache a first ``generate`` returned (as a chat's next turn does): the
    cache holds fewer rows than the tokens it stands for, and the continuation feeds only the new ones."""
    inputs = prompts(vlm)
    with tp.pruned(vlm, method, **pruner_kwargs(options)), torch.no_grad():
        # no end-of-sequence token: a prompt finished in the first call would go on in the second
        one_shot = greedy_with_logits(vlm, inputs, new_tokens=6, min_new_tokens=6)
        first = greedy_with_logits(vlm, inputs, new_tokens=3, min_new_tokens=3)
        sequences = first.sequences
        mask = torch.cat(
            [inputs["attention_mask"], torch.ones_like(sequences[:, inputs["input_ids"].shape[1] :])], 1
        )
        rest = {key: value for key, value in inputs.items() if key == "mm_token_type_ids"}
        if rest:
            text = torch.zeros_like(sequences[:, inputs["input_ids"].shape[1] :])
            rest["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], text], dim=1)
        continued = greedy_with_logits(
            vlm,
            {"input_ids": sequences, "attention_mask": mask, **rest, **cache_kwarg(first.past_key_values)},
            new_tokens=3,
            min_new_tokens=3,
        )
    assert torch.equal(continued.sequences, one_shot.sequences)
    for got, expected in zip(continued.logits, one_shot.logits[3:], strict=True):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_images_in_a_continued_cache_are_refused_before_any_work():
    model = shared_model("llava", "sdpa")
    inputs = prompts(model)
    with tp.pruned(model, "divprune", keep_ratio=0.25), torch.no_grad():
        first = greedy_with_logits(model, inputs, new_tokens=2)
        cache = first.past_key_values
        rows = [layer.keys.shape[2] for layer in cache.layers]
        with pytest.raises(ValueError, match="cannot add images to a cache whose visual tokens were pruned"):
            model(**{**inputs, **cache_kwarg(cache)})
    assert [layer.keys.shape[2] for layer in cache.layers] == rows


@pytest.mark.parametrize("method", ["divprune", "fastv", "sparsevila"])
def test_a_reset_cache_takes_a_new_prompt(method):
    """A cache object reused for a new prompt after ``cache.reset()`` (as with a static cache kept across
    requests) forgets how its last prompt was pruned: the new prefill equals one on a fresh cache."""
    model = shared_model("llava", "sdpa")
    inputs = prompts(model)
    other = tiny_inputs(model, (2, 1, 1), seed=1)
    with tp.pruned(model, method, keep_ratio=0.25), torch.no_grad():
        expected = model(**other, **cache_kwarg(DynamicCache(config=model.config.text_config))).logits
        cache = DynamicCache(config=model.config.text_config)
        model(**inputs, **cache_kwarg(cache))
        cache.reset()
        assert cache.get_seq_length() == 0
        got = model(**other, **cache_kwarg(cache)).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


COMPILED = [
    ("divprune", {}),
    ("fastv", {}),
    ("dart", {"drop_early_kv": True}),
    ("fastv", {"positions": "renumbered"}),
    ("tome", {}),
    ("sparsevila", {}),
]


@pytest.mark.parametrize(("method", "options"), COMPILED, ids=[m + "-".join(o) for m, o in COMPILED])
def test_compiled_static_decode_equals_eager(method, options):
    """transformers' own compiled decode (static cache, ``fullgraph=True``: our decode-step hooks trace
    without a graph break) after an eager pruned prefill: the tokens and logits of eager decoding, one graph
    for every step, and no recompilation for a second generate of the same shape."""
    model = shared_model("llava", "sdpa")
    inputs = prompts(model)
    config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True  # compile on the CPU too
    torch.compiler.reset()
    counters.clear()
    with tp.pruned(model, method, keep_ratio=0.25, **options), torch.no_grad():
        eager = greedy_with_logits(model, inputs)
        compiled = greedy_with_logits(model, inputs, cache_implementation="static", compile_config=config)
        assert counters["stats"]["unique_graphs"] == 1
        with torch.compiler.set_stance("fail_on_recompile"):
            again = greedy_with_logits(model, inputs, cache_implementation="static", compile_config=config)
    assert hasattr(model, "_compiled_call")  # decode ran compiled
    del model._compiled_call
    assert_same_generation(compiled, eager)
    assert_same_generation(again, eager)


def test_compiled_forward_equals_eager():
    """``torch.compile`` of the whole forward, prefill and selection included (graph breaks where selection
    reads the data), on a pruned ragged batch: the eager logits and the same kept tokens."""
    model = shared_model("llava", "sdpa")
    inputs = prompts(model)
    torch.compiler.reset()
    with tp.pruned(model, "fastv", keep_ratio=0.25) as pruner, torch.no_grad():
        expected = model(**inputs).logits
        kept = pruner.stats.keep_mask
        got = torch.compile(model.forward)(**inputs).logits
        assert torch.equal(pruner.stats.keep_mask, kept)
    torch.compiler.reset()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("positions", ["original", "renumbered"])
@pytest.mark.parametrize("method", ["divprune", "dart", "fastv", "feather", "transprune", "adaptinfer"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_packed_sequences_equal_padded_ones(vlm, method, positions):
    """A padding-free batch (prompts packed in one row, position ids restarting at each) gives each prompt's
    last token the logits it gets in a padded batch: the pruned layers keep the prompts apart (and
    renumber each prompt's positions on its own)."""
    inputs = prompts(vlm)
    real = inputs["attention_mask"].bool()
    lengths = real.sum(dim=1)
    packed = {
        "input_ids": inputs["input_ids"][real][None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths.tolist()])[None],
        **{k: inputs[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if k in inputs},
    }
    if "mm_token_type_ids" in inputs:
        text_positions = packed["position_ids"]
        vision_positions, _ = vlm.model.get_rope_index(
            inputs["input_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        packed["mm_token_type_ids"] = inputs["mm_token_type_ids"][real][None]
        packed["position_ids"] = torch.cat([text_positions, vision_positions[:, real].view(3, -1)])[:, None]
    with tp.pruned(vlm, method, keep_ratio=0.25, positions=positions) as pruner, torch.no_grad():
        padded = vlm(**inputs, use_cache=False).logits[:, -1]
        got = vlm(**packed, use_cache=False).logits[0]
        kept = pruner.stats.keep_mask[0]
    ends = torch.cumsum(lengths, 0) - 1  # each prompt's last token in the packed row
    rows = torch.cumsum(kept.long(), 0)[ends] - 1  # ... and its row after pruning
    torch.testing.assert_close(got[rows], padded, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_embeds_are_pruned_as_input_ids(vlm):
    """A call made with ``inputs_embeds`` (placeholders as their embedding, as the model finds them) prunes
    the same tokens as with ``input_ids`` and matches the masked reference on the same embeddings; a
    text-only one passes through."""
    inputs = prompts(vlm)
    with torch.no_grad():
        embeds = vlm.get_input_embeddings()(inputs["input_ids"])
    by_embeds = {**{k: v for k, v in inputs.items() if k != "input_ids"}, "inputs_embeds": embeds}
    config = tp.PrunerConfig("divprune", keep_ratio=0.25, positions="original")  # the masked reference's
    with tp.pruned(vlm, config) as pruner, torch.no_grad():
        vlm(**inputs)
        by_ids = pruner.stats.keep_mask
        got = vlm(**by_embeds).logits
        stages = pruner.stats.keep_masks
        text_only = vlm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    assert torch.equal(stages[max(stages)], by_ids)
    expected = masked_reference(vlm, by_embeds, stages)
    kept = by_ids & inputs["attention_mask"].bool()
    for b in range(kept.shape[0]):
        n = int(by_ids[b].sum())
        torch.testing.assert_close(
            got[b, got.shape[1] - n :][inputs["attention_mask"][b].bool()[by_ids[b]]],
            expected[b][kept[b]],
            atol=ATOL,
            rtol=0,
        )
    with torch.no_grad():
        torch.testing.assert_close(
            text_only,
            vlm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits,
            atol=0,
            rtol=0,
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_pruner_on_the_base_model_equals_pruner_on_the_generation_head(vlm):
    inputs = prompts(vlm)
    with tp.pruned(vlm, "fastv", keep_ratio=0.25), torch.no_grad():
        expected = vlm(**inputs).logits
    with tp.pruned(vlm.model, "fastv", keep_ratio=0.25), torch.no_grad():
        got = vlm(**inputs).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_a_prepared_4d_mask_at_prefill_is_refused_before_any_work():
    model = shared_model("llava", "sdpa")
    inputs = prompts(model)
    length = inputs["input_ids"].shape[1]
    four_d = inputs["attention_mask"][:, None, None, :].expand(-1, 1, length, -1).bool()
    with tp.pruned(model, "divprune", keep_ratio=0.25) as pruner, pytest.raises(ValueError, match="2-D"):
        model(**{**inputs, "attention_mask": four_d})
    assert pruner.stats is None
