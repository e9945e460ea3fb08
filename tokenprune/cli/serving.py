"""``tokenprune serve`` and ``tokenprune bench-serve``: the OpenAI-compatible server, and its load and fuzz
run."""

from __future__ import annotations

import contextlib
import logging
import pathlib
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .common import (
    RESULTS,
    SHAPES,
    TINY,
    CliError,
    DeviceOption,
    DtypeOption,
    MarkdownOption,
    exit_on_user_error,
    local_checkpoint,
    print_report,
    quiet_transformers,
    resolve_device,
    run_meta,
    user_errors,
)


def _default_config(method: str, keep_ratio: float | None, budget: int | None, layer: int | None):
    """The server's pruner config (``None`` for ``--method none``); keep ratio 0.25 unless told."""
    from ..config import PrunerConfig

    if method == "none":
        return None
    if keep_ratio is None and budget is None:
        keep_ratio = 0.25
    with user_errors(ValueError, TypeError):
        return PrunerConfig(method, keep_ratio=keep_ratio, budget=budget, layer=layer)


#: The name of the log handler ``serve`` adds to the ``tokenprune.serve`` logger.
_LOG_HANDLER = "tokenprune-serve"

#: Environment variable read for ``--api-key`` (a key on the command line shows in the process list).
API_KEY_ENV = "TOKENPRUNE_API_KEY"


def _removed_allow_local_images(value: bool) -> None:
    """Refuse the removed ``--allow-local-images`` with a pointer to the option that replaced it."""
    if value:
        raise typer.BadParameter(
            "removed: it let clients read any file the server could; use --allowed-local-media-path DIR "
            "to serve the images under DIR"
        )


def serve(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help=f"Checkpoint directory; '{SHAPES}': the shipped shapes VLM; '{TINY}': a tiny random LLaVA.",
        ),
    ] = SHAPES,
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
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar=API_KEY_ENV,
            help="Require 'Authorization: Bearer KEY' on every route but /health and /metrics.",
            show_default=False,
        ),
    ] = None,
    allow_remote_images: Annotated[
        bool, typer.Option("--allow-remote-images", help="Accept http(s) image URLs of public addresses.")
    ] = False,
    allow_private_image_urls: Annotated[
        bool,
        typer.Option(
            "--allow-private-image-urls",
            help="With --allow-remote-images: also fetch from loopback, private, link-local addresses.",
        ),
    ] = False,
    allowed_local_media_path: Annotated[
        pathlib.Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            resolve_path=True,
            help="Accept file:// image URLs (and absolute paths) of files under this directory only.",
            show_default=False,
        ),
    ] = None,
    allow_local_images: Annotated[
        bool, typer.Option(hidden=True, callback=_removed_allow_local_images, expose_value=False)
    ] = False,
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

        from ..serve import Limits, build_engine
        from ..serve.app import create_app
        from ..serve.auth import check_api_key, is_loopback
    except ImportError as error:
        raise typer.BadParameter(
            f"tokenprune serve needs the [serve] extra ({error.name} is missing)"
        ) from None

    console = Console()
    with exit_on_user_error(), contextlib.ExitStack() as stack:
        default = _default_config(method, keep_ratio, budget, layer)
        if allow_private_image_urls and not allow_remote_images:
            raise CliError("--allow-private-image-urls needs --allow-remote-images")
        with user_errors(ValueError):
            if api_key is not None:
                check_api_key(api_key)
            limits = Limits(
                max_images=max_images,
                max_image_bytes=int(max_image_mb * 2**20),
                max_prompt_tokens=max_prompt_tokens,
                max_new_tokens=max_new_tokens,
                allow_remote_images=allow_remote_images,
                allow_private_image_urls=allow_private_image_urls,
                allowed_local_media_path=allowed_local_media_path,
            )
        torch_device, torch_dtype = resolve_device(device, dtype)
        stack.enter_context(quiet_transformers())
        checkpoint = local_checkpoint(stack, model, seed)
        name = served_model_name or (model if model in (SHAPES, TINY) else pathlib.Path(checkpoint).name)
        with user_errors(OSError, ValueError, TypeError, RuntimeError):
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
        console.print(_banner(name, default, f"http://{host}:{port}/v1", torch_device, torch_dtype, attn))
        if api_key is None and not is_loopback(host):
            Console(stderr=True).print(
                f"[bold yellow]warning:[/] listening on {escape(host)} without an API key: anyone who can "
                f"reach it can use the model; set --api-key or {API_KEY_ENV}",
                highlight=False,
                soft_wrap=True,
            )
        app_ = create_app(engine, max_batch=max_batch, window_s=batch_window_ms / 1e3, api_key=api_key)
        _log_requests()
        uvicorn.run(app_, host=host, port=port, log_level="warning")


def _banner(name: str, default, url: str, device, dtype, attn: str) -> Table:
    """What ``serve`` says before it listens: the model, its default pruning in words, where, and on what."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("tokenprune serve", escape(url))
    grid.add_row("model", escape(name))
    pruning = default.describe() if default is not None else "none (a request may ask for a method)"
    grid.add_row("pruning", escape(pruning))
    grid.add_row("runs on", f"{device}, {str(dtype).removeprefix('torch.')}, {escape(attn)} attention")
    return grid


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a line is logged, not to the stream of the
    moment it was made (which a test harness, or a server restarted in one process, may have closed)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it: always the current stderr instead
        pass


def _log_requests() -> None:
    """Write the server's log lines (start, stop, one per request) to stderr, one line each with its time
    (grep-able, in a terminal or a file); the handler of an earlier call in this process is replaced."""
    logger = logging.getLogger("tokenprune.serve")
    logger.setLevel(logging.INFO)
    for handler in [h for h in logger.handlers if h.get_name() == _LOG_HANDLER]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.set_name(_LOG_HANDLER)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)


def bench_serve(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help=f"A checkpoint directory (or '{SHAPES}') instead of --arch.",
            show_default=False,
        ),
    ] = None,
    arch: Annotated[
        str, typer.Option(help="Architecture with random weights: tiny or a benchmark architecture.")
    ] = TINY,
    method: Annotated[str, typer.Option(help="The server's pruning method.")] = "dart",
    keep_ratio: Annotated[float, typer.Option(help="The server's keep ratio.")] = 0.25,
    clients: Annotated[int, typer.Option(min=1, help="Concurrent clients.")] = 64,
    rounds: Annotated[int, typer.Option(min=1, help="Requests per client, one after another.")] = 2,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per request.")] = 8,
    max_batch: Annotated[int, typer.Option(min=1, help="The server's --max-batch.")] = 16,
    fuzz: Annotated[int, typer.Option(min=0, help="Malformed requests sent after the load.")] = 200,
    out: Annotated[pathlib.Path, typer.Option(help="Folder for results.json.")] = RESULTS / "bench-serve",
    markdown: MarkdownOption = False,
) -> None:
    """Load-test a live server on 127.0.0.1 with and without pruning, then fuzz it with bad requests."""
    import json

    import torch

    from ..eval.serve_load import load_markdown_table, run_serve_benchmark
    from ..serve import Limits, build_engine

    console = Console()
    with exit_on_user_error(), contextlib.ExitStack() as stack:
        default = _default_config(method, keep_ratio, None, None)
        stack.enter_context(quiet_transformers())
        checkpoint = local_checkpoint(stack, model or TINY, 0, arch)
        name = arch if model is None else model if model == SHAPES else pathlib.Path(checkpoint).name
        with user_errors(OSError, ValueError, TypeError, RuntimeError):
            engine = build_engine(checkpoint, name, default, Limits())
        results = run_serve_benchmark(
            engine, clients=clients, rounds=rounds, max_tokens=max_tokens, max_batch=max_batch, fuzz=fuzz
        )
    results["meta"] = run_meta(
        name, torch.device("cpu"), "sdpa", torch.float32, clients=clients, rounds=rounds
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    title = f"{clients} clients x {rounds} requests, {name}"
    print_report(console, f"{title}\n\n{load_markdown_table(results['load'])}", markdown)
    fuzzed = results["fuzz"]
    console.print(
        f"fuzz: {fuzzed['four_xx_json_errors']}/{fuzzed['requests']} answered 4xx JSON errors; "
        f"healthy after: {fuzzed['healthy_after']}; results: {out / 'results.json'}"
    )
