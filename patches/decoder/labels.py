"""Labels and the loss: a generation head's loss over the rows the pruned language model returns.

The head's own loss would pair the logits of the pruned rows with the labels of the unpruned prompt.
:class:`LabelHooks` takes the labels away from the head before its forward, checks them against the
prompt before any decoder layer runs, and computes the loss after it over the rows that came back: the
loss of the unpruned model with the dropped tokens hidden from attention, over the same targets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .. import _internals as internals
from .layout import Call

#: The label of a token that is no target (transformers' loss ignores it).
IGNORE_INDEX = -100


class LabelHooks:
    """The hooks on one generation head that compute its loss over the rows its language model returns."""

    def __init__(self, head: internals.HeadLabels):
        self._head = head
        # the target of each prompt token's logits [B, L] in the head's current call (where it has labels),
        # and the rows its language model returned (their prompt positions [B, L'] and which are prompt
        # tokens, not re-padding)
        self.targets: torch.Tensor | None = None
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, model: nn.Module) -> LabelHooks | None:
        """Label hooks for ``model`` where it is a generation head that computes the loss of labels (read
        here, so that a head whose loss moved fails before any hook is placed), else ``None``."""
        head = internals.HeadLabels.of(model)
        return None if head is None else cls(head)

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        """Register the hooks on the head ``model``; returns their handles."""
        return [
            model.register_forward_pre_hook(self._take_labels, with_kwargs=True),
            model.register_forward_hook(self._loss_over_kept_rows, with_kwargs=True),
        ]

    def returned(self, call: Call) -> None:
        """Remember the rows the language model returned for a prefill ``call`` with images."""
        if self.targets is not None:
            self._rows = call.origin, call.real

    def _take_labels(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        labels, args, kwargs = self._head.take(args, kwargs)
        self.targets = None if labels is None else self._head.targets(labels, kwargs, IGNORE_INDEX)
        self._rows = None
        return args, kwargs

    def _loss_over_kept_rows(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """The head's output with the loss of its labels: the logits of each returned row against the target
        of that row's prompt token (the label of the token after it, as the unpruned head pairs them), none
        for re-padding. The loss is that of the unpruned model with the dropped tokens hidden from attention,
        over the same targets (:meth:`check` makes sure no target's predicting token was dropped)."""
        targets, self.targets = self.targets, None
        rows, self._rows = self._rows, None
        if targets is None:
            return None
        logits = output[0] if isinstance(output, tuple) else output.logits
        if rows is not None:
            origin, real = rows
            targets = torch.where(real, torch.gather(targets.to(origin.device), 1, origin), IGNORE_INDEX)
        return internals.with_loss(output, self._head.loss(module, logits, targets, kwargs))

    def check(self, call: Call, drops_tokens: Callable[[], bool]) -> None:
        """``ValueError`` for labels this pruner cannot compute the loss of, before any decoder layer runs:
        not shaped like the prompt, or a target right after a token that pruning may drop (a visual token, or
        padding, which goes with the dropped tokens), whose logits predict it; ``drops_tokens()`` says
        whether the stages drop any. The check does not depend on which tokens the method keeps."""
        targets = self.targets
        if targets is None:
            return
        if targets.shape != call.visual.shape:
            raise ValueError(
                f"labels must be shaped like the prompt, {list(call.visual.shape)}, not {list(targets.shape)}"
            )
        if not drops_tokens():
            return  # nothing is dropped
        droppable = call.visual | ~call.attention_mask.bool()
        predicted = droppable & (targets.to(droppable.device) != IGNORE_INDEX)
        if bool(predicted.any()):
            raise ValueError(
                f"labels give a target to {int(predicted.sum())} token(s) right after a visual or padding "
                "token, which pruning drops, leaving no logits to predict them: set those labels to -100 "
                "(the image tokens, the token after each image, a left-padded row's first token), or keep "
                "every token (keep_ratio=1.0)"
            )
