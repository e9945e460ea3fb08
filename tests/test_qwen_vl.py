"""Qwen2-VL specifics: the image size comes from each batch, and what is not supported yet says so.

Every prefill invariant runs on Qwen2-VL in test_invariants.py, test_schedule.py and test_kv_cache.py.
"""

import pytest
import torch

import tokenprune as tp
from tokenprune.patches import InternalsMovedError
from tokenprune.testing import tiny_inputs, tiny_model


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen2_vl")


def test_the_image_size_comes_from_the_batch(qwen):
    inputs = tiny_inputs(qwen, (1, 2))
    with tp.pruned(qwen, "uniform", keep_ratio=0.25) as pruner, torch.no_grad():
        qwen(**inputs)
    assert pruner.adapter.tokens_per_image is None  # no fixed size
    assert pruner.adapter.image_grid() == (8, 8)  # 16 x 16 patches merged 2 x 2
    assert pruner.stats.visual_tokens == [64, 128] and pruner.stats.kept_tokens == [16, 32]
    assert "per image" in repr(pruner)


def test_images_of_two_sizes_in_one_batch_are_refused(qwen):
    inputs = tiny_inputs(qwen, (1, 1))
    image = qwen.config.image_token_id
    ids = inputs["input_ids"].clone()
    last = (ids[1] == image).nonzero()[-4:, 0]  # make the second image 4 tokens shorter
    ids[1, last] = 7
    inputs.update(input_ids=ids, mm_token_type_ids=(ids == image).int())
    with tp.pruned(qwen, "uniform", keep_ratio=0.25), pytest.raises(ValueError, match="different sizes"):
        qwen(**inputs)


def test_a_budget_over_the_image_raises_at_the_forward(qwen):
    with tp.pruned(qwen, "fastv", budget=65), pytest.raises(ValueError, match="larger than the 64 visual"):
        qwen(**tiny_inputs(qwen, (1,)))


@pytest.mark.parametrize(
    ("method", "kwargs", "match"),
    [
        ("tome", {"keep_ratio": 0.5}, "'tome' \\(vision\\) is not supported on Qwen2-VL"),
        ("sparsevila", {"keep_ratio": 0.5}, "'sparsevila' \\(kv\\) is not supported on Qwen2-VL"),
        ("fastv", {"keep_ratio": 0.5, "layer": 4}, r"outside .* 4 layers"),
    ],
)
def test_unsupported_configs_are_refused_before_any_work(qwen, method, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tp.apply_pruner(qwen, method, **kwargs)
    assert not hasattr(qwen, "_tokenprune_pruner")


@pytest.mark.parametrize("name", ["visual", "language_model"])
def test_a_moved_qwen_internal_is_named(name):
    model = tiny_model("qwen2_vl")
    delattr(model.model, name)
    with pytest.raises(InternalsMovedError, match=f"no '{name}' module"):
        tp.apply_pruner(model, "fastv", keep_ratio=0.5)
