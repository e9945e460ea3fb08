"""The suites ``tokenprune eval --suite`` scores a model on: what a run needs of each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import shapes_model, suite, video_model, video_suite
from .accuracy import accuracy_by_kind, score


@dataclass(frozen=True)
class SuiteRun:
    """What a run on one suite needs of it.

    ``kinds``: its question kinds (a results column each); ``count``: the default number of questions;
    ``model``: the name of the shipped model trained on it (``--model``'s default); ``media``: what its
    visual tokens come from (``images`` or ``videos``), ``unit`` names one in tables; ``processor`` loads
    a checkpoint's processor (or inputs builder) from its directory; ``examples(seed, count)`` draws a
    split; ``score(model, processor, examples, batch_size)`` gives the accuracy per kind and ``"all"``;
    ``timing_batch(processor, examples, batch_size)`` builds the prefill-timing batch.
    """

    name: str
    kinds: tuple[str, ...]
    count: int
    model: str
    media: str
    unit: str
    processor: Callable
    examples: Callable
    score: Callable
    timing_batch: Callable


def _shapes_run() -> SuiteRun:
    from transformers import AutoProcessor

    return SuiteRun(
        name="shapes",
        kinds=suite.KINDS,
        count=600,
        model="shapes",
        media="images",
        unit="image",
        processor=AutoProcessor.from_pretrained,
        examples=suite.examples,
        score=score,
        timing_batch=lambda processor, examples, size: next(shapes_model.batches(processor, examples, size))[
            1
        ],
    )


def _video_score(model, inputs, examples, batch_size: int) -> dict[str, float]:
    replies = video_model.answers(model, inputs, examples, batch_size)
    return accuracy_by_kind(examples, replies, video_suite.KINDS)


def _video_run() -> SuiteRun:
    return SuiteRun(
        name="video",
        kinds=video_suite.KINDS,
        count=350,
        model="video",
        media="videos",
        unit="clip",
        processor=video_model.VideoInputs.from_pretrained,
        examples=video_suite.examples,
        score=_video_score,
        timing_batch=lambda inputs, examples, size: inputs.questions(examples[:size]),
    )


#: The suites ``tokenprune eval --suite`` runs, by name.
SUITES = {"shapes": _shapes_run, "video": _video_run}


def suite_run(name: str) -> SuiteRun:
    """The :class:`SuiteRun` of the suite ``name`` (a key of :data:`SUITES`)."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; the suites are {', '.join(SUITES)}")
    return SUITES[name]()
