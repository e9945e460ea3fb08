"""The shapes suite: deterministic splits, answers that match what is drawn, and the model's vocabulary."""

import collections
import random

import pytest
import torch

from tokenprune.eval import shapes_model, suite
from tokenprune.eval.train_shapes import PATCH_CLASSES, learning_rate, patch_targets, training_batch


def colours_in_cell(example, thing) -> collections.Counter:
    """How many pixels of each colour ``thing``'s grid cell holds in ``example``'s picture."""
    left, top = thing.column * suite.CELL, thing.row * suite.CELL
    return collections.Counter(
        example.image.getpixel((x, y))
        for x in range(left, left + suite.CELL)
        for y in range(top, top + suite.CELL)
    )


def test_same_seed_and_index_give_the_same_example():
    first, again = suite.examples("test", 6), suite.examples("test", 6)
    for a, b in zip(first, again, strict=True):
        assert (a.question, a.answer, a.things) == (b.question, b.answer, b.things)
        assert a.image.tobytes() == b.image.tobytes()
    assert suite.examples("test", 3, start=3)[0].image.tobytes() == first[3].image.tobytes()


def test_splits_and_fresh_seeds_differ():
    pictures = {e.image.tobytes() for split in ("train", "test", 99) for e in suite.examples(split, 12)}
    assert len(pictures) == 36


def test_kinds_cycle_in_equal_shares():
    counts = collections.Counter(e.kind for e in suite.examples(5, 60))
    assert counts == {kind: 10 for kind in suite.KINDS}


def test_answers_match_the_drawn_scene():
    for example in suite.examples("validation", 120):
        objects = [t for t in example.things if t.shape != "letter"]
        cells = [(t.column, t.row) for t in example.things]
        assert len(set(cells)) == len(cells)
        for thing in objects:  # every shape is drawn in its own colour inside its own cell
            assert colours_in_cell(example, thing)[suite.COLORS[thing.label]] > 150, (example.question, thing)
        letters = [t for t in example.things if t.shape == "letter"]
        for thing in letters:  # the glyph is black ink inside its cell
            assert colours_in_cell(example, thing)[(0, 0, 0)] > 5
        assert_right_answer(example.kind, example.question, example.answer, example.things)
        for kind, question, answer in suite.questions(example.things, random.Random(0)):
            assert suite.answerable(kind, example.things)
            assert_right_answer(kind, question, answer, example.things)


def assert_right_answer(kind, question, answer, things):
    """Check ``answer`` to ``question`` against the scene's items, independently of the suite's code."""
    objects = [t for t in things if t.shape != "letter"]
    letters = [t for t in things if t.shape == "letter"]
    if kind == "count":
        assert answer == str(len(objects))
    elif kind == "color":
        shape = question.split()[-2]
        (target,) = [t for t in objects if t.shape == shape]
        assert answer == target.label
    elif kind in ("shape", "grounding"):
        color = question.split()[-3]
        (target,) = [t for t in objects if t.label == color]
        assert answer == (target.shape if kind == "shape" else target.cell)
    elif kind == "position":
        words = question.split()
        first, second = ([t for t in objects if t.label == words[i]][0] for i in (2, 9))
        assert first.column != second.column
        assert answer == ("left" if first.column < second.column else "right")
    else:
        assert [answer] == [t.label for t in letters]


def test_bad_split_or_count_is_an_error():
    with pytest.raises(ValueError, match="unknown split"):
        suite.examples("dev", 1)
    with pytest.raises(TypeError, match="split"):
        suite.examples(1.5, 1)
    with pytest.raises(ValueError, match=">= 0"):
        suite.examples("test", -1)


def test_processor_covers_every_word_and_gives_144_visual_tokens():
    processor = shapes_model.processor()
    unknown = processor.tokenizer.unk_token_id
    examples = suite.examples("test", 60)
    chunk, inputs = next(shapes_model.batches(processor, examples, 60))
    assert chunk == examples
    image_tokens = (inputs["input_ids"] == shapes_model.config().image_token_id).sum(1)
    assert image_tokens.tolist() == [144] * 60
    assert not (inputs["input_ids"] == unknown).any()
    answers = processor.tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    assert all(len(ids) == 1 and unknown not in ids for ids in answers)


def test_training_batch_labels_only_the_replies():
    processor = shapes_model.processor()
    processor.tokenizer.padding_side = "right"
    tokenizer = processor.tokenizer
    examples = suite.examples("train", 6)
    batch = training_batch(processor, examples, describe=[True, False, False, False, False, False])
    eos = tokenizer.eos_token_id
    for row, example in enumerate(examples):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        assert batch["attention_mask"][row, 0] == 1  # tokens start at position 0: right padding
        assert int((ids == tokenizer.convert_tokens_to_ids("<image>")).sum()) == 144  # one image
        labelled = tokenizer.convert_ids_to_tokens(labels[labels != -100].tolist())
        replies = " ".join(labelled).split(" </s>")[:-1]
        if row == 0:
            assert [reply.strip() for reply in replies] == [suite.description(example.things)]
            continue
        # the example's own question is asked first, as it is scored; then one of every other kind
        prompt = tokenizer.decode(ids[: (labels != -100).nonzero()[0, 0]], skip_special_tokens=True)
        assert prompt.endswith(f"{example.question} assistant :")
        kinds = [k for k in suite.KINDS if suite.answerable(k, example.things)]
        assert len(replies) == len(kinds) and replies[0].strip() == example.answer
        assert labelled.count("</s>") == len(kinds) and int((ids == eos).sum()) == len(kinds)


def test_patch_targets_name_each_cells_item_and_the_letter_only_where_its_ink_is():
    examples = [e for e in suite.examples("train", 24) if e.kind == "reading"]
    targets = patch_targets(examples, 16).unflatten(1, (12, 12))
    for example, target in zip(examples, targets, strict=True):
        for thing in example.things:
            cell = target[thing.row * 3 : thing.row * 3 + 3, thing.column * 3 : thing.column * 3 + 3]
            letter = thing.shape == "letter"
            assert (cell[..., 0] == PATCH_CLASSES[0].index("black" if letter else thing.label)).all()
            assert (cell[..., 1] == PATCH_CLASSES[1].index(thing.shape)).all()
        (letter,) = [t for t in example.things if t.shape == "letter"]
        inked = (target[..., 2] != -100).nonzero().tolist()
        assert 2 <= len(inked) <= 6  # the glyph spans a few patches, all in its own cell
        assert {(row // 3, column // 3) for row, column in inked} == {(letter.row, letter.column)}
        assert set(target[..., 2][target[..., 2] != -100].tolist()) == {PATCH_CLASSES[2].index(letter.label)}
        for row, column in inked:  # and each of them does hold black pixels
            pixels = [
                example.image.getpixel((column * 16 + x, row * 16 + y)) for x in range(16) for y in range(16)
            ]
            assert min(max(pixel) for pixel in pixels) < 128
        assert int((target[..., 0] == 0).sum()) == 144 - 9 * len(example.things)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    rates = [learning_rate(step, 100, 1e-3, 10) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert rates[-1] == pytest.approx(1e-4, rel=0.01)


def test_training_script_updates_the_weights_and_saves_a_loadable_checkpoint(tmp_path, monkeypatch, capsys):
    from transformers import LlavaForConditionalGeneration

    from tokenprune.eval import train_shapes

    out = tmp_path / "ckpt"
    argv = ["train_shapes", "--out", str(out), "--steps", "2", "--batch", "2", "--every", "2"]
    argv += ["--validate", "6", "--patch-loss", "1", "--warmup", "1", "--threads", "1"]
    monkeypatch.setattr("sys.argv", argv)
    train_shapes.main()
    assert "step 2 loss" in capsys.readouterr().out
    trained = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    initial = shapes_model.build(0).state_dict()
    assert trained.keys() == initial.keys()  # the probe's heads are not saved
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    assert (out / "tokenizer.json").is_file() and (out / "processor_config.json").is_file()
