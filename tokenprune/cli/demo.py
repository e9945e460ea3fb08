"""What ``tokenprune run`` does once its options are read: load the model, answer the prompt with and
without pruning, time both, report, and save the picture of the kept tokens.

Kept apart from :mod:`.run`, which only declares the command, so that ``tokenprune --help`` imports
neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
import pathlib
import statistics
import time
from collections.abc import Iterator
from functools import partial

import torch
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import tokenprune

from ..config import PrunerConfig
from ..eval.archs import ARCHS
from ..eval.bench import TEXT_TOKENS, Runner, benchmark_inputs, build_model, tokens_per_image
from ..overlay import first_image_keep, save_overlay
from .common import (
    CliError,
    load_model,
    local_checkpoint,
    quiet_transformers,
    resolve_device,
    user_errors,
)
from .run import TIMED_ARCHS, example_image_path

#: Rounds of the prefill timing (each times the unpruned, pruned and ideal prefill in turn).
TIMING_ROUNDS = 5
#: How far the rounds' speedups may spread (max over min) before the report says the machine was busy.
NOISE = 1.2


def demo(
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
    timing: str = "llava-small",
) -> None:
    """Run the demo that :func:`~tokenprune.cli.run.run` describes; a user error is a :class:`CliError`."""
    from transformers import AutoProcessor

    if keep_ratio is None and budget is None:
        keep_ratio = 0.25
    amount = {"keep_ratio": keep_ratio} if budget is None else {"budget": budget}
    if keep_ratio is not None and budget is not None:
        raise CliError("give either --keep-ratio or --budget, not both")
    if timing not in (*TIMED_ARCHS, "model", "none"):
        raise CliError(f"--timing must be one of {', '.join(TIMED_ARCHS)}, model or none, got {timing!r}")
    with user_errors(ValueError, TypeError):  # bad method / ratio / budget / layer: fail before loading
        PrunerConfig(method, layer=layer, **amount)
    torch_device, torch_dtype = resolve_device(device, dtype)

    with contextlib.ExitStack() as stack:
        if image is None:
            image = stack.enter_context(example_image_path())
        with user_errors(OSError):
            picture = Image.open(image).convert("RGB")

        stack.enter_context(quiet_transformers())
        with console.status(f"Loading {escape(model)}...", spinner="dots"):
            checkpoint = local_checkpoint(stack, model, seed)
            with user_errors(OSError, ValueError):
                processor = AutoProcessor.from_pretrained(checkpoint)
            vlm = load_model(checkpoint, attn, torch_device, torch_dtype)
            # an unsupported family, a budget over the image or a layer past the model fails before any work
            with user_errors(ValueError, TypeError, RuntimeError):
                tokenprune.apply_pruner(vlm, method, layer=layer, **amount).remove()
            with user_errors(ValueError, TypeError):
                inputs = processor(images=picture, text=_build_prompt(processor, prompt), return_tensors="pt")
            inputs = inputs.to(torch_device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
            inputs = dict(inputs)

        with console.status("Generating without pruning...", spinner="dots"):
            base_answer, base_generate = _generate(vlm, processor, inputs, max_new_tokens, torch_device)

        with console.status(f"Generating with {method}...", spinner="dots"):
            with user_errors(ValueError, TypeError, RuntimeError):
                pruner = tokenprune.apply_pruner(vlm, method, layer=layer, **amount)
            try:
                torch.manual_seed(seed)
                answer, pruned_generate = _generate(vlm, processor, inputs, max_new_tokens, torch_device)
                stats = pruner.stats
                grid = pruner.adapter.image_grid()
                per_image = pruner.adapter.tokens_per_image
                description = pruner.config.describe()  # words, not a repr
            finally:
                pruner.remove()  # the model as it was, for the timing that follows

        _report(console, description, stats, base_answer, answer, (base_generate, pruned_generate))
        _overlay(console, picture, stats, grid, per_image, inputs["input_ids"], vlm, overlay)
        if timing == "model":
            _time_prefill(console, f"{model} on this image", vlm, inputs, method, layer, amount)
        elif timing != "none":
            with console.status(f"Building {timing} with random weights...", spinner="dots"):
                timed = build_model(ARCHS[timing](), attn, torch_device, torch_dtype)
                timed_inputs = benchmark_inputs(timed, 1, TEXT_TOKENS, torch_device)
            label = f"{timing} (random weights, {tokens_per_image(timed, timed_inputs)} visual tokens)"
            _time_prefill(console, label, timed, timed_inputs, method, layer, amount)


def _report(
    console: Console,
    description: str,
    stats,
    base_answer: str,
    answer: str,
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
    table.add_row("generate ms (total)", f"{generate[0] * 1e3:.1f}", f"{generate[1] * 1e3:.1f}")
    console.print(table)
    console.print(f"[bold]unpruned answer:[/] {escape(base_answer)}", highlight=False)
    console.print(f"[bold]pruned answer:[/]   {escape(answer)}", highlight=False)


def _overlay(console: Console, picture, stats, grid, per_image, input_ids, vlm, path: pathlib.Path) -> None:
    """Save the picture of the first image's kept tokens to ``path``, or say why there is none."""
    if stats is not None and stats.stage == "kv":
        console.print("[yellow]a kv method selects per decode step and layer; no overlay written[/]")
        return
    if stats is None or stats.keep_mask is None:
        console.print("[yellow]no image tokens were pruned; no overlay written[/]")
        return
    if grid is None:
        console.print("[yellow]this model's image tokens are not a patch grid; no overlay written[/]")
        return
    keep = first_image_keep(stats, input_ids, vlm.config.image_token_id, per_image)
    saved = save_overlay(_centre_square(picture), keep, grid, path)
    console.print(
        f"kept-token overlay ({grid[0]}x{grid[1]} grid, {int(keep.sum())}/{keep.numel()} kept) "
        f"saved to [bold]{escape(str(saved))}[/]",
        highlight=False,
    )


def _time_prefill(
    console: Console, label: str, model, inputs: dict, method: str, layer: int | None, amount: dict
) -> None:
    """Time the prefill of ``model`` on ``inputs`` unpruned, pruned and ideal (the language model on the kept
    tokens, no selection), :data:`TIMING_ROUNDS` rounds in turns, and print the medians and speedups, with
    the range of the rounds' speedups where they disagree (a busy machine)."""
    with user_errors(ValueError, TypeError):  # a budget or layer this model cannot take
        config = PrunerConfig(method, layer=layer, **amount)
        tokenprune.apply_pruner(model, config).remove()
    device = next(model.parameters()).device
    kept = config.kept_per_image(tokens_per_image(model, inputs))
    runner = Runner(model, inputs, device, TIMING_ROUNDS, 1)
    with console.status(f"Timing prefill on {escape(label)}...", spinner="dots"), _one_cpu_thread(device):
        turns = runner.prefill_turns(config, kept, unpruned=True)
    median = {name: statistics.median(times) for name, times in turns.items() if times}
    threads = ", one CPU thread" if device.type == "cpu" else ""
    title = f"prefill on {label}: median of {TIMING_ROUNDS} rounds in turns{threads}"
    table = Table(title=escape(title), title_justify="left")
    for column in ("", "unpruned", "pruned", "ideal"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("visual tokens", str(tokens_per_image(model, inputs)), str(kept), str(kept))
    times = (median["unpruned"], median["pruned"], median["ideal"])
    table.add_row("prefill ms (time to first token)", *(f"{t:.1f}" for t in times))
    table.add_row("prefill speedup", *(f"{times[0] / t:.2f}x" for t in times))
    console.print(table)
    speedups = [u / p for u, p in zip(turns["unpruned"], turns["pruned"], strict=True)]
    if max(speedups) > NOISE * min(speedups):
        console.print(
            f"[yellow]the rounds' speedups ranged {min(speedups):.2f}x-{max(speedups):.2f}x: the machine was "
            "busy; the median is shown[/]",
            highlight=False,
        )


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Torch on one thread while timing on a CPU: on a machine busy with other work, threads that wait for
    each other at every op slow a prefill several-fold and unevenly (2 threads, 2 busy cores: the unpruned
    prefill 4x slower than on one thread, the speedup 1.14x where one thread measured 1.64x)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _generate(model, processor, inputs: dict, max_new_tokens: int, device: torch.device) -> tuple[str, float]:
    """Greedy answer to ``inputs`` (new tokens only, decoded) and the wall time of ``generate``, timed after
    an untimed warm-up call (a model's first call pays for lazy set-up)."""
    generate = partial(model.generate, **inputs, max_new_tokens=max_new_tokens, do_sample=False)
    with torch.no_grad():
        generate()
        _synchronize(device)
        start = time.perf_counter()
        output = generate()
        _synchronize(device)
    seconds = time.perf_counter() - start
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip(), seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build_prompt(processor, prompt: str) -> str:
    """``prompt`` as is when it holds the image token, else a one-image user turn asking it."""
    image_token = getattr(processor, "image_token", "<image>")
    if image_token in prompt:
        return prompt
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: {image_token}\n{prompt} ASSISTANT:"


def _centre_square(image: Image.Image) -> Image.Image:
    """The central square of ``image``: the region a CLIP-style processor's resize and centre crop keep."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))
