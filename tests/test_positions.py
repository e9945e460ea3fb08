"""``positions="renumbered"``: the kept tokens close up after pruning, against references written with plain
transformers (the unpruned model with the dropped tokens hidden and the kept ones' rotary tables given at the
renumbered positions; and, before the language model, the model fed only the kept tokens)."""

import pytest
import torch
from conftest import shared_model
from helpers import (
    ATOL,
    assert_kept_rows_match,
    generated_steps,
    greedy_with_logits,
    hide_tokens_from_layers,
    recorded_image_features,
    renumbered,
    renumbered_rotary,
    substituted_image_features,
)

import tokenprune as tp
from tokenprune.positions import renumbering_shift
from tokenprune.testing import tiny_encoder, tiny_inputs

RAGGED = (1, 2, 1)
FAMILIES = ("llava", "qwen2_vl")
#: (layer, schedule, drop_early_kv) of the configs tested: before the language model, inside it, a schedule
CONFIGS = [
    {"layer": 0, "keep_ratio": 0.25},
    {"layer": 2, "keep_ratio": 0.25},
    {"schedule": ((1, 0.5), (3, 0.25))},
]


def renumbered_reference(model, inputs: dict, stages: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits of the unpatched model with the dropped tokens hidden from each stage's layers on and the
    kept ones at their renumbered positions there; no cache."""
    hidden = hide_tokens_from_layers(model, stages, inputs["attention_mask"])
    with torch.no_grad(), hidden, renumbered_rotary(model, inputs, stages):
        return model(**inputs, use_cache=False).logits


def test_renumbering_closes_the_gaps_of_one_axis():
    positions = torch.tensor([[[0, 0, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 8]]])
    kept = torch.tensor([[0, 0, 1, 0, 1, 0, 0, 1, 1], [1, 1, 0, 0, 1, 1, 0, 1, 1]]).bool()
    moved = positions[0] - renumbering_shift(positions, kept)
    assert moved[0][kept[0]].tolist() == [0, 1, 2, 3]  # left padding: the first kept token stays
    assert moved[1][kept[1]].tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(renumbering_shift(positions, torch.ones_like(kept)), torch.zeros(2, 9).long())


def test_renumbering_keeps_an_images_multimodal_offsets_and_moves_the_text_after_it():
    """Qwen-VL: text at 0, 1; a 2 x 2 image at 2 (time 2; height and width 2..3); text at 4, 5."""
    t = [0, 1, 2, 2, 2, 2, 4, 5]
    h = [0, 1, 2, 2, 3, 3, 4, 5]
    w = [0, 1, 2, 3, 2, 3, 4, 5]
    positions = torch.tensor([t, h, w])[:, None]
    image_rows = {"first": [1, 0, 0, 0], "last": [0, 0, 0, 1], "top row": [1, 1, 0, 0], "all": [1, 1, 1, 1]}
    shifts = {}
    for name, image in image_rows.items():
        kept = torch.tensor([[1, 1, *image, 1, 1]]).bool()
        shifts[name] = renumbering_shift(positions, kept)[0].tolist()
        assert torch.equal(
            positions[:, :, kept[0]] - torch.tensor(shifts[name])[kept[0]],
            renumbered(positions, kept)[:, :, kept[0]],
        )
    assert shifts["first"] == [0, 0, 0, 0, 0, 0, 1, 1]  # the text follows the kept (2, 2, 2): from 3 on
    assert shifts["top row"] == [0] * 8  # (2, 2, 3) is kept: the text at 4 already follows it
    assert shifts["last"] == shifts["all"] == [0] * 8


def test_renumbering_restarts_with_each_packed_prompt():
    positions = torch.tensor([[[0, 1, 2, 3, 0, 1, 2, 3]]])
    kept = torch.tensor([[1, 0, 1, 1, 1, 0, 0, 1]]).bool()
    sequence = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    assert renumbering_shift(positions, kept, sequence)[0].tolist() == [0, 0, 1, 1, 0, 0, 0, 2]


@pytest.mark.parametrize("positions", ["compact", 1])
def test_an_unknown_positions_value_is_refused(positions):
    with pytest.raises(ValueError, match="positions must be one of"):
        tp.PrunerConfig("fastv", keep_ratio=0.5, positions=positions)


#: Each method's declared position rule: its reference's, where the method's docstring says it comes from
#: (renumbered where the reference counts the kept tokens' positions again, or hands the language model
#: fewer features, which it numbers from 0; original where it gathers the kept tokens' position ids or
#: rotary tables). A change here is a change of reference, never a side effect.
REFERENCE_POSITIONS = {
    "adaptinfer": "renumbered",  # AdaptInfer-base renumbers the sequence after each stage
    "cdpruner": "renumbered",  # its LLaVA encode_images hands the language model fewer features
    "dart": "original",  # DART_K_norm.forward: position_ids = keep_indexs
    "divprune": "renumbered",  # prepare_inputs_labels_for_multimodal slices the prompt; generate numbers it
    "dycoke": "renumbered",  # dycole_ttm hands the language model fewer features
    "dycoke_kv": "original",  # kv: nothing dropped at prefill
    "evs": "original",  # vLLM gives each kept video token its mrope position (compute_mrope_for_media)
    "fastv": "original",  # LlamaModel.forward: position_ids = keep_indexs
    "fastvid": "original",  # its Qwen2.5-VL forward: position_ids[:, :, keep_indexs]
    "feather": "original",  # LlamaModel.forward: position_ids[:, keep_indexs]
    "hiprune": "renumbered",  # its LLaVA code selects image features before the sequence is built
    "holitom": "renumbered",  # its LLaVA-OneVision code hands the language model fewer video features
    "holitom_llm": "original",  # Qwen2Model_holitom.forward: position_ids = keep_indexs
    "holov": "renumbered",  # its LLaVA code hands the language model fewer projected features
    "idpruner": "original",  # its adapters gather the kept tokens' rotary tables
    "pdrop": "renumbered",  # pdrop_forward renumbers the kept tokens at each stage
    "random": "original",  # a baseline: no reference
    "saint": "renumbered",  # its tower hands LLaVA fewer features
    "saint_llm": "original",  # LlamaModel.forward: position_ids[batch_idx, keep_indexs]
    "scope": "renumbered",  # its CLIP tower hands LLaVA fewer features
    "sparsevila": "original",  # kv: nothing dropped at prefill
    "sparsevlm": "renumbered",  # LlamaDynamicvitModel.forward cuts position_ids to the kept length
    "tome": "renumbered",  # ToMe's code has no VLM: as an encoder handing LLaVA fewer features (turbo's)
    "transprune": "renumbered",  # its code renumbers the sequence after each stage
    "turbo": "renumbered",  # its LLaVA-1.5 code hands LLaVA fewer features
    "uniform": "original",  # a baseline: no reference
    "vidcom2": "original",  # its Qwen2.5-VL forward keeps position_ids[:, :, keep_token_indices]
    "visionzip": "renumbered",  # hands LLaVA fewer features
    "vispruner": "renumbered",  # hands LLaVA fewer features
    "vscan": "renumbered",  # its LLaVA code keeps image_feature[index_mask]: fewer features
    "vscan_llm": "renumbered",  # layer_prune renumbers the kept tokens (arange over the new sequence)
}


def test_each_method_declares_its_references_positions():
    """``positions=None`` (the default) is the declared rule, and the declared rule is the reference's; an
    explicit value overrides it. A method registered without a line above fails here: say its rule."""
    from tokenprune.registry import get_method

    assert set(tp.list_methods()) == set(REFERENCE_POSITIONS)
    declared = {method: get_method(method).positions for method in REFERENCE_POSITIONS}
    assert declared == REFERENCE_POSITIONS
    for method, rule in REFERENCE_POSITIONS.items():
        assert tp.PrunerConfig(method, keep_ratio=0.5).position_rule == rule
    assert tp.PrunerConfig("transprune", keep_ratio=0.5, positions="original").position_rule == "original"
    assert tp.PrunerConfig("fastv", keep_ratio=0.5, positions="renumbered").position_rule == "renumbered"


def test_a_composition_runs_under_its_decoder_methods_rule():
    """SAINT's hybrid: the tower's ``saint`` renumbers alone, but a pruner has one rule, ``saint_llm``'s."""
    vision = tp.PrunerConfig("saint", keep_ratio=0.5)
    hybrid = tp.PrunerConfig("saint_llm", keep_ratio=0.25, vision=vision)
    assert vision.position_rule == "renumbered" and hybrid.position_rule == "original"
    assert "renumbered" not in hybrid.describe()
    renumbered_hybrid = tp.PrunerConfig("saint_llm", keep_ratio=0.25, vision=vision, positions="renumbered")
    assert renumbered_hybrid.describe().count("positions renumbered") == 1


def test_positions_do_not_apply_to_a_kv_method_or_an_image_encoder():
    with pytest.raises(ValueError, match="positions do not apply"):
        tp.PrunerConfig("sparsevila", keep_ratio=0.5, positions="renumbered")
    with pytest.raises(ValueError, match="image encoder without one"):
        tp.apply_pruner(tiny_encoder("vit"), "visionzip", keep_ratio=0.5, positions="renumbered")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", CONFIGS[:2])
def test_keep_all_renumbered_gives_unpatched_logits(family, config):
    model = shared_model(family, "sdpa")
    inputs = tiny_inputs(model, RAGGED)
    with torch.no_grad():
        expected = model(**inputs).logits
        with tp.pruned(model, "fastv", **{**config, "keep_ratio": 1.0}, positions="renumbered"):
            got = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", CONFIGS)
def test_renumbered_dropping_equals_the_renumbered_masked_reference(family, config):
    model = shared_model(family, "sdpa")
    inputs = tiny_inputs(model, RAGGED)
    with torch.no_grad(), tp.pruned(model, "fastv", **config, positions="renumbered") as pruner:
        got = model(**inputs).logits
    expected = renumbered_reference(model, inputs, pruner.stats.keep_masks)
    assert_kept_rows_match(got, expected, pruner.stats.keep_mask, inputs["attention_mask"])


@pytest.mark.parametrize("config", CONFIGS)
def test_renumbered_differs_from_original_positions_on_llava(config):
    model = shared_model("llava", "sdpa")
    inputs = tiny_inputs(model, RAGGED)
    with torch.no_grad():
        with tp.pruned(model, "fastv", **config):
            original = model(**inputs).logits[:, -1]
        with tp.pruned(model, "fastv", **config, positions="renumbered"):
            moved = model(**inputs).logits[:, -1]
    assert (original - moved).abs().max() > 1e-2


def test_renumbered_qwen_text_follows_the_largest_kept_position_of_each_image():
    """One kept token per image: most images then lose their last row and column, and the text after them
    moves down (the reference computes where to), which original positions do not do."""
    model = shared_model("qwen2_vl", "sdpa")
    inputs = tiny_inputs(model, RAGGED)
    with torch.no_grad():
        with tp.pruned(model, "fastv", budget=1) as pruner:
            original = model(**inputs).logits
        with tp.pruned(model, "fastv", budget=1, positions="renumbered") as pruner:
            got = model(**inputs).logits
    expected = renumbered_reference(model, inputs, pruner.stats.keep_masks)
    assert_kept_rows_match(got, expected, pruner.stats.keep_mask, inputs["attention_mask"])
    assert (original[:, -1] - got[:, -1]).abs().max() > 1e-2


def fed_the_kept_tokens_alone(
    model, inputs: dict, keep: torch.Tensor, features: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of the unpatched ``model``'s language model fed only the ``keep`` tokens of the embedded prompt
    (the image features replaced by ``features`` where given), at its own positions (0, 1, ...)."""
    embedded = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: embedded.update(kwargs), with_kwargs=True
    )
    try:
        with torch.no_grad(), substituted_image_features(model, features):
            model(**inputs)
    finally:
        handle.remove()
    with torch.no_grad():
        kept = embedded["inputs_embeds"][:, keep]
        return model.lm_head(model.model.language_model(inputs_embeds=kept).last_hidden_state)


def test_renumbered_before_the_language_model_equals_the_model_fed_the_kept_tokens_alone():
    """The reference prunes the prompt itself: the embeddings of the kept tokens only, the model's own
    positions (0, 1, ...)."""
    model = shared_model("llava", "sdpa")
    inputs = {k: v[:1] for k, v in tiny_inputs(model, (1,)).items()}
    with torch.no_grad(), tp.pruned(model, "fastv", keep_ratio=0.25, layer=0, positions="renumbered") as p:
        got = model(**inputs).logits
    expected = fed_the_kept_tokens_alone(model, inputs, p.stats.keep_mask[0])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["divprune", "hiprune", "saint", "tome", "turbo"])
def test_a_method_whose_reference_hands_fewer_tokens_equals_the_model_fed_them_alone(method):
    """By default, as their references: the language model fed only the kept (or merged) tokens' embeddings,
    at its own positions (0, 1, ...); original positions give other logits."""
    model = shared_model("llava", "sdpa")
    inputs = {k: v[:1] for k, v in tiny_inputs(model, (1,)).items()}
    with torch.no_grad():
        with tp.pruned(model, method, keep_ratio=0.25) as p, recorded_image_features(model) as seen:
            got = model(**inputs).logits
        with tp.pruned(model, method, keep_ratio=0.25, positions="original"):
            original = model(**inputs).logits
    features = seen[-1] if p.config.vision_stage is not None else None  # a vision stage's, in their places
    expected = fed_the_kept_tokens_alone(model, inputs, p.stats.keep_mask[0], features)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (original[:, -1] - got[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", [*CONFIGS, {"layer": 2, "keep_ratio": 0.25, "drop_early_kv": True}])
def test_renumbered_generate_equals_recomputation(family, config):
    model = shared_model(family, "sdpa")
    inputs = tiny_inputs(model, RAGGED)
    with tp.pruned(model, "fastv", **config, positions="renumbered") as pruner:
        out = greedy_with_logits(model, inputs)
    stages = pruner.stats.keep_masks
    early = inputs["input_ids"].shape[1] if config.get("drop_early_kv") else None
    for step_logits, grown, grown_stages in generated_steps(inputs, out, stages):
        hidden = hide_tokens_from_layers(model, grown_stages, grown["attention_mask"], early)
        with torch.no_grad(), hidden, renumbered_rotary(model, grown, grown_stages):
            expected = model(**grown, use_cache=False).logits[:, -1]
        torch.testing.assert_close(step_logits, expected, atol=ATOL, rtol=0)
