"""LLaVA-NeXT and LLaVA-OneVision: AnyRes images of different token counts in one batch, newline tokens kept
as structure, and the invariants of DESIGN.md for every prefill method (eager and sdpa): the decoder's, and
the vision stage's in every tile (the reference takes the packed features it handed on)."""

import pytest
import torch
from conftest import shared_model
from helpers import (
    ATOL,
    assert_batch_equals_each_sample_alone,
    assert_generate_matches_reference,
    assert_kept_rows_match,
    decoder_merges,
    greedy_with_logits,
    kept_rows,
    layer_input_lengths,
    pruned_and_reference,
    selection_contexts,
    tokenprune_hooks,
    tower_outputs,
)
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

import tokenprune as tp
from tokenprune.patches import InternalsMovedError
from tokenprune.testing import ANYRES_FAMILIES, tiny_inputs, tiny_model

IMAGES = (1, 2, 1)
PREFILL_METHODS = sorted(m for m, (stage, _) in tp.list_methods().items() if stage in ("pre_llm", "llm"))
# tome is refused (test_tome_is_refused_before_any_work); vscan and holitom alone are their two stages, the
# encoder's first
VISION_METHODS = [
    "hiprune",
    "visionzip",
    "vispruner",
    "scope",
    "holov",
    "vscan",
    "evs",
    "fastvid",
    "vidcom2",
    "dycoke",
    "holitom",
]


@pytest.fixture(params=ANYRES_FAMILIES)
def next_model(request, attn):
    return shared_model(request.param, attn)


def placeholders(model, inputs):
    """Per prompt: image placeholders, and those that hold the learned newline (their features equal it)."""
    ids = inputs["input_ids"]
    placeholder = ids == model.config.image_token_id
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(ids)
        features = torch.cat(
            model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        )
    embeds[placeholder] = features
    newline = (embeds == model.model.image_newline).all(-1) & placeholder
    return placeholder, newline


@pytest.mark.parametrize("method", PREFILL_METHODS + VISION_METHODS)
def test_dropping_equals_masking_and_newlines_stay(next_model, method):
    model = next_model
    inputs = tiny_inputs(model, IMAGES)
    placeholder, newline = placeholders(model, inputs)
    # the reference masks the dropped tokens, each token at its own position (renumbered: test_positions.py)
    config = tp.PrunerConfig(method, keep_ratio=0.25, positions="original")
    got, stats, expected = pruned_and_reference(model, config, inputs)
    keep = stats.keep_mask
    assert bool(keep[newline].all())  # structure, never pruned
    visual = placeholder & ~newline
    assert stats.visual_tokens == visual.sum(dim=1).tolist()
    assert (keep & visual).sum(dim=1).tolist() == stats.kept_tokens
    assert_kept_rows_match(got, expected, keep, inputs["attention_mask"])


@pytest.mark.parametrize(("vision", "decoder"), [("hiprune", "fastv"), ("visionzip", "dart")])
def test_composed_stages_equal_masking(next_model, vision, decoder):
    inputs = tiny_inputs(next_model, (1, 1, 1))  # three aspect ratios: different tiles and unpadding
    config = tp.PrunerConfig(
        decoder, keep_ratio=0.125, layer=2, vision=tp.PrunerConfig(vision, keep_ratio=0.5)
    )
    got, stats, expected = pruned_and_reference(next_model, config, inputs)
    assert sorted(stats.keep_masks) == [0, 2] and stats.stage == "llm"
    assert stats.kept_tokens == [round(0.125 * n) for n in stats.visual_tokens]
    dropped_by_the_tower = (~stats.keep_masks[0] & inputs["attention_mask"].bool()).sum(dim=1)
    assert dropped_by_the_tower.tolist() == [n - round(0.5 * n) for n in stats.visual_tokens]
    assert_kept_rows_match(got, expected, stats.keep_mask, inputs["attention_mask"])


def test_budgets_count_all_tiles_of_an_image_together(next_model):
    model = next_model
    inputs = tiny_inputs(model, (1, 1, 1))  # three aspect ratios: different token counts
    _, newline = placeholders(model, inputs)
    with tp.pruned(model, "uniform", keep_ratio=0.25) as pruner, torch.no_grad():
        model(**inputs)
    visual = pruner.stats.visual_tokens
    assert len(set(visual)) > 1
    assert pruner.stats.kept_tokens == [round(0.25 * n) for n in visual]
    for method in ("fastv", "hiprune"):
        with tp.pruned(model, method, budget=7) as pruner, torch.no_grad():
            model(**inputs)
        assert pruner.stats.kept_tokens == [7, 7, 7]


@pytest.mark.parametrize("method", PREFILL_METHODS + VISION_METHODS)
def test_cached_generate_equals_recomputation(next_model, method):
    inputs = tiny_inputs(next_model, IMAGES)
    # the reference masks the dropped tokens, each token at its own position (renumbered: test_positions.py)
    with (
        tp.pruned(next_model, method, keep_ratio=0.25, positions="original") as pruner,
        tower_outputs(next_model) as handed_on,
        decoder_merges() as merged,
    ):
        out = greedy_with_logits(next_model, inputs)
    with tower_outputs(next_model, handed_on):
        assert_generate_matches_reference(next_model, inputs, out, pruner.stats.keep_masks, merged=merged)


@pytest.mark.parametrize("method", PREFILL_METHODS + VISION_METHODS)
def test_batch_equals_each_sample_alone(next_model, method):
    with tp.pruned(next_model, method, budget=9):
        assert_batch_equals_each_sample_alone(next_model, tiny_inputs(next_model, IMAGES), IMAGES)


@pytest.mark.parametrize("method", PREFILL_METHODS)
def test_pruned_layers_see_the_kept_count(next_model, method):
    inputs = tiny_inputs(next_model, (1,))
    length = inputs["input_ids"].shape[1]
    with tp.pruned(next_model, method, budget=10) as pruner:
        seen = layer_input_lengths(next_model, inputs)
    visual = pruner.stats.visual_tokens[0]
    stages = pruner.config.stages(visual)  # (layer, kept) of each stage: a pyramid's several
    ends = [layer for layer, _ in stages[1:]] + [len(next_model.model.language_model.layers)]
    expected = [length] * stages[0][0]
    for (layer, kept), end in zip(stages, ends, strict=True):
        expected += [length - (visual - kept)] * (end - layer)
    assert stages[-1][1] == 10 and seen == expected


def test_keep_all_text_only_and_remove(next_model):
    inputs, text = tiny_inputs(next_model, IMAGES), tiny_inputs(next_model, (0, 0))
    with torch.no_grad():
        expected, text_expected = next_model(**inputs).logits, next_model(**text).logits
    for method in ("fastv", *VISION_METHODS):
        with tp.pruned(next_model, method, keep_ratio=1.0), torch.no_grad():
            torch.testing.assert_close(next_model(**inputs).logits, expected, atol=1e-5, rtol=0)
    for method in ("dart", "visionzip"):
        pruner = tp.apply_pruner(next_model, method, keep_ratio=0.25)
        with torch.no_grad():
            assert torch.equal(next_model(**text).logits, text_expected)
            next_model(**inputs)
        pruner.remove()
        assert not tokenprune_hooks(next_model) and "pack_image_features" not in vars(next_model.model)
        with torch.no_grad():
            assert torch.equal(next_model(**inputs).logits, expected)


def test_a_decoder_stage_keeping_more_than_the_vision_stage_is_refused(next_model):
    config = tp.PrunerConfig(
        "fastv", keep_ratio=0.5, layer=2, vision=tp.PrunerConfig("hiprune", keep_ratio=0.25)
    )
    refused = pytest.raises(ValueError, match="vision tower keeps only")
    with tp.pruned(next_model, config), refused, torch.no_grad():
        next_model(**tiny_inputs(next_model, (1,)))


@pytest.mark.parametrize("method", ["tome", "turbo", "saint"])
def test_in_encoder_methods_are_refused_before_any_work(next_model, method):
    with pytest.raises(
        ValueError, match=f"'{method}' merges or drops patches inside each tile's .*use hiprune or visionzip"
    ):
        tp.apply_pruner(next_model, method, keep_ratio=0.5)
    assert not tokenprune_hooks(next_model)


def test_a_vision_method_needs_the_patches_exactly():
    model = tiny_model("llava_onevision")  # a SigLIP tower: no CLS token, so "default" drops a patch
    model.config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full', not 'default'"):
        tp.apply_pruner(model, "hiprune", keep_ratio=0.5)
    assert not tokenprune_hooks(model)


@pytest.mark.parametrize("family", ANYRES_FAMILIES)
def test_vision_stage_attention_implementations_agree(family):
    runs = []
    for attn in ("eager", "sdpa"):
        model = shared_model(family, attn)
        inputs = tiny_inputs(model, IMAGES)
        with tp.pruned(model, "visionzip", keep_ratio=0.25) as pruner, torch.no_grad():
            runs.append((model(**inputs).logits, pruner.stats.keep_mask))
    (eager, eager_keep), (sdpa, sdpa_keep) = runs
    assert torch.equal(eager_keep, sdpa_keep)
    mask = inputs["attention_mask"]
    for e, s in zip(kept_rows(eager, eager_keep, mask), kept_rows(sdpa, sdpa_keep, mask), strict=True):
        torch.testing.assert_close(e, s, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ANYRES_FAMILIES)
def test_each_packed_token_gets_its_own_patch_scores_features_and_neighbours(family):
    """What hiprune reads for each packed token (base tile, then the unpadded tiles row by row) is the
    eager attention that its own tile's patch received at each named layer, heads and queries averaged, and
    the tower's features of that patch (found by them, which the packed token's equal exactly); its
    buffers are its neighbours in the image as the tiles stitch it: one before and after in row order, one
    row above and below, clamped to the base tile or the stitched tiles."""
    model = shared_model(family, "eager")
    inputs = tiny_inputs(model, (1, 1, 1))  # three aspect ratios; the last loses rows to the unpadding
    pixels = []
    tower = model.model.vision_tower
    handle = tower.register_forward_pre_hook(lambda module, args: pixels.append(args[0]))
    config = tp.PrunerConfig("hiprune", keep_ratio=0.25, options={"anchor_layer": 0})
    with selection_contexts() as contexts, tp.pruned(model, config), torch.no_grad():
        model(**inputs)
    handle.remove()
    with torch.no_grad():
        out = tower(pixels[0], output_attentions=True, output_hidden_states=True)
        strategy = model.config.vision_feature_select_strategy
        patches = out.hidden_states[model.config.vision_feature_layer][:, int(strategy == "default") :]
    first = int(strategy == "default")  # the CLS key, if any, is not a patch
    received = {
        layer: out.attentions[layer].mean(dim=(1, 2))[:, first:] for layer in contexts[0].encoder_attention
    }
    output_layer = model.config.vision_feature_layer % (len(out.attentions) + 1) - 1  # hidden_states[i + 1]
    assert len(contexts) == 3 and sorted(received) == [0, output_layer]
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    tiles_before = 0
    for ctx, image_size in zip(contexts, inputs["image_sizes"], strict=True):
        match = (ctx.features[0][:, None, None] == patches[None]).all(dim=-1)  # [n, T, N]
        assert match.flatten(1).sum(dim=1).eq(1).all()
        _, tile, patch = match.nonzero().unbind(dim=1)
        for layer, attention in received.items():
            expected = attention[tile, patch]
            torch.testing.assert_close(ctx.encoder_attention[layer][0], expected, atol=1e-6, rtol=0)
        tile = tile - tiles_before
        tiles_before += int(tile.max()) + 1
        height, width = get_anyres_image_grid_shape(
            image_size.tolist(), model.config.image_grid_pinpoints, vision.image_size
        )
        assert int(tile.max()) == height * width
        # each token's place in the image: (grid, row, column), the high-resolution tiles stitched
        in_base = tile == 0
        tile_row, tile_col = (tile - 1).clamp(min=0) // width, (tile - 1).clamp(min=0) % width
        row = torch.where(in_base, patch // side, tile_row * side + patch // side)
        col = torch.where(in_base, patch % side, tile_col * side + patch % side)
        places = {
            (int(b), int(r), int(c)): i for i, (b, r, c) in enumerate(zip(in_base, row, col, strict=True))
        }
        for i, (b, r, c) in enumerate(zip(in_base.tolist(), row.tolist(), col.tolist(), strict=True)):
            grid = [j for j, other in enumerate(in_base.tolist()) if other == b]
            last_col = max(int(col[j]) for j in grid)
            after = places.get(
                (b, r, c + 1), places.get((b, r + 1, min(int(col[j]) for j in grid)), grid[-1])
            )
            before = places.get((b, r, c - 1), places.get((b, r - 1, last_col), grid[0]))
            below = places.get((b, r + 1, c), grid[-1])
            above = places.get((b, r - 1, c), grid[0])
            assert ctx.grid_neighbours[0, i].tolist() == [before, after, above, below], (i, b, r, c)


def test_a_moved_newline_is_named():
    model = tiny_model("llava_next")
    delattr(model.model, "image_newline")
    with pytest.raises(InternalsMovedError, match="image_newline"):
        tp.apply_pruner(model, "fastv", keep_ratio=0.5)


def test_a_changed_packing_step_is_named(monkeypatch):
    model = tiny_model("llava_next")
    monkeypatch.setattr(type(model.model), "pack_image_features", lambda self, features: features)
    with pytest.raises(InternalsMovedError, match="pack_image_features"):
        tp.apply_pruner(model, "fastv", keep_ratio=0.5)


def test_the_tiny_llava_next_checkpoint_loads_and_prunes(tmp_path):
    """save_tiny_checkpoint writes the tiny LLaVA-NeXT with its AnyRes processor; the processor's
    placeholder counts are the model's, and a pruned forward runs on them."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tokenprune.testing import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path / "next", family="llava_next")
    processor, model = AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)
    images = [Image.new("RGB", (40, 80)), Image.new("RGB", (90, 30))]
    inputs = processor(images=images, text=["a <image> b", "<image> c"], return_tensors="pt", padding=True)
    with tp.pruned(model, "fastv", keep_ratio=0.25) as pruner, torch.no_grad():
        model(**inputs)
    assert len(set(pruner.stats.visual_tokens)) == 2


def test_visionzip_keeps_every_tiles_class_token_first():
    """As VisionZip's LLaVA-NeXT code, every tile's CLS token at the output layer, projected, is among an
    image's kept tokens, here the first of them, in tile order."""
    model = shared_model("llava_next", "eager")
    inputs = tiny_inputs(model, (1, 1, 1))
    pixels = []
    tower = model.model.vision_tower
    handle = tower.register_forward_pre_hook(lambda module, args: pixels.append(args[0]))
    with tp.pruned(model, "visionzip", keep_ratio=0.25), tower_outputs(model) as handed_on, torch.no_grad():
        model(**inputs)
    handle.remove()
    with torch.no_grad():
        out = tower(pixels[0], output_hidden_states=True)
        cls = model.model.multi_modal_projector(out.hidden_states[model.config.vision_feature_layer][:, 0])
    newline = model.model.image_newline
    first_tile = 0
    for packed in handed_on[0][0]:
        kept = packed[(packed != 0).any(dim=-1) & (packed != newline).any(dim=-1)]
        tiles = len(kept) and int(torch.isclose(kept[:, None], cls[None], atol=1e-5).all(-1).any(0).sum())
        torch.testing.assert_close(kept[:tiles], cls[first_tile : first_tile + tiles], atol=1e-5, rtol=0)
        assert tiles >= 2  # the base tile's and at least one high-resolution tile's
        first_tile += tiles
    assert first_tile == len(cls)
