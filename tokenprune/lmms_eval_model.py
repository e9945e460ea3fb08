"""The ``tokenprune`` model of lmms-eval: a local checkpoint evaluated with a visual-token pruner.

Needs the ``[lmms]`` extra. lmms-eval finds the model through the ``lmms_eval.models`` entry point
(:func:`manifests`), so after ``pip install -e ".[lmms]"``::

    python -m lmms_eval --model tokenprune \\
        --model_args pretrained=/models/llava-1.5-7b-hf,method=dart,keep_ratio=0.111 \\
        --tasks mme --batch_size 8

``model_args`` are read by :func:`tokenprune.pruned_vlm.parse_model_args` (``method=none`` is the
unpruned baseline); loading, batched generation and scoring are :class:`tokenprune.pruned_vlm.PrunedVLM`'s.
It answers ``generate_until`` and ``loglikelihood`` requests over images (or no visual). lmms-eval 0.7.3's
evaluator turns every answer that is not text into a string, so its multiple-choice tasks cannot score
the ``loglikelihood`` answers of any model yet.
"""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from tqdm import tqdm

from .pruned_vlm import Continuation, PrunedVLM, Request, generation, parse_model_args

MODEL_ID = "tokenprune"


def manifests() -> list[ModelManifest]:
    """The entry point of group ``lmms_eval.models``: the manifest naming :class:`TokenPruneLMM` as the
    implementation of ``--model tokenprune`` (a "simple" model: lmms-eval hands it a task's text prompt
    and visuals, and the model applies its own chat template)."""
    return [ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{TokenPruneLMM.__name__}")]


class TokenPruneLMM(lmms):
    """lmms-eval's view of a :class:`PrunedVLM`: ``model_args`` in, replies to ``generate_until`` and scores
    of ``loglikelihood`` out."""

    is_simple = True

    def __init__(self, **model_args: object) -> None:
        super().__init__()
        args = parse_model_args(model_args)
        self.vlm = PrunedVLM.load(args)
        self.max_new_tokens = args.max_new_tokens

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """The reply to each request, in order, generated in batches of ``batch_size``.

        A request's ``args`` are ``(text, generation_kwargs, doc_to_visual, doc_id, task, split)``; its
        images are ``doc_to_visual`` of the document lmms-eval stored in ``task_dict``.
        """
        prepared = [self._request(instance) for instance in requests]
        with tqdm(total=len(prepared), disable=self.rank != 0, desc="tokenprune") as bar:
            replies = self.vlm.answer(prepared, progress=bar.update)
        for instance, reply in zip(requests, replies, strict=True):
            self.cache_hook.add_partial("generate_until", instance.args[:2], reply)
        return replies

    def _request(self, instance: Instance) -> Request:
        text, gen_kwargs, doc_to_visual, doc_id, task, split = instance.args
        images = self._images(doc_to_visual(self.task_dict[task][split][doc_id]), task)
        return Request(text, images, generation(gen_kwargs, self.max_new_tokens))

    @staticmethod
    def _images(visuals: list | None, task: str) -> tuple[Image.Image, ...]:
        """A document's visuals as RGB images; ``ValueError`` for any other kind of visual."""
        visuals = visuals or []
        others = [type(visual).__name__ for visual in visuals if not isinstance(visual, Image.Image)]
        if others:
            raise ValueError(
                f"the tokenprune model takes images only; task {task!r} gave {', '.join(sorted(set(others)))}"
            )
        return tuple(visual.convert("RGB") for visual in visuals)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """For each request, the negative log-likelihood of its continuation after its context (summed over
        the continuation's tokens) and whether greedy decoding would produce it, scored in batches of
        ``batch_size`` (see :meth:`PrunedVLM.score <tokenprune.pruned_vlm.PrunedVLM.score>`).

        Negative, as lmms-eval 0.7's models return it: its ``multiple_choice`` tasks pick the choice with
        the smallest value. A request's ``args`` are ``(context, continuation, doc_to_visual, doc_id, task,
        split)``; the continuation is a string, or lmms-eval's ``doc_to_target``, a function of the document.
        """
        prepared = []
        for instance in requests:
            context, continuation, doc_to_visual, doc_id, task, split = instance.args
            doc = self.task_dict[task][split][doc_id]
            if not isinstance(continuation, str):
                continuation = continuation(doc)
            prepared.append(Continuation(context, self._images(doc_to_visual(doc), task), continuation))
        with tqdm(total=len(prepared), disable=self.rank != 0, desc="tokenprune") as bar:
            scores = [(-logprob, greedy) for logprob, greedy in self.vlm.loglikelihood(prepared, bar.update)]
        for request, score in zip(prepared, scores, strict=True):
            self.cache_hook.add_partial("loglikelihood", (request.text, request.continuation), score)
        return scores

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "the tokenprune model answers single-round generate_until tasks only; multi-round generation "
            "is not implemented"
        )
