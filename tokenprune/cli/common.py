"""What the ``tokenprune`` commands share: the user-error convention, device and dtype options, model
loading, and the parsing of comma-separated lists.

A user error is a :class:`CliError`, printed by :func:`exit_on_user_error` as one red line with exit
code 2; :func:`user_errors` turns a library's exceptions into one.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    import torch

#: Where a command writes its outputs unless told otherwise, each in its own subfolder; git ignores it.
RESULTS = pathlib.Path("tokenprune-results")
#: ``--model`` value that builds the tiny random checkpoint of :mod:`tokenprune.testing` and loads it.
TINY = "tiny"
#: ``--model`` value of the trained shapes VLM shipped with the package (:mod:`tokenprune.eval.shapes_model`).
SHAPES = "shapes"
#: ``--model`` value of the trained video VLM shipped with the package (:mod:`tokenprune.eval.video_model`).
VIDEO = "video"

MarkdownOption = Annotated[
    bool, typer.Option("--markdown", help="Print tables as Markdown (as when the output is not a terminal).")
]
DeviceOption = Annotated[str, typer.Option(help="'auto' (cuda when available), 'cpu', 'cuda'...")]
PageOption = Annotated[
    pathlib.Path | None,
    typer.Option(
        help="Also write the table into this Markdown page (docs/performance.md), between the markers "
        "named after the --out folder (<!-- cpu-llava-small:start --> ...)."
    ),
]
DtypeOption = Annotated[str, typer.Option(help="'auto' (bfloat16 on GPU, float32 on CPU) or a dtype name.")]


class CliError(Exception):
    """A user error: printed as one red line, exit code 2."""


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Print a :class:`CliError` as one red line on stderr and exit with code 2."""
    try:
        yield
    except CliError as error:
        print_error(str(error))
        raise typer.Exit(code=2) from None


def print_error(message: str) -> None:
    """Print a user error as every command does: ``error: message``, one red line on stderr."""
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def print_report(console: Console, text: str, markdown: bool = False) -> None:
    """Print ``text``, Markdown that holds tables, on ``console``: as it is when asked (``--markdown``) or
    when the output is no terminal (a pipe, a file: Markdown to paste, each row on one line); on a terminal,
    each table drawn by rich within the terminal's width (:func:`fitted_tables`), the prose rendered."""
    if markdown or not console.is_terminal:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        return
    from rich.markdown import Markdown

    for block in text.strip().split("\n\n"):
        lines = block.strip().splitlines()
        if len(lines) > 1 and all(line.startswith("|") for line in lines):
            for table in fitted_tables(lines, console.width):
                console.print(table)
                console.print()
        else:
            console.print(Markdown(block))


#: Columns that say what a row is (a method, its setting...), repeated in each part of a table split to fit.
KEY_COLUMNS = 2


def fitted_tables(lines: list[str], width: int) -> list[Table]:
    """A Markdown pipe table (header, rule, rows; ``**bold**`` cells) as rich tables of at most ``width``
    columns, so that no row wraps: all its columns in one table where they fit side by side, else, as
    pandas prints a wide frame, its first :data:`KEY_COLUMNS` columns with as many of the next ones as fit,
    then with the following ones. A header wraps at its spaces; a column of long text (a description)
    takes the width left and wraps."""
    header, _, *rows = ([cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines)
    needs = [  # each column's width: its longest cell, or its header's longest word
        max(max(len(word) for word in name.split() or [""]), *(len(row[i]) for row in rows))
        for i, name in enumerate(header)
    ]
    keys = list(range(min(KEY_COLUMNS, len(header))))
    parts: list[list[int]] = [[]]
    for column in range(len(keys), len(header)):
        if parts[-1] and sum(needs[i] + 1 for i in (*keys, *parts[-1], column)) > width:
            parts.append([])
        parts[-1].append(column)
    tables = []
    for part in parts:
        table = Table(box=box.SIMPLE_HEAD, header_style="bold", padding=0, show_edge=False)  # 1 space apart
        for i in (*keys, *part):
            fixed = needs[i] if needs[i] <= width // 2 else None  # a long text column takes the rest
            table.add_column(escape(header[i]), overflow="fold", width=fixed, ratio=None if fixed else 1)
        for row in rows:
            cells = (re.sub(r"\*\*(.+?)\*\*", r"[bold]\1[/]", escape(row[i])) for i in (*keys, *part))
            table.add_row(*map(Text.from_markup, cells))
        tables.append(table)
    return tables


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn the given exception types into :class:`CliError` (one line, no traceback)."""
    try:
        yield
    except kinds as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CliError(message) from error


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
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


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype of ``--device`` and ``--dtype`` ('auto': cuda and bfloat16 when a GPU is
    there, else cpu and float32); a device or dtype that cannot be used here is a :class:`CliError`."""
    import torch

    with user_errors(RuntimeError, ValueError):
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


def load_model(checkpoint: str, attn: str, device: torch.device, dtype: torch.dtype):
    """A local image-text-to-text checkpoint on ``device`` in eval mode; load failures become CliError."""
    from transformers import AutoModelForImageTextToText

    with user_errors(OSError, ValueError):
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, attn_implementation=attn, dtype=dtype)
    return model.to(device).eval()


def checkpoint_path(model: str) -> str:
    """``--model`` as given to ``from_pretrained``: a local directory, or else a hub id."""
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_absolute() or model.startswith((".", "~")) or path.exists():
        raise CliError(
            f"no checkpoint directory at {model} (give a directory with config.json, '{SHAPES}' or '{TINY}')"
        )
    return model


def local_checkpoint(stack: contextlib.ExitStack, model: str, seed: int, arch: str | None = None) -> str:
    """``--model`` as a local checkpoint directory: the tiny model (or, with ``arch``, a benchmark
    architecture with random weights) is written to a temporary one that lives as long as ``stack``."""
    if model == SHAPES:
        from ..eval.shapes_model import shipped_checkpoint

        return str(stack.enter_context(shipped_checkpoint()))
    if model == VIDEO:
        from ..eval.video_model import shipped_checkpoint as shipped_video

        return str(stack.enter_context(shipped_video()))
    if model != TINY:
        return checkpoint_path(model)
    from ..testing import save_random_checkpoint, save_tiny_checkpoint

    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="tokenprune-tiny-"))
    if arch is None or arch == TINY:
        return str(save_tiny_checkpoint(folder, seed=seed))
    from ..eval.archs import ARCHS

    if arch not in ARCHS:
        raise CliError(f"unknown --arch {arch!r}; known: {', '.join(ARCHS)}")
    return str(save_random_checkpoint(folder, ARCHS[arch](), seed=seed))


def floats(text: str) -> list[float]:
    """The numbers of a comma-separated option value; anything else is a :class:`CliError`."""
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise CliError(f"expected comma-separated numbers, got {text!r}") from None


def ints(text: str) -> list[int]:
    """The integers of a comma-separated option value; anything else is a :class:`CliError`."""
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise CliError(f"expected comma-separated integers, got {text!r}") from None


def run_meta(arch: str, device: torch.device, attn: str, dtype: torch.dtype, **settings: object) -> dict:
    """What a benchmark's results file says about its run: model, machine, settings and versions."""
    import torch
    import transformers

    from ..eval.bench import machine_description

    return {
        "arch": arch,
        "machine": machine_description(device),
        "attn": attn,
        "dtype": str(dtype).removeprefix("torch."),
        **settings,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
