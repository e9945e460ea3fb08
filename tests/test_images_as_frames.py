"""``images_as_frames``: each prompt's images are the frames of one video (a video handed to LLaVA-1.5 as
frames). Decoder, ``kv`` and projected vision methods choose among all of a prompt's images at once, as
one item whose ``frames`` are the images; the invariants of DESIGN.md on it."""

import pytest
import torch
from helpers import (
    assert_batch_equals_each_sample_alone,
    assert_generate_matches_reference,
    assert_kept_rows_match,
    greedy_with_logits,
    masked_reference,
    recorded_image_features,
    selection_contexts,
    substituted_image_features,
    tokenprune_hooks,
)

import tokenprune as tp
from tokenprune.context import SelectionContext
from tokenprune.registry import _REGISTRY
from tokenprune.sequence import ImageRows, as_videos
from tokenprune.testing import tiny_inputs, tiny_model
from tokenprune.testing.dispatch import DeviceReads

IMAGES = (3, 0, 3)  # frames of each prompt; the middle one is text only
GRID = (8, 8)  # the tiny LLaVA's patches per image
METHODS = ["uniform", "fastv", "evs", "vidcom2"]  # before the language model, in it, and two video methods


@pytest.fixture
def last_frames():
    """A projected vision method that keeps the last ``keep`` tokens of each item: of a video, from its
    last frame back."""

    @tp.register_method("_last_frames", stage="vision", projected=True)
    def last(ctx: SelectionContext, keep: int) -> torch.Tensor:
        count = ctx.features.shape[1]
        return torch.arange(count - keep, count, device=ctx.features.device).expand(
            ctx.features.shape[0], keep
        )

    yield "_last_frames"
    del _REGISTRY["_last_frames"]


def frames_of_prompts(model) -> dict:
    return tiny_inputs(model, IMAGES, (5, 4, 6))


@pytest.mark.parametrize("method", METHODS)
def test_dropping_equals_masking_with_one_video_per_prompt(model, method):
    inputs = frames_of_prompts(model)
    config = tp.PrunerConfig(method, keep_ratio=0.25, positions="original", images_as_frames=True)
    with (
        selection_contexts() as contexts,
        tp.pruned(model, config) as pruner,
        recorded_image_features(model) as recorded,
        torch.no_grad(),
    ):
        got = model(**inputs).logits
    stats = pruner.stats
    video = IMAGES[0] * GRID[0] * GRID[1]
    assert [(tuple(ctx.features.shape[:2]), ctx.frames, ctx.grid) for ctx in contexts] == [
        ((2, video), (IMAGES[0], *GRID), None)
    ]
    assert stats.kept_tokens == [round(0.25 * video), 0, round(0.25 * video)]
    with substituted_image_features(model, recorded[-1] if config.vision_stage else None):
        expected = masked_reference(model, inputs, stats.keep_masks)
    assert_kept_rows_match(got, expected, stats.keep_mask, inputs["attention_mask"])


def test_a_projected_method_sees_the_frames_in_order(model, last_frames):
    """The last frame's tokens are the last of the video: keeping as many as one image has keeps exactly the
    prompt's last image."""
    inputs = frames_of_prompts(model)
    tokens = GRID[0] * GRID[1]
    with tp.pruned(model, last_frames, budget=tokens, images_as_frames=True) as pruner, torch.no_grad():
        model(**inputs)
    placeholders = inputs["input_ids"] == model.config.image_token_id
    for row in (0, 2):
        positions = placeholders[row].nonzero().squeeze(1)
        assert torch.equal(pruner.stats.keep_mask[row, positions], torch.arange(len(positions)) >= 2 * tokens)


@pytest.mark.parametrize("method", ["fastv", "evs", "sparsevila"])
def test_a_budget_per_frame_counts_every_image(model, method):
    inputs = frames_of_prompts(model)
    with tp.pruned(model, method, budget=2, per_frame=True, images_as_frames=True) as pruner, torch.no_grad():
        model(**inputs)
    assert pruner.stats.kept_tokens == [2 * IMAGES[0], 0, 2 * IMAGES[2]]


@pytest.mark.parametrize("method", ["fastv", "evs"])
def test_generate_equals_recomputation_and_batch_equals_alone(model, method):
    inputs = frames_of_prompts(model)
    config = tp.PrunerConfig(method, keep_ratio=0.25, positions="original", images_as_frames=True)
    with tp.pruned(model, config) as pruner:
        with recorded_image_features(model) as recorded:
            out = greedy_with_logits(model, inputs)
        stages = pruner.stats.keep_masks
        assert_batch_equals_each_sample_alone(model, inputs, IMAGES)
    with substituted_image_features(model, recorded[0] if config.vision_stage else None):
        assert_generate_matches_reference(model, inputs, out, stages)


def test_keep_all_equals_unpatched_and_remove_restores():
    model = tiny_model("llava")
    inputs = frames_of_prompts(model)
    with torch.no_grad():
        before = model(**inputs).logits
        for method in ("fastv", "evs"):
            with tp.pruned(model, method, keep_ratio=1.0, images_as_frames=True):
                torch.testing.assert_close(model(**inputs).logits, before, atol=1e-5, rtol=0)
        assert tokenprune_hooks(model) == []
        torch.testing.assert_close(model(**inputs).logits, before, atol=0, rtol=0)


def test_what_images_as_frames_refuses(model):
    with pytest.raises(ValueError, match="chooses inside the image encoder"):
        tp.PrunerConfig("visionzip", keep_ratio=0.25, images_as_frames=True)
    with pytest.raises(TypeError, match="images_as_frames must be a bool"):
        tp.PrunerConfig("fastv", keep_ratio=0.25, images_as_frames=1)
    with pytest.raises(ValueError, match="runs on LLaVA-1.5"):
        tp.apply_pruner(tiny_model("qwen2_5_vl"), "evs", keep_ratio=0.25, images_as_frames=True)
    ragged = tiny_inputs(model, (3, 2))
    with (
        tp.pruned(model, "evs", keep_ratio=0.25, images_as_frames=True),
        torch.no_grad(),
        pytest.raises(ValueError, match="as many images in each prompt"),
    ):
        model(**ragged)
    with pytest.raises(ValueError, match="frames of one size"):
        as_videos(ImageRows((64, 32), (2,)))


def test_rows_become_one_video_each():
    videos, video_of = as_videos(ImageRows((64, 64, 64, 16), (3, 0, 1), real=(200, 10, 30)))
    assert videos == ImageRows((192, 16), (1, 0, 1), real=(200, 10, 30))
    assert video_of == (0, 0, 0, 1)


def test_qwen_images_as_frames_in_the_language_model():
    """Qwen2.5-VL: a decoder method takes a prompt's images (of one grid) as one video's frames, at their
    multimodal positions."""
    model = tiny_model("qwen2_5_vl")
    inputs = tiny_inputs(model, (2, 1), (5, 4))
    config = tp.PrunerConfig("fastv", keep_ratio=0.25, positions="original", images_as_frames=True)
    with selection_contexts() as contexts, tp.pruned(model, config) as pruner, torch.no_grad():
        got = model(**inputs).logits
    tokens = [ctx.features.shape[1] for ctx in contexts]
    assert [ctx.frames[0] for ctx in contexts] == [2, 1] and tokens[0] == 2 * tokens[1]
    assert pruner.stats.kept_tokens == [round(0.25 * n) for n in tokens]
    expected = masked_reference(model, inputs, pruner.stats.keep_masks)
    assert_kept_rows_match(got, expected, pruner.stats.keep_mask, inputs["attention_mask"])


@pytest.mark.parametrize("method", ["fastv", "evs"])
def test_frames_read_nothing_more_from_the_device(model, method):
    """Where the shapes cannot tell the prompts' images apart (a prompt without any), the rows are read once
    per prefill with or without ``images_as_frames``: the vision stage hands on what it read."""
    inputs = frames_of_prompts(model)
    reads = []
    for frames in (False, True):
        with tp.pruned(model, method, keep_ratio=0.25, images_as_frames=frames), torch.no_grad():
            model(**inputs)  # the first forward checks the contracts
            with DeviceReads() as counted:
                model(**inputs)
        reads.append(counted.count)
    assert reads[1] == reads[0]
