"""The stage loop: at each pruning layer of a prefill, select each image's tokens and compact the batch.

:meth:`Stages.prune` runs at a stage layer K: it asks the method which visual tokens each image keeps (with
what the method needs, from :mod:`.needs`; a merging method's :class:`~tokenprune.context.Merged` features
become the kept tokens' hidden states), then gathers hidden states, rotary tables, position ids and the
2-D mask into a dense batch, re-padded to the longest kept row, and builds the mask of the layers from K
on. A schedule prunes at several layers, each time among the tokens still kept.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokenprune.context import Merged, SelectionContext
from tokenprune.sequence import VisualLayout, flagged, image_layouts, keep_masks, plan_compaction

from .. import _internals as internals
from .layout import Call
from .needs import LayerReading, provide
from .renumbering import decode_shift, renumbered_tables, renumbering
from .session import StageCache

if TYPE_CHECKING:
    from tokenprune.config import PrunerConfig
    from tokenprune.pruner import Pruner

    from .hooks import LanguageModelHooks


def size_following_stages(config: PrunerConfig, num_layers: int, model_name: str) -> list[tuple[int, None]]:
    """The stages of ``config`` for a family whose image token count varies with each image: its pruning
    layers, each with a kept count the decoder computes per image (none for a ``kv`` method, which prunes
    nothing at prefill and counts each image's share at the forward). ``ValueError`` for a vision method
    (not supported there yet) or a layer outside the language model."""
    spec = config.spec
    if spec.decode:
        check_layer(config.acting_layer, num_layers)
        return []
    if spec.stage not in ("pre_llm", "llm") or config.vision is not None:
        raise ValueError(
            f"{config.method!r} ({spec.stage}) is not supported on {model_name} yet: "
            "use a pre_llm, llm or kv method"
        )
    check_layer(config.last_layer, num_layers)
    return [(layer, None) for layer in config.stage_layers]


def check_layer(layer: int, num_layers: int) -> None:
    """``ValueError`` for a ``layer`` outside a language model of ``num_layers`` layers."""
    if layer >= num_layers:
        raise ValueError(
            f"layer={layer} is outside the language model's {num_layers} layers (valid: 0..{num_layers - 1})"
        )


def kept_by_vision_stage(image_tokens: torch.Tensor, keep: int, check: bool) -> torch.Tensor:
    """The patches a vision stage kept of the images ``image_tokens [I, N, D]``: ``[I, keep]``, in order.

    The adapter hands the language model every dropped patch as a zero placeholder, so the kept set travels
    with the features themselves, whatever ``generate`` does with them (encoding the images before the
    forward, repeating them for several sequences per prompt). With ``check``, ``ValueError`` (a read of the
    device) unless each image has ``keep`` nonzero features.
    """
    kept = image_tokens.ne(0).any(dim=-1)
    if check and bool((kept.sum(dim=1) != keep).any()):
        raise ValueError(
            "the image features reaching the language model are not the ones this pruner's vision "
            "stage encoded: pass pixel_values (not features encoded elsewhere) with the prompt"
        )
    return flagged(kept, keep)


def merged_into(hidden: torch.Tensor, layout: VisualLayout, merged: Merged) -> torch.Tensor:
    """``hidden [B, L, D]`` with the tokens of the images of ``layout`` that ``merged`` keeps replaced by its
    merged features (a new tensor: the layer before's output stays as it was)."""
    places = torch.gather(layout.positions, 1, merged.index)
    rows = layout.sample[:, None].expand_as(places)
    return hidden.index_put((rows, places), merged.features.to(hidden.dtype))


class Stages:
    """The pruning stages of one pruner on one language model: how many tokens each image keeps at each,
    and the pruning itself at a stage layer."""

    def __init__(self, pruner: Pruner, hooks: LanguageModelHooks):
        self._pruner = pruner
        self._hooks = hooks
        # (layer, visual tokens kept per image; None where that follows each image's size)
        self.stages: list[tuple[int, int | None]] = pruner.stages
        self.renumbered = pruner.config.position_rule == "renumbered"

    @property
    def layers(self) -> list[int]:
        """The decoder layer of each stage."""
        return [layer for layer, _ in self.stages]

    @property
    def needs(self) -> tuple[str, ...]:
        """What the decoder-stage method needs (nothing when the only method acts in the vision tower)."""
        config = self._pruner.config
        return () if config.spec.vision else config.spec.needs

    def keeps(self, stage: int, sizes: tuple[int, ...]) -> list[int]:
        """Tokens each image of ``sizes`` (each image's tokens in the prompt) keeps at ``stage``: the stage's
        count, or, for a family whose image size varies, the config's count for each image's size
        (``ValueError`` for a budget over it)."""
        keep = self.stages[stage][1]
        if keep is not None:
            return [keep] * len(sizes)
        by_size = {size: self._kept_for_size(stage, size) for size in set(sizes)}
        return [by_size[size] for size in sizes]

    def drops_tokens(self, sizes: tuple[int, ...]) -> bool:
        """Whether any stage keeps fewer tokens than some image of ``sizes`` has."""
        return any(
            keep < size
            for stage in range(len(self.stages))
            for keep, size in zip(self.keeps(stage, sizes), sizes, strict=True)
        )

    def _kept_for_size(self, stage: int, size: int) -> int:
        """Tokens an image of ``size`` keeps at ``stage`` (a vision stage is the first) under the pruner's
        config; ``ValueError`` for a budget over the image or a decoder stage keeping more than the vision
        stage handed on."""
        config = self._pruner.config
        vision = config.vision_stage
        frames = (self._hooks.frames_for(size) or (1,))[0]
        if vision is None:
            return config.stages(size, frames)[stage][1]
        kept = vision.kept_per_image(size, frames)
        if stage == 0:
            return kept
        keep = config.stages(size, frames)[stage - 1][1]
        if keep > kept:
            raise ValueError(
                f"{config.method!r} keeps {keep} tokens of an image of {size} but {vision.method!r} in the "
                f"vision tower keeps only {kept}: keep fewer in the decoder"
            )
        return keep

    def prune(
        self, call: Call, stage: int, hidden: torch.Tensor, args: tuple, kwargs: dict, cache: Any
    ) -> tuple[tuple, dict]:
        """Select and drop visual tokens at a stage layer; returns the layer's new arguments."""
        layer = self.stages[stage][0]
        batch, length = hidden.shape[:2]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(length, device=hidden.device)[None]
        position_ids = position_ids.expand(batch, length)
        cos, sin = kwargs["position_embeddings"]

        if stage == 0 and call.packed:
            call.sequence_ids = internals.packed_sequence_ids(kwargs.get("position_ids"))

        pruner = self._pruner
        hooks = self._hooks
        images = call.images
        with pruner.timed_selection():
            keeps = self.keeps(stage, call.image_sizes)
            reading = LayerReading(
                call, hooks.layers, hooks.language_model, layer, hidden, (cos, sin), self.needs
            )
            scores = provide(reading)
            selections = []
            for layout in image_layouts(call.visual, images, keeps):
                keep = keeps[layout.images[0]]
                if stage == 0 and pruner.config.vision_stage is not None:
                    check = pruner.checking("the vision stage's features")
                    index = kept_by_vision_stage(layout.take(hidden), keep, check)
                else:
                    index = pruner.select(self._context(hidden, scores, layout, stage), keep)
                if isinstance(index, Merged):  # the kept tokens' merged hidden states go on
                    hidden = merged_into(hidden, layout, index)
                    index = index.index
                selections.append((layout, index))
            keep = keep_masks(call.visual, selections)
            dropped = images.in_rows([size - kept for size, kept in zip(images.sizes, keeps, strict=True)])
            real = images.real
            if real is not None and any(dropped):  # padding goes too: as long as the longest kept row
                keep &= call.attention_mask.bool()
                real = tuple(tokens - drop for tokens, drop in zip(real, dropped, strict=True))
                width = max(real)
            else:  # every row keeps its padding (else, keep-all, the batch stays exactly as it was)
                width = length - min(dropped)
            plan = plan_compaction(keep, width)

        shift, moved = renumbering(call, keep) if self.renumbered else (None, None)
        pruned_hidden, pruned_positions, call.attention_mask = plan.gather_sequence(
            hidden, position_ids, call.attention_mask
        )
        position_embeddings = (plan.gather(cos), plan.gather(sin))
        if shift is not None:
            pruned_positions = pruned_positions - plan.gather(shift)
            rotary = internals.rotary_embedding(hooks.language_model)
            position_embeddings = renumbered_tables(call, plan, moved, pruned_hidden, rotary)
        call.compact(plan)
        call.images = dataclasses.replace(images, sizes=tuple(keeps), real=real)
        if kwargs.get("attention_mask") is None and len(set(dropped)) == 1:
            mask = None  # no padding before, and each row as long as the others: causal still, and known
        else:  # padding, which the mask code would read the device to look for
            mask = internals.causal_mask(
                hooks.language_model.config,
                pruned_hidden,
                call.attention_mask,
                cache,
                layer,
                call.sequence_ids,
                skip_allowed=False,
            )
        call.layer_kwargs = {
            "attention_mask": mask,
            "position_ids": pruned_positions,
            "position_embeddings": position_embeddings,
        }
        call.new_stages.append(StageCache(layer, call.attention_mask, decode_shift(shift, plan)))
        if stage == 0:
            call.first_index = call.origin
        call.keep_masks[layer] = call.reached()
        pruner.record_prefill(call.visual_in, images.in_rows(keeps), dict(call.keep_masks))
        args, kwargs = internals.with_layer_hidden_states(args, kwargs, pruned_hidden)
        return args, {**kwargs, **call.layer_kwargs}

    def _context(
        self, hidden: torch.Tensor, scores: dict[str, Any], layout: VisualLayout, stage: int
    ) -> SelectionContext:
        """The selection context of the images of ``layout``: their tokens and ``scores`` (each image's rows
        of a tensor over every token, its part of a per-image value, a module as it is)."""
        tokens = layout.positions.shape[1]
        first = stage == 0  # a later stage sees a subset of the tokens: no grid
        config = self._pruner.config
        ctx = SelectionContext(
            features=layout.take(hidden),
            grid=self._hooks.grid_for(tokens) if first else None,
            frames=self._hooks.frames_for(tokens) if first else None,
            image_index=layout.image_index,
            stage=stage,
            keep_ratio=config.stage_ratio(stage),
        )
        for name, value in scores.items():
            if isinstance(value, torch.Tensor):
                value = layout.take(value)
            elif not isinstance(value, nn.Module):
                value = value.of(layout)
            setattr(ctx, name, value)
        if ctx.keys is not None:
            ctx.key_heads = ctx.keys.shape[-1] // internals.key_head_dim(self._hooks.layers[0])
        return ctx
