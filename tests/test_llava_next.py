"""LLaVA-NeXT and LLaVA-OneVision: AnyRes images of different token counts in one batch, newline tokens kept
as structure, and the invariants of DESIGN.md for every prefill method (eager and sdpa)."""

import pytest
import torch
from helpers import (
    assert_batch_equals_each_sample_alone,
    assert_generate_matches_reference,
    assert_kept_rows_match,
    greedy_with_logits,
    layer_input_lengths,
    masked_reference,
    tokenprune_hooks,
)

import tokenprune as tp
from tokenprune.patches import InternalsMovedError
from tokenprune.testing import ANYRES_FAMILIES, tiny_inputs, tiny_model

IMAGES = (1, 2, 1)
PREFILL_METHODS = sorted(m for m, (stage, _) in tp.list_methods().items() if stage in ("pre_llm", "llm"))
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


@pytest.fixture(params=ANYRES_FAMILIES)
def next_model(request, attn):
    key = (request.param, attn)
    if key not in _MODELS:
        _MODELS[key] = tiny_model(request.param, attn_implementation=attn)
    return _MODELS[key]


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


@pytest.mark.parametrize("method", PREFILL_METHODS)
def test_dropping_equals_masking_and_newlines_stay(next_model, method):
    model = next_model
    inputs = tiny_inputs(model, IMAGES)
    placeholder, newline = placeholders(model, inputs)
    with tp.pruned(model, method, keep_ratio=0.25) as pruner, torch.no_grad():
        got = model(**inputs).logits
    keep = pruner.stats.keep_mask
    assert bool(keep[newline].all())  # structure, never pruned
    visual = placeholder & ~newline
    assert pruner.stats.visual_tokens == visual.sum(dim=1).tolist()
    assert (keep & visual).sum(dim=1).tolist() == pruner.stats.kept_tokens
    assert_kept_rows_match(
        got, masked_reference(model, inputs, pruner.stats.keep_masks), keep, inputs["attention_mask"]
    )


def test_budgets_count_all_tiles_of_an_image_together(next_model):
    model = next_model
    inputs = tiny_inputs(model, (1, 1, 1))  # three aspect ratios: different token counts
    _, newline = placeholders(model, inputs)
    with tp.pruned(model, "uniform", keep_ratio=0.25) as pruner, torch.no_grad():
        model(**inputs)
    visual = pruner.stats.visual_tokens
    assert len(set(visual)) > 1
    assert pruner.stats.kept_tokens == [round(0.25 * n) for n in visual]
    with tp.pruned(model, "fastv", budget=7) as pruner, torch.no_grad():
        model(**inputs)
    assert pruner.stats.kept_tokens == [7, 7, 7]


@pytest.mark.parametrize("method", PREFILL_METHODS)
def test_cached_generate_equals_recomputation(next_model, method):
    inputs = tiny_inputs(next_model, IMAGES)
    with tp.pruned(next_model, method, keep_ratio=0.25) as pruner:
        out = greedy_with_logits(next_model, inputs)
    assert_generate_matches_reference(next_model, inputs, out, pruner.stats.keep_masks)


@pytest.mark.parametrize("method", PREFILL_METHODS)
def test_batch_equals_each_sample_alone(next_model, method):
    with tp.pruned(next_model, method, budget=9):
        assert_batch_equals_each_sample_alone(next_model, tiny_inputs(next_model, IMAGES), IMAGES)


@pytest.mark.parametrize("method", PREFILL_METHODS)
def test_pruned_layers_see_the_kept_count(next_model, method):
    inputs = tiny_inputs(next_model, (1,))
    length = inputs["input_ids"].shape[1]
    with tp.pruned(next_model, method, budget=10) as pruner:
        seen = layer_input_lengths(next_model, inputs)
    k = pruner.config.acting_layer
    dropped = pruner.stats.visual_tokens[0] - 10
    assert seen == [length] * k + [length - dropped] * (len(next_model.model.language_model.layers) - k)


def test_keep_all_text_only_and_remove(next_model):
    inputs, text = tiny_inputs(next_model, IMAGES), tiny_inputs(next_model, (0, 0))
    with torch.no_grad():
        expected, text_expected = next_model(**inputs).logits, next_model(**text).logits
    with tp.pruned(next_model, "fastv", keep_ratio=1.0), torch.no_grad():
        torch.testing.assert_close(next_model(**inputs).logits, expected, atol=1e-5, rtol=0)
    pruner = tp.apply_pruner(next_model, "dart", keep_ratio=0.25)
    with torch.no_grad():
        assert torch.equal(next_model(**text).logits, text_expected)
        next_model(**inputs)
    pruner.remove()
    assert not tokenprune_hooks(next_model) and "pack_image_features" not in vars(next_model.model)
    with torch.no_grad():
        assert torch.equal(next_model(**inputs).logits, expected)


def test_unsupported_stages_are_refused(next_model):
    with pytest.raises(ValueError, match="'tome' \\(vision\\) is not supported on Llava"):
        tp.apply_pruner(next_model, "tome", keep_ratio=0.5)
    assert not tokenprune_hooks(next_model)


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
