"""Qwen2-VL and Qwen2.5-VL specifics: image sizes mixed in one batch, and what is not supported yet.

Every prefill invariant runs on both in test_invariants.py, test_schedule.py and test_kv_cache.py.
"""

import pytest
import torch
from helpers import (
    ATOL,
    assert_batch_equals_each_sample_alone,
    assert_generate_matches_reference,
    assert_kept_rows_match,
    decoder_merges,
    greedy_with_logits,
    masked_reference,
    select_sample,
    selection_contexts,
)

import tokenprune as tp
from tokenprune.patches import InternalsMovedError
from tokenprune.testing import QWEN_FAMILIES, tiny_inputs, tiny_model


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def qwen(request):
    return tiny_model(request.param)


def test_the_image_size_comes_from_the_batch(qwen):
    inputs = tiny_inputs(qwen, (1, 2))
    with tp.pruned(qwen, "uniform", keep_ratio=0.25) as pruner, torch.no_grad():
        qwen(**inputs)
    assert pruner.adapter.tokens_per_image is None  # no fixed size
    assert pruner.adapter.image_grid() == (8, 8)  # 16 x 16 patches merged 2 x 2
    assert pruner.adapter.hooks.grids == {64: (8, 8)}
    assert pruner.stats.visual_tokens == [64, 128] and pruner.stats.kept_tokens == [16, 32]
    assert "per image" in repr(pruner)


IMAGES = (1, 2, 1)
PATCHES = ((16, 16), (8, 12), (12, 16), (16, 8))  # 64, 24, 48 and 32 tokens
TOKENS = [64, 24, 48, 32]
PREFILL_METHODS = sorted(m for m, (stage, _) in tp.list_methods().items() if stage in ("pre_llm", "llm"))


def mixed_inputs(model):
    return tiny_inputs(model, IMAGES, image_patches=PATCHES)


@pytest.mark.parametrize("method", PREFILL_METHODS)
def test_mixed_sizes_equal_masking_with_the_ratio_per_image(qwen, method):
    inputs = mixed_inputs(qwen)
    # the reference masks the dropped tokens, each token at its own position (renumbered: test_positions.py)
    with (
        tp.pruned(qwen, method, keep_ratio=0.25, positions="original") as pruner,
        decoder_merges() as merged,
        torch.no_grad(),
    ):
        got = qwen(**inputs).logits
    kept = [round(0.25 * n) for n in TOKENS]
    assert pruner.stats.visual_tokens == [64, 24 + 48, 32]
    assert pruner.stats.kept_tokens == [kept[0], kept[1] + kept[2], kept[3]]
    keep = pruner.stats.keep_mask
    expected = masked_reference(qwen, inputs, pruner.stats.keep_masks, merged=merged)
    assert_kept_rows_match(got, expected, keep, inputs["attention_mask"])


@pytest.mark.parametrize("method", ["dart", "fastv", "uniform"])
def test_mixed_sizes_generate_equals_recomputation(qwen, method):
    inputs = mixed_inputs(qwen)
    with tp.pruned(qwen, method, keep_ratio=0.25) as pruner:
        out = greedy_with_logits(qwen, inputs)
    assert_generate_matches_reference(qwen, inputs, out, pruner.stats.keep_masks)


@pytest.mark.parametrize("method", ["dart", "divprune", "fastv"])
def test_mixed_sizes_batch_equals_each_sample_alone(qwen, method):
    with tp.pruned(qwen, method, budget=5):
        assert_batch_equals_each_sample_alone(qwen, mixed_inputs(qwen), IMAGES)


def test_mixed_sizes_schedule_keeps_each_images_share_at_each_stage(qwen):
    inputs = mixed_inputs(qwen)
    schedule = ((1, 0.5), (2, 0.25))
    with tp.pruned(qwen, "fastv", schedule=schedule) as pruner, torch.no_grad():
        qwen(**inputs)
    visual = inputs["input_ids"] == qwen.config.image_token_id
    final = [round(0.25 * n) for n in TOKENS]
    assert [int(v) for v in (pruner.stats.keep_masks[2] & visual).sum(dim=1)] == [
        final[0],
        final[1] + final[2],
        final[3],
    ]
    assert bool((pruner.stats.keep_masks[2] <= pruner.stats.keep_masks[1]).all())


VIDEOS = (1, 0, 2)  # 32 tokens each


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def qwen_with_videos(request):
    """Every Qwen family with videos: one placeholder run per video (Qwen2/2.5), one per frame (Qwen3)."""
    return tiny_model(request.param)


def media_inputs(model):
    return tiny_inputs(model, IMAGES, image_patches=PATCHES, videos_per_prompt=VIDEOS)


@pytest.mark.parametrize("method", PREFILL_METHODS)
def test_images_and_videos_equal_masking(qwen_with_videos, method):
    qwen = qwen_with_videos
    inputs = media_inputs(qwen)
    # the reference masks the dropped tokens, each token at its own position (renumbered: test_positions.py)
    with (
        tp.pruned(qwen, method, keep_ratio=0.25, positions="original") as pruner,
        decoder_merges() as merged,
        torch.no_grad(),
    ):
        got = qwen(**inputs).logits
    kept = [round(0.25 * n) for n in TOKENS]
    assert pruner.stats.visual_tokens == [64 + 32, 24 + 48, 32 + 64]
    assert pruner.stats.kept_tokens == [kept[0] + 8, kept[1] + kept[2], kept[3] + 16]
    keep = pruner.stats.keep_mask
    expected = masked_reference(qwen, inputs, pruner.stats.keep_masks, merged=merged)
    assert_kept_rows_match(got, expected, keep, inputs["attention_mask"])


@pytest.mark.parametrize(("media", "pruned_token"), [("images", "image"), ("videos", "video")])
def test_media_picks_what_is_pruned(qwen_with_videos, media, pruned_token):
    qwen = qwen_with_videos
    inputs = media_inputs(qwen)
    with tp.pruned(qwen, "fastv", keep_ratio=0.25, media=media) as pruner, torch.no_grad():
        qwen(**inputs)
    ids = inputs["input_ids"]
    tokens = {"image": ids == qwen.config.image_token_id, "video": ids == qwen.config.video_token_id}
    untouched = tokens["video" if pruned_token == "image" else "image"]
    assert bool(pruner.stats.keep_mask[untouched].all())
    assert pruner.stats.visual_tokens == tokens[pruned_token].sum(dim=1).tolist()
    assert int((pruner.stats.keep_mask & tokens[pruned_token]).sum()) == sum(pruner.stats.kept_tokens)


def test_images_and_videos_generate_equals_recomputation_and_batch_equals_alone(qwen_with_videos):
    qwen = qwen_with_videos
    inputs = media_inputs(qwen)
    with tp.pruned(qwen, "dart", keep_ratio=0.25) as pruner:
        out = greedy_with_logits(qwen, inputs)
        stages = pruner.stats.keep_masks  # of the generate's prefill, before the forwards below
        with torch.no_grad():
            batched = qwen(**inputs).logits[:, -1]
            for b in range(len(IMAGES)):
                alone = qwen(**select_sample(inputs, b, IMAGES, VIDEOS)).logits[:, -1]
                torch.testing.assert_close(batched[b : b + 1], alone, atol=ATOL, rtol=0)
    assert_generate_matches_reference(qwen, inputs, out, stages)


def test_a_qwen3_video_is_one_item_across_its_frames():
    qwen3 = tiny_model("qwen3_vl")
    inputs = tiny_inputs(qwen3, (0, 1), videos_per_prompt=(1, 1))  # 2 frames of 16 tokens per video
    with tp.pruned(qwen3, "fastv", budget=5) as pruner, torch.no_grad():
        qwen3(**inputs)
    assert pruner.stats.visual_tokens == [32, 64 + 32]
    assert pruner.stats.kept_tokens == [5, 10]  # a budget per video, not per frame
    for method in ("fastv", "visionzip", "sparsevila"):  # a decoder, a vision and a kv stage
        with tp.pruned(qwen3, method, budget=5, per_frame=True) as pruner, torch.no_grad():
            qwen3(**inputs)
        assert pruner.stats.kept_tokens == [10, 15], method  # or per frame (an image is one)


@pytest.mark.parametrize("method", ["fastv", "uniform", "evs"])
def test_a_video_is_given_as_frames(qwen_with_videos, method):
    """Each video's tokens reach a method with its ``(frames, rows, cols)`` (2 temporal patches of 4 x 4
    merged tokens), in the vision stage, before the language model and in a decoder layer; images with
    their grid, as one frame."""
    qwen = qwen_with_videos
    inputs = tiny_inputs(qwen, (1, 0), videos_per_prompt=(1, 1))  # images of 8 x 8 merged tokens
    with selection_contexts() as contexts, tp.pruned(qwen, method, keep_ratio=0.5), torch.no_grad():
        qwen(**inputs)
    by_count = {ctx.features.shape[1]: ctx for ctx in contexts}
    assert set(by_count) == {64, 32}
    assert by_count[64].frames is None and by_count[64].frame_grid() == (1, 8, 8)
    assert by_count[32].frames == (2, 4, 4) and by_count[32].grid is None


def test_a_moved_deepstack_step_is_named(monkeypatch):
    qwen3 = tiny_model("qwen3_vl")
    monkeypatch.delattr(type(qwen3.model.language_model), "_deepstack_process")
    with pytest.raises(InternalsMovedError, match="_deepstack_process"):
        tp.apply_pruner(qwen3, "fastv", keep_ratio=0.25)


def test_qwen3_deepstack_is_restored_on_remove():
    qwen3 = tiny_model("qwen3_vl")
    language_model = qwen3.model.language_model
    with tp.pruned(qwen3, "fastv", keep_ratio=0.25):
        assert "_deepstack_process" in vars(language_model)
    assert "_deepstack_process" not in vars(language_model)


def test_media_must_be_known(qwen):
    with pytest.raises(ValueError, match="media must be one of"):
        tp.apply_pruner(qwen, "fastv", keep_ratio=0.25, media="audio")


@pytest.mark.parametrize("method", ["fastv", "sparsevila"])
def test_a_budget_over_the_image_raises_at_the_forward(qwen, method):
    with tp.pruned(qwen, method, budget=65), pytest.raises(ValueError, match="larger than the 64 visual"):
        qwen(**tiny_inputs(qwen, (1,)))


@pytest.mark.parametrize(
    ("method", "kwargs", "match"),
    [
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


def test_a_renamed_grid_argument_is_named(monkeypatch):
    model = tiny_model("qwen2_vl")
    monkeypatch.setattr(type(model.model.visual), "forward", lambda self, hidden_states, sizes: hidden_states)
    with pytest.raises(InternalsMovedError, match="no longer takes 'grid_thw'"):
        tp.apply_pruner(model, "fastv", keep_ratio=0.5)
