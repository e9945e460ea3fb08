"""Scoring on the shapes suite, the results tables and the README markers they are written between."""

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from tokenprune.cli import app
from tokenprune.eval import suite
from tokenprune.eval.accuracy import (
    AccuracyRow,
    accuracy_by_kind,
    markdown_tables,
    overlay_sheet,
    replace_between_markers,
    seed_check,
)
from tokenprune.testing import save_tiny_checkpoint


def test_accuracy_by_kind_counts_exact_answers():
    examples = suite.examples("test", 12)
    replies = [e.answer for e in examples]
    replies[0] = "wrong"  # a color question
    replies[7] = replies[7].upper()  # a shape question: answers are compared exactly
    accuracy = accuracy_by_kind(examples, replies)
    assert accuracy["color"] == 0.5 and accuracy["shape"] == 0.5
    assert accuracy["count"] == accuracy["reading"] == 1.0
    assert accuracy["all"] == pytest.approx(10 / 12)
    with pytest.raises(ValueError):
        accuracy_by_kind(examples, replies[:-1])


def row(method: str, ratio: float, accuracy: float, base: float = 0.9) -> AccuracyRow:
    kinds = dict.fromkeys(suite.KINDS, accuracy)
    return AccuracyRow(method, "llm", ratio, 144 * ratio, 10.0, 1.0, accuracy, accuracy / base, **kinds)


def test_tables_show_every_method_and_ratio_with_the_best_retention_in_bold():
    rows = [
        dataclasses.replace(row("none", 1.0, 0.9), stage="none"),
        row("dart", 0.5, 0.9),
        row("dart", 0.11, 0.6),
        row("fastv", 0.5, 0.8),
        row("fastv", 0.11, 0.7),
    ]
    text = markdown_tables(rows)
    assert "Unpruned: **90.0%**" in text
    assert "| dart | llm | **90.0% (100.0%)** | 60.0% (66.7%) |" in text
    assert "| fastv | llm | 80.0% (88.9%) | **70.0% (77.8%)** |" in text
    assert "at 11% kept" in text and "| unpruned | 90% |" in text


def test_seed_check_names_the_cells_that_moved_more_than_the_limit(tmp_path):
    """Retention differences cell by cell against another seed's results.json: the mean, the largest, and
    every cell over 5 points; a run of the same seed or another suite is refused."""
    rows = [row("none", 1.0, 0.9), row("fastv", 0.5, 0.9), row("fastv", 0.25, 0.72), row("dart", 0.5, 0.81)]
    theirs = [row("none", 1.0, 0.8, 0.8), row("fastv", 0.5, 0.8, 0.8), row("fastv", 0.25, 0.56, 0.8)]
    other = tmp_path / "results.json"
    meta = {"suite": "shapes", "seed": 2}
    other.write_text(
        json.dumps(
            {"meta": {**meta, "seed": 7, "examples": 60}, "rows": [dataclasses.asdict(r) for r in theirs]}
        )
    )
    text = seed_check(rows, other, meta)
    # fastv keeps 100% at 50% on both seeds; at 25% 80% here, 70% there; dart is not in the other run
    assert "seed 7 (60 other questions)" in text and "5.0% on average over 2 cells" in text
    assert "at most 10.0% (fastv at 25%); more than 5% in fastv at 25% (10.0%)." in text
    with pytest.raises(ValueError, match="another seed"):
        seed_check(rows, other, {"suite": "shapes", "seed": 7})
    with pytest.raises(ValueError, match="another seed"):
        seed_check(rows, other, {"suite": "video", "seed": 2})


def test_markers_are_replaced_and_missing_markers_are_an_error():
    text = "intro\n<!-- shapes-eval:start -->\nold\n<!-- shapes-eval:end -->\noutro\n"
    new = replace_between_markers(text, "new table\n", "shapes-eval")
    assert new == "intro\n<!-- shapes-eval:start -->\nnew table\n<!-- shapes-eval:end -->\noutro\n"
    assert replace_between_markers(new, "new table\n", "shapes-eval") == new
    with pytest.raises(ValueError, match="markers"):
        replace_between_markers("no markers here", "x", "shapes-eval")


def test_eval_command_scores_methods_and_updates_the_page(tmp_path, monkeypatch):
    from tokenprune.eval import accuracy

    labels = []  # the overlay sheet's row labels
    save_sheet = accuracy._save_sheet
    monkeypatch.setattr(
        accuracy,
        "_save_sheet",
        lambda rows, path: labels.extend(r[0] for r in rows) or save_sheet(rows, path),
    )
    readme = tmp_path / "performance.md"
    readme.write_text("# x\n<!-- shapes-eval:start -->\nstale\n<!-- shapes-eval:end -->\n")
    args = ["eval", "--count", "12", "--methods", "dart,dart+renumbered,tome", "--keep-ratios", "0.5,0.05"]
    args += ["--batch-size", "12", "--out", str(tmp_path / "out"), "--page", str(readme)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [(r["method"], r["keep_ratio"]) for r in rows] == [
        ("none", 1.0),
        ("dart", 0.5),
        ("dart", 0.05),
        ("dart+renumbered", 0.5),
        ("dart+renumbered", 0.05),
        ("tome", 0.5),
        ("tome", 0.05),
    ]
    assert rows[0]["kept_tokens"] == 144 and rows[0]["retention"] == 1.0
    assert rows[1]["kept_tokens"] == 72 and rows[2]["kept_tokens"] == 7
    # ToMe cannot merge 145 tokens down to 8 in the tower's three merge steps: reported, not run
    assert rows[6]["accuracy"] is None and "cannot merge" in rows[6]["note"]
    assert rows[3]["kept_tokens"] == 72 and rows[3]["stage"] == "llm"
    for row in rows[:6]:
        assert 0 <= row["accuracy"] <= 1 and row["prefill_ms"] > 0
    text = readme.read_text()
    assert "stale" not in text and "| dart | llm |" in text and "n/a" in text
    assert "| dart+renumbered | llm |" in text
    for name in ("results.csv", "pareto.png", "overlays.png", "table.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert labels == ["dart 5%", "dart+renumbered 5%"]  # the asked ratio closest to 11% (tome cannot)


@pytest.mark.parametrize("flag", ["--page", "--readme"])  # --readme: the flag's name before docs/
def test_eval_command_rejects_a_missing_page_before_loading(tmp_path, flag):
    args = ["eval", flag, str(tmp_path / "nope.md"), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "nope.md is not a file" in result.output
    assert not (tmp_path / "out").exists()


def test_eval_command_rejects_a_bad_method_before_loading(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--methods", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "nope" in result.output
    assert not any(tmp_path.iterdir())


def test_lmms_task_command_writes_the_task(tmp_path):
    result = CliRunner().invoke(app, ["lmms-task", str(tmp_path / "task"), "--count", "6"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "task" / "tokenprune_shapes.yaml").is_file()
    assert len((tmp_path / "task" / "data.jsonl").read_text().splitlines()) == 6


def test_overlays_are_left_out_where_image_tokens_form_no_grid(tmp_path):
    """LLaVA-NeXT's tiles and newline rows are no single patch grid: the eval scores it without a sheet."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = save_tiny_checkpoint(tmp_path / "next", family="llava_next")
    processor, model = AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)
    examples = suite.examples("test", 6)
    sheet = tmp_path / "overlays.png"
    assert overlay_sheet(model, processor, examples, ["hiprune"], 0.5, sheet) is None
    assert not sheet.exists()
