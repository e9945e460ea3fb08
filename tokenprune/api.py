"""Public entry points: apply a pruner to a model, remove it, or scope it with a context manager."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from tokenprune.patches import adapter_for, check_placement

from .config import PrunerConfig
from .pruner import Pruner, attached_pruner


def apply_pruner(
    model: nn.Module,
    method: str | PrunerConfig,
    *,
    keep_ratio: float | None = None,
    budget: int | None = None,
    layer: int | None = None,
    schedule: tuple[tuple[int, float], ...] | None = None,
    drop_early_kv: bool = False,
    media: str = "both",
    positions: str | None = None,
    checks: str = "first",
    per_frame: bool = False,
    images_as_frames: bool = False,
    **options: object,
) -> Pruner:
    """Prune the visual tokens of every forward pass of ``model`` (including inside ``generate``).

    Args:
        model: a loaded transformers VLM of a supported family.
        method: a registered method name, or a :class:`PrunerConfig` (then give no other argument).
        keep_ratio: fraction of each image's visual tokens kept, in (0, 1].
        budget: visual tokens kept per image (exactly one of ``keep_ratio`` and ``budget``).
        layer: decoder layer where tokens are dropped; 0 prunes before the language model.
        schedule: prune at several layers, ``((layer, keep_ratio), ...)``, instead of one (see
            :class:`PrunerConfig`).
        drop_early_kv: also drop the pruned tokens' KV entries from the layers before ``layer`` once
            prefill is done (see :class:`PrunerConfig`).
        media: in a family that takes videos, prune ``"images"``, ``"videos"`` or ``"both"``.
        positions: ``"original"`` keeps the kept tokens' positions, ``"renumbered"`` closes the gaps the
            dropped ones leave, ``None`` follows the method's reference (see :class:`PrunerConfig`).
        checks: ``"first"`` checks the contracts that read the device (a host sync each on a GPU) at the
            first forward only, ``"every"`` at each (see :class:`PrunerConfig`).
        per_frame: ``budget`` counts per frame of a video (an image is one frame), not per video.
        images_as_frames: each prompt's images are the frames of one video (see :class:`PrunerConfig`).
        **options: method-specific options, checked against the method's declaration (type and range;
            ``docs/methods.md`` lists them).

    Returns:
        The :class:`Pruner`; ``pruner.stats`` describes the last prefill.

    Every check (method, its options, ratio or budget, layer, model family, an existing pruner, a
    tensor-parallel sharding the method cannot score exactly under, a device_map over several devices) runs
    before the model is touched, and raises ``ValueError``/``TypeError``/``RuntimeError`` naming the fix.
    """
    if isinstance(method, PrunerConfig):
        extra = (keep_ratio, budget, layer, schedule)
        defaults = (
            not drop_early_kv and not options and media == "both" and positions is None and checks == "first"
        ) and not (per_frame or images_as_frames)
        if any(x is not None for x in extra) or not defaults:
            raise TypeError("pass either a PrunerConfig or a method name with its arguments, not both")
        config = method
    else:
        config = PrunerConfig(
            method,
            keep_ratio=keep_ratio,
            budget=budget,
            layer=layer,
            options=dict(options),
            schedule=None if schedule is None else tuple(schedule),
            drop_early_kv=drop_early_kv,
            media=media,
            positions=positions,
            checks=checks,
            per_frame=per_frame,
            images_as_frames=images_as_frames,
        )
    if attached_pruner(model) is not None:
        raise RuntimeError("this model already has a pruner; call tokenprune.remove_pruner(model) first")
    adapter = adapter_for(model)
    config = config.for_depth(adapter.num_layers)  # a pyramid's layers follow the language model's depth
    check_placement(model, config.vision_stage is not None, config.spec.decode)
    if config.images_as_frames and config.vision_stage is not None and not adapter.frames_of_images:
        raise ValueError(
            f"images_as_frames with a vision method ({config.vision_stage.method!r}) runs on LLaVA-1.5; on "
            f"{type(model).__name__} give a decoder or kv method"
        )
    stages = adapter.stages(config)  # a layer outside the model or a budget larger than an image raises
    return Pruner(model, config, adapter, stages)


def remove_pruner(model: nn.Module) -> None:
    """Remove the pruner from ``model``; ``ValueError`` if it has none."""
    pruner = attached_pruner(model)
    if pruner is None:
        raise ValueError("this model has no pruner to remove")
    pruner.remove()


@contextlib.contextmanager
def pruned(model: nn.Module, method: str | PrunerConfig, **kwargs: object) -> Iterator[Pruner]:
    """``with pruned(model, "fastv", keep_ratio=0.25): ...`` applies a pruner and always removes it."""
    pruner = apply_pruner(model, method, **kwargs)
    try:
        yield pruner
    finally:
        pruner.remove()
