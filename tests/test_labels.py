"""``model(**inputs, labels=labels)`` under a pruner: the loss of the unpatched model when every token is
kept, and otherwise the loss of the masked reference (the unpruned model with the dropped tokens hidden
from attention, same positions, same targets), on every VLM family, in ragged left-padded batches."""

import pytest
import torch
from conftest import shared_model
from helpers import (
    ATOL,
    hide_tokens_from_layers,
    recorded_image_features,
    substituted_image_features,
    tokenprune_hooks,
    tower_outputs,
)

import tokenprune as tp
from tokenprune.patches import InternalsMovedError
from tokenprune.testing import (
    ANYRES_FAMILIES,
    FAMILIES,
    QWEN_FAMILIES,
    tiny_encoder,
    tiny_inputs,
    tiny_model,
    tiny_pixels,
)

RAGGED = (1, 2, 1)  # images per prompt; the prompts differ in length too, so rows are left-padded
#: (family, method): a decoder-layer and a pre-LLM method on every family, a vision-tower method and a
#: schedule (two pruning layers) on LLaVA, vision-tower methods on Qwen2-VL and Qwen3-VL (DeepStack)
CASES = [(f, m) for f in FAMILIES for m in ("dart", "divprune")]
CASES += [("llava", "visionzip"), ("llava", "fastv"), ("qwen2_vl", "visionzip"), ("qwen3_vl", "hiprune")]
SCHEDULE = {"fastv": ((1, 0.5), (3, 0.25))}


def pruner_kwargs(method: str, keep_ratio: float) -> dict:
    """The config of ``method``'s cases, with the positions the masked reference keeps (each token's own)."""
    if method in SCHEDULE and keep_ratio < 1.0:
        return {"schedule": SCHEDULE[method], "positions": "original"}
    return {"keep_ratio": keep_ratio, "positions": "original"}


def text_labels(model, inputs: dict) -> torch.Tensor:
    """Every text token of the prompts as a target, but the image placeholders, the token after each run of
    them, the padding and the token after it (-100): the targets no pruned token predicts."""
    ids, padding = inputs["input_ids"], ~inputs["attention_mask"].bool()
    placeholder = ids == model.config.image_token_id
    untargeted = placeholder | padding
    after = torch.zeros_like(untargeted)
    after[:, 1:] = untargeted[:, :-1]
    return ids.masked_fill(untargeted | after, -100)


def loss(model, inputs: dict, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, labels=labels, **kwargs).loss


@pytest.mark.parametrize(("family", "method"), CASES)
def test_keep_all_gives_the_unpatched_loss(family, method):
    """Keeping every token, any labels work, even targets on the image tokens (``labels=input_ids``, as
    transformers' own tests pass them)."""
    model = shared_model(family, "sdpa")
    inputs = tiny_inputs(model, RAGGED)
    for labels in (text_labels(model, inputs), inputs["input_ids"]):
        expected = loss(model, inputs, labels)
        with tp.pruned(model, method, keep_ratio=1.0):
            got = loss(model, inputs, labels)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("family", "method"), CASES)
def test_dropping_gives_the_masked_reference_loss(family, method):
    model = shared_model(family, "sdpa")
    inputs = tiny_inputs(model, RAGGED)
    labels = text_labels(model, inputs)
    kwargs = pruner_kwargs(method, 0.25)
    qwen_tower = family in QWEN_FAMILIES and tp.list_methods()[method][0] == "vision"
    record = tower_outputs(model) if qwen_tower else recorded_image_features(model)
    with tp.pruned(model, method, **kwargs) as pruner, record as recorded:
        got = loss(model, inputs, labels)
    assert sum(pruner.stats.kept_tokens) < sum(pruner.stats.visual_tokens)
    if qwen_tower:  # the tower's outputs, DeepStack features included, as the vision stage handed them on
        handed_on = tower_outputs(model, recorded)
    else:
        handed_on = substituted_image_features(model, recorded[-1] if pruner.config.vision_stage else None)
    with handed_on, hide_tokens_from_layers(model, pruner.stats.keep_masks, inputs["attention_mask"]):
        expected = loss(model, inputs, labels, use_cache=False)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    unpruned = loss(model, inputs, labels)
    assert not torch.allclose(got, unpruned, atol=ATOL, rtol=0)  # the reference is not the unpruned loss


def test_the_loss_kwargs_and_the_tuple_output_are_the_heads():
    """``num_items_in_batch`` (the Trainer's, with gradient accumulation) reaches the loss as the head hands
    it on, and ``return_dict=False`` puts the loss first."""
    model = shared_model("llava", "sdpa")
    inputs = tiny_inputs(model, RAGGED)
    labels = text_labels(model, inputs)
    with tp.pruned(model, "dart", keep_ratio=0.25) as pruner, torch.no_grad():
        got = model(**inputs, labels=labels, num_items_in_batch=torch.tensor(7)).loss
        as_tuple = model(**inputs, labels=labels, return_dict=False)
        plain = model(**inputs, labels=labels)
    with hide_tokens_from_layers(model, pruner.stats.keep_masks, inputs["attention_mask"]):
        expected = loss(model, inputs, labels, use_cache=False, num_items_in_batch=torch.tensor(7))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert torch.equal(as_tuple[0], plain.loss) and torch.equal(as_tuple[1], plain.logits)


def test_gradients_equal_the_masked_references():
    """Training through a pruned forward: the gradients are those of the masked reference's loss (the
    selection itself is not differentiated, in either)."""
    model = tiny_model("llava")
    inputs = tiny_inputs(model, RAGGED)
    labels = text_labels(model, inputs)
    with tp.pruned(model, "dart", keep_ratio=0.25) as pruner:
        model(**inputs, labels=labels).loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with hide_tokens_from_layers(model, pruner.stats.keep_masks, inputs["attention_mask"]):
        model(**inputs, labels=labels, use_cache=False).loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and len(got) > 0
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], atol=ATOL, rtol=0, msg=name)


def unmask_after(labels: torch.Tensor, inputs: dict, flags: torch.Tensor) -> torch.Tensor:
    """``labels`` with the token after each flagged one a target again (its own id)."""
    after = torch.zeros_like(flags)
    after[:, 1:] = flags[:, :-1] & inputs["attention_mask"].bool()[:, 1:]
    return torch.where(after, inputs["input_ids"], labels)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", *ANYRES_FAMILIES])
@pytest.mark.parametrize("after", ["image", "padding"])
def test_a_target_after_a_droppable_token_is_refused_before_the_decoder_runs(family, after):
    """Pruning drops visual tokens and padding: the logits that would predict the token after one are gone,
    whichever tokens the method keeps. Refused before any decoder layer runs; kept all, the same labels
    work."""
    model = shared_model(family, "sdpa")
    inputs = tiny_inputs(model, RAGGED)
    ids = inputs["input_ids"]
    flags = ids == model.config.image_token_id if after == "image" else ~inputs["attention_mask"].bool()
    labels = unmask_after(text_labels(model, inputs), inputs, flags)
    layers = model.model.language_model.layers
    ran = []
    handle = layers[0].register_forward_pre_hook(lambda module, args: ran.append(1))
    try:
        with tp.pruned(model, "dart", keep_ratio=0.25), pytest.raises(ValueError, match="right after a"):
            loss(model, inputs, labels)
    finally:
        handle.remove()
    assert ran == []
    expected = loss(model, inputs, labels)
    with tp.pruned(model, "dart", keep_ratio=1.0):
        torch.testing.assert_close(loss(model, inputs, labels), expected, atol=1e-6, rtol=0)


def test_labels_shaped_unlike_the_prompt_are_refused():
    model = shared_model("llava", "sdpa")
    inputs = tiny_inputs(model, RAGGED)
    labels = text_labels(model, inputs)[:, 1:]
    with tp.pruned(model, "dart", keep_ratio=0.25), pytest.raises(ValueError, match="shaped like the prompt"):
        loss(model, inputs, labels)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_a_kv_method_keeps_the_unpatched_loss(family):
    """A ``kv`` method prunes nothing at prefill: its loss is the unpatched one, for any ratio."""
    model = shared_model(family, "sdpa")
    inputs = tiny_inputs(model, RAGGED)
    labels = text_labels(model, inputs)
    expected = loss(model, inputs, labels)
    with tp.pruned(model, "sparsevila", keep_ratio=0.25):
        torch.testing.assert_close(loss(model, inputs, labels), expected, atol=1e-6, rtol=0)


def test_an_image_classifier_takes_its_labels_with_its_tokens_pruned():
    """A standalone classifier's labels are one per image: the loss is that of its logits, computed from the
    pruned encoder."""
    model = tiny_encoder("vit-classifier")
    pixels = tiny_pixels(model, num_images=3)
    labels = torch.tensor([0, 1, 0])
    with torch.no_grad():
        unpruned = model(pixel_values=pixels).logits
        with tp.pruned(model, "tome", keep_ratio=0.25):  # merging in every layer: the CLS token changes
            out = model(pixel_values=pixels, labels=labels)
    assert not torch.allclose(out.logits, unpruned, atol=ATOL)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


def test_a_head_whose_loss_moved_is_named():
    """The pruned loss hands each row's target to the head's loss function as ``shift_labels``; a release
    whose loss function takes none is named when the pruner is applied."""
    model = tiny_model("llava")
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    with pytest.raises(InternalsMovedError, match="shift_labels"):
        tp.apply_pruner(model, "dart", keep_ratio=0.25)
    assert not hasattr(model, "_tokenprune_pruner") and tokenprune_hooks(model) == []


@pytest.mark.parametrize("keep_ratio", [1.0, 0.25])
def test_shift_labels_are_the_targets_where_given(keep_ratio):
    """Sequence-parallel training hands the head ``shift_labels``, each token's target already aligned with
    its logits: the loss is then theirs (gathered with the kept tokens), whatever ``labels`` say."""
    model = shared_model("llava", "sdpa")
    inputs = tiny_inputs(model, RAGGED)
    labels = text_labels(model, inputs)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    other = labels.masked_fill(labels != -100, 7)  # other labels, same targets through shift_labels
    with tp.pruned(model, "dart", keep_ratio=keep_ratio) as pruner:
        expected = loss(model, inputs, labels)
        got = loss(model, inputs, other, shift_labels=shifted)
        moved = loss(model, inputs, labels, shift_labels=shifted.masked_fill(shifted != -100, 7))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(moved, expected)
    assert (sum(pruner.stats.kept_tokens) < sum(pruner.stats.visual_tokens)) == (keep_ratio < 1.0)
