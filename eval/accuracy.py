"""Accuracy of a VLM on a suite (the shapes suite of images, the video suite of clips), unpruned and under
every registered method and budget."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import tokenprune as tp
from tokenprune.overlay import first_image_keep, render_overlay
from tokenprune.pruned_vlm import Generation, PrunedVLM, Request

from . import shapes_model, suite
from .bench import bench_config, times_ms, write_rows


def answers(model, processor, examples: list[suite.Example], batch_size: int = 32) -> list[str]:
    """The model's greedy answer to each example: the first word of at most three new tokens (``""``
    when there are none), generated in left-padded batches by :class:`~tokenprune.pruned_vlm.PrunedVLM`
    with whatever pruner the model has applied."""
    requests = [Request(item.question, (item.image,), Generation(max_new_tokens=3)) for item in examples]
    replies = PrunedVLM(model, processor, None, batch_size).answer(requests)
    return [(reply.split() or [""])[0] for reply in replies]


def score(model, processor, examples: list[suite.Example], batch_size: int = 32) -> dict[str, float]:
    """Accuracy per question kind of :data:`suite.KINDS` and ``"all"``, as fractions in [0, 1]."""
    return accuracy_by_kind(examples, answers(model, processor, examples, batch_size))


def accuracy_by_kind(
    examples: list, replies: list[str], kinds: tuple[str, ...] = suite.KINDS
) -> dict[str, float]:
    """The fraction of ``replies`` equal to their example's answer, per kind of ``kinds`` present and
    ``"all"``."""
    right, total = collections.Counter(), collections.Counter()
    for item, reply in zip(examples, replies, strict=True):
        for key in (item.kind, "all"):
            total[key] += 1
            right[key] += reply == item.answer
    return {kind: right[kind] / total[kind] for kind in (*kinds, "all") if total[kind]}


#: Fractions of each image's visual tokens kept in a suite run, from generous to harsh.
KEEP_RATIOS = (0.5, 0.25, 0.11, 0.05)
#: The keep ratio the per-kind table and the overlay sheet show by default: the asked one closest to it.
FOCUS_RATIO = 0.11
#: Question kinds the kept-token overlays show, one example each.
OVERLAY_KINDS = ("reading", "count", "grounding")


@dataclass
class AccuracyRow:
    """One method at one keep ratio on the suite (``method="none"``: the unpruned model, ratio 1).

    ``kept_tokens`` is the mean number of visual tokens per image that reach the layers after pruning (for
    a ``kv`` method: that each decode step attends to); ``retention`` is ``accuracy`` over the unpruned
    model's; the kind columns hold the accuracy on that question kind. A configuration the model cannot
    run (e.g. more token merging than its encoder has layers for) has ``None`` numbers and the reason in
    ``note``.
    """

    method: str
    stage: str
    keep_ratio: float
    kept_tokens: float | None
    prefill_ms: float | None
    prefill_speedup: float | None
    accuracy: float | None
    retention: float | None
    color: float | None
    shape: float | None
    count: float | None
    position: float | None
    grounding: float | None
    reading: float | None
    note: str = ""


def evaluate_methods(
    model,
    processor,
    examples: list,
    methods: list[str],
    keep_ratios: tuple[float, ...] = KEEP_RATIOS,
    batch_size: int = 32,
    timing_repeats: int = 5,
    run=None,
) -> list[AccuracyRow]:
    """Score the unpruned model, then every method at every keep ratio, on ``examples`` of the suite of
    ``run`` (a :class:`~tokenprune.eval.suites.SuiteRun`; default: the shapes suite's), whose question
    kinds the rows have a column each for.

    Prefill time is the fastest of ``timing_repeats`` forward passes over the first batch; the unpruned
    model is timed right before each configuration and the speedup is the ratio of the two, so that
    slow drift of a shared machine cancels (the unpruned row's time is the median of those baselines).
    Returns the rows, the unpruned one first.
    """
    if run is None:
        from .suites import suite_run

        run = suite_run("shapes")
    device = next(model.parameters()).device
    timing = {
        key: value.to(device) for key, value in run.timing_batch(processor, examples, batch_size).items()
    }
    for key in ("pixel_values", "pixel_values_videos"):
        if key in timing:
            timing[key] = timing[key].to(model.dtype)
    row = functools.partial(_row, row_class(run.kinds))

    def prefill() -> None:
        with torch.no_grad():
            model(**timing)

    base = run.score(model, processor, examples, batch_size)  # also warms up every kernel the timings use
    baselines = []
    rows = []
    for method in methods:
        for ratio in keep_ratios:
            config = bench_config(method, ratio)
            baselines.append(min(times_ms(prefill, device, timing_repeats)))  # right before, as drift is slow
            with contextlib.ExitStack() as scope:
                try:
                    pruner = scope.enter_context(tp.pruned(model, config))
                except ValueError as error:  # e.g. more merging than the encoder's layers allow
                    rows.append(row(method, config.stage, ratio, None, None, None, None, base, str(error)))
                    continue
                ms = min(times_ms(prefill, device, timing_repeats))
                accuracy = run.score(model, processor, examples, batch_size)
                stats = pruner.stats
            kept = sum(stats.kept_tokens) / len(stats.kept_tokens)
            rows.append(row(method, stats.stage, ratio, kept, ms, baselines[-1], accuracy, base))
    token = model.config.video_token_id if run.media == "videos" else model.config.image_token_id
    visual = int((timing["input_ids"][0] == token).sum())
    base_ms = statistics.median(baselines) if baselines else min(times_ms(prefill, device, timing_repeats))
    return [row("none", "none", 1.0, visual, base_ms, base_ms, base, base), *rows]


@functools.cache
def row_class(kinds: tuple[str, ...]) -> type:
    """:class:`AccuracyRow` for the shapes suite's kinds; for other ``kinds``, a dataclass with the same
    fields but a column per kind of ``kinds`` instead of the shapes suite's."""
    if kinds == suite.KINDS:
        return AccuracyRow
    common = [(f.name, f.type) for f in dataclasses.fields(AccuracyRow)]
    first = [name for name, _ in common].index("retention")
    columns = [*common[: first + 1], *((kind, "float | None") for kind in kinds)]
    return dataclasses.make_dataclass("AccuracyRow", [*columns, ("note", str, dataclasses.field(default=""))])


def row_kinds(row) -> tuple[str, ...]:
    """The question kinds a row has a column for (those after ``retention``, before ``note``)."""
    names = [field.name for field in dataclasses.fields(row)]
    return tuple(names[names.index("retention") + 1 : names.index("note")])


def _row(cls, method, stage, ratio, kept, ms, base_ms, accuracy, base, note="") -> AccuracyRow:
    kind_names = row_kinds(cls)
    if accuracy is None:
        return cls(method, stage, ratio, *(None,) * 5, **dict.fromkeys(kind_names), note=note)
    kinds = {kind: round(accuracy[kind], 4) for kind in kind_names}
    return cls(
        method=method,
        stage=stage,
        keep_ratio=ratio,
        kept_tokens=round(kept, 2),
        prefill_ms=round(ms, 2),
        prefill_speedup=round(base_ms / ms, 3),
        accuracy=round(accuracy["all"], 4),
        retention=round(accuracy["all"] / base["all"], 4) if base["all"] else 0.0,
        **kinds,
    )


def focus_ratio(ratios: Iterable[float]) -> float:
    """Of the keep ratios asked, the one closest to :data:`FOCUS_RATIO`: the one a reader looks at, shown
    by the per-kind table and, unless told otherwise, the overlay sheet (a ratio that was asked, so that
    they match the main table)."""
    return min(ratios, key=lambda ratio: abs(ratio - FOCUS_RATIO))


def overlay_sheet(
    model, processor, examples: list[suite.Example], methods: list[str], keep_ratio: float, path: Path
) -> Path | None:
    """Save one picture of which patches each method keeps at ``keep_ratio``: a row per method (``kv``
    methods, which choose afresh at every decode step and layer, are left out), a column per example of
    :data:`OVERLAY_KINDS`, each cell captioned with the question, the answer and the method's reply.

    Returns the path written, or ``None`` (nothing written) where no method's kept patches could be drawn:
    a model whose image tokens form no single patch grid (LLaVA-NeXT/OneVision's tiles and newlines).
    """
    chosen = [next(item for item in examples if item.kind == kind) for kind in OVERLAY_KINDS]
    rows = []
    for method in methods:
        config = bench_config(method, keep_ratio)
        if config.stage == "kv":
            continue
        with contextlib.ExitStack() as scope:
            try:
                pruner = scope.enter_context(tp.pruned(model, config))
            except ValueError:  # a configuration the model cannot run: its table cell says why
                continue
            cells = [_overlay_cell(model, processor, pruner, method, item) for item in chosen]
        if all(cell is not None for cell in cells):
            rows.append((f"{method} {keep_ratio * 100:.3g}%", cells))  # 0.111 is 11.1%, not 11%
    return _save_sheet(rows, path) if rows else None


def _overlay_cell(
    model, processor, pruner, method: str, item: suite.Example
) -> tuple[Image.Image, str] | None:
    """The overlay of the patches ``pruner`` keeps of ``item``'s image, and its caption; ``None`` if the
    image's tokens form no patch grid."""
    reply = answers(model, processor, [item])[0]  # the prefill of this answer fills pruner.stats
    if pruner.adapter.image_grid() is None:
        return None
    ids = next(shapes_model.batches(processor, [item], 1))[1]["input_ids"]
    per_image = pruner.adapter.tokens_per_image
    keep = first_image_keep(pruner.stats, ids, model.config.image_token_id, per_image)
    picture = render_overlay(item.image, keep, pruner.adapter.image_grid())
    return picture, f"{item.question}\n{item.answer} / {method}: {reply or '-'}"


def _save_sheet(rows: list[tuple[str, list[tuple[Image.Image, str]]]], path: Path) -> Path:
    """Tile captioned pictures into a grid with a label on the left of each row; returns ``path``."""
    font = ImageFont.load_default(size=13)
    label_width, caption_height, gap = 130, 40, 8
    width, height = rows[0][1][0][0].size
    columns = max(len(cells) for _, cells in rows)
    sheet = Image.new(
        "RGB",
        (label_width + columns * (width + gap), len(rows) * (height + caption_height + gap)),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(sheet)
    for r, (label, cells) in enumerate(rows):
        top = r * (height + caption_height + gap)
        draw.text((6, top + height // 2), label, fill=(0, 0, 0), font=font)
        for c, (picture, caption) in enumerate(cells):
            left = label_width + c * (width + gap)
            sheet.paste(picture, (left, top))
            draw.multiline_text((left + 4, top + height + 3), caption, fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def plot_pareto(
    rows: list[AccuracyRow], path: Path, title: str, suite_name: str = "shapes", unit: str = "image"
) -> None:
    """Accuracy against visual tokens kept per image (left) and against prefill time (right): one line
    per method through its keep ratios, the unpruned model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    base = rows[0]
    methods = list(dict.fromkeys(row.method for row in rows[1:]))
    colours = plt.get_cmap("tab20").colors
    for ax, field, label in (
        (axes[0], "kept_tokens", f"visual tokens kept per {unit}"),
        (axes[1], "prefill_ms", "prefill time of one batch (ms)"),
    ):
        for i, method in enumerate(methods):
            points = sorted(
                (getattr(r, field), r.accuracy * 100)
                for r in rows
                if r.method == method and r.accuracy is not None
            )
            if points:
                style = dict(color=colours[2 * (i % 10) + i // 10], marker="os^D"[i % 4], markersize=4)
                ax.plot(*zip(*points, strict=True), label=method, **style)
        ax.plot(getattr(base, field), base.accuracy * 100, "k*", markersize=12, label="unpruned")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].set_ylabel(f"accuracy on the {suite_name} suite (%)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_tables(rows: list[AccuracyRow], unit: str = "image") -> str:
    """Two markdown tables: accuracy and retention of every method by keep ratio, then accuracy per
    question kind (the rows' kind columns) at each method's ratio closest to 11% kept; ``unit`` names
    what the visual tokens are counted per."""
    base, kinds = rows[0], row_kinds(rows[0])
    ratios = sorted({r.keep_ratio for r in rows[1:]}, reverse=True)
    methods = list(dict.fromkeys(r.method for r in rows[1:]))
    by_key = {(r.method, r.keep_ratio): r for r in rows[1:]}
    header = "| method | stage | " + " | ".join(f"{ratio:.0%} kept" for ratio in ratios) + " |"
    lines = [
        f"Unpruned: **{base.accuracy:.1%}** ({base.kept_tokens:.0f} visual tokens per {unit}). "
        "Cells: accuracy (retention = pruned / unpruned accuracy); in bold the best retention of the methods "
        "that prune at prefill (a kv method prunes at decode steps only).",
        "",
        header,
        "|" + "---|" * (len(ratios) + 2),
    ]
    prefill_methods = [m for m in methods if by_key[m, ratios[0]].stage != "kv"]
    best = {
        ratio: max((by_key[m, ratio].retention or 0.0 for m in prefill_methods), default=None)
        for ratio in ratios
    }
    for method in methods:
        cells = []
        for ratio in ratios:
            row = by_key[method, ratio]
            if row.accuracy is None:
                cells.append("n/a")
                continue
            cell = f"{row.accuracy:.1%} ({row.retention:.1%})"
            cells.append(f"**{cell}**" if row.stage != "kv" and row.retention == best[ratio] else cell)
        lines.append(f"| {method} | {by_key[method, ratios[0]].stage} | " + " | ".join(cells) + " |")
    focus = focus_ratio(ratios)
    lines += [
        "",
        f"Accuracy per question kind at {focus:.0%} kept (unpruned first):",
        "",
        "| method | " + " | ".join(kinds) + " |",
        "|" + "---|" * (len(kinds) + 1),
    ]
    for row in [base, *(by_key[m, focus] for m in methods)]:
        name = "unpruned" if row.method == "none" else row.method
        values = ["n/a" if row.accuracy is None else f"{getattr(row, kind):.0%}" for kind in kinds]
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    notes = [f"- {r.method} at {r.keep_ratio:.0%}: {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", "n/a: the model cannot run that configuration:", *notes]
    return "\n".join(lines) + "\n"


def write_accuracy_results(
    rows: list[AccuracyRow], out_dir: Path, meta: dict, suite_name: str = "shapes", unit: str = "image"
) -> dict[str, Path]:
    """Write ``results.json`` / ``results.csv`` (rows with ``meta``), ``pareto.png`` and ``table.md`` to
    ``out_dir`` for a run on the suite ``suite_name``; return their paths by kind (``json``, ``csv``,
    ``plot``, ``table``)."""
    title = (
        f"model {meta['arch']}: {meta['examples']} {suite_name} questions (seed {meta['seed']}), "
        f"{meta['machine']}"
    )
    paths = write_rows(
        rows, out_dir, meta, "pareto.png", lambda path: plot_pareto(rows, path, title, suite_name, unit)
    )
    paths["table"] = out_dir / "table.md"
    paths["table"].write_text(markdown_tables(rows, unit))
    return paths


def seed_check(rows: list[AccuracyRow], other: Path, meta: dict, limit: float = 0.05) -> str:
    """A Markdown paragraph comparing this run's retention with the run of another seed in ``other`` (its
    ``results.json``), cell by cell (method and keep ratio, cells both runs scored): the largest and mean
    difference and the cells that differ by more than ``limit``. ``ValueError`` where ``other`` is a run of
    another suite or the same seed, or shares no cell."""
    data = json.loads(other.read_text())
    theirs = {
        (r["method"], r["keep_ratio"]): r["retention"] for r in data["rows"] if r["retention"] is not None
    }
    if data["meta"].get("suite") != meta["suite"] or data["meta"].get("seed") == meta["seed"]:
        raise ValueError(
            f"{other} is not a run of the {meta['suite']} suite on another seed than {meta['seed']}"
        )
    cells = [
        (abs(r.retention - theirs[r.method, r.keep_ratio]), r.method, r.keep_ratio)
        for r in rows
        if r.method != "none" and r.retention is not None and (r.method, r.keep_ratio) in theirs
    ]
    if not cells:
        raise ValueError(f"{other} scores none of this run's methods at its keep ratios")
    worst = max(cells)
    over = [f"{method} at {ratio:.0%} ({diff:.1%})" for diff, method, ratio in sorted(cells, reverse=True)]
    over = over[: sum(diff > limit for diff, _, _ in cells)]
    seed, examples = data["meta"]["seed"], data["meta"]["examples"]
    mean = sum(diff for diff, _, _ in cells) / len(cells)
    found = f"more than {limit:.0%} in {', '.join(over)}" if over else f"no cell by more than {limit:.0%}"
    return (
        f"\nFresh-seed check: the same cells on seed {seed} ({examples} other questions): retention differs "
        f"by {mean:.1%} on average over {len(cells)} cells, at most {worst[0]:.1%} ({worst[1]} at "
        f"{worst[2]:.0%}); {found}.\n"
    )


def replace_between_markers(text: str, replacement: str, name: str) -> str:
    """``text`` with what lies between ``<!-- name:start -->`` and ``<!-- name:end -->`` replaced;
    ``ValueError`` when the markers are missing, so a stale README never passes for a fresh one."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    head, found, rest = text.partition(start)
    _, found_end, tail = rest.partition(end)
    if not (found and found_end):
        raise ValueError(f"markers {start} and {end} not found; add them where the table belongs")
    return f"{head}{start}\n{replacement}{end}{tail}"
