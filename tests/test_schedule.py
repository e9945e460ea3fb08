"""Multi-stage schedules: pruning at several layers, each stage among the tokens still kept."""

import pytest
import torch
from helpers import (
    assert_batch_equals_each_sample_alone,
    assert_generate_matches_reference,
    assert_kept_rows_match,
    decoder_merges,
    greedy_with_logits,
    layer_input_lengths,
    masked_reference,
)

import tokenprune as tp
from tokenprune.patches._cache_internals import output_cache
from tokenprune.testing import tiny_inputs

METHODS = sorted(m for m, (stage, _) in tp.list_methods().items() if stage in ("pre_llm", "llm"))
RAGGED = (1, 2, 1)


@pytest.fixture
def model(any_model):
    """Every VLM family."""
    return any_model


SCHEDULES = {"from-1": ((1, 0.5), (2, 0.25), (3, 0.125)), "from-0": ((0, 0.5), (2, 0.25))}
NEEDS_A_LAYER = {name for name in METHODS if "transition" in tp.registry.get_method(name).needs}


def kept_per_stage(schedule):
    return [max(1, round(r * 64)) for _, r in schedule]


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize("method", METHODS)
def test_schedule_equals_masking_per_stage(model, method, schedule):
    if method in NEEDS_A_LAYER and schedule[0][0] == 0:
        with pytest.raises(ValueError, match="needs layer >= 1"):
            tp.apply_pruner(model, method, schedule=schedule)
        return
    inputs = tiny_inputs(model, RAGGED)
    # the reference masks tokens at their own positions: the kept ones keep theirs (see test_positions.py)
    with (
        tp.pruned(model, method, schedule=schedule, positions="original") as pruner,
        decoder_merges() as merged,
        torch.no_grad(),
    ):
        got = model(**inputs).logits
    stats = pruner.stats
    assert sorted(stats.keep_masks) == [layer for layer, _ in schedule]
    assert stats.kept_tokens == [kept_per_stage(schedule)[-1] * n for n in RAGGED]
    masks = [stats.keep_masks[layer] for layer, _ in schedule]
    for earlier, later in zip(masks, masks[1:], strict=False):
        assert bool((later <= earlier).all())  # each stage keeps a subset of the previous one
    expected = masked_reference(model, inputs, stats.keep_masks, merged=merged)
    assert_kept_rows_match(got, expected, stats.keep_mask, inputs["attention_mask"])


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("method", ["fastv", "dart", "uniform"])
def test_schedule_generate_equals_recomputation(model, method, drop):
    inputs = tiny_inputs(model, RAGGED)
    schedule = SCHEDULES["from-1"]
    with tp.pruned(model, method, schedule=schedule, drop_early_kv=drop) as pruner, torch.no_grad():
        out = greedy_with_logits(model, inputs)
        cache = output_cache(model(**inputs, use_cache=True))
    early = inputs["input_ids"].shape[1] if drop else None
    assert_generate_matches_reference(model, inputs, out, pruner.stats.keep_masks, early_from_query=early)
    lengths = [cache.layers[i].keys.shape[2] for i in range(4)]  # rows each layer holds
    stage_lengths = [int(pruner.stats.keep_masks[layer].sum(1).max()) for layer, _ in schedule]
    assert lengths == [stage_lengths[0] if drop else inputs["input_ids"].shape[1], *stage_lengths]


@pytest.mark.parametrize("method", METHODS)
def test_schedule_batch_equals_each_sample_alone(model, method):
    with tp.pruned(model, method, schedule=SCHEDULES["from-1"]):
        assert_batch_equals_each_sample_alone(model, tiny_inputs(model, RAGGED), RAGGED)


def test_schedule_layers_see_each_stage_count(model):
    inputs = tiny_inputs(model, (1,))
    length = inputs["input_ids"].shape[1]
    with tp.pruned(model, "fastv", schedule=SCHEDULES["from-1"]):
        seen = layer_input_lengths(model, inputs)
    assert seen == [length, *(length - 64 + k for k in kept_per_stage(SCHEDULES["from-1"]))]


def test_keep_all_schedule_gives_unpatched_logits(model):
    inputs = tiny_inputs(model, RAGGED)
    with torch.no_grad():
        expected = model(**inputs).logits
        with tp.pruned(model, "dart", schedule=((1, 1.0), (3, 1.0))):
            got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"schedule": ((2, 0.5), (1, 0.25))}, ValueError, "strictly increasing"),
        ({"schedule": ((1, 0.25), (2, 0.5))}, ValueError, "must not increase"),
        ({"schedule": ((1, 1.5),)}, ValueError, r"\(0, 1\]"),
        ({"schedule": ((1, 0.5), (4, 0.25))}, ValueError, "outside"),
        ({"schedule": ()}, ValueError, "at least one"),
        ({"schedule": (3,)}, TypeError, "pair"),
        ({"schedule": ((1, 0.5),), "keep_ratio": 0.5}, ValueError, "only the schedule"),
    ],
)
def test_bad_schedules(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        tp.apply_pruner(model, "fastv", **kwargs)
    assert not hasattr(model, "_tokenprune_pruner")


def test_every_method_describes_its_stages_on_a_32_layer_model():
    """Every registered method's config says where it acts: a pyramid of several stages (``pdrop``'s evenly
    spaced layers, ``sparsevlm``'s tuple of its reference's layers) names them all, a one-stage pyramid
    (``vscan_llm``) its layer as any one-stage method, and ``vscan`` both of its stages."""
    for method in tp.list_methods():
        config = tp.PrunerConfig(method, keep_ratio=0.125).for_depth(32)
        assert config.describe().startswith(f"{method}: ") or config.vision is not None, method
    assert "at layers 8, 16, 24" in tp.PrunerConfig("pdrop", keep_ratio=0.125).for_depth(32).describe()
    assert "at layers 3, 7, 16" in tp.PrunerConfig("sparsevlm", keep_ratio=0.125).for_depth(32).describe()
    one_stage = tp.PrunerConfig("vscan_llm", keep_ratio=0.125).for_depth(32).describe()
    assert (
        one_stage
        == "vscan_llm: 12.5% of each image's visual tokens kept from decoder layer 16 (positions renumbered)"
    )
    vscan = tp.PrunerConfig("vscan", keep_ratio=0.125).for_depth(32).describe()
    assert vscan.startswith(
        "vscan: 37.5% of each image's visual tokens kept inside the image encoder; then vscan_llm"
    )
