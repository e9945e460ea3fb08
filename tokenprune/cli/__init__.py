"""The ``tokenprune`` command line: one module per group of commands, wired into one Typer app here.

:mod:`.run` (``run``, ``methods``), :mod:`.bench` (``bench``, ``bench-encoder``), :mod:`.evaluate`
(``eval``, ``lmms-task``), :mod:`.serving` (``serve``, ``bench-serve``); :mod:`.common` holds what they
share.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

import tokenprune

from . import bench, evaluate, run, serving
from .common import print_error
from .run import DEFAULT_PROMPT, example_image_path


class Commands(TyperGroup):
    """The ``tokenprune`` group. A command-line error (a value of the wrong type, an unknown option, a
    missing argument) is printed as every user error of the commands is, ``error: ...`` on one line, with
    exit code 2, instead of click's usage block."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Run the command line; in ``standalone_mode`` exit with its code, a click error printed first."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as error:  # click's errors, a usage error among them
            context = getattr(error, "ctx", None)
            hint = f"; see '{context.command_path} --help'" if context is not None else ""
            print_error(error.format_message().rstrip(".") + hint)
            sys.exit(error.exit_code)
        except typer.Abort:
            print_error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="tokenprune",
    cls=Commands,
    help="Training-free visual token pruning for vision-language models in transformers.",
    invoke_without_command=True,  # no command: the help (see main)
    add_completion=False,
    rich_markup_mode=None,  # click's help: wrapped to the terminal, no option name cut, no <bool> on flags
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tokenprune {tokenprune.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Training-free visual token pruning for vision-language models in transformers."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


# short help: what `tokenprune --help` lists, short enough not to be cut at 80 columns
app.command(short_help="List the pruning methods.")(run.methods)
app.command(short_help="Answer a prompt about an image, pruned and not.")(run.run)
app.command(short_help="Time pruned runs against the unpruned model.")(bench.bench)
app.command("eval", short_help="Accuracy against keep ratio on the shapes or video suite.")(evaluate.eval_)
app.command("lmms-task", short_help="Write the shapes suite as an lmms-eval task.")(evaluate.lmms_task)
app.command("bench-encoder", short_help="Images/s of an image encoder, pruned.")(bench.bench_encoder)
app.command(short_help="Serve a model with an OpenAI-compatible API.")(serving.serve)
app.command("bench-serve", short_help="Load-test and fuzz the server.")(serving.bench_serve)

__all__ = ["DEFAULT_PROMPT", "app", "example_image_path", "main"]
