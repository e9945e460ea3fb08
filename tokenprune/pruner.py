"""The ``Pruner``: one method, applied to one model through its family adapter, with statistics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import PrunerConfig
from .context import Merged, SelectionContext

_ATTRIBUTE = "_tokenprune_pruner"


@dataclass
class PruneStats:
    """What the last prefill did.

    Attributes:
        stage: ``vision``, ``pre_llm`` or ``llm`` (a composed config reports its decoder stage).
        layer: decoder layer where tokens were dropped (0 = before the language model, and for ``vision``).
        visual_tokens: visual tokens in each sample's prompt.
        kept_tokens: visual tokens kept for each sample.
        selection_ms: wall time of selection (scoring, top-k and layout), milliseconds.
        keep_mask: ``[B, L]`` bool over the original prompt, True for every token that reached the last
            pruning layer and the layers after it (``None`` for a text-only prompt).
        keep_masks: the same for every pruning layer of a schedule, by layer.
        decode_keep_masks: for a ``kv`` method, one entry per decode step since the prefill: by decoder
            layer, ``[B, L]`` bool over the prompt, True for the tokens that step's query attended to.
            ``kept_tokens`` then counts the visual tokens each step attends to, and ``selection_ms``
            adds up the selections of every step.
    """

    stage: str
    layer: int
    visual_tokens: list[int] = field(default_factory=list)
    kept_tokens: list[int] = field(default_factory=list)
    selection_ms: float = 0.0
    keep_mask: torch.Tensor | None = None
    keep_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    decode_keep_masks: list[dict[int, torch.Tensor]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """The numbers, without the mask: for printing or JSON."""
        return {
            "stage": self.stage,
            "layer": self.layer,
            "visual_tokens": self.visual_tokens,
            "kept_tokens": self.kept_tokens,
            "selection_ms": round(self.selection_ms, 3),
        }


class Pruner:
    """A method applied to a model. Made by :func:`tokenprune.apply_pruner`; undone by :meth:`remove`."""

    def __init__(
        self, model: nn.Module, config: PrunerConfig, adapter, stages: list[tuple[int, int]]
    ) -> None:
        self.model = model
        self.config = config
        self.adapter = adapter
        self.stages = stages  # (decoder layer, visual tokens kept per image); a vision stage is layer 0
        # a kv method prunes nothing at prefill (no stages): it attends to this many per decode step;
        # ``None`` where the count depends on each image's size (Qwen2-VL)
        if stages:
            self.keep_per_image = stages[-1][1]
        elif adapter.tokens_per_image is not None:
            self.keep_per_image = config.kept_per_image(adapter.tokens_per_image)
        else:
            self.keep_per_image = None
        self.stats: PruneStats | None = None
        self._selection_ms = 0.0
        self._handles = adapter.attach(self)
        setattr(model, _ATTRIBUTE, self)

    def __repr__(self) -> str:
        return (
            f"Pruner({self.config.method!r}, keep={self.keep_per_image or 'per image'}/"
            f"{self.adapter.tokens_per_image or 'per image'}, "
            f"layer={self.config.acting_layer})"
        )

    def remove(self) -> None:
        """Remove every hook; the model computes exactly what it did before :func:`apply_pruner`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if getattr(self.model, _ATTRIBUTE, None) is self:
            delattr(self.model, _ATTRIBUTE)

    # -- called by adapters ---------------------------------------------------------------------

    def begin_prefill(self) -> None:
        """Start timing a new forward's selection work."""
        self._selection_ms = 0.0

    @contextlib.contextmanager
    def timed_selection(self) -> Iterator[None]:
        """Add the enclosed selection work to this forward's time (synchronising the device so the time
        is real). Not timed inside a compiled graph (a decode step of a ``kv`` method), which cannot wait
        for the device."""
        if torch.compiler.is_compiling():
            with torch.no_grad():
                yield
            return
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self._selection_ms += (time.perf_counter() - start) * 1e3

    def select(self, ctx: SelectionContext, keep: int) -> torch.Tensor:
        """Keep indices ``[I, keep]`` for the images in ``ctx``, from the decoder-stage method."""
        return self.select_with(self.config, ctx, keep)

    @staticmethod
    def select_with(config: PrunerConfig, ctx: SelectionContext, keep: int) -> torch.Tensor | Merged:
        """What ``config``'s method keeps (or merges) of the images in ``ctx``."""
        return config.spec.select(ctx, keep, config.options)

    def record_encoder(self, visual: list[int], kept: list[int]) -> None:
        """Record the vision stage of the current forward (a VLM's decoder stages then add to it)."""
        self.stats = PruneStats(
            stage="vision", layer=0, visual_tokens=visual, kept_tokens=kept, selection_ms=self._selection_ms
        )

    def record_prefill(self, visual: list[int], kept: list[int], keep_masks: dict[int, torch.Tensor]) -> None:
        """Record a pruning stage of the current prefill; ``selection_ms`` covers all of its stages."""
        self.stats = PruneStats(
            stage=self.config.stage,
            layer=self.config.acting_layer,
            visual_tokens=visual,
            kept_tokens=kept,
            selection_ms=self._selection_ms,
            keep_mask=keep_masks[max(keep_masks)],
            keep_masks=keep_masks,
        )

    def record_decode_prompt(self, visual: list[int], attended: list[int]) -> None:
        """Record the unpruned prefill of a ``kv`` method: visual tokens, and those each step attends to."""
        self.stats = PruneStats(stage=self.config.stage, layer=0, visual_tokens=visual, kept_tokens=attended)

    def record_decode_step(self, visible: dict[int, torch.Tensor]) -> None:
        """Record one decode step of a ``kv`` method: the prompt tokens each layer attended to."""
        if self.stats is not None:
            self.stats.decode_keep_masks.append(visible)
            self.stats.selection_ms = self._selection_ms

    def record_text_only(self, batch_size: int) -> None:
        self.stats = PruneStats(
            stage=self.config.stage,
            layer=self.config.acting_layer,
            visual_tokens=[0] * batch_size,
            kept_tokens=[0] * batch_size,
        )


def attached_pruner(model: nn.Module) -> Pruner | None:
    """The pruner applied to ``model``, if any."""
    return getattr(model, _ATTRIBUTE, None)
