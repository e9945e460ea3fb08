"""The shipped shapes VLM: a small, ordinary checkpoint that answers the suite and the README command."""

import pathlib
import re

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from typer.testing import CliRunner

from tokenprune.cli import DEFAULT_PROMPT, app, example_image_path
from tokenprune.eval import shapes_model, suite
from tokenprune.eval.accuracy import score

MAX_MIB = 30


def load():
    with shapes_model.shipped_checkpoint() as path:
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return model, processor


def test_checkpoint_is_small_and_is_the_model_the_code_builds():
    with shapes_model.shipped_checkpoint() as path:
        files = [f for f in pathlib.Path(path).iterdir() if f.is_file()]
        assert sum(f.stat().st_size for f in files) <= MAX_MIB * 2**20
        assert any(f.name == "model.safetensors" for f in files)
        assert any(f.name == "README.md" for f in files)  # the model card
    model, processor = load()
    expected = shapes_model.config()
    assert model.config.vision_config.hidden_size == expected.vision_config.hidden_size
    assert model.config.text_config.num_hidden_layers == expected.text_config.num_hidden_layers
    assert processor.tokenizer.get_vocab() == shapes_model.tokenizer().get_vocab()
    built = shapes_model.build().state_dict()
    loaded = model.state_dict()
    assert built.keys() == loaded.keys()
    assert all(built[k].shape == loaded[k].shape for k in built)
    assert not all(torch.equal(built[k], loaded[k]) for k in built)  # trained, not the initialisation


def test_unpruned_model_answers_the_test_split_above_the_bar_of_90_percent():
    # guessing within each kind scores about 0.25; the shipped model scores 0.99 on all 600 test
    # questions (its model card), every kind included, reading the letters too
    model, processor = load()
    accuracy = score(model, processor, suite.examples("test", 120), batch_size=40)
    assert accuracy["all"] >= 0.9, accuracy
    assert min(accuracy[kind] for kind in suite.KINDS) >= 0.85, accuracy


def test_readme_command_answers_the_bundled_example(tmp_path):
    example = suite.example(7, 4)
    assert example.question == DEFAULT_PROMPT
    with example_image_path() as path, Image.open(path) as image:
        assert image.convert("RGB").tobytes() == example.image.tobytes()
    result = CliRunner().invoke(app, ["run", "--overlay", str(tmp_path / "o.png")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", result.output).split())
    assert f"unpruned answer: {example.answer}" in text, text
    assert f"pruned answer: {example.answer}" in text, text
    assert re.search(r"visual tokens │? *144 │? *36\b", text), text
    # the prefill timed where pruning pays: the LLaVA-1.5-shaped architecture, same method and ratio
    assert "prefill on llava-small (random weights, 576 visual tokens)" in text, text
    assert re.search(r"visual tokens │? *576 │? *144 │? *144\b", text), text
