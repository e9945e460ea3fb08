"""The vision stage on standalone image encoders (CLIP, SigLIP, ViT) and composed with decoder methods
on LLaVA: the invariants of the issue, counts, and clear errors."""

import pytest
import torch
from helpers import (
    ATOL,
    assert_batch_equals_each_sample_alone,
    assert_generate_matches_reference,
    assert_kept_rows_match,
    greedy_with_logits,
    layer_input_lengths,
    masked_reference,
    recorded_image_features,
    substituted_image_features,
    tokenprune_hooks,
)

import tokenprune as tp
from tokenprune.patches import _encoder_internals as encoder_internals
from tokenprune.patches._internals import InternalsMovedError
from tokenprune.registry import get_method
from tokenprune.testing import ENCODER_FAMILIES, tiny_encoder, tiny_inputs, tiny_pixels

VISION_METHODS = sorted(m for m, (stage, _) in tp.list_methods().items() if stage == "vision")
MERGING = [m for m in VISION_METHODS if "r" in get_method(m).options]  # merge r tokens per layer
SELECTING = [m for m in VISION_METHODS if m not in MERGING]
WITH_CLS = {"clip": 1, "siglip": 0, "vit": 1, "vit-classifier": 1}


def encode(model, pixels: torch.Tensor) -> torch.Tensor:
    """The encoder's output tokens (a classifier's logits)."""
    with torch.no_grad():
        out = model(pixel_values=pixels)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def run_layers(model, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` through every encoder layer of ``model``, as the encoder calls them."""
    with torch.no_grad():
        for layer in encoder_internals.encoder_layers(getattr(model, "vision_model", model)):
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@pytest.fixture(scope="module", params=ENCODER_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("tome", {"r": 0}), *[(m, {"keep_ratio": 1.0}) for m in VISION_METHODS]],
)
def test_nothing_merged_equals_the_original(family, attn, method, kwargs):
    model = tiny_encoder(family, attn)
    pixels = tiny_pixels(model)
    expected = encode(model, pixels)
    with tp.pruned(model, method, **kwargs) as pruner:
        got = encode(model, pixels)
    assert torch.equal(got, expected)
    assert pruner.stats.kept_tokens == pruner.stats.visual_tokens == [64, 64]


def first_output_and_second_attention(model, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden`` through the two layers of ``model``: the first layer's output and the second layer's
    attention output."""
    layers = encoder_internals.encoder_layers(getattr(model, "vision_model", model))
    seen = {}
    handles = [
        layers[0].register_forward_hook(lambda module, args, out: seen.update(first=out)),
        encoder_internals.layer_attention(layers[1]).register_forward_hook(
            lambda module, args, out: seen.update(attention=out[0])
        ),
    ]
    run_layers(model, hidden)
    for handle in handles:
        handle.remove()
    return seen["first"], seen["attention"]


@pytest.mark.parametrize("method", MERGING)
@pytest.mark.parametrize("family_name", ["clip", "siglip", "vit"])
def test_merging_duplicates_back_reproduces_the_original(family_name, method):
    """Every token twice, merged back inside the first layer, after its attention (which attends to every
    key twice, as to the tokens once): that layer's output is the tokens' own, and with proportional
    attention the next layer's attention computes what it computes on the tokens once (a duplicated CLS
    token is never merged; its two halves weigh as one token of size 2, and both equal the original CLS).
    """
    model = tiny_encoder(family_name, "eager", num_layers=2)  # a merge step in each layer
    cls = WITH_CLS[family_name]
    hidden = torch.randn(2, cls + 64, 32, generator=torch.Generator().manual_seed(1))
    first, attention = first_output_and_second_attention(model, hidden)
    duplicated = hidden.repeat_interleave(2, dim=1)  # a, a, b, b, ...: each source next to its copy
    with tp.pruned(model, method, r=64, proportional=True):
        merged, merged_attention = first_output_and_second_attention(model, duplicated)
    assert merged.shape[1] == 64 + 2 * cls  # the CLS copy is kept as a patch token
    for got, expected in ((merged, first), (merged_attention, attention)):
        torch.testing.assert_close(got[:, cls:], expected, atol=1e-5, rtol=0)
        if cls:
            torch.testing.assert_close(got[:, 0], expected[:, 0], atol=1e-5, rtol=0)
    if cls:
        with tp.pruned(model, method, r=64, proportional=False):
            _, unweighted = first_output_and_second_attention(model, duplicated)
        assert (unweighted[:, cls:] - attention).abs().max() > 1e-4  # the CLS copies would weigh double


@pytest.mark.parametrize(
    ("method", "budget"),
    # ToMe merges at most half of the tokens per layer: the budgets stay within what its 6 steps reach
    [(m, b) for m in SELECTING for b in (1, 7, 16, 63)] + [(m, b) for m in MERGING for b in (2, 7, 16, 63)],
)
def test_exact_count_reaches_the_output(family, method, budget):
    model = tiny_encoder(family)
    with tp.pruned(model, method, budget=budget) as pruner, torch.no_grad():
        out = model(pixel_values=tiny_pixels(model, 3))
    assert pruner.stats.kept_tokens == [budget] * 3
    if family != "vit-classifier":  # a classifier returns logits only
        cls = WITH_CLS[family] if method != "visionzip" else 0  # VisionZip's CLS takes one of the budget's
        assert out.last_hidden_state.shape[1] == cls + budget


@pytest.mark.parametrize("method", VISION_METHODS)
def test_batch_equals_each_image_alone(family, method):
    model = tiny_encoder(family)
    pixels = tiny_pixels(model, 3)
    with tp.pruned(model, method, keep_ratio=0.25):
        batched = encode(model, pixels)
        alone = torch.cat([encode(model, pixels[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", VISION_METHODS)
def test_encoder_attention_implementations_agree(family, method):
    pixels = tiny_pixels(tiny_encoder(family))
    eager, sdpa = (tiny_encoder(family, attn) for attn in ("eager", "sdpa"))
    with tp.pruned(eager, method, keep_ratio=0.25), tp.pruned(sdpa, method, keep_ratio=0.25):
        torch.testing.assert_close(encode(eager, pixels), encode(sdpa, pixels), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", VISION_METHODS)
def test_remove_restores_the_encoder(family, method):
    model = tiny_encoder(family)
    pixels = tiny_pixels(model)
    before = encode(model, pixels)
    pruner = tp.apply_pruner(model, method, keep_ratio=0.25)
    pruned = encode(model, pixels)
    assert family == "vit-classifier" or pruned.shape[1] < before.shape[1]
    tp.remove_pruner(model)
    assert torch.equal(encode(model, pixels), before)
    assert not tokenprune_hooks(model)
    assert pruner.stats.kept_tokens == [16, 16]


def test_selection_keeps_the_selected_output_tokens():
    """HiPrune keeps tokens as they are: the pruned output is the original output at the kept patches."""
    model = tiny_encoder("clip")
    pixels = tiny_pixels(model)
    full = encode(model, pixels)
    with tp.pruned(model, "hiprune", budget=10), torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    pruned = out.last_hidden_state
    torch.testing.assert_close(pruned[:, 0], full[:, 0])
    rows = [torch.nonzero((full[b, 1:, None] == pruned[b, None, 1:]).all(-1))[:, 0] for b in range(2)]
    assert all(r.numel() == 10 and bool((r.diff() > 0).all()) for r in rows)


# -- LLaVA: the vision stage alone is covered by test_invariants; here, composed with decoder methods --

COMPOSED = [(v, d) for v in VISION_METHODS for d in ("fastv", "dart")] + [
    ("saint", "saint_llm")
]  # SAINT's hybrid


def composed(vision: str, decoder: str) -> tp.PrunerConfig:
    return tp.PrunerConfig(decoder, keep_ratio=0.125, layer=2, vision=tp.PrunerConfig(vision, keep_ratio=0.5))


@pytest.mark.parametrize(("vision", "decoder"), COMPOSED)
def test_composed_stages_equal_masking(model, vision, decoder):
    inputs = tiny_inputs(model, (1, 2, 1))
    config = composed(vision, decoder)
    with tp.pruned(model, config) as pruner, recorded_image_features(model) as recorded, torch.no_grad():
        got = model(**inputs).logits
    stats = pruner.stats
    assert sorted(stats.keep_masks) == [0, 2]
    assert stats.kept_tokens == [8, 16, 8] and stats.visual_tokens == [64, 128, 64]
    assert stats.stage == "llm"
    with substituted_image_features(model, recorded[-1]):
        expected = masked_reference(model, inputs, stats.keep_masks)
    assert_kept_rows_match(got, expected, stats.keep_mask, inputs["attention_mask"])


@pytest.mark.parametrize(("vision", "decoder"), COMPOSED[:2])
def test_composed_generate_equals_recomputation(model, vision, decoder):
    inputs = tiny_inputs(model, (1, 2))
    with tp.pruned(model, composed(vision, decoder)) as pruner, recorded_image_features(model) as recorded:
        out = greedy_with_logits(model, inputs)
    with substituted_image_features(model, recorded[-1]):
        assert_generate_matches_reference(model, inputs, out, pruner.stats.keep_masks)


@pytest.mark.parametrize(("vision", "decoder"), COMPOSED[::3])
def test_composed_batch_equals_each_sample_alone(model, vision, decoder):
    with tp.pruned(model, composed(vision, decoder)):
        assert_batch_equals_each_sample_alone(model, tiny_inputs(model, (1, 2, 1)), (1, 2, 1))


def test_composed_layers_see_each_stage_count(model):
    inputs = tiny_inputs(model, (1,))
    length = inputs["input_ids"].shape[1]
    with tp.pruned(model, composed("tome", "fastv")):
        seen = layer_input_lengths(model, inputs)
    assert seen == [length - 32] * 2 + [length - 56] * 2


def test_projector_called_alone_is_untouched(model):
    features = torch.randn(2, 64, model.config.vision_config.hidden_size)
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        expected = projector(features)
        with tp.pruned(model, "visionzip", keep_ratio=0.25):
            assert torch.equal(projector(features), expected)


def test_features_encoded_elsewhere_are_refused(model):
    inputs = tiny_inputs(model, (1,))
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    text = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with tp.pruned(model, "hiprune", keep_ratio=0.25), pytest.raises(ValueError, match="pass pixel_values"):
        model(**text, mm_encoder_outputs={"image": features})


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "kwargs", "error", "match"),
    [
        ("fastv", {"keep_ratio": 0.5}, ValueError, "only vision methods apply"),
        ("tome", {"budget": 1}, ValueError, "cannot merge 65 tokens down to 2 in 5 layers"),
        ("tome", {"r": -1}, ValueError, "tome option r must be an int >= 0, or None, got -1"),
        ("tome", {"r": 2, "keep_ratio": 0.5}, ValueError, "not both"),
        ("tome", {"keep_ratio": 0.5, "layer": 2}, ValueError, "acts inside the image encoder"),
        ("hiprune", {"keep_ratio": 0.5, "anchor_layer": 9}, ValueError, r"anchor_layer must be .* 0..4"),
        ("visionzip", {"budget": 65}, ValueError, "larger than the 64 visual tokens"),
        ("saint", {"budget": 16, "drop_layer": 5}, ValueError, r"drop_layer must be an int in \[0, 4\)"),
        ("turbo", {"keep_ratio": 0.5, "alpha": -1.0}, ValueError, "turbo option alpha must be .* >= 0"),
        ("turbo", {"r": 2, "alpha": "1"}, TypeError, "turbo option alpha must be a finite number >= 0"),
    ],
)
def test_bad_vision_config_raises_before_any_work(method, kwargs, error, match):
    model = tiny_encoder("clip", num_layers=5)
    with pytest.raises(error, match=match):
        tp.apply_pruner(model, method, **kwargs)
    assert not tokenprune_hooks(model)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (
            lambda: tp.PrunerConfig(
                "fastv", keep_ratio=0.75, layer=2, vision=tp.PrunerConfig("tome", keep_ratio=0.5)
            ),
            "keeps only 32",
        ),
        (
            lambda: tp.PrunerConfig(
                "fastv", keep_ratio=0.2, layer=0, vision=tp.PrunerConfig("tome", options={"r": 2})
            ),
            "decoder layer >= 1",
        ),
        (
            lambda: tp.PrunerConfig("fastv", keep_ratio=0.2, vision=tp.PrunerConfig("fastv", keep_ratio=0.5)),
            "takes a vision method",
        ),
        (
            lambda: tp.PrunerConfig(
                "tome", keep_ratio=0.2, vision=tp.PrunerConfig("hiprune", keep_ratio=0.5)
            ),
            "not with another vision method",
        ),
    ],
)
def test_bad_composition_raises_before_any_work(model, config, match):
    with pytest.raises(ValueError, match=match):
        tp.apply_pruner(model, config())
    assert not tokenprune_hooks(model)


def test_proportional_attention_refuses_flash_attention():
    model = tiny_encoder("clip")
    model.config._attn_implementation = "flash_attention_2"  # the check reads the configured kernel
    with pytest.raises(ValueError, match="proportional=False"):
        tp.apply_pruner(model, "tome", keep_ratio=0.5)
    tp.apply_pruner(model, "tome", keep_ratio=0.5, proportional=False).remove()


def test_vision_stage_needs_the_default_feature_strategy():
    from tokenprune.testing import tiny_model

    model = tiny_model()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
        tp.apply_pruner(model, "hiprune", keep_ratio=0.5)


@pytest.mark.parametrize(
    ("break_it", "named"),
    [
        (lambda vm: delattr(vm.encoder.layers[0].self_attn, "k_proj"), "'k_proj'"),
        (lambda vm: delattr(vm.encoder.layers[0].self_attn, "scale"), "softmax scale"),
        (lambda vm: delattr(vm, "embeddings"), "embeddings"),
        (lambda vm: delattr(vm.encoder, "layers"), "encoder.layers"),
    ],
)
def test_a_moved_encoder_internal_is_named(break_it, named):
    model = tiny_encoder("clip")
    break_it(model)  # CLIPVisionModel is the vision transformer itself
    with pytest.raises(InternalsMovedError, match=named):
        tp.apply_pruner(model, "tome", keep_ratio=0.5)


def test_encoder_layer_signature_is_checked(monkeypatch):
    model = tiny_encoder("vit")
    layer_class = type(encoder_internals.encoder_layers(model)[0])
    monkeypatch.setattr(layer_class, "forward", lambda self, x, mask=None: x)
    with pytest.raises(InternalsMovedError, match=r"\(hidden_states, attention_mask\)"):
        tp.apply_pruner(model, "hiprune", keep_ratio=0.5)


@pytest.mark.parametrize("family_name", ["clip", "siglip"])
def test_dual_encoders_prune_their_image_side(family_name):
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    config_class, model_class = {"clip": (CLIPConfig, CLIPModel), "siglip": (SiglipConfig, SiglipModel)}[
        family_name
    ]
    vision = tiny_encoder(family_name).config.to_dict()
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(0)
    model = model_class(config_class(vision_config=vision, text_config=text)).eval()
    pixels = tiny_pixels(model.vision_model)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels).pooler_output
    with tp.pruned(model, "tome", keep_ratio=1.0), torch.no_grad():
        torch.testing.assert_close(model.get_image_features(pixel_values=pixels).pooler_output, expected)
    with tp.pruned(model, "visionzip", budget=10) as pruner, torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
    assert out.last_hidden_state.shape[1] == 10  # CLIP's CLS token is one of VisionZip's budget
    assert pruner.stats.kept_tokens == [10, 10]


@pytest.mark.parametrize("method", VISION_METHODS)
def test_beam_search_with_several_sequences_per_prompt(model, method):
    """generate encodes the images once and repeats them for every returned sequence: the kept set must
    follow (it travels with the features)."""
    inputs = tiny_inputs(model, (1, 2))
    with tp.pruned(model, method, keep_ratio=0.25) as pruner, torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0
        )
    assert out.shape == (4, inputs["input_ids"].shape[1] + 3)
    assert pruner.stats.kept_tokens == [16, 16, 32, 32]
