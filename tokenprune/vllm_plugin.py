"""The logic of the vLLM plugin, free of vLLM: which config a served model prunes with, how many
placeholder tokens an image gets, and which K embedding rows of each image reach the language model.

vLLM sizes the prompt (one placeholder per image token) before the image encoder runs, so a pruned model
must say K up front and return exactly K rows per image from its embedding step. Only ``pre_llm``
methods that need nothing but the image's own embeddings can do that (``random``, ``uniform``,
``divprune``, ``idpruner``); the others need the language model's layers or the encoder's attention,
which vLLM's embedding step does not have.

:func:`register` is the ``vllm.general_plugins`` entry point (the ``[vllm]`` extra): it re-registers
LLaVA-1.5 with :mod:`tokenprune.vllm_models`. The config comes from the model's HF config
(``--hf-overrides '{"tokenprune_method": "divprune", "tokenprune_keep_ratio": 0.25}'``) or, where
absent, the environment (``TOKENPRUNE_METHOD``, ``TOKENPRUNE_KEEP_RATIO`` or ``TOKENPRUNE_BUDGET``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from importlib.metadata import version

import torch

from .config import PrunerConfig
from .context import SelectionContext

_KEYS = ("method", "keep_ratio", "budget")
#: The vLLM minor release the model classes of :mod:`tokenprune.vllm_models` are written for.
VLLM_SERIES = "0.33."


def register() -> None:
    """The ``vllm.general_plugins`` entry point: serve ``LlavaForConditionalGeneration`` checkpoints with
    :class:`tokenprune.vllm_models.PrunedLlavaForConditionalGeneration` (unpruned without a config).

    Outside the vLLM series it is written for, it warns and registers nothing, so vLLM's own model runs.
    """
    found = version("vllm")
    if not found.startswith(VLLM_SERIES):
        warnings.warn(
            f"tokenprune's vLLM plugin is written for vLLM {VLLM_SERIES}x, found {found}: not registered",
            stacklevel=2,
        )
        return
    from vllm import ModelRegistry

    ModelRegistry.register_model(
        "LlavaForConditionalGeneration", "tokenprune.vllm_models:PrunedLlavaForConditionalGeneration"
    )


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
    """Placeholder tokens for an image of ``num_tokens`` embeddings: the kept count under ``config``."""
    return num_tokens if config is None else config.kept_per_image(num_tokens)


def select_embeddings(
    embeddings: Sequence[torch.Tensor], config: PrunerConfig | None, grids: Sequence[tuple[int, int] | None]
) -> list[torch.Tensor]:
    """Each image's kept embedding rows ``[K_i, D]``, in their original order, from ``embeddings[i]
    [N_i, D]`` (an image whose rows are a ``grids[i]`` patch grid, or ``None``). Images of the same size
    are selected together; each is drawn as its prompt's first image (``random`` seeds by that place)."""
    if config is None:
        return list(embeddings)
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
        keep = placeholder_count(shape[0], config)
        index = config.spec.select(ctx, keep, config.options)
        kept = torch.gather(features, 1, index[..., None].expand(-1, -1, shape[1]))
        for row, i in enumerate(members):
            out[i] = kept[row]
    return out
