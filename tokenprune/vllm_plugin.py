"""The logic of the vLLM plugin, free of vLLM: which config a served model prunes with, how many
placeholder tokens an image gets, which embedding rows of each image reach the language model, and (for
Qwen2.5-VL) which multimodal RoPE positions the kept placeholders take.

vLLM sizes the prompt (one placeholder per image token) before the image encoder runs, so a pruned model
must say K up front and return exactly K rows per image from its embedding step. Only ``pre_llm``
methods that need nothing but the image's own embeddings can do that (``random``, ``uniform``,
``divprune``, ``idpruner``); the others need the language model's layers or the encoder's attention,
which vLLM's embedding step does not have.

:func:`register` is the ``vllm.general_plugins`` entry point (the ``[vllm]`` extra): it re-registers
LLaVA-1.5, LLaVA-NeXT and (experimental) Qwen2.5-VL with :mod:`tokenprune.vllm_models`. The config comes
from the model's HF config (``--hf-overrides '{"tokenprune_method": "divprune", "tokenprune_keep_ratio":
0.25}'``) or, where absent, the environment (``TOKENPRUNE_METHOD``, ``TOKENPRUNE_KEEP_RATIO`` or
``TOKENPRUNE_BUDGET``).

Counts follow the transformers path: ``keep_ratio`` and ``budget`` apply per image; a LLaVA-NeXT image's
visual rows are all its tiles together, its ``image_newline`` rows are structure and always kept; a
Qwen2.5-VL image's tokens are its merged patches (one per ``merge x merge`` group), and its videos are
not pruned.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from importlib.metadata import version

import torch

from .config import PrunerConfig
from .context import SelectionContext
from .methods.baselines import grid_sample

_KEYS = ("method", "keep_ratio", "budget")
#: The vLLM minor release the model classes of :mod:`tokenprune.vllm_models` are written for.
VLLM_SERIES = "0.33."
#: The vLLM architectures the plugin re-registers; each is served by ``Pruned<architecture>``.
ARCHITECTURES = (
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: serve each of :data:`ARCHITECTURES` with its pruned
    subclass in :mod:`tokenprune.vllm_models` (unpruned without a config).

    Outside the vLLM series it is written for, it warns and registers nothing, so vLLM's own models run.
    """
    found = version("vllm")
    if not found.startswith(VLLM_SERIES):
        warnings.warn(
            f"tokenprune's vLLM plugin is written for vLLM {VLLM_SERIES}x, found {found}: not registered",
            stacklevel=2,
        )
        return
    from vllm import ModelRegistry

    for architecture in ARCHITECTURES:
        ModelRegistry.register_model(architecture, f"tokenprune.vllm_models:Pruned{architecture}")


def plugin_config(hf_config: object, environ: Mapping[str, str] = os.environ) -> PrunerConfig | None:
    """The pruner config of a served model: ``tokenprune_*`` attributes of its HF config, else the
    ``TOKENPRUNE_*`` environment variables; ``None`` when neither names a method. ``ValueError`` (naming
    the fix) for a method the plugin cannot run or a bad amount."""
    values = {key: getattr(hf_config, f"tokenprune_{key}", None) for key in _KEYS}
    if values["method"] is None:
        values = {key: environ.get(f"TOKENPRUNE_{key.upper()}") for key in _KEYS}
    if values["method"] is None:
        return None
    keep_ratio = None if values["keep_ratio"] is None else float(values["keep_ratio"])
    budget = None if values["budget"] is None else int(values["budget"])
    config = PrunerConfig(str(values["method"]), keep_ratio=keep_ratio, budget=budget)
    spec = config.spec
    if spec.stage != "pre_llm" or spec.needs:
        raise ValueError(
            f"the vLLM plugin runs pre_llm methods that need only the image embeddings (divprune, idpruner, "
            f"random, uniform), not {config.method!r} ({spec.stage}, needs {list(spec.needs)})"
        )
    return config


def placeholder_count(num_tokens: int, config: PrunerConfig | None) -> int:
    """Placeholder tokens for an image of ``num_tokens`` embeddings: the kept count under ``config``
    (``ValueError`` for a budget larger than the image)."""
    return num_tokens if config is None else config.kept_per_image(num_tokens)


def next_placeholder_count(num_tokens: int, newline_rows: int, config: PrunerConfig | None) -> int:
    """Placeholder tokens for a LLaVA-NeXT image packed into ``num_tokens`` rows, ``newline_rows`` of them
    ``image_newline``: every newline row (structure, kept as the transformers path keeps it) plus the kept
    count of the visual rows of all tiles together."""
    return newline_rows + placeholder_count(num_tokens - newline_rows, config)


def qwen_placeholder_count(grid_thw: Sequence[int], merge: int, config: PrunerConfig | None) -> int:
    """Placeholder tokens for a Qwen2.5-VL image of ``grid_thw`` patches: the kept count of its
    ``t * h * w / merge**2`` merged tokens (the vision merger's output rows, one per merge x merge group)."""
    t, h, w = (int(n) for n in grid_thw)
    return placeholder_count(t * h * w // merge**2, config)


def qwen_grid(grid_thw: Sequence[int], merge: int) -> tuple[int, int] | None:
    """The merged-token grid ``(rows, columns)`` of a single-frame Qwen2.5-VL image, whose merged tokens
    come in raster order over it; ``None`` for several frames (no single patch grid)."""
    t, h, w = (int(n) for n in grid_thw)
    return (h // merge, w // merge) if t == 1 else None


def kept_indices(
    embeddings: Sequence[torch.Tensor], config: PrunerConfig, grids: Sequence[tuple[int, int] | None]
) -> list[torch.Tensor]:
    """Sorted indices ``[K_i]`` of the rows ``config`` keeps of each image ``embeddings[i] [N_i, D]`` (a
    ``grids[i]`` patch grid, or ``None``), chosen by the registered method function. Images of the same
    size are selected together; each is drawn as its prompt's first image (``random`` seeds by that
    place, which vLLM's embedding step does not know)."""
    out: list[torch.Tensor | None] = [None] * len(embeddings)
    groups: dict[tuple, list[int]] = {}
    for i, (rows, grid) in enumerate(zip(embeddings, grids, strict=True)):
        groups.setdefault((rows.shape, grid), []).append(i)
    for (shape, grid), members in groups.items():
        features = torch.stack([embeddings[i] for i in members])
        ctx = SelectionContext(
            features=features,
            grid=grid,
            image_index=torch.zeros(len(members), dtype=torch.long, device=features.device),
        )
        index = config.spec.select(ctx, placeholder_count(shape[0], config), config.options)
        for row, i in enumerate(members):
            out[i] = index[row]
    return out


def select_embeddings(
    embeddings: Sequence[torch.Tensor], config: PrunerConfig | None, grids: Sequence[tuple[int, int] | None]
) -> list[torch.Tensor]:
    """Each image's kept embedding rows ``[K_i, D]``, in their original order (see :func:`kept_indices`);
    every row without a config."""
    if config is None:
        return list(embeddings)
    return [
        rows[index] for rows, index in zip(embeddings, kept_indices(embeddings, config, grids), strict=True)
    ]


def select_next_embeddings(
    embeddings: Sequence[torch.Tensor], newline: torch.Tensor, config: PrunerConfig | None
) -> list[torch.Tensor]:
    """Each LLaVA-NeXT image's kept rows, in their original order, from its packed rows ``[N_i, D]``:
    its ``image_newline`` rows (found by their exact value ``newline [D]``, as the transformers path finds
    them) and the rows ``config`` keeps of the others, selected without a patch grid (tiles and unpadding
    make none). The count is :func:`next_placeholder_count`'s."""
    if config is None:
        return list(embeddings)
    newlines = [(rows == newline.to(rows)).all(dim=-1) for rows in embeddings]
    visual = [(~mask).nonzero().squeeze(1) for mask in newlines]
    chosen = kept_indices(
        [rows[v] for rows, v in zip(embeddings, visual, strict=True)], config, [None] * len(embeddings)
    )
    out = []
    for rows, mask, v, index in zip(embeddings, newlines, visual, chosen, strict=True):
        keep = mask.clone()
        keep[v[index]] = True
        out.append(rows[keep])
    return out


def qwen_position_cells(grid_thw: Sequence[int], merge: int, config: PrunerConfig | None) -> torch.Tensor:
    """Raster indices ``[K]`` of the merged-grid cells whose multimodal RoPE positions the K placeholders
    of a Qwen2.5-VL image take, in order: the cells ``uniform`` keeps (spread evenly over the grid), every
    cell without a config or for a video.

    vLLM fixes each request's positions when it is admitted, before the image is encoded, so they cannot
    follow a content-based choice: they are exactly the kept tokens' own positions for ``uniform`` only;
    with ``divprune``, ``idpruner`` or ``random`` the i-th kept token (in raster order) takes the i-th of
    these cells' positions, not its own.
    """
    t, h, w = (int(n) for n in grid_thw)
    total = t * h * w // merge**2
    if config is None or t != 1:
        return torch.arange(total)
    return grid_sample(qwen_placeholder_count(grid_thw, merge, config), h // merge, w // merge)


def unpruned_layout(
    length: int, items: Sequence[tuple[int, int, torch.Tensor]]
) -> tuple[torch.Tensor, list[int]]:
    """Where a pruned prompt sits in its unpruned layout.

    ``items`` are the prompt's images and videos, ordered by offset: ``(offset in the pruned prompt of
    ``length`` tokens, placeholder tokens unpruned, raster cells ``[K]`` its K placeholders stand for)``.
    Returns the unpruned index of every pruned-prompt token ``[length]`` (text keeps its place, shifted by
    the tokens pruned before it) and each item's unpruned offset, so positions computed for the unpruned
    prompt can be gathered onto the pruned one.
    """
    pieces, offsets = [], []
    start = shift = 0
    for offset, total, cells in items:
        pieces += [torch.arange(start, offset) + shift, cells + offset + shift]
        offsets.append(offset + shift)
        start = offset + len(cells)
        shift += total - len(cells)
    pieces.append(torch.arange(start, length) + shift)
    return torch.cat(pieces), offsets
