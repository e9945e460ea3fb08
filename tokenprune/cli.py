"""The ``tokenprune`` command line: try a pruning method on a model and an image, list the methods.

``tokenprune run`` loads a local checkpoint (or builds the tiny random one), answers a prompt about an
image with and without pruning, prints both answers with token counts and timings, and saves a picture
of the kept tokens. ``tokenprune methods`` lists the registered methods.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import pathlib
import tempfile
import time
from collections.abc import Iterator
from typing import Annotated

import torch
import typer
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import tokenprune

from .config import PrunerConfig
from .overlay import first_image_keep, save_overlay

#: The question of the bundled example image (``assets/example.png``: example 4 of the shapes suite's seed 7).
DEFAULT_PROMPT = "which cell holds the blue object ?"
#: ``--model`` value that builds the tiny random checkpoint of :mod:`tokenprune.testing` and loads it.
TINY = "tiny"
#: ``--model`` value of the trained shapes VLM shipped with the package (:mod:`tokenprune.eval.shapes_model`).
SHAPES = "shapes"

DeviceOption = Annotated[str, typer.Option(help="'auto' (cuda when available), 'cpu', 'cuda'...")]
DtypeOption = Annotated[str, typer.Option(help="'auto' (bfloat16 on GPU, float32 on CPU) or a dtype name.")]

app = typer.Typer(
    name="tokenprune",
    help="Training-free visual token pruning for vision-language models in transformers.",
    no_args_is_help=True,
    add_completion=False,
)


class CliError(Exception):
    """A user error: printed as one red line, exit code 2."""


def example_image_path() -> contextlib.AbstractContextManager[pathlib.Path]:
    """A context manager giving a file-system path of the bundled example image (``assets/example.png``)."""
    return importlib.resources.as_file(importlib.resources.files("tokenprune") / "assets" / "example.png")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tokenprune {tokenprune.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Training-free visual token pruning for vision-language models in transformers."""


@app.command()
def methods() -> None:
    """List the registered pruning methods with their default stage."""
    table = Table(title="tokenprune methods")
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("stage", style="magenta", no_wrap=True)
    table.add_column("description")
    for name, (stage, description) in sorted(tokenprune.list_methods().items()):
        table.add_row(name, stage, description)
    Console().print(table)


@app.command()
def run(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help=f"Checkpoint directory (or hub id); '{SHAPES}': the shipped shapes VLM; '{TINY}': a tiny "
            "random LLaVA.",
        ),
    ] = SHAPES,
    image: Annotated[
        pathlib.Path | None,
        typer.Option(
            "--image",
            "-i",
            help="Image file; default: the bundled example.",
            show_default=False,
        ),
    ] = None,
    prompt: Annotated[
        str,
        typer.Option(
            "--prompt",
            "-p",
            help="Question, or a full prompt containing the image token.",
        ),
    ] = DEFAULT_PROMPT,
    method: Annotated[str, typer.Option(help="Pruning method (see `tokenprune methods`).")] = "dart",
    keep_ratio: Annotated[
        float | None,
        typer.Option(
            help="Fraction of visual tokens kept, in (0, 1]; 0.25 when neither this nor --budget is given.",
            show_default=False,
        ),
    ] = None,
    budget: Annotated[
        int | None,
        typer.Option(
            help="Visual tokens kept per image (instead of --keep-ratio).",
            show_default=False,
        ),
    ] = None,
    layer: Annotated[
        int | None,
        typer.Option(
            help="Decoder layer where tokens are dropped (0: before the LLM; default: the method's).",
            show_default=False,
        ),
    ] = None,
    attn: Annotated[
        str,
        typer.Option(
            help="Attention implementation: eager, sdpa, flash_attention_2.",
        ),
    ] = "sdpa",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per answer.")] = 16,
    overlay: Annotated[
        pathlib.Path,
        typer.Option(
            help="Where to save the picture of the kept tokens (PNG).",
        ),
    ] = pathlib.Path("tokenprune_overlay.png"),
    seed: Annotated[int, typer.Option(help="Seed of the tiny model's weights and of random methods.")] = 0,
    device: Annotated[
        str,
        typer.Option(
            help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1'...",
        ),
    ] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            help="'auto' (bfloat16 on GPU, float32 on CPU), 'float32', 'float16', 'bfloat16'.",
        ),
    ] = "auto",
) -> None:
    """Answer PROMPT about IMAGE with and without pruning; print answers, token counts, timings."""
    console = Console()
    with _exit_on_user_error():
        _run(
            console,
            model=model,
            image=image,
            prompt=prompt,
            method=method,
            keep_ratio=keep_ratio,
            budget=budget,
            layer=layer,
            attn=attn,
            max_new_tokens=max_new_tokens,
            overlay=overlay,
            seed=seed,
            device=device,
            dtype=dtype,
        )


# -- implementation -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _exit_on_user_error() -> Iterator[None]:
    """Print a :class:`CliError` as one red line on stderr and exit with code 2."""
    try:
        yield
    except CliError as error:
        message = f"[bold red]error:[/] {escape(str(error))}"
        Console(stderr=True).print(message, highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


def _load_model(checkpoint: str, attn: str, device: torch.device, dtype: torch.dtype):
    """A local image-text-to-text checkpoint on ``device`` in eval mode; load failures become CliError."""
    from transformers import AutoModelForImageTextToText

    with _user_errors(OSError, ValueError):
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, attn_implementation=attn, dtype=dtype)
    return model.to(device).eval()


@contextlib.contextmanager
def _user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn the given exception types into :class:`CliError` (one line, no traceback)."""
    try:
        yield
    except kinds as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CliError(message) from error


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and warnings within the block, restoring them after."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    with _user_errors(RuntimeError, ValueError):
        resolved = torch.device(
            "cuda"
            if device == "auto" and torch.cuda.is_available()
            else "cpu"
            if device == "auto"
            else device
        )
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {device}: CUDA is not available here; use --device cpu")
    if dtype == "auto":
        return resolved, torch.bfloat16 if resolved.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise CliError(f"--dtype must be auto or one of {', '.join(dtypes)}, got {dtype!r}")
    return resolved, dtypes[dtype]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill_seconds(model: torch.nn.Module, inputs: dict, device: torch.device, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of one full forward pass over the prompt (time to first token)."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            model(**inputs)
            _synchronize(device)
            best = min(best, time.perf_counter() - start)
    return best


def _generate(model, processor, inputs: dict, max_new_tokens: int, device: torch.device) -> tuple[str, float]:
    """Greedy answer to ``inputs`` (new tokens only, decoded) and the wall time of ``generate``."""
    _synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    _synchronize(device)
    seconds = time.perf_counter() - start
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip(), seconds


def _build_prompt(processor, prompt: str) -> str:
    """``prompt`` as is when it holds the image token, else a one-image user turn asking it."""
    image_token = getattr(processor, "image_token", "<image>")
    if image_token in prompt:
        return prompt
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: {image_token}\n{prompt} ASSISTANT:"


def _checkpoint(model: str) -> str:
    """``--model`` as given to ``from_pretrained``: a local directory, or else a hub id."""
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_absolute() or model.startswith((".", "~")) or path.exists():
        raise CliError(
            f"no checkpoint directory at {model} (give a directory with config.json, '{SHAPES}' or '{TINY}')"
        )
    return model


def _centre_square(image: Image.Image) -> Image.Image:
    """The central square of ``image``: the region a CLIP-style processor's resize and centre crop keep."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _run(
    console: Console,
    *,
    model: str,
    image: pathlib.Path | None,
    prompt: str,
    method: str,
    keep_ratio: float | None,
    budget: int | None,
    layer: int | None,
    attn: str,
    max_new_tokens: int,
    overlay: pathlib.Path,
    seed: int,
    device: str,
    dtype: str,
) -> None:
    from transformers import AutoProcessor

    if keep_ratio is None and budget is None:
        keep_ratio = 0.25
    amount = {"keep_ratio": keep_ratio} if budget is None else {"budget": budget}
    if keep_ratio is not None and budget is not None:
        raise CliError("give either --keep-ratio or --budget, not both")
    with _user_errors(ValueError, TypeError):  # bad method / ratio / budget / layer: fail before loading
        PrunerConfig(method, layer=layer, **amount)
    torch_device, torch_dtype = _resolve_device(device, dtype)

    with contextlib.ExitStack() as stack:
        if image is None:
            image = stack.enter_context(example_image_path())
        with _user_errors(OSError):
            picture = Image.open(image).convert("RGB")

        stack.enter_context(_quiet_transformers())
        with console.status(f"Loading {escape(model)}...", spinner="dots"):
            checkpoint = _local_checkpoint(stack, model, seed)
            with _user_errors(OSError, ValueError):
                processor = AutoProcessor.from_pretrained(checkpoint)
            vlm = _load_model(checkpoint, attn, torch_device, torch_dtype)
            # an unsupported family, a budget over the image or a layer past the model fails before any work
            with _user_errors(ValueError, TypeError, RuntimeError):
                tokenprune.apply_pruner(vlm, method, layer=layer, **amount).remove()
            with _user_errors(ValueError, TypeError):
                inputs = processor(images=picture, text=_build_prompt(processor, prompt), return_tensors="pt")
            inputs = inputs.to(torch_device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
            inputs = dict(inputs)

        with console.status("Generating without pruning...", spinner="dots"):
            _prefill_seconds(vlm, inputs, torch_device, repeats=1)  # warm-up
            base_prefill = _prefill_seconds(vlm, inputs, torch_device)
            base_answer, base_generate = _generate(vlm, processor, inputs, max_new_tokens, torch_device)

        with console.status(f"Generating with {method}...", spinner="dots"):
            with _user_errors(ValueError, TypeError, RuntimeError):
                scope = tokenprune.pruned(vlm, method, layer=layer, **amount)
                pruner = stack.enter_context(scope)
            torch.manual_seed(seed)
            pruned_prefill = _prefill_seconds(vlm, inputs, torch_device)
            torch.manual_seed(seed)
            answer, pruned_generate = _generate(vlm, processor, inputs, max_new_tokens, torch_device)
            stats = pruner.stats
            grid = pruner.adapter.image_grid()
            per_image = pruner.adapter.tokens_per_image
            description = repr(pruner)

    _report(
        console,
        description,
        stats,
        base_answer,
        answer,
        (base_prefill, pruned_prefill),
        (base_generate, pruned_generate),
    )
    if stats is not None and stats.stage == "kv":
        console.print("[yellow]a kv method selects per decode step and layer; no overlay written[/]")
        return
    if stats is None or stats.keep_mask is None:
        console.print("[yellow]no image tokens were pruned; no overlay written[/]")
        return
    if grid is None:
        console.print("[yellow]this model's image tokens are not a patch grid; no overlay written[/]")
        return
    keep = first_image_keep(stats, inputs["input_ids"], vlm.config.image_token_id, per_image)
    path = save_overlay(_centre_square(picture), keep, grid, overlay)
    console.print(
        f"kept-token overlay ({grid[0]}x{grid[1]} grid, {int(keep.sum())}/{keep.numel()} kept) "
        f"saved to [bold]{escape(str(path))}[/]",
        highlight=False,
    )


def _report(
    console: Console,
    description: str,
    stats,
    base_answer: str,
    answer: str,
    prefill: tuple[float, float],
    generate: tuple[float, float],
) -> None:
    visual = stats.visual_tokens[0] if stats and stats.visual_tokens else 0
    kept = stats.kept_tokens[0] if stats and stats.kept_tokens else 0
    table = Table(title=escape(description), title_justify="left")
    table.add_column("")
    table.add_column("unpruned", justify="right")
    table.add_column("pruned", justify="right")
    table.add_row("visual tokens", str(visual), str(kept))
    table.add_row("selection ms", "-", f"{stats.selection_ms:.2f}" if stats else "-")
    table.add_row("prefill ms (time to first token)", f"{prefill[0] * 1e3:.1f}", f"{prefill[1] * 1e3:.1f}")
    table.add_row("prefill speedup", "1.00x", f"{prefill[0] / prefill[1]:.2f}x")
    table.add_row("generate ms (total)", f"{generate[0] * 1e3:.1f}", f"{generate[1] * 1e3:.1f}")
    console.print(table)
    console.print(f"[bold]unpruned answer:[/] {escape(base_answer)}", highlight=False)
    console.print(f"[bold]pruned answer:[/]   {escape(answer)}", highlight=False)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise CliError(f"expected comma-separated numbers, got {text!r}") from None


def _run_meta(arch: str, device: torch.device, attn: str, dtype: torch.dtype, **settings: object) -> dict:
    """What a benchmark's results file says about its run: model, machine, settings and versions."""
    from .eval.bench import machine_description

    return {
        "arch": arch,
        "machine": machine_description(device),
        "attn": attn,
        "dtype": str(dtype).removeprefix("torch."),
        **settings,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }


@app.command()
def bench(
    arch: Annotated[
        str, typer.Option(help="Architecture with random weights: tiny, llava-small, llava-1.5-7b.")
    ] = "tiny",
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="A local checkpoint instead of --arch.", show_default=False),
    ] = None,
    methods: Annotated[
        str, typer.Option(help="Comma-separated methods (or 'fastv+drop_early_kv'); default: all.")
    ] = "",
    keep_ratios: Annotated[str, typer.Option(help="Comma-separated keep ratios.")] = "0.25,0.111",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1",
    attn: Annotated[str, typer.Option(help="Attention implementation.")] = "sdpa",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per measurement (median).")] = 3,
    new_tokens: Annotated[int, typer.Option(min=2, help="Tokens generated for the decode timing.")] = 8,
    compile: Annotated[
        bool, typer.Option("--compile", help="Also time decoding with a static cache and a compiled step.")
    ] = False,
    out: Annotated[pathlib.Path, typer.Option(help="Folder for results.json, results.csv, speedup.png.")] = (
        pathlib.Path("bench-results")
    ),
) -> None:
    """Time prefill, decode and end-to-end of pruned runs against the unpruned model and the ideal."""
    from .eval.archs import ARCHS
    from .eval.bench import bench_config, build_model, markdown_table, run_benchmark, write_results

    console = Console()
    with _exit_on_user_error():
        names = [m for m in methods.split(",") if m] or sorted(tokenprune.list_methods())
        ratios = _floats(keep_ratios)
        sizes = [int(b) for b in _floats(batch_sizes)]
        with _user_errors(ValueError, TypeError):
            for name in names:
                for ratio in ratios:
                    bench_config(name, ratio)
        if model is None and arch not in ARCHS:
            raise CliError(f"unknown --arch {arch!r}; known: {', '.join(ARCHS)}")
        torch_device, torch_dtype = _resolve_device(device, dtype)
        with _quiet_transformers(), console.status("Building the model...", spinner="dots"):
            if model is None:
                vlm = build_model(ARCHS[arch](), attn, torch_device, torch_dtype)
            else:
                vlm = _load_model(_checkpoint(model), attn, torch_device, torch_dtype)
        with _quiet_transformers():
            rows = run_benchmark(
                vlm, names, ratios, sizes, repeats=repeats, new_tokens=new_tokens, compile=compile
            )
    settings = {"repeats": repeats, "new_tokens": new_tokens, "compile": compile}
    meta = _run_meta(model or arch, torch_device, attn, torch_dtype, **settings)
    paths = write_results(rows, out, meta)
    console.print(markdown_table(rows), highlight=False)
    console.print(f"results: {', '.join(str(p) for p in paths.values())}", highlight=False)


@app.command("eval")
def eval_(
    model: Annotated[
        str,
        typer.Option("--model", "-m", help=f"Checkpoint directory; '{SHAPES}' is the shipped shapes VLM."),
    ] = SHAPES,
    seed: Annotated[
        int,
        typer.Option(help="Seed of the questions: 2 is the test split; any other draws a fresh one."),
    ] = 2,
    count: Annotated[int, typer.Option(min=6, help="Questions (an equal share of each kind).")] = 600,
    methods: Annotated[str, typer.Option(help="Comma-separated methods; default: all registered.")] = "",
    keep_ratios: Annotated[str, typer.Option(help="Comma-separated keep ratios.")] = "0.5,0.25,0.11,0.05",
    batch_size: Annotated[int, typer.Option(min=1, help="Questions per generate call.")] = 32,
    overlay_ratio: Annotated[float, typer.Option(help="Keep ratio of the kept-token overlays.")] = 0.11,
    attn: Annotated[str, typer.Option(help="Attention implementation.")] = "sdpa",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    out: Annotated[
        pathlib.Path, typer.Option(help="Folder for results.json/.csv, table.md, pareto.png, overlays.png.")
    ] = pathlib.Path("eval-results"),
    readme: Annotated[
        pathlib.Path | None,
        typer.Option(help="Also write table.md into this file between its shapes-eval markers."),
    ] = None,
) -> None:
    """Accuracy of every method at every keep ratio on the shapes suite, with retention and prefill time."""
    from .eval import suite
    from .eval.accuracy import (
        evaluate_methods,
        overlay_sheet,
        replace_between_markers,
        write_accuracy_results,
    )

    console = Console()
    with _exit_on_user_error(), contextlib.ExitStack() as stack:
        names = [m for m in methods.split(",") if m] or sorted(tokenprune.list_methods())
        ratios = tuple(_floats(keep_ratios))
        with _user_errors(ValueError, TypeError):
            for name in names:
                for ratio in (*ratios, overlay_ratio):
                    PrunerConfig(name, keep_ratio=ratio)
        if readme is not None and not readme.is_file():
            raise CliError(f"--readme {readme} is not a file")
        torch_device, torch_dtype = _resolve_device(device, dtype)
        checkpoint = _local_checkpoint(stack, model, seed=0)
        stack.enter_context(_quiet_transformers())
        from transformers import AutoProcessor

        with console.status(f"Loading {escape(model)}...", spinner="dots"):
            with _user_errors(OSError, ValueError):
                processor = AutoProcessor.from_pretrained(checkpoint)
            vlm = _load_model(checkpoint, attn, torch_device, torch_dtype)
            examples = suite.examples(seed, count)
        with console.status(f"Scoring {len(names)} methods x {len(ratios)} keep ratios...", spinner="dots"):
            rows = evaluate_methods(vlm, processor, examples, names, ratios, batch_size)
            meta = _run_meta(model, torch_device, attn, torch_dtype, seed=seed, examples=count)
            paths = write_accuracy_results(rows, out, meta)
            sheet = out / "overlays.png"
            paths["overlays"] = overlay_sheet(vlm, processor, examples, names, overlay_ratio, sheet)
    table = paths["table"].read_text()
    if readme is not None:
        readme.write_text(replace_between_markers(readme.read_text(), table, "shapes-eval"))
        paths["readme"] = readme
    console.print(table, highlight=False)
    console.print(f"results: {', '.join(str(p) for p in paths.values())}", highlight=False)


@app.command("lmms-task")
def lmms_task(
    directory: Annotated[pathlib.Path, typer.Argument(help="Folder to write the task into.")],
    seed: Annotated[int, typer.Option(help="Seed of the questions: 2 is the test split.")] = 2,
    count: Annotated[int, typer.Option(min=1, help="Questions.")] = 600,
) -> None:
    """Write the shapes suite as the lmms-eval task tokenprune_shapes (use with --include_path DIR)."""
    from .eval.lmms_task import export_lmms_task

    path = export_lmms_task(directory, seed, count)
    typer.echo(f"wrote {path}; run: python -m lmms_eval --model tokenprune --include_path {directory} ...")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise CliError(f"expected comma-separated integers, got {text!r}") from None


@app.command("bench-encoder")
def bench_encoder(
    arch: Annotated[
        str, typer.Option(help="Image encoder with random weights: tiny-vit, vit-b16.")
    ] = "vit-b16",
    merges: Annotated[str, typer.Option("--r", help="Comma-separated ToMe r values (tokens per layer).")] = (
        "0,4,8,12,16"
    ),
    keep_ratios: Annotated[str, typer.Option(help="Keep ratios of hiprune and visionzip.")] = "0.5,0.25",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward.")] = 8,
    attn: Annotated[str, typer.Option(help="Attention implementation.")] = "sdpa",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per measurement (median).")] = 3,
    out: Annotated[
        pathlib.Path, typer.Option(help="Folder for results.json, results.csv, throughput.png.")
    ] = (pathlib.Path("bench-encoder-results")),
) -> None:
    """Images/s of an image encoder with vision-stage methods against the unpruned encoder."""
    from .eval.archs import ENCODER_ARCHS
    from .eval.encoder_bench import (
        build_encoder,
        encoder_markdown_table,
        run_encoder_benchmark,
        write_encoder_results,
    )

    console = Console()
    with _exit_on_user_error():
        rs, ratios = _ints(merges), _floats(keep_ratios)
        with _user_errors(ValueError, TypeError):
            for r in rs:
                PrunerConfig("tome", options={"r": r})
            for ratio in ratios:
                PrunerConfig("hiprune", keep_ratio=ratio)
        if arch not in ENCODER_ARCHS:
            raise CliError(f"unknown --arch {arch!r}; known: {', '.join(ENCODER_ARCHS)}")
        torch_device, torch_dtype = _resolve_device(device, dtype)
        with _quiet_transformers():
            encoder = build_encoder(ENCODER_ARCHS[arch](), attn, torch_device, torch_dtype)
            rows = run_encoder_benchmark(encoder, rs, ratios, batch_size, repeats=repeats)
    meta = _run_meta(arch, torch_device, attn, torch_dtype, batch_size=batch_size, repeats=repeats)
    paths = write_encoder_results(rows, out, meta)
    console.print(encoder_markdown_table(rows), highlight=False)
    console.print(f"results: {', '.join(str(p) for p in paths.values())}", highlight=False)


def _local_checkpoint(stack: contextlib.ExitStack, model: str, seed: int, arch: str | None = None) -> str:
    """``--model`` as a local checkpoint directory: the tiny model (or, with ``arch``, a benchmark
    architecture with random weights) is written to a temporary one that lives as long as ``stack``."""
    if model == SHAPES:
        from .eval.shapes_model import shipped_checkpoint

        return str(stack.enter_context(shipped_checkpoint()))
    if model != TINY:
        return _checkpoint(model)
    from .testing import save_random_checkpoint, save_tiny_checkpoint

    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="tokenprune-tiny-"))
    if arch is None or arch == TINY:
        return str(save_tiny_checkpoint(folder, seed=seed))
    from .eval.archs import ARCHS

    if arch not in ARCHS:
        raise CliError(f"unknown --arch {arch!r}; known: {', '.join(ARCHS)}")
    return str(save_random_checkpoint(folder, ARCHS[arch](), seed=seed))


def _default_config(method: str, keep_ratio: float | None, budget: int | None, layer: int | None):
    """The server's pruner config (``None`` for ``--method none``); keep ratio 0.25 unless told."""
    if method == "none":
        return None
    if keep_ratio is None and budget is None:
        keep_ratio = 0.25
    with _user_errors(ValueError, TypeError):
        return PrunerConfig(method, keep_ratio=keep_ratio, budget=budget, layer=layer)


@app.command()
def serve(
    model: Annotated[
        str,
        typer.Option("--model", "-m", help=f"Checkpoint directory; '{TINY}' builds the tiny random LLaVA."),
    ] = TINY,
    method: Annotated[str, typer.Option(help="Default pruning method; 'none' serves unpruned.")] = "dart",
    keep_ratio: Annotated[
        float | None, typer.Option(help="Default keep ratio (0.25 without --budget).", show_default=False)
    ] = None,
    budget: Annotated[
        int | None, typer.Option(help="Default visual tokens kept per image.", show_default=False)
    ] = None,
    layer: Annotated[int | None, typer.Option(help="Default decoder layer.", show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    served_model_name: Annotated[
        str | None,
        typer.Option(help="Model id clients ask for; default: the folder name.", show_default=False),
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests generated together at most.")] = 8,
    batch_window_ms: Annotated[float, typer.Option(min=0, help="How long a batch waits for company.")] = 10.0,
    max_images: Annotated[int, typer.Option(min=0, help="Images per request at most.")] = 4,
    max_image_mb: Annotated[float, typer.Option(min=0, help="Size of one image at most, MiB.")] = 8.0,
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt tokens per request at most.")] = 4096,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per request at most.")] = 256,
    allow_remote_images: Annotated[bool, typer.Option(help="Accept http(s) image URLs.")] = False,
    allow_local_images: Annotated[bool, typer.Option(help="Accept file:// image URLs and paths.")] = False,
    attn: Annotated[str, typer.Option(help="Attention implementation.")] = "sdpa",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the tiny model's weights.")] = 0,
    compile: Annotated[
        bool, typer.Option("--compile", help="Decode with a static cache and a compiled step.")
    ] = False,
) -> None:
    """Serve MODEL with an OpenAI-compatible API (chat completions, streaming), pruning visual tokens."""
    try:
        import uvicorn

        from .serve import Limits, build_engine
        from .serve.app import create_app
    except ImportError as error:
        raise typer.BadParameter(
            f"tokenprune serve needs the [serve] extra ({error.name} is missing)"
        ) from None

    console = Console()
    with _exit_on_user_error(), contextlib.ExitStack() as stack:
        default = _default_config(method, keep_ratio, budget, layer)
        limits = Limits(
            max_images=max_images,
            max_image_bytes=int(max_image_mb * 2**20),
            max_prompt_tokens=max_prompt_tokens,
            max_new_tokens=max_new_tokens,
            allow_remote_images=allow_remote_images,
            allow_local_images=allow_local_images,
        )
        torch_device, torch_dtype = _resolve_device(device, dtype)
        stack.enter_context(_quiet_transformers())
        checkpoint = _local_checkpoint(stack, model, seed)
        name = served_model_name or (TINY if model == TINY else pathlib.Path(checkpoint).name)
        with _user_errors(OSError, ValueError, TypeError, RuntimeError):
            engine = build_engine(
                checkpoint,
                name,
                default,
                limits,
                attn=attn,
                device=torch_device,
                dtype=torch_dtype,
                compile=compile,
            )
        console.print(f"serving [bold]{escape(name)}[/] ({escape(repr(default))}) on http://{host}:{port}/v1")
        app_ = create_app(engine, max_batch=max_batch, window_s=batch_window_ms / 1e3)
        uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command("bench-serve")
def bench_serve(
    model: Annotated[str, typer.Option("--model", "-m", help=f"Checkpoint directory or '{TINY}'.")] = TINY,
    arch: Annotated[
        str, typer.Option(help="Without --model: tiny or a benchmark architecture (random weights).")
    ] = TINY,
    method: Annotated[str, typer.Option(help="The server's pruning method.")] = "dart",
    keep_ratio: Annotated[float, typer.Option(help="The server's keep ratio.")] = 0.25,
    clients: Annotated[int, typer.Option(min=1, help="Concurrent clients.")] = 64,
    rounds: Annotated[int, typer.Option(min=1, help="Requests per client, one after another.")] = 2,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per request.")] = 8,
    max_batch: Annotated[int, typer.Option(min=1, help="The server's --max-batch.")] = 16,
    fuzz: Annotated[int, typer.Option(min=0, help="Malformed requests sent after the load.")] = 200,
    out: Annotated[pathlib.Path, typer.Option(help="Folder for results.json.")] = pathlib.Path(
        "bench-serve-results"
    ),
) -> None:
    """Load-test a live server on 127.0.0.1 with and without pruning, then fuzz it with bad requests."""
    import json

    from .eval.serve_load import run_serve_benchmark
    from .serve import Limits, build_engine

    console = Console()
    with _exit_on_user_error(), contextlib.ExitStack() as stack:
        default = _default_config(method, keep_ratio, None, None)
        stack.enter_context(_quiet_transformers())
        checkpoint = _local_checkpoint(stack, model, 0, arch)
        name = arch if model == TINY else pathlib.Path(checkpoint).name
        with _user_errors(OSError, ValueError, TypeError, RuntimeError):
            engine = build_engine(checkpoint, name, default, Limits())
        results = run_serve_benchmark(
            engine, clients=clients, rounds=rounds, max_tokens=max_tokens, max_batch=max_batch, fuzz=fuzz
        )
    results["meta"] = _run_meta(
        name, torch.device("cpu"), "sdpa", torch.float32, clients=clients, rounds=rounds
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = Table(title=f"{clients} clients x {rounds} requests, {name}")
    for column in (
        "pruning",
        "failed",
        "req/s",
        "tok/s",
        "p50 s",
        "p95 s",
        "visual in/kept",
        "RSS growth MiB",
    ):
        table.add_column(column)
    for row in results["load"]:
        table.add_row(
            escape(row["label"]),
            str(row["failures"]),
            f"{row['requests_per_s']:.2f}",
            f"{row['completion_tokens_per_s']:.1f}",
            f"{row['latency_p50_s']:.2f}",
            f"{row['latency_p95_s']:.2f}",
            f"{row['visual_tokens_before']}/{row['visual_tokens_after']}",
            f"{row['peak_rss_growth_mib']:.0f}",
        )
    console.print(table)
    fuzzed = results["fuzz"]
    console.print(
        f"fuzz: {fuzzed['four_xx_json_errors']}/{fuzzed['requests']} answered 4xx JSON errors; "
        f"healthy after: {fuzzed['healthy_after']}; results: {out / 'results.json'}"
    )


if __name__ == "__main__":
    app()
