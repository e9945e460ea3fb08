"""Bad configuration fails early and clearly, before the model is touched."""

import pytest
import torch
from helpers import cache_kwarg, tokenprune_hooks
from transformers import LlamaConfig, LlamaForCausalLM

import tokenprune as tp
from tokenprune.patches._cache_internals import output_cache
from tokenprune.testing import tiny_inputs


@pytest.fixture
def llava(model):
    return model


def assert_untouched(model):
    assert not hasattr(model, "_tokenprune_pruner")
    assert not tokenprune_hooks(model)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "nope", "keep_ratio": 0.5}, ValueError, "registered methods: .*dart.*fastv"),
        ({"method": "fastv"}, ValueError, "exactly one of keep_ratio"),
        ({"method": "fastv", "keep_ratio": 0.5, "budget": 4}, ValueError, "exactly one of keep_ratio"),
        ({"method": "fastv", "keep_ratio": 0.0}, ValueError, r"\(0, 1\]"),
        ({"method": "fastv", "keep_ratio": 1.5}, ValueError, r"\(0, 1\]"),
        ({"method": "fastv", "keep_ratio": "half"}, TypeError, "keep_ratio must be a number"),
        ({"method": "fastv", "budget": 0}, ValueError, "budget must be >= 1"),
        ({"method": "fastv", "budget": 2.5}, TypeError, "budget must be an int"),
        ({"method": "fastv", "budget": 65}, ValueError, "larger than the 64 visual tokens"),
        (
            {"method": "fastv", "budget": 65, "per_frame": True},
            ValueError,
            "larger than the 64 visual tokens per",
        ),
        ({"method": "fastv", "keep_ratio": 0.5, "per_frame": True}, ValueError, "per_frame counts a budget"),
        ({"method": "fastv", "budget": 4, "per_frame": 1}, TypeError, "per_frame must be a bool"),
        (
            {"method": "fastv", "keep_ratio": 0.5, "layer": 4},
            ValueError,
            r"outside .* 4 layers \(valid: 0..3\)",
        ),
        ({"method": "fastv", "keep_ratio": 0.5, "layer": -1}, ValueError, "layer must be >= 0"),
        ({"method": "random", "keep_ratio": 0.5, "sed": 3}, ValueError, "unknown option.*'sed'.*seed"),
        ({"method": "dart", "keep_ratio": 0.25, "pivots": "x"}, TypeError, "dart option pivots must be"),
        ({"method": "idpruner", "keep_ratio": 0.25, "lam": 2.0}, ValueError, r"lam must be .* in \[0, 1\]"),
        ({"method": 3, "keep_ratio": 0.5}, TypeError, "registered name"),
    ],
)
def test_bad_config_raises_before_any_work(llava, kwargs, error, match):
    kwargs = dict(kwargs)
    method = kwargs.pop("method")
    with pytest.raises(error, match=match):
        tp.apply_pruner(llava, method, **kwargs)
    assert_untouched(llava)


def test_unsupported_model_names_supported_families():
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32
    )
    model = LlamaForCausalLM(config)
    with pytest.raises(
        ValueError,
        match="unsupported model type 'llama'.*supports: clip, clip_vision_model, llava, llava_next, "
        "llava_onevision, qwen2_5_vl, qwen2_vl, qwen3_vl, siglip",
    ):
        tp.apply_pruner(model, "fastv", keep_ratio=0.5)
    assert_untouched(model)


def test_second_apply_says_remove_first(llava):
    pruner = tp.apply_pruner(llava, "uniform", keep_ratio=0.5)
    try:
        with pytest.raises(RuntimeError, match="remove_pruner"):
            tp.apply_pruner(llava, "fastv", keep_ratio=0.5)
    finally:
        pruner.remove()
    assert_untouched(llava)


def test_remove_without_pruner_is_an_error(llava):
    with pytest.raises(ValueError, match="no pruner"):
        tp.remove_pruner(llava)


def test_config_object_and_extra_arguments_conflict(llava):
    config = tp.PrunerConfig("uniform", keep_ratio=0.5)
    with pytest.raises(TypeError, match="not both"):
        tp.apply_pruner(llava, config, keep_ratio=0.25)
    with tp.pruned(llava, config) as pruner:
        assert pruner.config is config


def test_pruned_context_removes_on_error(llava):
    with pytest.raises(KeyError), tp.pruned(llava, "uniform", keep_ratio=0.5):
        raise KeyError("boom")
    assert_untouched(llava)


def test_placeholder_count_must_be_whole_images(llava):
    inputs = tiny_inputs(llava, (1,))
    inputs["input_ids"][0, -1] = llava.config.image_token_id  # one stray placeholder
    with tp.pruned(llava, "uniform", keep_ratio=0.5), pytest.raises(ValueError), torch.no_grad():
        llava(**inputs)


def test_images_cannot_continue_a_pruned_cache(llava):
    inputs = tiny_inputs(llava, (1,))
    with tp.pruned(llava, "uniform", keep_ratio=0.5), torch.no_grad():
        out = llava(**inputs, use_cache=True)
        with pytest.raises(ValueError, match="new cache"):
            llava(**inputs, **cache_kwarg(output_cache(out)))
