"""The ``tokenprune`` command line: one module per group of commands, wired into one Typer app here.

:mod:`.run` (``run``, ``methods``), :mod:`.bench` (``bench``, ``bench-encoder``), :mod:`.evaluate`
(``eval``, ``lmms-task``), :mod:`.serving` (``serve``, ``bench-serve``); :mod:`.common` holds what they
share.
"""

from __future__ import annotations

from typing import Annotated

import typer

import tokenprune

from . import bench, evaluate, run, serving
from .run import DEFAULT_PROMPT, example_image_path

app = typer.Typer(
    name="tokenprune",
    help="Training-free visual token pruning for vision-language models in transformers.",
    no_args_is_help=True,
    add_completion=False,
)


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


app.command()(run.methods)
app.command()(run.run)
app.command()(bench.bench)
app.command("eval")(evaluate.eval_)
app.command("lmms-task")(evaluate.lmms_task)
app.command("bench-encoder")(bench.bench_encoder)
app.command()(serving.serve)
app.command("bench-serve")(serving.bench_serve)

__all__ = ["DEFAULT_PROMPT", "app", "example_image_path", "main"]
