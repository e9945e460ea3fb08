"""The vision stage in Qwen2/2.5/3-VL's tower (hiprune, visionzip among the merger's output tokens), alone
and composed with decoder methods: the invariants on images of several sizes and videos in one batch."""

import pytest
import torch
from conftest import shared_model
from helpers import (
    ATOL,
    assert_generate_matches_reference,
    assert_kept_rows_match,
    greedy_with_logits,
    kept_rows,
    masked_reference,
    select_sample,
    selection_contexts,
    tokenprune_hooks,
    tower_outputs,
)
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.vision_utils import get_vision_window_index

import tokenprune as tp
from tokenprune.testing import QWEN_FAMILIES, tiny_inputs

SELECTING = ["hiprune", "visionzip", "scope", "holov", "evs", "fastvid", "vidcom2", "dycoke"]
TWO_STAGES = ["vscan", "holitom"]  # alone, the encoder stage then its decoder one (vscan: composed below)
IMAGES = (1, 2, 1)
VIDEOS = (1, 0, 2)
PATCHES = ((16, 16), (8, 12), (12, 16), (16, 8))  # 64, 24, 48 and 32 tokens; videos of 32


@pytest.fixture(params=QWEN_FAMILIES)
def qwen(request):
    model = shared_model(request.param, "sdpa")
    yield model
    assert not hasattr(model, "_tokenprune_pruner"), "test left a pruner on the shared model"


def media_inputs(model) -> dict:
    return tiny_inputs(model, IMAGES, image_patches=PATCHES, videos_per_prompt=VIDEOS)


def item_tokens(model, inputs: dict) -> list[list[int]]:
    """The merged tokens of each prompt's images and videos, from their grids."""
    unit = model.config.vision_config.spatial_merge_size**2
    images = iter(int(g.prod()) // unit for g in inputs["image_grid_thw"])
    videos = iter(int(g.prod()) // unit for g in inputs["video_grid_thw"])
    return [
        [next(images) for _ in range(i)] + [next(videos) for _ in range(v)]
        for i, v in zip(IMAGES, VIDEOS, strict=True)
    ]


def pruned_and_reference(model, config, inputs: dict):
    """Logits of ``model`` pruned by ``config``, its stats, and the masked reference: the unpatched model
    given the tower outputs the vision stage handed on, the dropped tokens hidden from attention."""
    with tp.pruned(model, config) as pruner, tower_outputs(model) as handed_on, torch.no_grad():
        got = model(**inputs).logits
    stats = pruner.stats
    with tower_outputs(model, handed_on):
        expected = masked_reference(model, inputs, stats.keep_masks)
    return got, stats, expected


@pytest.mark.parametrize("method", SELECTING + TWO_STAGES)
def test_keep_all_equals_the_unpatched_model(qwen, method):
    inputs = media_inputs(qwen)
    with torch.no_grad():
        expected = qwen(**inputs).logits
        with tp.pruned(qwen, method, keep_ratio=1.0):
            assert torch.equal(qwen(**inputs).logits, expected)


@pytest.mark.parametrize("method", SELECTING)
@pytest.mark.parametrize("keep", [{"keep_ratio": 0.25}, {"budget": 7}])
def test_dropping_equals_masking_with_the_features_handed_on(qwen, method, keep):
    inputs = media_inputs(qwen)
    items = item_tokens(qwen, inputs)
    # the reference masks the dropped tokens, each token at its own position (renumbered: test_positions.py)
    config = tp.PrunerConfig(method, **keep, positions="original")
    got, stats, expected = pruned_and_reference(qwen, config, inputs)
    per_item = (lambda n: round(0.25 * n)) if "keep_ratio" in keep else (lambda n: keep["budget"])
    assert stats.stage == "vision" and sorted(stats.keep_masks) == [0]
    assert stats.visual_tokens == [sum(sizes) for sizes in items]
    assert stats.kept_tokens == [sum(per_item(n) for n in sizes) for sizes in items]
    assert_kept_rows_match(got, expected, stats.keep_mask, inputs["attention_mask"])


@pytest.mark.parametrize(
    ("vision", "decoder"), [("hiprune", "fastv"), ("visionzip", "dart"), ("vscan", "vscan_llm")]
)
def test_composed_stages_equal_masking(qwen, vision, decoder):
    inputs = media_inputs(qwen)
    items = item_tokens(qwen, inputs)
    # the reference masks the dropped tokens, each token at its own position (renumbered: test_positions.py)
    vision_stage = tp.PrunerConfig(vision, keep_ratio=0.5)
    config = tp.PrunerConfig(decoder, keep_ratio=0.125, layer=2, vision=vision_stage, positions="original")
    got, stats, expected = pruned_and_reference(qwen, config, inputs)
    assert sorted(stats.keep_masks) == [0, 2] and stats.stage == "llm"
    assert stats.kept_tokens == [sum(round(0.125 * n) for n in sizes) for sizes in items]
    dropped_by_the_tower = ~stats.keep_masks[0] & inputs["attention_mask"].bool()
    assert int(dropped_by_the_tower.sum()) == sum(sum(n - round(0.5 * n) for n in sizes) for sizes in items)
    assert_kept_rows_match(got, expected, stats.keep_mask, inputs["attention_mask"])


@pytest.mark.parametrize("method", SELECTING)
def test_generate_equals_recomputation(qwen, method):
    inputs = media_inputs(qwen)
    # the reference masks the dropped tokens, each token at its own position (renumbered: test_positions.py)
    with (
        tp.pruned(qwen, method, keep_ratio=0.25, positions="original") as pruner,
        tower_outputs(qwen) as handed_on,
    ):
        out = greedy_with_logits(qwen, inputs)
    with tower_outputs(qwen, handed_on):
        assert_generate_matches_reference(qwen, inputs, out, pruner.stats.keep_masks)


def test_batch_equals_each_sample_alone(qwen):
    inputs = media_inputs(qwen)
    config = tp.PrunerConfig("fastv", budget=4, layer=2, vision=tp.PrunerConfig("hiprune", budget=12))
    with tp.pruned(qwen, config), torch.no_grad():
        batched = qwen(**inputs).logits[:, -1]
        for b in range(len(IMAGES)):
            alone = qwen(**select_sample(inputs, b, IMAGES, VIDEOS)).logits[:, -1]
            torch.testing.assert_close(batched[b : b + 1], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_attention_implementations_agree(family):
    runs = []
    for attn in ("eager", "sdpa"):
        model = shared_model(family, attn)
        inputs = media_inputs(model)
        config = tp.PrunerConfig("hiprune", keep_ratio=0.25, options={"anchor_layer": 0})
        with tp.pruned(model, config) as pruner, torch.no_grad():
            runs.append((model(**inputs).logits, pruner.stats.keep_mask))
    (eager, eager_keep), (sdpa, sdpa_keep) = runs
    assert torch.equal(eager_keep, sdpa_keep)
    mask = inputs["attention_mask"]
    for e, s in zip(kept_rows(eager, eager_keep, mask), kept_rows(sdpa, sdpa_keep, mask), strict=True):
        torch.testing.assert_close(e, s, atol=ATOL, rtol=0)  # padding rows differ between the two


def test_remove_restores_the_model(qwen):
    inputs = media_inputs(qwen)
    with torch.no_grad():
        expected = qwen(**inputs).logits
    pruner = tp.apply_pruner(qwen, "visionzip", keep_ratio=0.25)
    assert "get_image_features" in vars(qwen.model)
    with torch.no_grad():
        qwen(**inputs)
    pruner.remove()
    assert not tokenprune_hooks(qwen)
    assert "get_image_features" not in vars(qwen.model) and "get_video_features" not in vars(qwen.model)
    with torch.no_grad():
        assert torch.equal(qwen(**inputs).logits, expected)


@pytest.mark.parametrize(
    ("media", "kept_token"), [("images", "video_token_id"), ("videos", "image_token_id")]
)
def test_media_picks_what_the_tower_prunes(qwen, media, kept_token):
    inputs = media_inputs(qwen)
    got, stats, expected = pruned_and_reference(
        qwen, tp.PrunerConfig("hiprune", keep_ratio=0.25, media=media, positions="original"), inputs
    )
    untouched = inputs["input_ids"] == getattr(qwen.config, kept_token)
    assert bool(stats.keep_mask[untouched].all()) and not bool(stats.keep_mask.all())
    assert_kept_rows_match(got, expected, stats.keep_mask, inputs["attention_mask"])


@pytest.mark.parametrize("method", SELECTING)
def test_deepstack_features_follow_the_tokens(method):
    """Qwen3-VL: with DeepStack level ``i`` made ``tokens @ maps[i]`` of the tower's tokens (random linear
    maps, before the pruner sees them), each level the pruner hands on is that of the tokens it hands on:
    kept, dropped or merged alike (every merge is linear in the tokens, so it commutes with the map), whether
    the method's merge follows the features (``fastvid``: the maps change their similarities) or attention
    and keys only."""
    model = shared_model("qwen3_vl", "sdpa")
    inputs = media_inputs(model)
    width = model.config.text_config.hidden_size
    maps = torch.randn(2, width, width, generator=torch.Generator().manual_seed(0)) / width**0.5

    def levels_are_the_tokens(module, args, output):
        output.deepstack_features = [output.pooler_output @ m for m in maps]
        return output

    handle = model.model.visual.register_forward_hook(levels_are_the_tokens)  # runs before the pruner's
    try:
        with tp.pruned(model, method, keep_ratio=0.25), tower_outputs(model) as handed_on, torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    for tokens, deepstack in handed_on:
        assert len(deepstack) == 2 and int(tokens.ne(0).any(dim=-1).sum()) < tokens.shape[0]
        for level, linear_map in zip(deepstack, maps, strict=True):
            torch.testing.assert_close(level, tokens @ linear_map, atol=1e-5, rtol=0)


def test_encoder_attention_is_the_blocks_own():
    """What hiprune reads at a window-attention block and at the full-attention block of Qwen2.5-VL equals
    the eager attention weights those blocks computed: summed over each merged token's patches and every
    query of the image, divided by the image's patches, heads averaged, in the merger's output order."""
    model = shared_model("qwen2_5_vl", "eager")
    inputs = tiny_inputs(model, (1,))
    weights: list[torch.Tensor] = []
    original = modeling_qwen2_5_vl.eager_attention_forward

    def recording(module, *args, **kwargs):
        output, attention = original(module, *args, **kwargs)
        if isinstance(module, modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention):
            weights.append(attention[0].mean(dim=0))  # [L, L] heads averaged, one window or image
        return output, attention

    with pytest.MonkeyPatch.context() as patch, selection_contexts() as contexts:
        patch.setattr(modeling_qwen2_5_vl, "eager_attention_forward", recording)
        with tp.pruned(model, "hiprune", keep_ratio=0.25, anchor_layer=0), torch.no_grad():
            model(**inputs)
    grid = inputs["image_grid_thw"]
    window_index, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=16, patch_size=4)
    patches = int(grid.prod())
    blocks = [weights[: len(weights) - 1], weights[-1:]]  # block 0: its windows; block 1: the whole image
    (ctx,) = contexts
    for layer, chunks in enumerate(blocks):
        received = torch.cat([w.sum(dim=0) for w in chunks]) / patches  # per patch, block order
        per_token = torch.empty(patches // 4)
        per_token[window_index] = received.view(-1, 4).sum(dim=1)
        torch.testing.assert_close(ctx.encoder_attention[layer][0], per_token, atol=1e-6, rtol=0)
    assert len(blocks[0]) > 1  # several windows


@pytest.mark.parametrize("method", ["tome", "turbo", "saint"])
def test_merging_is_refused_before_any_work(qwen, method):
    with pytest.raises(
        ValueError, match=f"'{method}' merges or drops tokens inside the encoder's .*use hiprune or visionzip"
    ):
        tp.apply_pruner(qwen, method, keep_ratio=0.5)
    assert not tokenprune_hooks(qwen)


def test_a_decoder_stage_keeping_more_than_the_vision_stage_is_refused(qwen):
    config = tp.PrunerConfig(
        "fastv", keep_ratio=0.5, layer=2, vision=tp.PrunerConfig("hiprune", keep_ratio=0.25)
    )
    with tp.pruned(qwen, config), pytest.raises(ValueError, match="vision tower keeps only"), torch.no_grad():
        qwen(**media_inputs(qwen))
