"""The invariants of DESIGN.md, for every registered method and attention implementation on LLaVA."""

import pytest
import torch
from helpers import (
    ATOL,
    INVARIANT_FAMILIES,
    assert_generate_matches_reference,
    assert_kept_rows_match,
    decoder_merges,
    greedy_with_logits,
    layer_input_lengths,
    masked_reference,
    recorded_image_features,
    select_sample,
    substituted_image_features,
)

import tokenprune as tp
from tokenprune.testing import tiny_inputs, tokens_per_image

METHODS = sorted(m for m, (stage, _) in tp.list_methods().items() if stage != "kv")  # kv: test_retrieval
#: (family, method) pairs: every method on LLaVA; decoder methods on Qwen-VL (its vision stage has
#: test_qwen_vision.py, the kv stage of every family test_retrieval.py)
CASES = [
    (f, m) for f in INVARIANT_FAMILIES for m in METHODS if f == "llava" or tp.list_methods()[m][0] != "vision"
]


@pytest.fixture
def model(any_model):
    """Every VLM family (see CASES)."""
    return any_model


RAGGED = (1, 2, 1)  # images per prompt in the ragged batch; prompt lengths differ too


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(("family", "method"), CASES)
def test_keep_all_gives_unpatched_logits(model, method):
    inputs = tiny_inputs(model, RAGGED)
    expected = logits(model, inputs)
    with tp.pruned(model, method, keep_ratio=1.0) as pruner:
        got = logits(model, inputs)
    assert pruner.stats.kept_tokens == pruner.stats.visual_tokens
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("family", "method"), CASES)
def test_keep_all_keeps_a_padding_column_that_every_row_has(model, method):
    """Pruning drops padding with the tokens it drops; keeping all, it drops nothing, not even a padding
    column that no row needs."""
    inputs = tiny_inputs(model, RAGGED)
    padded = {
        key: torch.nn.functional.pad(value, (1, 0)) if key in PER_TOKEN else value
        for key, value in inputs.items()
    }
    expected = logits(model, padded)
    with tp.pruned(model, method, keep_ratio=1.0):
        got = logits(model, padded)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


#: the inputs with one entry per prompt token (left-padded with zeros: pad id, masked, position 0)
PER_TOKEN = ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids")


def vision_features(pruner, recorded: list[torch.Tensor]) -> torch.Tensor | None:
    """The projected image features a vision-stage method handed the language model (None otherwise)."""
    return recorded[-1] if pruner.config.vision_stage is not None else None


@pytest.mark.parametrize(("family", "method"), CASES)
def test_dropping_equals_masking(model, method):
    inputs = tiny_inputs(model, RAGGED)
    # the reference masks the dropped tokens, each token at its own position (renumbered: test_positions.py)
    with (
        tp.pruned(model, method, keep_ratio=0.25, positions="original") as pruner,
        recorded_image_features(model) as recorded,
        decoder_merges() as merged,
    ):
        got = logits(model, inputs)
    keep = pruner.stats.keep_mask
    with substituted_image_features(model, vision_features(pruner, recorded)):
        expected = masked_reference(model, inputs, pruner.stats.keep_masks, merged=merged)
    assert_kept_rows_match(got, expected, keep, inputs["attention_mask"])
    n = tokens_per_image(model)
    assert pruner.stats.kept_tokens == [16 * k for k in RAGGED]
    assert pruner.stats.visual_tokens == [n * k for k in RAGGED]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_cached_generate_equals_recomputation(model, method):
    inputs = tiny_inputs(model, RAGGED)
    # the reference masks the dropped tokens, each token at its own position (renumbered: test_positions.py)
    with (
        tp.pruned(model, method, keep_ratio=0.25, positions="original") as pruner,
        recorded_image_features(model) as recorded,
        decoder_merges() as merged,
    ):
        out = greedy_with_logits(model, inputs)
    with substituted_image_features(model, vision_features(pruner, recorded)):
        assert_generate_matches_reference(model, inputs, out, pruner.stats.keep_masks, merged=merged)


@pytest.mark.parametrize(("family", "method"), CASES)
def test_batch_equals_each_sample_alone(model, method):
    inputs = tiny_inputs(model, RAGGED)
    with tp.pruned(model, method, keep_ratio=0.25) as pruner:
        batched = logits(model, inputs)[:, -1]
        with torch.no_grad():
            batched_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        for b in range(len(RAGGED)):
            alone_inputs = select_sample(inputs, b, RAGGED)
            alone = logits(model, alone_inputs)[:, -1]
            torch.testing.assert_close(batched[b : b + 1], alone, atol=ATOL, rtol=0)
            assert pruner.stats.kept_tokens == [16 * RAGGED[b]]
            with torch.no_grad():
                alone_tokens = model.generate(
                    **alone_inputs, max_new_tokens=3, do_sample=False, pad_token_id=0
                )
            assert torch.equal(batched_tokens[b, -3:], alone_tokens[0, -3:])


@pytest.mark.parametrize(("family", "method"), CASES)
def test_remove_restores_exactly(model, method):
    inputs = tiny_inputs(model, RAGGED)
    before = logits(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = tp.apply_pruner(model, method, keep_ratio=0.25)
    assert logits(model, inputs).shape[1] < before.shape[1]
    tp.remove_pruner(model)
    assert torch.equal(logits(model, inputs), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert pruner.stats is not None


def configured_stages(config: tp.PrunerConfig, n: int) -> list[tuple[int, int]]:
    """``(layer, tokens kept)`` of each stage of ``config`` for images of ``n`` tokens: a composed vision
    stage's first (layer 0: before the language model), as ``vscan`` composes in a VLM, then the config's."""
    vision = [] if config.vision is None else [(0, config.vision.kept_per_image(n))]
    return [*vision, *config.stages(n)]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_pruned_layers_see_the_configured_count(model, method):
    inputs = tiny_inputs(model, (1,))
    length = inputs["input_ids"].shape[1]
    n = tokens_per_image(model)
    with tp.pruned(model, method, budget=10) as pruner:
        seen = layer_input_lengths(model, inputs)
    expected = [length] * len(seen)
    for layer, keep in configured_stages(pruner.config, n):  # one stage, a pyramid's (pdrop) down to 10...
        expected[layer:] = [length - n + keep] * (len(seen) - layer)
    assert seen == expected
    assert expected[-1] == length - n + 10


@pytest.mark.parametrize(("family", "method"), CASES)
def test_a_ragged_batch_is_as_long_as_its_longest_kept_row(model, method):
    """Pruning drops the padding too: the layers after it see the longest row's kept tokens (its prompt less
    the dropped visual tokens), not the longest prompt less the fewest dropped."""
    inputs = tiny_inputs(model, RAGGED)
    with tp.pruned(model, method, keep_ratio=0.25) as pruner:
        seen = layer_input_lengths(model, inputs)
    n = tokens_per_image(model)
    expected = [inputs["input_ids"].shape[1]] * len(seen)
    for layer, keep in configured_stages(pruner.config, n):  # one stage, a pyramid's (pdrop) down to 16...
        dropped = (n - keep) * torch.tensor(RAGGED)
        expected[layer:] = [int((inputs["attention_mask"].sum(dim=1) - dropped).max())] * (len(seen) - layer)
    assert seen == expected


@pytest.mark.parametrize(("family", "method"), CASES)
def test_text_only_prompt_passes_through(model, method):
    inputs = tiny_inputs(model, (0, 0))
    expected = logits(model, inputs)
    with tp.pruned(model, method, keep_ratio=0.25) as pruner:
        got = logits(model, inputs)
    assert torch.equal(got, expected)
    assert pruner.stats.visual_tokens == [0, 0]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_attention_implementations_agree(family, method):
    from tokenprune.testing import tiny_model

    inputs = tiny_inputs(tiny_model(family), RAGGED)
    results = []
    for attn in ("eager", "sdpa"):
        m = tiny_model(family, attn_implementation=attn)
        with tp.pruned(m, method, keep_ratio=0.25) as pruner:
            results.append((logits(m, inputs)[:, -1], pruner.stats.keep_mask))
    assert torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][0], results[1][0], atol=ATOL, rtol=0)
