"""``tokenprune eval`` and ``tokenprune lmms-task``: accuracy against the keep ratio on the shapes suite
(or the video suite), and the shapes suite exported as an lmms-eval task."""

from __future__ import annotations

import contextlib
import pathlib
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

import tokenprune

from .common import (
    RESULTS,
    SHAPES,
    VIDEO,
    CliError,
    DeviceOption,
    DtypeOption,
    MarkdownOption,
    exit_on_user_error,
    floats,
    load_model,
    local_checkpoint,
    print_report,
    quiet_transformers,
    resolve_device,
    run_meta,
    user_errors,
)


def eval_(
    suite_name: Annotated[
        str,
        typer.Option(
            "--suite", help="'shapes' (images, 6 question kinds) or 'video' (16-frame clips, 7 kinds)."
        ),
    ] = "shapes",
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help=f"Checkpoint directory; '{SHAPES}' / '{VIDEO}': the shipped shapes / video VLM; default: "
            "the suite's own.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(help="Seed of the questions: 2 is the test split; any other draws a fresh one."),
    ] = 2,
    count: Annotated[
        int | None,
        typer.Option(
            min=6,
            help="Questions (an equal share of each kind); default: 600 (shapes), 350 (video).",
            show_default=False,
        ),
    ] = None,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated methods (or 'fastv+renumbered', 'saint_llm+saint'); default: all."
        ),
    ] = "",
    keep_ratios: Annotated[str, typer.Option(help="Comma-separated keep ratios.")] = "0.5,0.25,0.11,0.05",
    batch_size: Annotated[int, typer.Option(min=1, help="Questions per generate call.")] = 32,
    overlay_ratio: Annotated[
        float | None,
        typer.Option(
            help="Keep ratio of the kept-token overlays; default: the asked one closest to 11%.",
            show_default=False,
        ),
    ] = None,
    attn: Annotated[str, typer.Option(help="Attention implementation.")] = "sdpa",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    out: Annotated[
        pathlib.Path, typer.Option(help="Folder for results.json/.csv, table.md, pareto.png, overlays.png.")
    ] = RESULTS / "eval",
    readme: Annotated[
        pathlib.Path | None,
        typer.Option(
            "--page",
            "--readme",
            help="Also write table.md into this Markdown page (docs/performance.md) between its "
            "shapes-eval (video-eval) markers.",
        ),
    ] = None,
    compare: Annotated[
        pathlib.Path | None,
        typer.Option(
            help="results.json of a run on another seed: add the fresh-seed check (retention, cell by cell) "
            "to the table.",
            show_default=False,
        ),
    ] = None,
    markdown: MarkdownOption = False,
) -> None:
    """Accuracy of every method at every keep ratio on the shapes (or video) suite, with retention and
    prefill time."""
    from ..eval.accuracy import (
        evaluate_methods,
        focus_ratio,
        overlay_sheet,
        replace_between_markers,
        seed_check,
        write_accuracy_results,
    )
    from ..eval.bench import bench_config
    from ..eval.suites import suite_run

    console = Console()
    with exit_on_user_error(), contextlib.ExitStack() as stack:
        with user_errors(ValueError):
            run = suite_run(suite_name)
        model = run.model if model is None else model
        count = run.count if count is None else count
        names = [m for m in methods.split(",") if m] or sorted(tokenprune.list_methods())
        ratios = tuple(floats(keep_ratios))
        if not ratios:
            raise CliError("--keep-ratios names no ratio")
        overlay_ratio = focus_ratio(ratios) if overlay_ratio is None else overlay_ratio
        with user_errors(ValueError, TypeError):
            for name in names:
                for ratio in (*ratios, overlay_ratio):
                    bench_config(name, ratio)
        for path, option in ((readme, "--page"), (compare, "--compare")):
            if path is not None and not path.is_file():
                raise CliError(f"{option} {path} is not a file")
        torch_device, torch_dtype = resolve_device(device, dtype)
        checkpoint = local_checkpoint(stack, model, seed=0)
        stack.enter_context(quiet_transformers())
        with console.status(f"Loading {escape(model)}...", spinner="dots"):
            with user_errors(OSError, ValueError):
                processor = run.processor(checkpoint)
            vlm = load_model(checkpoint, attn, torch_device, torch_dtype)
            examples = run.examples(seed, count)
        with console.status(f"Scoring {len(names)} methods x {len(ratios)} keep ratios...", spinner="dots"):
            rows = evaluate_methods(vlm, processor, examples, names, ratios, batch_size, run=run)
            meta = run_meta(model, torch_device, attn, torch_dtype, suite=run.name, seed=seed, examples=count)
            paths = write_accuracy_results(rows, out, meta, run.name, run.unit)
            if compare is not None:
                with user_errors(ValueError, KeyError):
                    check = seed_check(rows, compare, meta)
                paths["table"].write_text(paths["table"].read_text() + check)
            if run.media == "images":  # the overlays draw kept patches over one picture
                sheet = overlay_sheet(vlm, processor, examples, names, overlay_ratio, out / "overlays.png")
                if sheet is not None:
                    paths["overlays"] = sheet
    table = paths["table"].read_text()
    if readme is not None:
        readme.write_text(replace_between_markers(readme.read_text(), table, f"{run.name}-eval"))
        paths["readme"] = readme
    print_report(console, table, markdown)
    console.print(f"results: {', '.join(str(p) for p in paths.values())}", highlight=False)


def lmms_task(
    directory: Annotated[pathlib.Path, typer.Argument(help="Folder to write the task into.")],
    seed: Annotated[int, typer.Option(help="Seed of the questions: 2 is the test split.")] = 2,
    count: Annotated[int, typer.Option(min=1, help="Questions.")] = 600,
) -> None:
    """Write the shapes suite as the lmms-eval task tokenprune_shapes (use with --include_path DIR)."""
    from ..eval.lmms_task import export_lmms_task

    path = export_lmms_task(directory, seed, count)
    typer.echo(f"wrote {path}; run: python -m lmms_eval --model tokenprune --include_path {directory} ...")
