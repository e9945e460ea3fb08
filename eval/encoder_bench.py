"""Image-encoder throughput under the vision stage: images/s of a ViT against its unpruned self.

For each setting, in one run: the unpruned encoder, then ToMe at each ``r`` (tokens merged per layer) and
the selecting vision methods at each keep ratio. Each timing is the fastest of ``repeats`` forward passes
of one batch after a warm-up; every ratio is to the unpruned encoder measured in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress

import tokenprune as tp
from tokenprune.testing import tiny_pixels

from .bench import save_plot, times_ms, write_rows


@dataclass
class EncoderRow:
    """One measured setting: ``setting`` is ``r=16`` or ``keep=0.25`` (``-`` unpruned)."""

    method: str
    setting: str
    batch_size: int
    patches: int
    kept_tokens: int
    batch_ms: float
    images_per_s: float
    speedup: float = 1.0


def build_encoder(config, attn: str, device: torch.device, dtype: torch.dtype):
    """A random-weight image encoder (``ViTModel`` for a ``ViTConfig``) of ``config``, in eval mode."""
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation=attn, dtype=dtype)
    return model.to(device).eval()


def run_encoder_benchmark(
    model,
    merges: list[int],
    keep_ratios: list[float],
    batch_size: int,
    *,
    repeats: int = 3,
    selecting: tuple[str, ...] = ("hiprune", "visionzip", "vispruner", "saint"),
    merging: tuple[str, ...] = ("tome", "turbo"),
) -> list[EncoderRow]:
    """Time ``model`` unpruned, with each ``merging`` method at each ``r`` in ``merges``, and with each
    ``selecting`` method at each keep ratio. Returns one row per setting, ``speedup`` relative to the
    unpruned row."""
    device = next(model.parameters()).device
    pixels = tiny_pixels(model, batch_size).to(device, next(model.parameters()).dtype)
    settings = [("unpruned", "-", None)]
    settings += [(m, f"r={r}", {"r": r}) for m in merging for r in merges]
    settings += [(m, f"keep={ratio}", {"keep_ratio": ratio}) for m in selecting for ratio in keep_ratios]

    @torch.no_grad()
    def forward() -> None:
        model(pixel_values=pixels)

    rows = []
    with Progress(transient=True) as progress:
        task = progress.add_task("encoder benchmark", total=len(settings))
        for method, setting, kwargs in settings:
            progress.update(task, description=f"{method} {setting}")
            if kwargs is None:
                ms = min(times_ms(forward, device, repeats))
                patches = kept = (model.config.image_size // model.config.patch_size) ** 2
            else:
                with tp.pruned(model, method, **kwargs) as pruner:
                    ms = min(times_ms(forward, device, repeats))
                patches, kept = pruner.stats.visual_tokens[0], pruner.stats.kept_tokens[0]
            rows.append(EncoderRow(method, setting, batch_size, patches, kept, ms, batch_size / ms * 1e3))
            progress.advance(task)
    for row in rows:
        row.speedup = row.images_per_s / rows[0].images_per_s
    return rows


def write_encoder_results(rows: list[EncoderRow], out_dir: Path, meta: dict) -> dict[str, Path]:
    """Write ``results.json`` (meta + rows), ``results.csv`` and ``throughput.png``; return their paths."""
    title = f"{meta['arch']}, {meta['machine']}"
    return write_rows(rows, out_dir, meta, "throughput.png", lambda path: plot_throughput(rows, path, title))


def plot_throughput(rows: list[EncoderRow], path: Path, title: str) -> None:
    """Speedup over the unpruned encoder vs patch tokens left at the output, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r.method for r in rows if r.method != "unpruned"):
        points = sorted((r.kept_tokens, r.speedup) for r in rows if r.method == name)
        ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="unpruned")
    save_plot(fig, ax, path, title, "patch tokens at the output", "images/s vs unpruned")


def encoder_markdown_table(rows: list[EncoderRow]) -> str:
    """The rows as a README table."""
    lines = [
        "| method | setting | patches kept | batch ms | images/s | speedup |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.method} | {r.setting} | {r.kept_tokens}/{r.patches} | {r.batch_ms:.1f} | "
        f"{r.images_per_s:.1f} | {r.speedup:.2f}x |"
        for r in rows
    ]
    return "\n".join(lines)
