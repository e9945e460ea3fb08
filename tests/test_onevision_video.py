"""LLaVA-OneVision's videos, mixed with images in one batch: each video is one item of its frames' pooled
tokens (its closing newline kept as structure), pruned by decoder and ``kv`` methods as images are, and by
vision methods that choose among projected tokens by their features; the invariants of DESIGN.md on it."""

import pytest
import torch
from conftest import shared_model
from helpers import (
    assert_generate_matches_reference,
    assert_kept_rows_match,
    greedy_with_logits,
    pruned_and_reference,
    select_sample,
    selection_contexts,
    tokenprune_hooks,
    tower_outputs,
)

import tokenprune as tp
from tokenprune.context import SelectionContext
from tokenprune.registry import _REGISTRY, get_method
from tokenprune.testing import tiny_inputs, tiny_model

IMAGES = (1, 0, 2)
VIDEOS = (1, 1, 0)
FRAMES = (4, 4, 4)  # a tiny video: 4 frames of 4 x 4 pooled tokens, then its newline
PREFILL_METHODS = sorted(m for m, (stage, _) in tp.list_methods().items() if stage in ("pre_llm", "llm"))


@pytest.fixture
def onevision(attn):
    return shared_model("llava_onevision", attn)


@pytest.fixture
def frames_method():
    """A vision method that chooses among projected tokens by their features alone, as the video methods do:
    the last ``keep`` tokens of each item (of a video, from its last frame back)."""

    @tp.register_method("_last_frame", stage="vision", projected=True)
    def last_frame(ctx: SelectionContext, keep: int) -> torch.Tensor:
        count = ctx.features.shape[1]
        index = torch.arange(count - keep, count, device=ctx.features.device)
        return index.expand(ctx.features.shape[0], keep)

    yield "_last_frame"
    del _REGISTRY["_last_frame"]


def video_inputs(model) -> dict:
    return tiny_inputs(model, IMAGES, videos_per_prompt=VIDEOS)


def placeholders(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Video placeholders of each prompt, and the newline each video ends with."""
    videos = inputs["input_ids"] == model.config.video_token_id
    ends = videos & ~torch.nn.functional.pad(videos[:, 1:], (0, 1))
    return videos, ends


VIDEO_VISION_METHODS = sorted(
    m for m in tp.list_methods() if get_method(m).vision and get_method(m).projected
)


@pytest.mark.parametrize("method", [*PREFILL_METHODS, *VIDEO_VISION_METHODS, "frames_method"])
def test_videos_and_images_dropping_equals_masking(onevision, method, request):
    if method == "frames_method":
        method = request.getfixturevalue("frames_method")
    inputs = video_inputs(onevision)
    config = tp.PrunerConfig(method, keep_ratio=0.25, positions="original")
    got, stats, expected = pruned_and_reference(onevision, config, inputs)
    videos, newline = placeholders(onevision, inputs)
    assert bool(stats.keep_mask[newline].all())  # structure, never pruned
    frame_tokens = FRAMES[0] * FRAMES[1] * FRAMES[2]
    kept_of_videos = (stats.keep_mask & videos & ~newline).sum(dim=1).tolist()
    assert kept_of_videos == [round(0.25 * frame_tokens) * v for v in VIDEOS]
    assert_kept_rows_match(got, expected, stats.keep_mask, inputs["attention_mask"])


def test_a_video_reaches_methods_as_its_frames(onevision, frames_method):
    inputs = video_inputs(onevision)
    for method in ("fastv", frames_method):
        with selection_contexts() as contexts, tp.pruned(onevision, method, keep_ratio=0.5), torch.no_grad():
            onevision(**inputs)
        videos = [ctx for ctx in contexts if ctx.frames is not None]
        assert [ctx.frames for ctx in videos] == [FRAMES]
        assert videos[0].features.shape[:2] == (2, 64)  # both videos, in one call


@pytest.mark.parametrize("method", ["fastv", "dart", "frames_method", "sparsevila"])
def test_generate_equals_recomputation_and_batch_equals_alone(onevision, method, request):
    if method == "frames_method":
        method = request.getfixturevalue("frames_method")
    inputs = video_inputs(onevision)
    options = {} if method == "sparsevila" else {"positions": "original"}
    with tp.pruned(onevision, method, keep_ratio=0.25, **options) as pruner:
        with tower_outputs(onevision) as handed_on:
            out = greedy_with_logits(onevision, inputs)
        stages = pruner.stats.keep_masks
        with torch.no_grad():
            batched = onevision(**inputs).logits[:, -1]
            for b in range(len(IMAGES)):
                alone = onevision(**select_sample(inputs, b, IMAGES, VIDEOS)).logits[:, -1]
                torch.testing.assert_close(batched[b : b + 1], alone, atol=2e-4, rtol=0)
    if method != "sparsevila":  # a kv method keeps the prompt whole: test_retrieval.py
        with tower_outputs(onevision, handed_on):
            assert_generate_matches_reference(onevision, inputs, out, stages)


@pytest.mark.parametrize("media", ["images", "videos"])
def test_media_picks_what_is_pruned(onevision, media):
    inputs = video_inputs(onevision)
    with tp.pruned(onevision, "fastv", keep_ratio=0.25, media=media) as pruner, torch.no_grad():
        onevision(**inputs)
    videos, _ = placeholders(onevision, inputs)
    images = inputs["input_ids"] == onevision.config.image_token_id
    untouched = videos if media == "images" else images
    assert bool(pruner.stats.keep_mask[untouched].all())
    assert not bool(pruner.stats.keep_mask[images if media == "images" else videos].all())


def test_a_budget_per_frame(onevision, frames_method):
    inputs = video_inputs(onevision)
    videos, newline = placeholders(onevision, inputs)
    for method in ("fastv", frames_method, "sparsevila"):
        with tp.pruned(onevision, method, budget=3, per_frame=True) as pruner, torch.no_grad():
            onevision(**inputs)
        assert pruner.stats.kept_tokens[:2] == [3 + 3 * FRAMES[0], 3 * FRAMES[0]], method
    assert "3 visual tokens per frame" in tp.PrunerConfig("fastv", budget=3, per_frame=True).describe()


def test_a_vision_method_that_needs_the_tower_leaves_videos_whole(onevision):
    inputs = video_inputs(onevision)
    with tp.pruned(onevision, "visionzip", keep_ratio=0.25) as pruner, torch.no_grad():
        onevision(**inputs)
    videos, _ = placeholders(onevision, inputs)
    assert bool(pruner.stats.keep_mask[videos].all())
    assert len(pruner.stats.visual_tokens) == sum(IMAGES)  # the images alone


def test_keep_all_equals_unpatched_and_remove_restores(frames_method):
    model = tiny_model("llava_onevision")
    inputs = video_inputs(model)
    with torch.no_grad():
        before = model(**inputs).logits
    for method in ("fastv", frames_method):
        pruner = tp.apply_pruner(model, method, keep_ratio=1.0)
        with torch.no_grad():
            kept_all = model(**inputs).logits
        tp.remove_pruner(model)
        torch.testing.assert_close(kept_all, before, atol=1e-5, rtol=0)
        assert pruner.stats.kept_tokens == pruner.stats.visual_tokens
    assert tokenprune_hooks(model) == [] and "get_video_features" not in vars(model.model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before, atol=0, rtol=0)
