"""The command line, the tiny on-disk checkpoint it loads by default, and the kept-token overlay."""

import re

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
from typer.testing import CliRunner

import tokenprune as tp
from tokenprune.cli import app, example_image_path
from tokenprune.overlay import TITLE_HEIGHT, overlay_size, save_overlay
from tokenprune.testing import IMAGE_TOKEN_ID, save_tiny_checkpoint, tiny_model

PROMPT = "USER: <image>\nWhat is it? ASSISTANT:"
runner = CliRunner()


def plain(text: str) -> str:
    """``text`` without ANSI escapes, with runs of whitespace collapsed."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())


def test_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "run" in result.output and "methods" in result.output
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0, result.output
    assert "--keep-ratio" in plain(result.output)


def test_methods_lists_every_registered_method():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name, (stage, _) in tp.list_methods().items():
        assert re.search(rf"\b{name}\b.*\b{stage}\b", result.output), (name, result.output)
    assert "``" not in result.output  # the docstrings' reStructuredText code spans
    assert "| feather | llm | Keep a grid of every stride-th row" in result.output  # piped: Markdown


COMMANDS = ["", "methods", "run", "bench", "eval", "lmms-task", "bench-encoder", "serve", "bench-serve"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_and_names_every_option_in_full(command):
    result = runner.invoke(app, [command, "--help"] if command else ["--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80, result.output
    assert "…" not in result.output and "<bool>" not in result.output
    if command == "":  # each command's short help, in full
        from typer.main import get_command

        for name, cmd in get_command(app).commands.items():
            assert re.search(rf"^  {name} +{re.escape(cmd.short_help)}$", result.output, re.MULTILINE)
    if command == "serve":
        for name in ("--served-model-name", "--allowed-local-media-path", "--allow-private-image-urls"):
            assert name in result.output


def test_no_command_prints_the_help():
    result = runner.invoke(app, [])
    assert result.exit_code == 0 and "Usage: tokenprune [OPTIONS] COMMAND" in result.output


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["run", "--keep-ratio", "abc"], "'--keep-ratio'"),
        (["run", "--nope"], "--nope"),
        (["bench", "--repeats", "0"], "'--repeats'"),
        (["lmms-task"], "'directory'"),
        (["nope"], "'nope'"),
    ],
)
def test_a_command_line_error_is_one_line_like_every_other_error(args, named):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and named in line and "--help'" in line


MARKDOWN = """Unpruned: **85.0%** of the answers.

| batch | method | layer | kept | prefill ms | speedup | ideal | of ideal | selection % | launches \
| decode tok/s | KV MiB |
|---|---|---|---|---|---|---|---|---|---|---|---|
| 1 | fastv+drop_early_kv | 2 | 16 | 1234.5 | 1.52x | 1.80x | 0.84 | 3.1 | 45 | 125.3 | **1.2** |"""


def test_a_report_is_markdown_when_asked_or_piped_and_rich_tables_within_80_columns_on_a_terminal():
    import io

    from rich.console import Console

    from tokenprune.cli.common import print_report

    def printed(markdown: bool, terminal: bool) -> str:
        out = io.StringIO()
        print_report(
            Console(file=out, force_terminal=terminal, width=80, color_system=None), MARKDOWN, markdown
        )
        return out.getvalue()

    assert printed(markdown=True, terminal=True) == printed(markdown=False, terminal=False) == MARKDOWN + "\n"
    drawn = printed(markdown=False, terminal=True)
    assert max(len(line) for line in drawn.splitlines()) <= 80 and "|" not in drawn and "**" not in drawn
    assert "Unpruned: 85.0% of the answers." in drawn
    rows = [line.split() for line in drawn.splitlines() if line.startswith("1 ")]
    assert len(rows) == 2  # two tables, each with the key columns
    assert all(row[:2] == ["1", "fastv+drop_early_kv"] for row in rows)
    cells = ["2", "16", "1234.5", "1.52x", "1.80x", "0.84", "3.1", "45", "125.3", "1.2"]
    assert rows[0][2:] + rows[1][2:] == cells  # no cell cut


def test_run_tiny_writes_overlay(tmp_path):
    target = tmp_path / "o.png"
    args = [
        "run",
        "--model",
        "tiny",
        "--method",
        "uniform",
        "--budget",
        "8",
        "--max-new-tokens",
        "4",
        "--overlay",
        str(target),
        "--timing",
        "model",
    ]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    assert re.search(r"visual tokens │? *64 │? *8\b", text), text
    # the answering model's prefill, timed unpruned, pruned and ideal
    assert "prefill on tiny on this image: median of 5 rounds in turns, one CPU thread" in text, text
    assert re.search(r"visual tokens │? *64 │? *8 │? *8\b", text), text
    assert re.search(r"prefill speedup │? *1\.00x │? *\d+\.\d\dx │? *\d+\.\d\dx", text), text
    assert "unpruned answer:" in text and "pruned answer:" in text
    assert "8/64 kept" in text and str(target) in text
    with Image.open(target) as picture:
        assert picture.format == "PNG"
        with example_image_path() as example, Image.open(example) as source:
            assert picture.size == overlay_size((min(source.size), min(source.size)))


def test_run_bad_keep_ratio_is_a_clear_error():
    result = runner.invoke(app, ["run", "--method", "uniform", "--keep-ratio", "2"])
    assert result.exit_code == 2
    assert "keep_ratio must be in (0, 1]" in plain(result.output)
    assert "Traceback" not in result.output


def test_run_unknown_method_is_a_clear_error():
    result = runner.invoke(app, ["run", "--method", "no-such-method"])
    assert result.exit_code == 2
    assert "no-such-method" in plain(result.output)


def test_run_unknown_timing_is_a_clear_error():
    result = runner.invoke(app, ["run", "--timing", "llava-huge"])
    assert result.exit_code != 0
    message = "--timing must be one of llava-small, llava-1.5-7b, qwen2.5-vl-small, model or none"
    assert message in plain(result.output)


def test_run_times_architectures_the_benchmark_builds():
    from tokenprune.cli.run import TIMED_ARCHS
    from tokenprune.eval.archs import ARCHS

    assert set(TIMED_ARCHS) <= set(ARCHS)


def test_run_budget_larger_than_image_is_a_clear_error(tmp_path):
    args = ["run", "--model", "tiny", "--method", "uniform", "--budget", "65"]
    args += ["--overlay", str(tmp_path / "o.png")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "budget=65" in plain(result.output)
    assert not (tmp_path / "o.png").exists()


def test_example_image_is_bundled():
    with example_image_path() as path, Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 32


def test_tiny_checkpoint_round_trip(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "ckpt")
    processor = AutoProcessor.from_pretrained(path)
    with example_image_path() as example, Image.open(example) as image:
        inputs = processor(images=image.convert("RGB"), text=PROMPT, return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == 64
    assert inputs["input_ids"][0, 0] == 1  # <s>
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)
    words = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0, -6:].tolist())
    assert words == ["what", "is", "it", "?", "assistant", ":"]

    loaded = LlavaForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        expected = tiny_model().eval()(**inputs).logits
        actual = loaded(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    decoded = processor.batch_decode(torch.arange(5, 40)[None], skip_special_tokens=True)[0]
    assert "<unk>" not in decoded and decoded.strip()


def test_save_overlay_darkens_dropped_patches(tmp_path):
    image = Image.new("RGB", (40, 32), (180, 160, 140))
    grid = (4, 5)
    keep = torch.zeros(20, dtype=torch.bool)
    keep[[0, 7, 19]] = True
    path = save_overlay(image, keep, grid, tmp_path / "sub" / "overlay.png")
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size == overlay_size(image.size) == (480, 384 + TITLE_HEIGHT)
        grey = picture.convert("L")
        body = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).float()
        body = body.view(grey.height, grey.width)[TITLE_HEIGHT:]
    cell_h, cell_w = body.shape[0] // grid[0], body.shape[1] // grid[1]

    def cell_mean(index: int) -> float:
        r, c = divmod(index, grid[1])
        return body[r * cell_h : (r + 1) * cell_h, c * cell_w : (c + 1) * cell_w].mean().item()

    assert cell_mean(7) > 2 * cell_mean(8)
    assert cell_mean(0) > 2 * cell_mean(1)


def test_save_overlay_rejects_wrong_mask(tmp_path):
    with pytest.raises(ValueError, match="20 flags"):
        save_overlay(Image.new("RGB", (8, 8)), torch.ones(19, dtype=torch.bool), (4, 5), tmp_path / "o.png")


def test_every_command_that_loads_a_model_defaults_to_the_same_one():
    from typer.main import get_command

    commands = get_command(app).commands
    defaults = {
        name: next(p.default for p in commands[name].params if p.name == "model")
        for name in ("run", "eval", "serve")
    }
    # eval's default is the model of its --suite, by default the shapes suite's
    from tokenprune.eval.suites import suite_run

    suite = next(p.default for p in commands["eval"].params if p.name == "suite_name")
    defaults["eval"] = defaults["eval"] or suite_run(suite).model
    assert set(defaults.values()) == {"shapes"}, defaults


def test_run_writes_its_overlay_under_the_results_folder_that_git_ignores(tmp_path, monkeypatch):
    import pathlib
    import subprocess

    from tokenprune.cli.common import RESULTS

    monkeypatch.chdir(tmp_path)
    args = ["run", "--model", "tiny", "--method", "uniform", "--budget", "8", "--max-new-tokens", "2"]
    result = runner.invoke(app, [*args, "--timing", "none"])
    assert result.exit_code == 0, result.output
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*")] == [RESULTS, RESULTS / "overlay.png"]
    assert "uniform: 8 visual tokens per image kept before the language model" in plain(result.output)
    root = pathlib.Path(__file__).resolve().parent.parent
    ignored = subprocess.run(["git", "check-ignore", "-q", str(RESULTS / "overlay.png")], cwd=root)
    assert ignored.returncode == 0


def test_every_output_default_is_under_the_results_folder():
    from typer.main import get_command

    from tokenprune.cli.common import RESULTS

    outputs = {
        (name, param.name): param.default
        for name, command in get_command(app).commands.items()
        for param in command.params
        if param.name in ("out", "overlay")
    }
    assert len(outputs) == 5 and all(RESULTS in path.parents for path in outputs.values()), outputs
