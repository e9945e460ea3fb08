"""What ``tokenprune run`` does once its options are read: load the model, answer the prompt with and
without pruning, time both, report, and save the picture of the kept tokens.

Kept apart from :mod:`.run`, which only declares the command, so that ``tokenprune --help`` imports
neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
import pathlib
import time

import torch
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import tokenprune

from ..config import PrunerConfig
from ..overlay import first_image_keep, save_overlay
from .common import (
    CliError,
    load_model,
    local_checkpoint,
    quiet_transformers,
    resolve_device,
    user_errors,
)
from .run import example_image_path


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
) -> None:
    """Run the demo that :func:`~tokenprune.cli.run.run` describes; a user error is a :class:`CliError`."""
    from transformers import AutoProcessor

    if keep_ratio is None and budget is None:
        keep_ratio = 0.25
    amount = {"keep_ratio": keep_ratio} if budget is None else {"budget": budget}
    if keep_ratio is not None and budget is not None:
        raise CliError("give either --keep-ratio or --budget, not both")
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
            _prefill_seconds(vlm, inputs, torch_device, repeats=1)  # warm-up
            base_prefill = _prefill_seconds(vlm, inputs, torch_device)
            base_answer, base_generate = _generate(vlm, processor, inputs, max_new_tokens, torch_device)

        with console.status(f"Generating with {method}...", spinner="dots"):
            with user_errors(ValueError, TypeError, RuntimeError):
                scope = tokenprune.pruned(vlm, method, layer=layer, **amount)
                pruner = stack.enter_context(scope)
            torch.manual_seed(seed)
            pruned_prefill = _prefill_seconds(vlm, inputs, torch_device)
            torch.manual_seed(seed)
            answer, pruned_generate = _generate(vlm, processor, inputs, max_new_tokens, torch_device)
            stats = pruner.stats
            grid = pruner.adapter.image_grid()
            per_image = pruner.adapter.tokens_per_image
            description = pruner.config.describe()  # words, not a repr

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


def _centre_square(image: Image.Image) -> Image.Image:
    """The central square of ``image``: the region a CLIP-style processor's resize and centre crop keep."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))
