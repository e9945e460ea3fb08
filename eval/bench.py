"""Speed and memory benchmark: pruned prefill and decode against the unpruned model and the ideal.

For each batch size and budget, in one run: the unpruned model; the *ideal*, the same model with the
language model run on a sequence of the pruned length and no selection work (vision tower included, as
every method pays for it); and every method. Each prefill timing is the fastest of ``repeats`` after a
warm-up (a prefill does the same work each time: the fastest run is the one the machine disturbed least),
each decode timing their median; a method's prefill is timed in ``prefill_turns`` turns (default
``repeats``) with the ideal it is held to, so the ratios (speedup, speedup / ideal, selection share of
prefill) come from one machine and moment.
"""

from __future__ import annotations

import contextlib
import csv
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from rich.progress import Progress
from transformers import AutoModelForImageTextToText, PreTrainedModel

import tokenprune as tp
from tokenprune.compile import compiled_decoding
from tokenprune.patches._cache_internals import cache_nbytes, output_cache
from tokenprune.testing import QWEN_FAMILIES, tiny_inputs
from tokenprune.testing.dispatch import CountOps

#: The (rows, columns) of patches of each image in a Qwen-VL benchmark: 256 tokens once merged 2x2.
QWEN_IMAGE_PATCHES = (32, 32)
#: The (rows, columns) of patches of each frame of a Qwen-VL video benchmark: 64 tokens once merged 2x2.
QWEN_FRAME_PATCHES = (16, 16)


@dataclass
class BenchRow:
    """One measured configuration. Times in milliseconds; peak memory in MiB (CUDA only, else ``None``).

    ``decode_tokens_per_s`` is NaN when the decode time could not be told apart from timing noise.
    ``compiled_decode_tokens_per_s`` is the same with a static cache and transformers' compiled decode
    step, and ``compiled_prefill_ms`` the prefill (time to first token) of the whole forward under
    ``torch.compile``, pruner and all, ``compiled_prefill_speedup`` against the unpruned one's (``--compile``;
    NaN when not measured). ``kv_cache_mib`` is what the KV cache holds after
    prefill, every layer together. ``prefill_launches`` counts what one prefill launches: CUDA kernels on
    a GPU (torch profiler), torch ops dispatched on a CPU (their GPU launches, one or more each).
    ``ideal_speedup`` is the unpruned prefill's time over the ideal's, timed in turns with this row's (the
    row's fastest prefill times the median ratio of the two in a turn, :meth:`Runner.paired_prefill_ms`): for
    a method dropping tokens inside the language model, its layer ideal (:func:`layer_ideal_ms`).
    """

    method: str
    layer: int | None
    batch_size: int
    visual_tokens: int
    kept_tokens: int
    prompt_tokens: int
    prefill_ms: float
    selection_ms: float
    decode_tokens_per_s: float
    end_to_end_ms: float
    peak_memory_mib: float | None
    kv_cache_mib: float = float("nan")
    compiled_decode_tokens_per_s: float = float("nan")
    compiled_prefill_ms: float = float("nan")
    compiled_prefill_speedup: float = float("nan")
    prefill_launches: int = 0
    prefill_speedup: float = 1.0
    ideal_speedup: float = 1.0
    speedup_vs_ideal: float = 1.0
    selection_share: float = 0.0


def launches(fn: Callable[[], object], device: torch.device) -> int:
    """CUDA kernels ``fn`` launches on a GPU (torch profiler), or the torch ops it dispatches elsewhere."""
    if device.type != "cuda":
        with CountOps() as ops:
            fn()
        return ops.count
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize(device)
    return sum(1 for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _no_grad(fn: Callable[..., object], **kwargs) -> object:
    return fn(**kwargs)


def times_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Wall times of ``fn`` over ``repeats`` runs after one warm-up, in milliseconds."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def build_model(config, attn: str, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """A random-weight model of ``config`` (timing only), in eval mode, its weights created and initialised
    on ``device`` (a 7B model's on the GPU in seconds, not on the CPU first and then moved)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval()


#: Text tokens of each benchmark prompt beside its image.
TEXT_TOKENS = 40


def benchmark_inputs(
    model, batch_size: int, text_tokens: int, device: torch.device, video_frames: int = 0
) -> dict:
    """One image and ``text_tokens`` text tokens per prompt, on ``device`` in the model's dtype (a Qwen-VL
    image of :data:`QWEN_IMAGE_PATCHES`); with ``video_frames``, one Qwen-VL video of that many frames
    (temporal patches, two input frames each) of :data:`QWEN_FRAME_PATCHES` instead of the image."""
    qwen = model.config.model_type in QWEN_FAMILIES
    text = (text_tokens,) * batch_size
    if video_frames:
        if not qwen:
            raise ValueError("the video benchmark runs Qwen-VL architectures (qwen2.5-vl-small)")
        grid = (video_frames, *QWEN_FRAME_PATCHES)
        inputs = tiny_inputs(
            model, (0,) * batch_size, text, videos_per_prompt=(1,) * batch_size, video_grid=grid
        )
    elif qwen:
        inputs = tiny_inputs(model, (1,) * batch_size, text, image_patches=(QWEN_IMAGE_PATCHES,) * batch_size)
    else:
        inputs = tiny_inputs(model, (1,) * batch_size, text)
    inputs = {k: v.to(device) for k, v in inputs.items() if v is not None}
    for pixels in ("pixel_values", "pixel_values_videos"):
        if pixels in inputs:
            inputs[pixels] = inputs[pixels].to(model.dtype)
    return inputs


def tokens_per_image(model, inputs: dict) -> int:
    """Visual tokens of each image (or video) of ``inputs`` (one per prompt, all of one size)."""
    ids = inputs["input_ids"]
    token = model.config.image_token_id if "pixel_values" in inputs else model.config.video_token_id
    return int((ids == token).sum()) // ids.shape[0]


class Runner:
    """Times one model on one batch of ``inputs``: prefill, the ideal prefill, decode and its KV cache, each
    ``repeats`` times after a warm-up (``new_tokens`` per decode)."""

    def __init__(
        self,
        model,
        inputs: dict,
        device: torch.device,
        repeats: int,
        new_tokens: int,
        compile: bool = False,
        prefill_turns: int | None = None,
    ):
        self.model, self.inputs, self.device = model, inputs, device
        self.repeats, self.new_tokens, self.compile = repeats, new_tokens, compile
        self.turns = prefill_turns or repeats  # of each prefill beside its ideal

    @torch.no_grad()
    def prefill(self) -> None:
        self.model(**self.inputs, logits_to_keep=1)

    @torch.no_grad()
    def ideal_prefill(self, kept_per_image: int) -> None:
        """Vision tower and projector on the images (or videos), then the language model on the pruned
        length."""
        base = self.model.model
        if "pixel_values" in self.inputs:
            images = ("pixel_values", "image_grid_thw", "image_sizes")
            base.get_image_features(**{k: self.inputs[k] for k in images if k in self.inputs})
        else:
            base.get_video_features(self.inputs["pixel_values_videos"], self.inputs["video_grid_thw"])
        batch, length = self.inputs["input_ids"].shape
        pruned = length - (tokens_per_image(self.model, self.inputs) - kept_per_image)
        embeds = base.get_input_embeddings()(self.inputs["input_ids"][:, :pruned])
        hidden = base.language_model(inputs_embeds=embeds).last_hidden_state
        self.model.lm_head(hidden[:, -1:])

    @torch.no_grad()
    def kv_cache_mib(self) -> float:
        """MiB of keys and values the cache holds after one prefill."""
        cache = output_cache(self.model(**self.inputs, logits_to_keep=1, use_cache=True))
        return cache_nbytes(cache) / 2**20

    @torch.no_grad()
    def generate(self, new_tokens: int, **generate_kwargs) -> None:
        self.model.generate(
            **self.inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **generate_kwargs,
        )

    def decode(self, **generate_kwargs) -> tuple[float, float]:
        """End-to-end ``generate`` ms and decode tokens/s (the steps after the first token)."""
        end_to_end, first_token = (
            statistics.median(
                times_ms(lambda n=n: self.generate(n, **generate_kwargs), self.device, self.repeats)
            )
            for n in (self.new_tokens, 1)
        )
        batch = self.inputs["input_ids"].shape[0]
        # the same prefill is in both; on a noisy machine a tiny model's decode can vanish in it
        decode_s = (end_to_end - first_token) / 1e3
        return end_to_end, batch * (self.new_tokens - 1) / decode_s if decode_s > 0 else float("nan")

    def compiled_decode_rate(self) -> float:
        """Decode tokens/s with a static cache and a compiled decode step, compiled afresh for this
        configuration (the warm-up run compiles). The compiled code is dropped afterwards: left in place,
        it slows the eager calls of the next measurements (5x on the tiny model on a CPU)."""
        torch.compiler.reset()
        try:
            return self.decode(**compiled_decoding(self.device))[1]
        finally:
            torch.compiler.reset()

    def compiled_prefill_ms(self) -> float:
        """The fastest prefill of the whole forward compiled afresh for this configuration (the warm-up run
        compiles; dropped afterwards, as in :meth:`compiled_decode_rate`)."""
        torch.compiler.reset()
        try:
            forward = partial(_no_grad, torch.compile(self.model), **self.inputs, logits_to_keep=1)
            return min(times_ms(forward, self.device, self.repeats))
        finally:
            torch.compiler.reset()

    #: What :meth:`prefill_turns` times.
    TURNS = ("ideal", "pruned", "selection", "unpruned", "full")

    def prefill_turns(
        self, config: tp.PrunerConfig, kept: int, unpruned: bool = False, full: bool = False
    ) -> dict[str, list[float]]:
        """Prefill ms of :attr:`turns` rounds, each timing in turn the ideal prefill of ``kept`` tokens
        per image, the model under ``config`` (attached for its own run, after an untimed one that checks its
        contracts), with ``unpruned`` the model as it is, and with ``full`` the ideal prefill of every token,
        so that all meet the same moments of a shared machine. Keys ``"ideal"``, ``"pruned"``,
        ``"selection"`` (each pruned run's selection ms), ``"unpruned"`` and ``"full"``."""
        turns: dict[str, list[float]] = {key: [] for key in self.TURNS}
        visual = tokens_per_image(self.model, self.inputs)
        for _ in range(self.turns):
            if unpruned:
                turns["unpruned"] += times_ms(self.prefill, self.device, 1)
            if full:
                turns["full"] += times_ms(partial(self.ideal_prefill, visual), self.device, 1)
            turns["ideal"] += times_ms(partial(self.ideal_prefill, kept), self.device, 1)
            with tp.pruned(self.model, config) as pruner:
                turns["pruned"] += times_ms(self.prefill, self.device, 1)
                turns["selection"].append(pruner.stats.selection_ms)
        return turns

    def paired_prefill_ms(self, config: tp.PrunerConfig, kept: int) -> tuple[float, float, float]:
        """The fastest prefill under ``config``, the ideal prefill it is held to and the least selection ms,
        of :meth:`prefill_turns`. The ideal is the fastest prefill times the median, over the turns, of the
        ideal's time over the method's in the same turn: each turn times the two back to back, so the
        machine's speed, which drifts between turns, cancels in the ratio (the two fastest, taken apart, may
        come from different moments of the machine). A method dropping tokens inside the language model is
        held to its :func:`layer_ideal_ms`, from each turn's ideal prefills of ``kept`` and of every token."""
        depth = self.model.config.get_text_config().num_hidden_layers
        config = config.for_depth(depth)
        visual = tokens_per_image(self.model, self.inputs)
        lengths = decoder_lengths(config, visual, depth)
        in_decoder = any(length != kept for length in lengths)
        turns = self.prefill_turns(config, kept, full=in_decoder)
        ideals = turns["ideal"]
        if in_decoder:
            ideals = [
                layer_ideal_ms(i, f, lengths, visual, kept)
                for i, f in zip(ideals, turns["full"], strict=True)
            ]
        pruned = min(turns["pruned"])
        ratio = statistics.median(i / p for i, p in zip(ideals, turns["pruned"], strict=True))
        return pruned, pruned * ratio, min(turns["selection"])

    def measure(
        self,
        method: str,
        layer: int | None,
        kept: int,
        pruner: tp.Pruner | None = None,
        prefill: tuple[float, float] | None = None,
    ) -> BenchRow:
        """The row of the model as it is now (``pruner`` attached, if given), its prefill and selection ms
        timed here unless ``prefill`` gives them."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if prefill is None:
            prefill_ms = min(times_ms(self.prefill, self.device, self.repeats))
            prefill = prefill_ms, pruner.stats.selection_ms if pruner is not None else 0.0
        prefill_ms, selection = prefill
        end_to_end, decode_rate = self.decode()
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        batch = self.inputs["input_ids"].shape[0]
        return BenchRow(
            method=method,
            layer=layer,
            batch_size=batch,
            visual_tokens=tokens_per_image(self.model, self.inputs),
            kept_tokens=kept,
            prompt_tokens=self.inputs["input_ids"].shape[1],
            prefill_ms=prefill_ms,
            selection_ms=selection,
            decode_tokens_per_s=decode_rate,
            end_to_end_ms=end_to_end,
            peak_memory_mib=peak,
            kv_cache_mib=self.kv_cache_mib(),
            compiled_decode_tokens_per_s=self.compiled_decode_rate() if self.compile else float("nan"),
            compiled_prefill_ms=self.compiled_prefill_ms() if self.compile else float("nan"),
        )


def decoder_lengths(config: tp.PrunerConfig, visual: int, depth: int) -> list[int]:
    """The visual tokens per image each of the ``depth`` decoder layers runs on under ``config`` (resolved
    for that depth), images of ``visual`` tokens: for a method dropping them inside the language model, what
    its vision stage hands on, then each stage's count from its layer on; else the kept count throughout (a
    ``kv`` method's prefill, which keeps every token, is held to the same ideal as the others)."""
    if config.stage != "llm":
        return [config.kept_per_image(visual)] * depth
    vision = config.vision_stage
    lengths = [visual if vision is None else vision.kept_per_image(visual)] * depth
    for layer, kept in config.stages(visual):
        lengths[layer:] = [kept] * (depth - layer)
    return lengths


def layer_ideal_ms(ideal_ms: float, full_ms: float, lengths: list[int], visual: int, kept: int) -> float:
    """The ideal prefill of a method that drops tokens inside the language model, its layers running on
    ``lengths`` visual tokens per image (:func:`decoder_lengths`): the ideal of ``kept`` tokens per image
    (``ideal_ms``) plus, for each layer, its share of what every token costs more (``full_ms``, the ideal of
    all ``visual`` tokens), in proportion to the tokens it runs on beyond ``kept``. Layers of one model are
    alike, and a layer's time is taken as linear in its tokens between the two measured lengths (attention's
    quadratic part makes it a little less in between, so the ideal is a little lenient)."""
    extra = sum(length - kept for length in lengths) / (len(lengths) * max(visual - kept, 1))
    return ideal_ms + (full_ms - ideal_ms) * extra


#: The variants an entry may add to its method, ``method+variant``, and the config options each sets.
VARIANTS = {
    "drop_early_kv": {"drop_early_kv": True},
    "renumbered": {"positions": "renumbered"},
    "original": {"positions": "original"},
}
#: The share of each image's tokens a composed entry's vision stage keeps (at least the entry's ratio):
#: SAINT's hybrid default, 376 of LLaVA-1.5's 576 patches kept in the encoder (about a third dropped there).
VISION_STAGE_KEEP = 376 / 576


def bench_config(method: str, keep_ratio: float) -> tp.PrunerConfig:
    """The config a benchmark or accuracy entry names: a method, or ``method+variant`` (one or more of
    :data:`VARIANTS`, e.g. ``fastv+drop_early_kv``, ``fastv+renumbered`` or ``transprune+original``) for
    those options, or
    ``method+vision_method`` (e.g. ``saint_llm+saint``, SAINT's hybrid) for a decoder method composed after a
    vision stage keeping :data:`VISION_STAGE_KEEP` of each image, or ``keep_ratio`` where that is more."""
    name, *variants = method.split("+")
    stages = {name: stage for name, (stage, _) in tp.list_methods().items()}
    vision = [variant for variant in variants if stages.get(variant) == "vision"]
    unknown = [variant for variant in variants if variant not in VARIANTS and variant not in vision]
    if unknown or len(vision) > 1:
        raise ValueError(
            f"unknown benchmark variant {method!r}; the variants are "
            + ", ".join(f"'<method>+{variant}'" for variant in VARIANTS)
            + " and '<decoder method>+<vision method>'"
        )
    options = {key: value for variant in variants for key, value in VARIANTS.get(variant, {}).items()}
    if vision:
        options["vision"] = tp.PrunerConfig(vision[0], keep_ratio=max(keep_ratio, VISION_STAGE_KEEP))
    return tp.PrunerConfig(name, keep_ratio=keep_ratio, **options)


def run_benchmark(
    model,
    methods: list[str],
    keep_ratios: list[float],
    batch_sizes: list[int],
    *,
    repeats: int = 3,
    prefill_turns: int | None = None,
    new_tokens: int = 8,
    text_tokens: int = TEXT_TOKENS,
    compile: bool = False,
    video_frames: int = 0,
) -> list[BenchRow]:
    """Measure the unpruned model, the ideal and every method, per batch size and keep ratio (on a video of
    ``video_frames`` frames per prompt instead of an image, where given).

    Returns one row per (batch size, ratio, method), plus an ``unpruned`` row per batch size and an
    ``ideal`` row per (batch size, ratio); every ratio is relative to that batch size's unpruned row.
    With ``compile``, every row also measures decoding with a static cache and a compiled step.
    """
    device = next(model.parameters()).device
    rows: list[BenchRow] = []
    counted: list[tuple[BenchRow, Runner, float | None]] = []  # rows whose launches are counted last
    steps = len(batch_sizes) * (1 + len(keep_ratios) * (1 + len(methods)))
    with Progress(transient=True) as progress:
        task = progress.add_task("benchmark", total=steps)
        for batch_size in batch_sizes:
            inputs = benchmark_inputs(model, batch_size, text_tokens, device, video_frames)
            n = tokens_per_image(model, inputs)
            runner = Runner(model, inputs, device, repeats, new_tokens, compile, prefill_turns)
            progress.update(task, description=f"bs={batch_size} unpruned")
            base = runner.measure("unpruned", None, n)
            rows.append(base)
            counted.append((base, runner, None))
            progress.advance(task)
            for ratio in keep_ratios:
                kept = max(1, round(ratio * n))
                progress.update(task, description=f"bs={batch_size} keep={kept} ideal")
                ideal_ms = min(times_ms(lambda r=runner, k=kept: r.ideal_prefill(k), device, repeats))
                ideal = BenchRow(
                    "ideal",
                    None,
                    batch_size,
                    n,
                    kept,
                    base.prompt_tokens - n + kept,
                    ideal_ms,
                    0.0,
                    float("nan"),
                    float("nan"),
                    None,
                )
                rows.append(ideal)
                progress.advance(task)
                neighbours = {"ideal": ideal_ms}  # each method's ideal, timed in turns with it
                for method in methods:
                    progress.update(task, description=f"bs={batch_size} keep={kept} {method}")
                    config = bench_config(method, ratio)
                    prefill_ms, neighbours[method], selection = runner.paired_prefill_ms(config, kept)
                    with tp.pruned(model, config) as pruner:
                        row = runner.measure(
                            method, pruner.config.acting_layer, kept, pruner, (prefill_ms, selection)
                        )
                    rows.append(row)
                    counted.append((row, runner, ratio))
                    progress.advance(task)
                for row in (ideal, *rows[-len(methods) :]):
                    row.prefill_speedup = base.prefill_ms / row.prefill_ms
                    row.ideal_speedup = base.prefill_ms / neighbours[row.method]
                    row.speedup_vs_ideal = row.prefill_speedup / row.ideal_speedup
                    row.selection_share = row.selection_ms / row.prefill_ms
                    row.compiled_prefill_speedup = base.compiled_prefill_ms / row.compiled_prefill_ms
        # Launches are counted after every timing: on a GPU the profiler that counts them leaves CUDA's
        # profiling library hooked into every later launch (an H100 run, counting as it timed, then measured
        # the ideal prefill, less work than the unpruned one before it, 1.5x slower than that one).
        progress.update(task, description="counting launches")
        for row, runner, ratio in counted:
            with contextlib.ExitStack() as stack:
                if ratio is not None:
                    stack.enter_context(tp.pruned(model, bench_config(row.method, ratio)))
                row.prefill_launches = launches(runner.prefill, device)
    return rows


def machine_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return f"{cpu} CPU, {torch.get_num_threads()} threads"


def write_results(rows: list[BenchRow], out_dir: Path, meta: dict) -> dict[str, Path]:
    """Write ``results.json`` (meta + rows), ``results.csv`` and ``speedup.png``; return their paths."""
    title = f"{meta['arch']} prefill, {meta['machine']}"
    return write_rows(rows, out_dir, meta, "speedup.png", lambda path: plot_speedup(rows, path, title))


def write_rows(
    rows: list, out_dir: Path, meta: dict, plot_name: str, plot: Callable[[Path], None]
) -> dict[str, Path]:
    """Write dataclass ``rows`` to ``results.json`` (with ``meta``) and ``results.csv`` in ``out_dir``, and
    ``plot`` to ``plot_name`` there; return the paths by kind (``json``, ``csv``, ``plot``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv", "plot": out_dir / plot_name}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    plot(paths["plot"])
    return paths


def plot_speedup(rows: list[BenchRow], path: Path, title: str) -> None:
    """Prefill speedup vs kept tokens: one line per method, plus the ideal (first batch size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = rows[0].batch_size
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [m for m in dict.fromkeys(r.method for r in rows) if m != "unpruned"]
    for name in names:
        points = sorted(
            (r.kept_tokens, r.prefill_speedup) for r in rows if r.method == name and r.batch_size == batch
        )
        style = {"color": "black", "linestyle": "--", "linewidth": 2} if name == "ideal" else {"marker": "o"}
        ax.plot(*zip(*points, strict=True), label=name, **style)
    save_plot(
        fig,
        ax,
        path,
        f"{title} (batch {batch})",
        "visual tokens kept per image",
        "prefill speedup vs unpruned",
    )


def save_plot(fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    """Label, lay out and save a benchmark plot, and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(rows: list[BenchRow]) -> str:
    """The rows as a README table (with the compiled prefill's and decode's columns where measured)."""
    compiled = any(r.compiled_decode_tokens_per_s == r.compiled_decode_tokens_per_s for r in rows)  # not NaN
    lines = [
        "| batch | method | layer | kept | prefill ms | speedup | ideal | of ideal | selection % | launches "
        + ("| compiled prefill ms | compiled speedup " if compiled else "")
        + f"| decode tok/s |{' compiled decode tok/s |' if compiled else ''} KV MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if compiled else ""),
    ]
    for r in rows:
        if r.method == "ideal":
            continue
        lines.append(
            f"| {r.batch_size} | {r.method} | {'-' if r.layer is None else r.layer} | {r.kept_tokens} | "
            f"{r.prefill_ms:.1f} | {r.prefill_speedup:.2f}x | {r.ideal_speedup:.2f}x | "
            f"{r.speedup_vs_ideal:.2f} | {100 * r.selection_share:.1f} | {r.prefill_launches} | "
            + (f"{r.compiled_prefill_ms:.1f} | {r.compiled_prefill_speedup:.2f}x | " if compiled else "")
            + f"{r.decode_tokens_per_s:.1f} | "
            + (f"{r.compiled_decode_tokens_per_s:.1f} | " if compiled else "")
            + f"{r.kv_cache_mib:.1f} |"
        )
    return "\n".join(lines)
