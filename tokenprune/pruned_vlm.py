"""A local VLM checkpoint with an optional pruner, answering batches of questions about images.

This is the part of the lmms-eval model (:mod:`tokenprune.lmms_eval_model`) that needs no lmms-eval:
reading its ``model_args`` and a task's generation settings, grouping requests into batches, and
generating with left padding through the processor's chat template. It works for any checkpoint that
``AutoModelForImageTextToText`` and ``AutoProcessor`` load and that tokenprune has an adapter for
(LLaVA, LLaVA-NeXT/OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence

import torch
from PIL import Image
from transformers import LogitsProcessor

from .api import apply_pruner
from .config import PrunerConfig
from .pruner import Pruner

#: The ``method`` that runs the model unpruned (the baseline of a retention figure).
UNPRUNED = "none"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The ``model_args`` keys with a meaning of their own; every other key is an option of the method.
MODEL_KEYS = (
    "pretrained",
    "method",
    "keep_ratio",
    "budget",
    "layer",
    "batch_size",
    "device",
    "dtype",
    "max_new_tokens",
)
DEFAULT_MAX_NEW_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """What ``model_args`` asked for: the checkpoint, the pruner (``None``: unpruned) and how to run."""

    pretrained: str
    pruner: PrunerConfig | None
    batch_size: int = 1
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS


def parse_model_args(args: Mapping[str, object]) -> ModelArgs:
    """The :class:`ModelArgs` of lmms-eval's ``model_args`` (already split into ``key: value``).

    ``method`` defaults to ``none`` (unpruned); with a method, ``keep_ratio`` or ``budget`` is required
    and ``layer`` and the method's own options (``pivots=8`` for dart) may follow. The pruner config is
    checked here, before any checkpoint is loaded; every mistake raises ``ValueError`` naming the fix.
    """
    values = {key: value for key, value in args.items() if value is not None}
    pretrained = values.pop("pretrained", None)
    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(
            "model_args needs pretrained=PATH, a checkpoint directory that "
            "AutoModelForImageTextToText.from_pretrained loads (e.g. pretrained=/models/llava-1.5-7b-hf)"
        )
    method = values.pop("method", UNPRUNED)
    batch_size = _positive_int(values.pop("batch_size", 1), "batch_size", "requests per generate call")
    max_new_tokens = _positive_int(
        values.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
        "max_new_tokens",
        "new tokens per reply where a task sets none",
    )
    device = str(values.pop("device", "cpu"))
    dtype = values.pop("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"model_args dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    pruning = {key: values.pop(key) for key in ("keep_ratio", "budget", "layer") if key in values}
    if method == UNPRUNED:
        if pruning or values:
            raise ValueError(
                f"method=none runs the model unpruned, so {', '.join(sorted({*pruning, *values}))} has no "
                "effect: remove it, or name a method (e.g. method=dart,keep_ratio=0.25)"
            )
        pruner = None
    else:
        try:
            pruner = PrunerConfig(method, **pruning, options=values)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"model_args do not make a pruner: {error} (model_args keys: {', '.join(MODEL_KEYS)}; any "
                "other key is an option of the method)"
            ) from error
    return ModelArgs(pretrained, pruner, batch_size, device, DTYPES[dtype], max_new_tokens)


def _positive_int(value: object, name: str, meaning: str) -> int:
    """``value`` as an int >= 1 (lmms-eval's CLI passes ``batch_size`` as a string)."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model_args {name} ({meaning}) must be an int >= 1, e.g. {name}=8; got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Generation:
    """How one request is generated. Hashable: requests with equal settings share a batch.

    ``until`` holds the strings at whose first occurrence a reply is cut; greedy decoding unless
    ``temperature > 0`` and ``do_sample``.
    """

    until: tuple[str, ...] = ()
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1
    do_sample: bool = False

    def generate_kwargs(self) -> dict[str, object]:
        """The keyword arguments of ``model.generate`` for these settings."""
        kwargs: dict[str, object] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        if self.do_sample and self.temperature > 0:
            return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        return {**kwargs, "do_sample": False}


def generation(gen_kwargs: Mapping[str, object], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Generation:
    """The :class:`Generation` of a task's ``generation_kwargs``; ``max_new_tokens`` where it sets none.

    Reads ``until`` (a string or a list of strings), ``max_new_tokens``, ``temperature``, ``top_p``,
    ``num_beams`` and ``do_sample``; other keys (image options of other model classes) are ignored.
    """
    until = gen_kwargs.get("until") or ()
    if isinstance(until, str):
        until = (until,)
    if not isinstance(until, (list, tuple)) or not all(isinstance(stop, str) for stop in until):
        raise ValueError(f"generation_kwargs until must be a string or a list of strings, got {until!r}")
    return Generation(
        until=tuple(until),
        max_new_tokens=int(gen_kwargs.get("max_new_tokens", max_new_tokens)),
        temperature=float(gen_kwargs.get("temperature") or 0.0),
        top_p=float(gen_kwargs.get("top_p") or 1.0),
        num_beams=int(gen_kwargs.get("num_beams") or 1),
        do_sample=bool(gen_kwargs.get("do_sample", False)),
    )


def truncate(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any non-empty string of ``until`` (all of it if none occurs)."""
    cut = min((text.find(stop) for stop in until if stop and stop in text), default=len(text))
    return text[:cut]


def batches(keys: Sequence[Hashable], size: int) -> list[list[int]]:
    """Indices of ``keys`` in batches of at most ``size``, each batch holding equal keys only.

    Groups appear in order of their first index and keep their indices in order, so a batch never mixes
    generation settings and the replies can be put back in request order.
    """
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return [group[start : start + size] for group in groups.values() for start in range(0, len(group), size)]


def chat_prompt(processor, text: str, num_images: int = 1) -> str:
    """The processor's chat prompt of one user turn showing ``num_images`` images, then ``text``, ending
    where the reply starts."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    conversation = [{"role": "user", "content": content}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


@dataclasses.dataclass(frozen=True)
class Request:
    """One question: its text, its images (in the order the prompt shows them) and how to generate."""

    text: str
    images: tuple[Image.Image, ...]
    generation: Generation


@dataclasses.dataclass(frozen=True)
class Continuation:
    """A text to score after a question: the question, its images and the continuation (appended to the
    chat prompt as it is, so a leading space is the caller's)."""

    text: str
    images: tuple[Image.Image, ...]
    continuation: str


def _as_list(ids: int | list[int] | None) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


class _Forced(LogitsProcessor):
    """Forces step ``t`` of ``generate`` to emit ``tokens[:, t]`` (``[B, C]``), the prompt being
    ``prompt_length`` tokens long."""

    def __init__(self, tokens: torch.Tensor, prompt_length: int) -> None:
        self.tokens, self.prompt_length = tokens, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, self.tokens[:, step : step + 1], 0.0)


class PrunedVLM:
    """A checkpoint, its processor and (unless unpruned) a pruner, answering batches of :class:`Request`."""

    def __init__(self, model, processor, pruner: Pruner | None, batch_size: int = 1):
        self.model = model
        self.processor = processor
        self.pruner = pruner
        self.batch_size = batch_size
        processor.tokenizer.padding_side = "left"

    @classmethod
    def load(cls, args: ModelArgs) -> PrunedVLM:
        """Load ``args.pretrained`` with its processor on ``args.device`` and apply ``args.pruner``.

        ``apply_pruner`` checks the pruner against the model (its family, layers and image size) before
        any request runs, so a budget larger than an image fails here rather than mid-evaluation.
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(args.pretrained)
        model = AutoModelForImageTextToText.from_pretrained(args.pretrained, dtype=args.dtype)
        model = model.to(args.device).eval()
        pruner = None if args.pruner is None else apply_pruner(model, args.pruner)
        return cls(model, processor, pruner, args.batch_size)

    @torch.no_grad()
    def generate(self, requests: Sequence[Request]) -> list[str]:
        """The replies to one batch of requests sharing one :class:`Generation`: the decoded new tokens,
        cut at the first ``until`` string and stripped."""
        settings = requests[0].generation
        images = [image for request in requests for image in request.images]
        prompts = [chat_prompt(self.processor, request.text, len(request.images)) for request in requests]
        inputs = self._inputs(prompts, images)
        output = self.model.generate(**inputs, **settings.generate_kwargs())
        new = output[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        return [truncate(text, settings.until).strip() for text in texts]

    def answer(self, requests: Sequence[Request], progress: Callable[[int], None] | None = None) -> list[str]:
        """The reply to every request, in request order.

        Requests with equal generation settings share batches of ``batch_size``; ``progress`` is called
        with the size of each batch once it is answered.
        """
        replies = [""] * len(requests)
        for batch in batches([request.generation for request in requests], self.batch_size):
            for index, reply in zip(batch, self.generate([requests[i] for i in batch]), strict=True):
                replies[index] = reply
            if progress is not None:
                progress(len(batch))
        return replies

    @torch.no_grad()
    def score(self, requests: Sequence[Continuation]) -> list[tuple[float, bool]]:
        """For one batch of requests: the log-probability of each continuation after its prompt (summed
        over its tokens) and whether greedy decoding would produce exactly those tokens.

        The prompt is the chat prompt of the request's question and images, ending where the reply starts;
        the continuation's tokens are those that the prompt followed by the continuation has beyond the
        prompt's own. They are scored as ``generate`` would produce them, each step forced to the next one:
        the pruner chooses the visual tokens from the prompt alone, as it does when answering (a forward
        over prompt and continuation would let each candidate answer choose the tokens that favour it).
        """
        images = [image for request in requests for image in request.images]
        prompts = [chat_prompt(self.processor, request.text, len(request.images)) for request in requests]
        inputs = self._inputs(prompts, images)
        whole = self._inputs(
            [prompt + request.continuation for prompt, request in zip(prompts, requests, strict=True)], images
        )
        counts = (whole["attention_mask"].sum(dim=1) - inputs["attention_mask"].sum(dim=1)).tolist()
        pad = self.processor.tokenizer.pad_token_id
        tokens = torch.full((len(requests), max(counts)), pad, device=self.model.device)  # [B, C]
        eos = self.model.generation_config.eos_token_id
        for row, count in enumerate(counts):
            if count < 1:
                raise ValueError(f"continuation {requests[row].continuation!r} adds no token to its prompt")
            tokens[row, :count] = whole["input_ids"][row, -count:]
            if any(token in _as_list(eos) for token in tokens[row, : count - 1].tolist()):
                raise ValueError(
                    f"continuation {requests[row].continuation!r} holds the end-of-sequence token before its "
                    "end (generate would stop there)"
                )
        output = self.model.generate(
            **inputs,
            max_new_tokens=tokens.shape[1],
            do_sample=False,
            logits_processor=[_Forced(tokens, inputs["input_ids"].shape[1])],
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=pad,
        )
        logits = torch.stack(output.logits, dim=1).float()  # [B, C, V] before the forcing
        logprobs = logits.log_softmax(dim=-1).gather(2, tokens[..., None])[..., 0]  # [B, C]
        greedy = logits.argmax(dim=-1) == tokens
        return [
            (float(logprobs[row, :count].sum()), bool(greedy[row, :count].all()))
            for row, count in enumerate(counts)
        ]

    def loglikelihood(
        self, requests: Sequence[Continuation], progress: Callable[[int], None] | None = None
    ) -> list[tuple[float, bool]]:
        """:meth:`score` of every request, in request order, in batches of ``batch_size``; ``progress`` is
        called with the size of each batch once it is scored."""
        scores = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            scores += self.score(batch)
            if progress is not None:
                progress(len(batch))
        return scores

    def _inputs(self, texts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """The processor's left-padded batch of ``texts`` showing ``images``, on the model's device."""
        return self.processor(images=images or None, text=texts, return_tensors="pt", padding=True).to(
            self.model.device, dtype=self.model.dtype
        )

    def close(self) -> None:
        """Remove the pruner (if any), leaving the model as loaded."""
        if self.pruner is not None:
            self.pruner.remove()
            self.pruner = None
