"""The pruned cache's session: how a prefill pruned the cache, and what each decode step on it needs.

After a prefill that pruned, :func:`record_session` keeps a :class:`Session` on the returned cache. Each
decode step on that cache then gets positions in the original prompt's numbering and masks in the pruned
layout of each layer group (:func:`decode_inputs` before the language model, :func:`step_layer_inputs`
at each stage layer). With a static cache ``generate`` builds the masks itself, ahead of a compiled step:
:func:`masks_for_generate` shadows the model's own builder to build them in the pruned layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import _cache_internals as caches
from .. import _internals as internals
from .layout import Call
from .renumbering import shifted_step


@dataclass
class StageCache:
    """The prompt rows that the caches of layers ``first_layer..`` hold after one pruning stage."""

    first_layer: int
    prefix_mask: torch.Tensor  # [B, L_s] 2-D mask of those rows
    # renumbered positions: how far this stage moved the positions of the tokens after the prompt down,
    # from the layout before it ``[B, 1]`` (``None``: original positions)
    position_shift: torch.Tensor | None = None

    def followed_by(self, tail: torch.Tensor) -> torch.Tensor:
        """The 2-D mask ``[B, L_s + T]`` of these rows and then the tokens after the prompt (``tail``)."""
        return torch.cat([self.prefix_mask, tail], dim=1)


@dataclass
class Session:
    """How a cache was pruned at prefill: what decode steps need to extend its masks and positions.

    Kept on the cache itself (``_cache_internals.mark_pruned_cache``), which then reports the prompt's length.
    """

    original_length: int  # L, the prompt length before pruning
    stages: list[StageCache]
    first_index: torch.Tensor  # [B, L_1] prompt position of each row after the first stage
    # layer masks of the coming decode step for the stages after layer 0, when ``generate`` builds the masks
    # ahead of a compiled step (see :func:`masks_for_generate`): first layer -> mask
    step_masks: dict[int, Any] = field(default_factory=dict)

    def tail(self, mask: torch.Tensor | None, cache: Any, batch: int, new: int) -> torch.Tensor:
        """The 2-D mask ``[B, T]`` of the tokens after the prompt, ``new`` of them in this step: that part of
        ``mask`` (over every token so far, ``[B, L + T]``), or, without one, every such token visible."""
        prefix = self.stages[0].prefix_mask
        if mask is None:
            return prefix.new_ones(batch, int(cache.get_seq_length()) - self.original_length + new)
        return mask[:, self.original_length :].to(prefix.dtype)

    def dropped(self, num_layers: int) -> list[int]:
        """Prompt tokens pruned from each layer's cache."""
        dropped = [0] * num_layers
        for stage in self.stages:
            for i in range(stage.first_layer, num_layers):
                dropped[i] = self.original_length - stage.prefix_mask.shape[1]
        return dropped


def session_of(cache: Any) -> Session | None:
    """The session a pruner left on ``cache``, if it pruned it."""
    record = caches.cache_record(cache)
    return record if isinstance(record, Session) else None


def record_session(call: Call, output: Any, drop_early_kv: bool, num_layers: int) -> None:
    """Leave on the cache a prefill returned (if any) how ``call`` pruned it; with ``drop_early_kv`` the
    layers before the first stage drop the pruned tokens' entries too."""
    cache = caches.output_cache(output)
    if cache is None:
        return
    session = Session(call.original_length, call.new_stages, call.first_index)
    first = session.stages[0]
    if drop_early_kv and first.first_layer > 0:
        caches.compact_cache_layers(cache, range(first.first_layer), session.first_index)
        first.first_layer = 0
    caches.mark_pruned_cache(cache, session, session.dropped(num_layers))


def decode_inputs(kwargs: dict, cache: Any, session: Session, renumbered_first: bool) -> tuple[dict, Call]:
    """Inputs of a step on a pruned cache: original-space positions, pruned-space masks; and the step's call.

    ``renumbered_first``: the first stage renumbered positions before the language model, so the step's
    own position ids move down with its prompt. With a 2-D mask (over every token so far, as ``generate``
    keeps it) the masks of the pruned layers are built from it here and at each stage layer. A prepared
    mask (4-D, or one per layer type) is what :func:`masks_for_generate` built for this step, the later
    stages' masks with it: used as they are, so that a compiled step builds nothing from tensors whose size
    grows each step.
    """
    embeds = kwargs["inputs_embeds"]
    batch, new = embeds.shape[:2]
    mask = kwargs.get("attention_mask")
    done = cache.get_seq_length()  # tokens processed, prompt included (the cache counts its pruned ones)
    kwargs = dict(kwargs)
    if kwargs.get("position_ids") is None:
        kwargs["position_ids"] = (torch.arange(new, device=embeds.device) + done)[None].expand(batch, -1)
    shift = session.stages[0].position_shift
    if shift is not None and renumbered_first:
        kwargs["position_ids"] = kwargs["position_ids"] - shift
    if isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() == 4):
        missing = [s.first_layer for s in session.stages if s.first_layer > 0]
        if any(layer not in session.step_masks for layer in missing):
            raise ValueError(
                "decode steps on a pruned cache need the 2-D attention mask, or the masks generate "
                "prepares with the pruner attached (not masks built elsewhere)"
            )
        return kwargs, Call(session=session)
    if mask is not None and mask.dim() != 2:
        raise ValueError("decode steps on a pruned cache need a 2-D attention mask (or none)")
    if mask is not None and not torch.compiler.is_compiling() and mask.shape[1] != int(done) + new:
        raise ValueError(
            f"attention_mask covers {mask.shape[1]} tokens but the cache holds {int(done)} (its "
            f"prompt counted before pruning), plus {new} new"
        )
    tail = session.tail(mask, cache, batch, new)
    first = session.stages[0]
    if first.first_layer == 0:
        kwargs["attention_mask"] = first.followed_by(tail)
    return kwargs, Call(session=session, tail=tail)


def step_layer_inputs(
    call: Call, stage: int, layer: int, language_model: nn.Module, hidden: torch.Tensor, kwargs: dict
) -> dict[str, Any]:
    """What a decode step's ``stage`` layer (``layer``) and the layers after it get in place of their own
    arguments ``kwargs``: the mask of the rows that stage left in their caches, and, where it renumbered,
    the positions moved down as the prompt's were."""
    rows = call.session.stages[stage]
    update = {}
    if rows.first_layer > 0:  # else the language model already built this mask from the pruned 2-D mask
        if call.tail is None:  # prepared with the step's other masks
            mask = call.session.step_masks[layer]
        else:
            cache = caches.cache_argument(kwargs)
            mask_2d = rows.followed_by(call.tail)
            mask = internals.causal_mask(language_model.config, hidden, mask_2d, cache, layer)
        update["attention_mask"] = mask
    if rows.position_shift is not None and layer > 0:  # layer 0's: in the language model's positions
        rotary = internals.rotary_embedding(language_model)
        update.update(shifted_step(call, hidden, kwargs.get("position_ids"), rows.position_shift, rotary))
    return update


def masks_for_generate(model: nn.Module, language_model: nn.Module) -> Callable:
    """A ``create_masks_for_generate`` for ``model`` (shadowed on that instance while the pruner is attached),
    which ``generate`` calls to build each step's layer masks ahead of the forward when its cache is static,
    so that a compiled step receives fixed-size masks.

    For a cache this pruner pruned it builds them in the pruned layout: the first stage's mask over its
    rows, returned for the forward, and the later stages' masks, left on the cache's session for the stage
    layers. At a prefill it returns the 2-D mask, from which the pruner builds its own masks. Elsewhere it
    is the model's own function.
    """
    original = internals.mask_for_generate_function(model)
    text_config = language_model.config

    def create_masks_for_generate(**kwargs):  # generate passes every argument by keyword
        mask, cache = kwargs.get("attention_mask"), caches.cache_argument(kwargs)
        session = session_of(cache)
        if session is None:
            return mask if kwargs.get("is_first_iteration") else original(**kwargs)
        embeds = kwargs["inputs_embeds"]
        tail = session.tail(mask, cache, *embeds.shape[:2])
        session.step_masks = {
            stage.first_layer: internals.causal_mask(
                text_config, embeds, stage.followed_by(tail), cache, stage.first_layer
            )
            for stage in session.stages
            if stage.first_layer > 0
        }
        first = session.stages[0]
        if first.first_layer == 0:
            mask = first.followed_by(tail)
        return original(**{**kwargs, "attention_mask": mask})

    return create_masks_for_generate
