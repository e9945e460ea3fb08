"""``tokenprune bench`` and ``tokenprune bench-encoder``: speed and memory of pruned runs against the
unpruned model and the ideal, for a VLM and for an image encoder."""

from __future__ import annotations

import pathlib
from typing import Annotated

import typer
from rich.console import Console

import tokenprune

from .common import (
    RESULTS,
    CliError,
    DeviceOption,
    DtypeOption,
    MarkdownOption,
    PageOption,
    checkpoint_path,
    exit_on_user_error,
    floats,
    ints,
    load_model,
    print_report,
    quiet_transformers,
    resolve_device,
    run_meta,
    user_errors,
)


def bench(
    arch: Annotated[
        str,
        typer.Option(
            help="Architecture with random weights: tiny, llava-small, llava-1.5-7b, qwen2.5-vl-small."
        ),
    ] = "tiny",
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="A local checkpoint instead of --arch.", show_default=False),
    ] = None,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated methods (or 'fastv+drop_early_kv', 'saint_llm+saint'); default: all."
        ),
    ] = "",
    keep_ratios: Annotated[str, typer.Option(help="Comma-separated keep ratios.")] = "0.25,0.111",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1",
    attn: Annotated[str, typer.Option(help="Attention implementation.")] = "sdpa",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    repeats: Annotated[
        int, typer.Option(min=1, help="Timed runs per measurement (the fastest prefill, the median decode).")
    ] = 3,
    prefill_turns: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Turns in which each method's prefill and its ideal's are timed back to back (the fastest "
            "prefill, held to the ideal by the median ratio of the two in a turn); default --repeats. More "
            "turns steady the ratios on a noisy machine.",
        ),
    ] = None,
    new_tokens: Annotated[int, typer.Option(min=2, help="Tokens generated for the decode timing.")] = 8,
    video_frames: Annotated[
        int,
        typer.Option(
            min=0,
            help="Each prompt holds a video of this many frames (Qwen-VL temporal patches of 64 tokens) "
            "instead of an image.",
        ),
    ] = 0,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Also time the whole prefill under torch.compile, and decoding with a static cache and a "
            "compiled step.",
        ),
    ] = False,
    out: Annotated[pathlib.Path, typer.Option(help="Folder for results.json, results.csv, speedup.png.")] = (
        RESULTS / "bench"
    ),
    page: PageOption = None,
    markdown: MarkdownOption = False,
) -> None:
    """Time prefill, decode and end-to-end of pruned runs against the unpruned model and the ideal."""
    from ..eval.archs import ARCHS
    from ..eval.bench import bench_config, build_model, markdown_table, run_benchmark, write_results
    from ..testing import QWEN_FAMILIES

    console = Console()
    with exit_on_user_error():
        names = [m for m in methods.split(",") if m] or sorted(tokenprune.list_methods())
        ratios = floats(keep_ratios)
        sizes = [int(b) for b in floats(batch_sizes)]
        with user_errors(ValueError, TypeError):
            for name in names:
                for ratio in ratios:
                    bench_config(name, ratio)
        if model is None and arch not in ARCHS:
            raise CliError(f"unknown --arch {arch!r}; known: {', '.join(ARCHS)}")
        check_page(page, out)
        torch_device, torch_dtype = resolve_device(device, dtype)
        with quiet_transformers(), console.status("Building the model...", spinner="dots"):
            if model is None:
                vlm = build_model(ARCHS[arch](), attn, torch_device, torch_dtype)
            else:
                vlm = load_model(checkpoint_path(model), attn, torch_device, torch_dtype)
        if video_frames and vlm.config.model_type not in QWEN_FAMILIES:
            raise CliError(
                "--video-frames times Qwen-VL videos: use --arch qwen2.5-vl-small or a Qwen-VL model"
            )
        with quiet_transformers():
            rows = run_benchmark(
                vlm,
                names,
                ratios,
                sizes,
                repeats=repeats,
                prefill_turns=prefill_turns,
                new_tokens=new_tokens,
                compile=compile,
                video_frames=video_frames,
            )
    settings = {
        "repeats": repeats,
        "prefill_turns": prefill_turns or repeats,
        "new_tokens": new_tokens,
        "compile": compile,
        "video_frames": video_frames,
    }
    meta = run_meta(model or arch, torch_device, attn, torch_dtype, **settings)
    paths = write_results(rows, out, meta)
    report(console, markdown_table(rows), paths, page, out, markdown)


def bench_encoder(
    arch: Annotated[
        str, typer.Option(help="Image encoder with random weights: tiny-vit, vit-b16.")
    ] = "vit-b16",
    merges: Annotated[
        str, typer.Option("--r", help="Comma-separated r values of tome and turbo (tokens per layer).")
    ] = "0,4,8,12,16",
    keep_ratios: Annotated[
        str, typer.Option(help="Keep ratios of hiprune, visionzip, vispruner and saint.")
    ] = "0.5,0.25",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward.")] = 8,
    attn: Annotated[str, typer.Option(help="Attention implementation.")] = "sdpa",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per measurement (the fastest).")] = 3,
    out: Annotated[
        pathlib.Path, typer.Option(help="Folder for results.json, results.csv, throughput.png.")
    ] = RESULTS / "bench-encoder",
    page: PageOption = None,
    markdown: MarkdownOption = False,
) -> None:
    """Images/s of an image encoder with vision-stage methods against the unpruned encoder."""
    from ..config import PrunerConfig
    from ..eval.archs import ENCODER_ARCHS
    from ..eval.encoder_bench import (
        build_encoder,
        encoder_markdown_table,
        run_encoder_benchmark,
        write_encoder_results,
    )

    console = Console()
    with exit_on_user_error():
        rs, ratios = ints(merges), floats(keep_ratios)
        with user_errors(ValueError, TypeError):
            for r in rs:
                PrunerConfig("tome", options={"r": r})
            for ratio in ratios:
                PrunerConfig("hiprune", keep_ratio=ratio)
        if arch not in ENCODER_ARCHS:
            raise CliError(f"unknown --arch {arch!r}; known: {', '.join(ENCODER_ARCHS)}")
        check_page(page, out)
        torch_device, torch_dtype = resolve_device(device, dtype)
        with quiet_transformers():
            encoder = build_encoder(ENCODER_ARCHS[arch](), attn, torch_device, torch_dtype)
            rows = run_encoder_benchmark(encoder, rs, ratios, batch_size, repeats=repeats)
    meta = run_meta(arch, torch_device, attn, torch_dtype, batch_size=batch_size, repeats=repeats)
    paths = write_encoder_results(rows, out, meta)
    report(console, encoder_markdown_table(rows), paths, page, out, markdown)


def check_page(page: pathlib.Path | None, out: pathlib.Path) -> None:
    """A :class:`CliError` before any run if ``page`` cannot be read or lacks the markers of ``out``."""
    from ..eval.accuracy import replace_between_markers

    if page is not None:
        with user_errors(OSError, ValueError):
            replace_between_markers(page.read_text(), "", out.name)


def report(
    console: Console, table: str, paths: dict, page: pathlib.Path | None, out: pathlib.Path, markdown: bool
) -> None:
    """Print ``table`` and where the results went; write it into ``page`` between ``out``'s markers."""
    from ..eval.accuracy import replace_between_markers

    if page is not None:
        page.write_text(replace_between_markers(page.read_text(), table + "\n", out.name))
    print_report(console, table, markdown)
    console.print(f"results: {', '.join(str(p) for p in paths.values())}", highlight=False)
