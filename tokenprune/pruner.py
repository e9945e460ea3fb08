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


class SelectionTimer:
    """The selection time of one forward (and, for a ``kv`` method, of its decode steps).

    On a CPU, wall time. On a GPU, a pair of CUDA events around each selection, read only when the total
    is asked for: timing never stalls the device (a synchronize around every selection would, and a
    decode step of a ``kv`` method selects in every layer).
    """

    _PENDING_LIMIT = 1024  # event pairs kept unread before the finished ones are added up

    def __init__(self) -> None:
        self._ms = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def measure(self, device: torch.device) -> Iterator[None]:
        """Add the enclosed work on ``device`` to the total."""
        if device.type != "cuda":
            start = time.perf_counter()
            yield
            self._ms += (time.perf_counter() - start) * 1e3
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((start, end))
        if len(self._events) > self._PENDING_LIMIT:
            self._add_up(wait=False)

    def _add_up(self, wait: bool) -> None:
        """Move the event pairs that have finished (all of them, waiting, if ``wait``) into the total."""
        pending = []
        for start, end in self._events:
            if wait or end.query():
                end.synchronize()
                self._ms += start.elapsed_time(end)
            else:
                pending.append((start, end))
        self._events = pending

    @property
    def ms(self) -> float:
        """The total in milliseconds, once the timed work has finished."""
        self._add_up(wait=True)
        return self._ms


@dataclass
class PruneStats:
    """What the last prefill did.

    Attributes:
        stage: ``vision``, ``pre_llm`` or ``llm`` (a composed config reports its decoder stage).
        layer: decoder layer where tokens were dropped (0 = before the language model, and for ``vision``;
            for a ``kv`` method, the first layer whose decode steps hide entries, 0 where each layer does).
        visual_tokens: visual tokens in each sample's prompt.
        kept_tokens: visual tokens kept for each sample.
        selection_ms: time of selection (scoring, top-k and layout), milliseconds: wall time on a CPU,
            CUDA events on a GPU (reading it waits for the selection to finish; timing never does).
        keep_mask: ``[B, L]`` bool over the original prompt, True for every token that reached the last
            pruning layer and the layers after it (``None`` for a text-only prompt).
        keep_masks: the same for every pruning layer of a schedule, by layer.
        decode_keep_masks: for a ``kv`` method, one entry per decode step since the prefill: by decoder
            layer, ``[B, L]`` bool over the prompt, True for the tokens that step's query attended to.
            ``kept_tokens`` then counts the visual tokens each step attends to, and ``selection_ms``
            adds up the selections of every step (steps run compiled are neither recorded nor timed).
    """

    stage: str
    layer: int
    visual_tokens: list[int] = field(default_factory=list)
    kept_tokens: list[int] = field(default_factory=list)
    timer: SelectionTimer = field(default_factory=SelectionTimer, repr=False)
    keep_mask: torch.Tensor | None = None
    keep_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    decode_keep_masks: list[dict[int, torch.Tensor]] = field(default_factory=list)

    @property
    def selection_ms(self) -> float:
        return self.timer.ms

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
        if config.images_as_frames:  # each stage's count follows the size of each prompt's video
            stages = [(layer, None) for layer, _ in stages]
        self.stages = stages  # (decoder layer, visual tokens kept per image); a vision stage is layer 0
        # a kv method prunes nothing at prefill (no stages): it attends to this many per decode step;
        # ``None`` where the count depends on each image's size (Qwen2-VL) or video's
        if stages:
            self.keep_per_image = stages[-1][1]
        elif adapter.tokens_per_image is not None and not config.images_as_frames:
            self.keep_per_image = config.kept_per_image(adapter.tokens_per_image)
        else:
            self.keep_per_image = None
        self.stats: PruneStats | None = None
        self._checked: set[str] = set()  # the contracts checked so far (see :meth:`checking`)
        self.begin_prefill()
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
        """Start timing (and, with ``checks="every"``, checking) a new forward's selection work."""
        self._timer = SelectionTimer()
        if self.config.checks == "every":
            self._checked = set()

    def checking(self, contract: str) -> bool:
        """Whether to check ``contract`` now, reading the device: at its first use by this pruner (or, with
        ``checks="every"``, of each forward), never in a compiled graph. A read stalls a GPU's queue: later
        forwards run on the trust the first one earned."""
        if torch.compiler.is_compiling() or contract in self._checked:
            return False
        self._checked.add(contract)
        return True

    @contextlib.contextmanager
    def timed_selection(self) -> Iterator[None]:
        """Add the enclosed selection work to this forward's selection time (see :class:`SelectionTimer`).
        Not timed inside a compiled graph (a decode step of a ``kv`` method), which cannot record events."""
        with torch.no_grad():
            if torch.compiler.is_compiling():
                yield
                return
            with self._timer.measure(next(self.model.parameters()).device):
                yield

    def select(self, ctx: SelectionContext, keep: int) -> torch.Tensor | Merged:
        """Keep indices ``[I, keep]`` for the images in ``ctx``, from the decoder-stage method (in a
        :class:`Merged` for a merging one, whose features replace the kept tokens' hidden states)."""
        return self.select_with(self.config, ctx, keep)

    def select_with(self, config: PrunerConfig, ctx: SelectionContext, keep: int) -> torch.Tensor | Merged:
        """What ``config``'s method keeps (or merges) of the images in ``ctx``. The answer's values are
        checked at the method's first selection only (see :meth:`checking`): a check reads the device, and a
        merging tower or a decode step selects in every layer."""
        check = self.checking(f"{config.method}'s answer")
        return config.spec.select(ctx, keep, config.options, check_values=check)

    def record_encoder(self, visual: list[int], kept: list[int]) -> None:
        """Record the vision stage of the current forward (a VLM's decoder stages then add to it)."""
        self.stats = PruneStats(
            stage="vision", layer=0, visual_tokens=visual, kept_tokens=kept, timer=self._timer
        )

    def record_prefill(self, visual: list[int], kept: list[int], keep_masks: dict[int, torch.Tensor]) -> None:
        """Record a pruning stage of the current prefill; ``selection_ms`` covers all of its stages."""
        self.stats = PruneStats(
            stage=self.config.stage,
            layer=self.config.acting_layer,
            visual_tokens=visual,
            kept_tokens=kept,
            timer=self._timer,
            keep_mask=keep_masks[max(keep_masks)],
            keep_masks=keep_masks,
        )

    def record_decode_prompt(self, visual: list[int], attended: list[int]) -> None:
        """Record the unpruned prefill of a ``kv`` method: visual tokens, and those each step attends to."""
        self.stats = PruneStats(
            stage=self.config.stage,
            layer=self.config.acting_layer,  # 0, or the first layer whose steps hide entries
            visual_tokens=visual,
            kept_tokens=attended,
            timer=self._timer,
        )

    def record_decode_step(self, visible: dict[int, torch.Tensor]) -> None:
        """Record one decode step of a ``kv`` method: the prompt tokens each layer attended to."""
        if self.stats is not None:
            self.stats.decode_keep_masks.append(visible)

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
