"""Scoring on the shapes suite, the results tables and the README markers they are written between."""

import dataclasses

import pytest

from tokenprune.eval import suite
from tokenprune.eval.accuracy import (
    AccuracyRow,
    accuracy_by_kind,
    markdown_tables,
    replace_between_markers,
)


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


def test_markers_are_replaced_and_missing_markers_are_an_error():
    text = "intro\n<!-- shapes-eval:start -->\nold\n<!-- shapes-eval:end -->\noutro\n"
    new = replace_between_markers(text, "new table\n", "shapes-eval")
    assert new == "intro\n<!-- shapes-eval:start -->\nnew table\n<!-- shapes-eval:end -->\noutro\n"
    assert replace_between_markers(new, "new table\n", "shapes-eval") == new
    with pytest.raises(ValueError, match="markers"):
        replace_between_markers("no markers here", "x", "shapes-eval")
