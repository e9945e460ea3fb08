"""``tokenprune run`` and ``tokenprune methods``: try a pruning method on a model and an image, list the
methods.

``run`` loads a local checkpoint (or builds the tiny random one), answers a prompt about an image with and
without pruning, prints both answers with token counts and timings, and saves a picture of the kept tokens.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import pathlib
from typing import Annotated

import typer
from rich.console import Console

import tokenprune

from .common import RESULTS, SHAPES, TINY, MarkdownOption, exit_on_user_error, print_report

#: The architectures ``run --timing`` may time (:data:`tokenprune.eval.archs.ARCHS`, named here so that
#: ``--help`` imports no torch).
TIMED_ARCHS = ("llava-small", "llava-1.5-7b", "qwen2.5-vl-small")

#: The question of the bundled example image (``assets/example.png``: example 4 of the shapes suite's seed 7).
DEFAULT_PROMPT = "which cell holds the blue object ?"


def example_image_path() -> contextlib.AbstractContextManager[pathlib.Path]:
    """A context manager giving a file-system path of the bundled example image (``assets/example.png``)."""
    return importlib.resources.as_file(importlib.resources.files("tokenprune") / "assets" / "example.png")


def methods(markdown: MarkdownOption = False) -> None:
    """List the registered pruning methods with their default stage."""
    lines = ["| name | stage | description |", "|---|---|---|"]
    for name, (stage, description) in sorted(tokenprune.list_methods().items()):
        lines.append(f"| {name} | {stage} | {description.replace('``', '')} |")  # docstrings' code spans
    print_report(Console(), "\n".join(lines), markdown)


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
    ] = RESULTS / "overlay.png",
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
    timing: Annotated[
        str,
        typer.Option(
            help="Where prefill is timed unpruned, pruned and ideal: an architecture with random weights "
            f"({', '.join(TIMED_ARCHS)}), 'model' (the answering model itself) or 'none'.",
        ),
    ] = "llava-small",
) -> None:
    """Answer PROMPT about IMAGE with and without pruning; print answers, token counts, timings."""
    from .demo import demo

    console = Console()
    with exit_on_user_error():
        demo(
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
            timing=timing,
        )
