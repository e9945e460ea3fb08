"""The model behind the server: prepares each request's inputs, and generates for a batch of them with
the request's pruner, streaming every row's new text as it comes.

:meth:`Engine.prepare` runs per request (processor, prompt length check) and raises
:class:`~tokenprune.serve.protocol.RequestError`; :meth:`Engine.generate` runs one batch in the worker
thread, grouped by pruner config and sampling settings, and never raises into the server: a failure is
delivered to each request of the batch as an event.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from ..api import apply_pruner
from ..compile import compiled_decoding
from ..config import PrunerConfig
from ..patches import adapter_for
from ..pruner import Pruner
from .metrics import Metrics
from .protocol import Limits, RequestError, without_reprs

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request on its way through the batcher: its inputs, settings, and where its events go.

    Events put on ``events`` (from the worker thread, through ``loop``): ``("delta", text)`` per new
    piece of text, then ``("done", Completion)`` or ``("error", message)``.
    """

    input_ids: torch.Tensor  # [L]
    pixel_values: torch.Tensor | None  # [images, 3, H, W]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    config: PrunerConfig | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def emit(self, kind: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    @property
    def group(self) -> tuple:
        """Jobs of one group generate as one batch: same pruner and sampling settings."""
        return (repr(self.config), self.temperature, self.top_p, self.seed)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    visual_tokens: int
    kept_visual_tokens: int


class _RowStreamer(BaseStreamer):
    """Receives each step's new tokens for the whole batch from ``generate`` and hands them to a callback."""

    def __init__(self, on_step: Callable[[list[int]], None]):
        self.on_step = on_step
        self.prompt_seen = False
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first passes the prompt itself
            self.prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.on_step(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class _Row:
    """The text of one batch row so far; emits the new text after each token until the row stops."""

    def __init__(self, job: Job, tokenizer: Any, eos: set[int]):
        self.job, self.tokenizer, self.eos = job, tokenizer, eos
        self.ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    def add(self, token: int) -> None:
        if self.finish_reason is not None:
            return
        if token in self.eos:
            self.finish_reason = "stop"
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.text) and text.startswith(self.text):
            self.job.emit("delta", text[len(self.text) :])
            self.text = text
        if len(self.ids) >= self.job.max_new_tokens:
            self.finish_reason = "length"


class Engine:
    """A loaded VLM and its processor, with the server's default pruner config and limits."""

    def __init__(
        self,
        model,
        processor,
        name: str,
        default: PrunerConfig | None,
        limits: Limits,
        metrics: Metrics,
        compile: bool = False,
    ):
        self.model, self.processor, self.name = model, processor, name
        self.default, self.limits, self.metrics = default, limits, metrics
        self.tokenizer = processor.tokenizer
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.device = next(model.parameters()).device
        self.decoding = compiled_decoding(self.device) if compile else {}  # generate's cache and compile args
        self._lock = threading.Lock()  # one batch on the model at a time
        self._checked: set[str] = set()  # configs known to run on this model
        self._pruner: Pruner | None = None  # attached to the model for the last batch's config

    def check(self, config: PrunerConfig | None) -> None:
        """``RequestError`` if ``config`` cannot run on this model (a budget over an image, a layer past
        the decoder...); checked without touching the model, which may be generating."""
        if config is None or repr(config) in self._checked:
            return
        try:
            adapter = adapter_for(self.model)
            adapter.stages(config.for_depth(adapter.num_layers))
        except (ValueError, TypeError) as error:
            raise RequestError(str(error), param="tokenprune") from error
        self._checked.add(repr(config))

    def prepare(
        self, messages: list[dict], images: list, max_tokens: int | None
    ) -> tuple[torch.Tensor, Any, int]:
        """``(input_ids [L], pixel_values or None, max_new_tokens)`` of one request; ``RequestError`` for a
        prompt over the limit or inputs the processor refuses."""
        max_new = min(max_tokens or self.limits.max_new_tokens, self.limits.max_new_tokens)
        try:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(images=images or None, text=text, return_tensors="pt")
        except (ValueError, TypeError) as error:
            raise RequestError(f"the processor refused the request: {error}", param="messages") from error
        input_ids = inputs["input_ids"][0]
        if input_ids.numel() > self.limits.max_prompt_tokens:
            raise RequestError(
                f"the prompt is {input_ids.numel()} tokens; this server takes at most "
                f"{self.limits.max_prompt_tokens}",
                param="messages",
                code="context_length_exceeded",
            )
        return input_ids, inputs.get("pixel_values"), max_new

    def generate(self, jobs: list[Job]) -> None:
        """Generate for ``jobs`` (called in the worker thread), one batch per group of settings."""
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.group, []).append(job)
        with self._lock:
            for group in groups.values():
                try:
                    self._generate_group(group)
                except Exception as error:  # noqa: BLE001 (delivered to the clients, never kills the worker)
                    log.exception("generation failed for a batch of %d requests", len(group))
                    message = without_reprs(f"generation failed: {type(error).__name__}: {error}")
                    for job in group:
                        job.emit("error", message)

    def _generate_group(self, jobs: list[Job]) -> None:
        length = max(job.input_ids.numel() for job in jobs)
        input_ids = torch.full((len(jobs), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(jobs), length, dtype=torch.long)
        for b, job in enumerate(jobs):  # left padding
            input_ids[b, length - job.input_ids.numel() :] = job.input_ids
            attention_mask[b, length - job.input_ids.numel() :] = 1
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        pixels = [job.pixel_values for job in jobs if job.pixel_values is not None]
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.device, self.model.dtype)
        first = jobs[0]
        sampling = {"do_sample": first.temperature > 0}
        if first.temperature > 0:
            sampling.update(temperature=first.temperature, top_p=first.top_p)
        rows = [_Row(job, self.tokenizer, self.eos) for job in jobs]
        streamer = _RowStreamer(lambda tokens: [row.add(t) for row, t in zip(rows, tokens, strict=True)])
        if first.seed is not None:
            torch.manual_seed(first.seed)
        start = time.perf_counter()
        pruner = self._pruner_for(first.config)
        with torch.no_grad():
            self.model.generate(
                **inputs,
                max_new_tokens=max(job.max_new_tokens for job in jobs),
                pad_token_id=self.pad_id,
                streamer=streamer,
                **sampling,
                **self.decoding,
            )
        stats = pruner.stats if pruner is not None else None
        end = time.perf_counter()
        visual = self._visual_counts(input_ids, stats)
        first_token = streamer.first_token_at or end
        self.metrics.batch(
            size=len(jobs),
            visual=sum(v for v, _ in visual),
            kept=sum(k for _, k in visual),
            prefill_s=first_token - start,
            decode_s=end - first_token,
            generated=sum(len(row.ids) for row in rows),
        )
        for row, (before, after) in zip(rows, visual, strict=True):
            completion = Completion(
                text=row.text,
                finish_reason=row.finish_reason or "length",
                prompt_tokens=row.job.input_ids.numel(),
                completion_tokens=len(row.ids),
                visual_tokens=before,
                kept_visual_tokens=after,
            )
            row.job.emit("done", completion)

    def _pruner_for(self, config: PrunerConfig | None) -> Pruner | None:
        """The model's pruner for ``config`` (``None``: unpruned). It stays attached between batches and is
        replaced only when a batch asks for another config, so the hooks are not set up per batch."""
        if self._pruner is not None and repr(self._pruner.config) == repr(config):
            return self._pruner
        if self._pruner is not None:
            self._pruner.remove()
            self._pruner = None
        if config is not None:
            self._pruner = apply_pruner(self.model, config)
        return self._pruner

    def _visual_counts(self, input_ids: torch.Tensor, stats) -> list[tuple[int, int]]:
        """Per row: visual tokens in the prompt, and those the pruner kept (all, without a pruner)."""
        if stats is not None and stats.visual_tokens:
            return list(zip(stats.visual_tokens, stats.kept_tokens, strict=True))
        counts = (input_ids == self.model.config.image_token_id).sum(dim=1).tolist()
        return [(n, n) for n in counts]
