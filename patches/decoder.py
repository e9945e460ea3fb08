"""Hooks that prune visual tokens inside a transformers decoder-only language model.

Shared by every family whose language model is a Llama-style decoder (``layers``, rotary
``position_embeddings``, a 2-D padding mask). The family module says where the images are; this module
does the rest, with per-instance forward hooks only:

* on the language model (pre): tells prefill from decode. In decode it rewrites the 2-D mask and the
  position ids for a cache whose visual entries were pruned, so the next token keeps its original
  position and attends only to kept tokens.
* on each pruning layer K (pre): at prefill, asks the method which visual tokens to keep and gathers
  hidden states, rotary tables and position ids into a dense, left-padded batch; builds the mask of the
  layers from K on. A schedule prunes at several layers, each time among the tokens still kept.
* on the other layers after the first K (pre): hands them the pruned mask, positions and rotary tables.
* on the language model (post): remembers how the returned cache was pruned, for the decode steps.

Layers before the first K see every token and keep their full cache (unless ``drop_early_kv``); layers
from K on see only the kept tokens. K = 0 is the ``pre_llm`` stage.

With ``positions="renumbered"`` a hook on the rotary embedding records the position ids of each forward:
at a stage layer the kept tokens' ids close up (:func:`tokenprune.positions.renumbering_shift`) and the
following layers get the rotary tables of those ids; a decode step's ids are moved down by what each stage
moved its prompt's last token, in the stage's layers (the language model's own ids for a stage at layer 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.attention import causal_rows_attention, query_logits
from tokenprune.context import Instruction, InstructionRows, SelectionContext
from tokenprune.positions import renumbering_shift
from tokenprune.sequence import (
    Compaction,
    VisualLayout,
    image_groups,
    image_ids_by_count,
    image_ids_by_runs,
    keep_masks,
    places_in_prompts,
    plan_compaction,
)
from tokenprune.transition import sublayer_transition

from . import _internals as internals

#: The label of a token that is no target (transformers' loss ignores it).
IGNORE_INDEX = -100

if TYPE_CHECKING:
    from tokenprune.pruner import Pruner


@dataclass
class _StageCache:
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
class _Session:
    """How a cache was pruned at prefill: what decode steps need to extend its masks and positions.

    Kept on the cache itself (``_internals.mark_pruned_cache``), which then reports the prompt's length.
    """

    original_length: int  # L, the prompt length before pruning
    stages: list[_StageCache]
    first_index: torch.Tensor  # [B, L_1] prompt position of each row after the first stage
    # layer masks of the coming decode step for the stages after layer 0, when ``generate`` builds the masks
    # ahead of a compiled step (see ``DecoderPruningHooks.masks_for_generate``): first layer -> mask
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


@dataclass
class _Call:
    """State of one language-model forward, shared by its hooks.

    At prefill ``visual``, ``attention_mask`` and ``origin`` describe the rows of the current (possibly
    already pruned) layout; at a decode step ``session`` and ``tail`` describe the pruned cache.
    """

    visual: torch.Tensor | None = None  # [B, L_cur] image token flags
    image_id: torch.Tensor | None = None  # [B, L_cur] number of each token's image, -1 off images
    image_sizes: torch.Tensor | None = None  # [num_images] tokens of each image in the prompt
    attention_mask: torch.Tensor | None = None  # [B, L_cur] 2-D mask
    origin: torch.Tensor | None = None  # [B, L_cur] prompt position of each row
    real: torch.Tensor | None = None  # [B, L_cur] the row holds a prompt token, not re-padding
    original_length: int = 0  # L, the prompt length
    visual_in: list[int] = field(default_factory=list)  # visual tokens per sample before pruning
    keep_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, L] over the prompt
    new_stages: list[_StageCache] = field(default_factory=list)
    first_index: torch.Tensor | None = None
    session: _Session | None = None
    tail: torch.Tensor | None = None  # [B, T] 2-D mask of the tokens after the prompt (unprepared decode)
    packed: bool = False  # the call may hold packed sequences (no mask, no cache): the model reads positions
    sequence_ids: torch.Tensor | None = None  # [B, L_cur] packed sequence of each row, where packed
    layer_kwargs: dict[str, Any] = field(default_factory=dict)  # what the following layers get
    scoring_input: torch.Tensor | None = None  # input of the layer whose keys/attention score tokens
    transition: torch.Tensor | None = None  # [B, L_cur] float32 layer transitions summed so far
    pending_transition: torch.Tensor | None = None  # [B, L_cur] a layer's attention's, until its MLP's
    # renumbered positions: the ids the rotary embedding was given (prefill: of the current layout)
    rotary_positions: torch.Tensor | None = None  # [B or 1, L_cur], or [3, B, L_cur] (multimodal RoPE)


def _largest_per_prompt(sequence: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """By prompt ``[B, L]``: at ``p``, the largest of ``values [B, L]`` over the tokens of prompt ``p`` of the
    row (``sequence [B, L]`` numbers each token's prompt from 0); -1 past the row's prompts (values >= -1)."""
    return torch.full_like(values, -1).scatter_reduce(1, sequence, values, "amax")


@dataclass
class _Instructions:
    """The instructions of a batch's rows (see ``DecoderPruningHooks._instruction_rows``)."""

    keys: torch.Tensor  # [B, Q, H_kv * d]
    features: torch.Tensor  # [B, Q, D]
    prompt: torch.Tensor  # [B, Q] the prompt of each (-1: padding)
    sequences: torch.Tensor  # [B, L] the prompt of every token
    places: torch.Tensor  # [B, Q] the place of each in its prompt

    def of(self, layout: VisualLayout) -> Instruction:
        """Each image's: its row's instruction tokens of its own prompt."""
        image_prompt = self.sequences[layout.sample, layout.positions[:, 0]]
        mask = self.prompt[layout.sample] == image_prompt[:, None]
        sample = layout.sample
        return Instruction(self.keys[sample], self.features[sample], mask, self.places[sample])


@dataclass
class _InstructionRows:
    """The attention rows of a batch's instructions (``DecoderPruningHooks._instruction_rows_attention``)."""

    to_tokens: torch.Tensor  # [B, L, H, Q] attention of each instruction query, by head, to every token
    rows: torch.Tensor  # [B, Q] the instruction tokens' positions
    prompt: torch.Tensor  # [B, Q] the prompt of each (-1: padding)
    sequences: torch.Tensor  # [B, L] the prompt of every token

    def of(self, layout: VisualLayout) -> InstructionRows:
        """Each image's: its row's instruction queries of its own prompt, over its tokens and theirs."""
        image_prompt = self.sequences[layout.sample, layout.positions[:, 0]]
        mask = self.prompt[layout.sample] == image_prompt[:, None]  # [I, Q]
        visual = layout.take(self.to_tokens).permute(0, 2, 3, 1)  # [I, H, Q, N]
        rows = self.rows[:, :, None, None].expand(-1, -1, *self.to_tokens.shape[2:])
        text = torch.gather(self.to_tokens, 1, rows).permute(0, 2, 3, 1)[layout.sample]  # [I, H, Q, Q]
        keys = mask[:, None, None, :] & mask[:, None, :, None]
        return InstructionRows(visual, text * keys, mask)


def size_following_stages(config, num_layers: int, model_name: str) -> list[tuple[int, None]]:
    """The stages of ``config`` for a family whose image token count varies with each image: its
    pruning layers, each with a kept count the decoder computes per image (none for a ``kv`` method, which
    prunes nothing at prefill and counts each image's share at the forward). ``ValueError`` for a vision
    method (not supported there yet) or a layer outside the language model."""
    spec = config.spec
    if spec.decode:
        return []
    if spec.stage not in ("pre_llm", "llm") or config.vision is not None:
        raise ValueError(
            f"{config.method!r} ({spec.stage}) is not supported on {model_name} yet: "
            "use a pre_llm, llm or kv method"
        )
    if config.last_layer >= num_layers:
        raise ValueError(
            f"layer={config.last_layer} is outside the language model's {num_layers} layers "
            f"(valid: 0..{num_layers - 1})"
        )
    layers = [layer for layer, _ in config.schedule] if config.schedule else [config.acting_layer]
    return [(layer, None) for layer in layers]


class LanguageModelHooks:
    """What every set of hooks on a decoder-only language model holds: the model, its layers, the image
    token layout, and the image placeholders of the next forward (``pending_visual [B, L]``, set by the
    family adapter)."""

    def __init__(self, language_model: nn.Module, tokens_per_image: int, grid: tuple[int, int] | None):
        internals.check_decoder_internals(language_model)
        self.language_model = language_model
        self.layers = internals.decoder_layers(language_model)
        self.tokens_per_image = tokens_per_image
        self.grid = grid
        self.pending_visual: torch.Tensor | None = None
        self.pending_image_id: torch.Tensor | None = None  # [B, L] set by adapters that number images
        # families whose image size varies: each image is one run of placeholders, and the patch grid
        # of an image of a given token count, where known (set per forward by the family adapter)
        self.images_by_runs = False
        self.grids: dict[int, tuple[int, int]] = {}
        self._pruner: Pruner | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def image_ids(self, visual: torch.Tensor) -> torch.Tensor:
        """The number of each placeholder's image ``[B, L]`` (-1 off images)."""
        if self.images_by_runs:
            return image_ids_by_runs(visual)
        return image_ids_by_count(visual, self.tokens_per_image)

    def grid_for(self, tokens: int) -> tuple[int, int] | None:
        """The patch grid of an image of ``tokens`` tokens, if known."""
        return self.grids.get(tokens) if self.images_by_runs else self.grid

    def masks_for_generate(self, model: nn.Module) -> Callable:
        """The ``create_masks_for_generate`` that ``model``'s ``generate`` uses while these hooks are attached
        (see :meth:`generation_overrides`)."""
        raise NotImplementedError

    def generation_overrides(self, model: nn.Module) -> list[internals.InstanceOverride]:
        """Shadow ``create_masks_for_generate`` on ``model`` (a model that generates) with
        :meth:`masks_for_generate`: with a static cache ``generate`` builds the layers' masks itself, ahead of
        each forward, and those of a pruned cache must follow the pruned layout."""
        if not hasattr(model, "prepare_inputs_for_generation"):
            return []
        masks = self.masks_for_generate(model)
        return [internals.InstanceOverride(model, "create_masks_for_generate", masks)]


class DecoderPruningHooks(LanguageModelHooks):
    """Installs and removes the hooks of one pruner on one decoder-only language model."""

    def __init__(
        self, model: nn.Module, language_model: nn.Module, tokens_per_image: int, grid: tuple[int, int] | None
    ):
        """Hooks for the language model of the VLM ``model`` (whose generation head, if it has one, computes
        the loss of labels: read here, so that a head whose loss moved fails before any hook is placed)."""
        super().__init__(language_model, tokens_per_image, grid)
        self._head = internals.HeadLabels.of(model)
        self._call: _Call | None = None
        # (layer, visual tokens kept per image; None where that follows each image's size)
        self._stages: list[tuple[int, int | None]] = []
        self._renumbered = False  # positions="renumbered"
        # the target of each prompt token's logits [B, L] in the generation head's current call (where it
        # has labels), and the rows its language model returned (their prompt positions [B, L'] and which
        # are prompt tokens, not re-padding)
        self._targets: torch.Tensor | None = None
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach(self, pruner: Pruner, model: nn.Module) -> list[RemovableHandle]:
        """Register the hooks for ``pruner``, whose VLM is ``model``; returns their handles."""
        self._pruner = pruner
        self._stages = pruner.stages
        stage_layers = [layer for layer, _ in self._stages]
        lm = self.language_model
        handles = [
            lm.register_forward_pre_hook(self._before_language_model, with_kwargs=True),
            lm.register_forward_hook(self._after_language_model, with_kwargs=True, always_call=True),
            *self.generation_overrides(model),
            *self._label_hooks(model),
        ]
        self._renumbered = pruner.config.position_rule == "renumbered"
        if self._renumbered:
            rotary = internals.rotary_embedding(lm)
            handles.append(rotary.register_forward_pre_hook(self._capture_positions, with_kwargs=True))
        for i, layer in enumerate(self.layers[stage_layers[0] :], start=stage_layers[0]):
            hook = (
                partial(self._at_stage_layer, stage_layers.index(i))
                if i in stage_layers
                else self._after_stage
            )
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        needs = self._needs()
        if "transition" in needs:  # from the layer before the first stage to the one before the last
            handles += [
                sublayer.register_forward_hook(self._track_transition, with_kwargs=True)
                for layer in self.layers[stage_layers[0] - 1 : stage_layers[-1]]
                for sublayer in internals.sublayers(layer)
            ]
        if {"attention", "unrotated_logits", "keys", "instruction", "instruction_rows"} & set(needs):
            # registered last, so that each sees its layer's input after any pruning at that layer
            handles += [
                self.layers[k - 1].register_forward_pre_hook(self._capture_scoring_input, with_kwargs=True)
                for k in stage_layers
                if k > 0
            ]
        return handles

    def _label_hooks(self, model: nn.Module) -> list[RemovableHandle]:
        """Hooks on ``model``, where it is a generation head, that compute its loss over the rows the language
        model returns: the head's own loss would pair the logits of the pruned rows with the labels of the
        unpruned prompt."""
        if self._head is None:
            return []
        return [
            model.register_forward_pre_hook(self._take_labels, with_kwargs=True),
            model.register_forward_hook(self._loss_over_kept_rows, with_kwargs=True),
        ]

    def _take_labels(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        labels, args, kwargs = self._head.take(args, kwargs)
        self._targets = None if labels is None else self._head.targets(labels, kwargs, IGNORE_INDEX)
        self._rows = None
        return args, kwargs

    def _loss_over_kept_rows(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """The head's output with the loss of its labels: the logits of each returned row against the target
        of that row's prompt token (the label of the token after it, as the unpruned head pairs them), none
        for re-padding. The loss is that of the unpruned model with the dropped tokens hidden from attention,
        over the same targets (:meth:`_check_labels` makes sure no target's predicting token was dropped)."""
        targets, self._targets = self._targets, None
        rows, self._rows = self._rows, None
        if targets is None:
            return None
        logits = output[0] if isinstance(output, tuple) else output.logits
        if rows is not None:
            origin, real = rows
            targets = torch.where(real, torch.gather(targets.to(origin.device), 1, origin), IGNORE_INDEX)
        return internals.with_loss(output, self._head.loss(module, logits, targets, kwargs))

    def _check_labels(self, call: _Call) -> None:
        """``ValueError`` for labels this pruner cannot compute the loss of, before any decoder layer runs:
        not shaped like the prompt, or a target right after a token that pruning may drop (a visual token, or
        padding, which goes with the dropped tokens), whose logits predict it. The check does not depend on
        which tokens the method keeps."""
        targets = self._targets
        if targets.shape != call.visual.shape:
            raise ValueError(
                f"labels must be shaped like the prompt, {list(call.visual.shape)}, not {list(targets.shape)}"
            )
        sizes = call.image_sizes
        if not any(bool((self._keeps(stage, sizes) < sizes).any()) for stage in range(len(self._stages))):
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

    def prompt_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """During a prefill with images: the prompt position of each current row ``[B, L_cur]`` and
        whether the row holds a prompt token (not re-padding); ``None`` otherwise."""
        call = self._call
        if call is None or call.visual is None:
            return None
        return call.origin, call.real

    def _needs(self) -> tuple[str, ...]:
        """What the decoder-stage method needs (nothing when the only method acts in the vision tower)."""
        config = self._pruner.config
        return () if config.spec.vision else config.spec.needs

    # -- language model -------------------------------------------------------------------------

    def _before_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        visual, self.pending_visual = self.pending_visual, None
        image_id, self.pending_image_id = self.pending_image_id, None
        self._call = None
        cache = internals.cache_argument(kwargs)
        # ``visual`` is None in a call without images, so that a decode step (compiled, perhaps) reads no data
        has_images = visual is not None and bool(visual.any())
        session = internals.cache_record(cache)
        if isinstance(session, _Session):
            if has_images:
                raise ValueError(
                    "cannot add images to a cache whose visual tokens were pruned; start a new cache"
                )
            return args, self._decode_inputs(kwargs, cache, session)
        if not has_images:
            if not torch.compiler.is_compiling():
                self._pruner.record_text_only(kwargs["inputs_embeds"].shape[0])
            return args, kwargs
        if internals.cache_length(cache, 0) > 0:
            raise ValueError(
                "images must be in the first forward of a cache to be pruned (no chunked prefill "
                "or continuation of an unpruned cache)"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise ValueError(
                "pruning a prompt needs its 2-D attention mask [batch, tokens] (or none), not "
                f"{'a mask per layer type' if isinstance(mask, dict) else f'a {mask.dim()}-D mask'}: pass "
                "the padding mask the processor returns; the pruner builds each layer's mask itself"
            )
        if self._pruner.config.vision_stage is None:  # else the vision tower began this prefill
            self._pruner.begin_prefill()
        batch, length = visual.shape
        packed = mask is None and cache is None  # as the model's mask code, which then reads the positions
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=visual.device)
        origin = torch.arange(length, device=visual.device).expand(batch, length)
        image_id = self.image_ids(visual) if image_id is None else image_id
        self._call = _Call(
            visual=visual,
            image_id=image_id,
            image_sizes=torch.bincount(image_id[visual]),
            attention_mask=mask,
            origin=origin,
            real=torch.ones_like(visual),
            original_length=length,
            visual_in=visual.sum(1).tolist(),
            packed=packed,
        )
        if self._targets is not None:
            self._check_labels(self._call)
        return args, kwargs

    def _decode_inputs(self, kwargs: dict, cache: Any, session: _Session) -> dict:
        """Inputs of a step on a pruned cache: original-space positions, pruned-space masks.

        With a 2-D mask (over every token so far, as ``generate`` keeps it) the masks of the pruned layers
        are built from it here and at each stage layer. A prepared mask (4-D, or one per layer type) is what
        :meth:`masks_for_generate` built for this step, the later stages' masks with it: used as they are,
        so that a compiled step builds nothing from tensors whose size grows each step.
        """
        embeds = kwargs["inputs_embeds"]
        batch, new = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        done = cache.get_seq_length()  # tokens processed, prompt included (the cache counts its pruned ones)
        kwargs = dict(kwargs)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = (torch.arange(new, device=embeds.device) + done)[None].expand(batch, -1)
        shift = session.stages[0].position_shift
        if shift is not None and self._stages[0][0] == 0:  # renumbered before the language model
            kwargs["position_ids"] = kwargs["position_ids"] - shift
        if isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() == 4):
            missing = [s.first_layer for s in session.stages if s.first_layer > 0]
            if any(layer not in session.step_masks for layer in missing):
                raise ValueError(
                    "decode steps on a pruned cache need the 2-D attention mask, or the masks generate "
                    "prepares with the pruner attached (not masks built elsewhere)"
                )
            self._call = _Call(session=session)
            return kwargs
        if mask is not None and mask.dim() != 2:
            raise ValueError("decode steps on a pruned cache need a 2-D attention mask (or none)")
        if mask is not None and not torch.compiler.is_compiling() and mask.shape[1] != int(done) + new:
            raise ValueError(
                f"attention_mask covers {mask.shape[1]} tokens but the cache holds {int(done)} (its "
                f"prompt counted before pruning), plus {new} new"
            )
        tail = session.tail(mask, cache, batch, new)
        self._call = _Call(session=session, tail=tail)
        first = session.stages[0]
        if first.first_layer == 0:
            kwargs["attention_mask"] = first.followed_by(tail)
        return kwargs

    def masks_for_generate(self, model: nn.Module) -> Callable:
        """A ``create_masks_for_generate`` for ``model`` (shadowed on that instance while the pruner is
        attached), which ``generate`` calls to build each step's layer masks ahead of the forward when its
        cache is static, so that a compiled step receives fixed-size masks.

        For a cache this pruner pruned it builds them in the pruned layout: the first stage's mask over
        its rows, returned for the forward, and the later stages' masks, left on the cache's record for the
        stage layers. At a prefill it returns the 2-D mask, from which the pruner builds its own masks.
        Elsewhere it is the model's own function.
        """
        original = internals.mask_for_generate_function(model)
        text_config = self.language_model.config

        def create_masks_for_generate(**kwargs):  # generate passes every argument by keyword
            mask, cache = kwargs.get("attention_mask"), internals.cache_argument(kwargs)
            session = internals.cache_record(cache)
            if not isinstance(session, _Session):
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

    def _after_language_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call, self._call = self._call, None
        if call is not None and call.visual is not None and self._targets is not None:
            self._rows = call.origin, call.real
        if call is None or not call.new_stages:
            return
        cache = internals.output_cache(output)
        if cache is None:
            return
        session = _Session(call.original_length, call.new_stages, call.first_index)
        first = session.stages[0]
        if self._pruner.config.drop_early_kv and first.first_layer > 0:
            internals.compact_cache_layers(cache, range(first.first_layer), session.first_index)
            first.first_layer = 0
        internals.mark_pruned_cache(cache, session, session.dropped(self.num_layers))

    # -- decoder layers -------------------------------------------------------------------------

    def _capture_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._call is not None:
            self._call.rotary_positions = internals.rotary_position_ids(args, kwargs)

    def _capture_scoring_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._call is not None and self._call.visual is not None:
            self._call.scoring_input = internals.layer_hidden_states(args, kwargs)

    def _track_transition(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Add a layer's transition of every token to the float32 sum the prefill carries across stages:
        its attention's and its MLP's (called in that order) added first in the model's dtype, as
        TransPrune's reference adds them."""
        call = self._call
        if call is None or call.visual is None:
            return
        inputs, outputs = internals.sublayer_input_output(args, kwargs, output)
        change = sublayer_transition(inputs, outputs, call.attention_mask.bool())
        if call.pending_transition is None:  # the attention's: the MLP's comes next
            call.pending_transition = change
            return
        change, call.pending_transition = (call.pending_transition + change).float(), None
        call.transition = change if call.transition is None else call.transition + change

    def _after_stage(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._call is None or not self._call.layer_kwargs:
            return None
        return args, {**kwargs, **self._call.layer_kwargs}

    def _at_stage_layer(
        self, stage: int, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        call = self._call
        if call is None:
            return None
        kwargs = {**kwargs, **call.layer_kwargs}  # the previous stage's layout, if any
        hidden = internals.layer_hidden_states(args, kwargs)
        cache = internals.cache_argument(kwargs)
        layer = self._stages[stage][0]
        if call.session is None:
            return self._prune(call, stage, hidden, args, kwargs, cache)
        rows = call.session.stages[stage]
        update = {}
        if rows.first_layer > 0:  # else the language model already built this mask from the pruned 2-D mask
            if call.tail is None:  # prepared with the step's other masks
                mask = call.session.step_masks[layer]
            else:
                mask_2d = rows.followed_by(call.tail)
                mask = internals.causal_mask(self.language_model.config, hidden, mask_2d, cache, layer)
            update["attention_mask"] = mask
        if rows.position_shift is not None and layer > 0:  # layer 0's: in the language model's positions
            update.update(self._shifted_step(call, hidden, kwargs.get("position_ids"), rows.position_shift))
        if not update:
            return None
        call.layer_kwargs = {**call.layer_kwargs, **update}
        return args, {**kwargs, **call.layer_kwargs}

    def _shifted_step(
        self, call: _Call, hidden: torch.Tensor, position_ids: torch.Tensor | None, shift: torch.Tensor
    ) -> dict[str, Any]:
        """A decode step's positions from a renumbering stage on: each row's moved down by ``shift [B, 1]``,
        and the rotary tables of those positions."""
        call.rotary_positions = call.rotary_positions - shift
        rotary = internals.rotary_embedding(self.language_model)
        update = {"position_embeddings": rotary(hidden, call.rotary_positions)}
        if position_ids is not None:
            update["position_ids"] = position_ids - shift
        return update

    def _prune(
        self, call: _Call, stage: int, hidden: torch.Tensor, args: tuple, kwargs: dict, cache: Any
    ) -> tuple[tuple, dict]:
        """Select and drop visual tokens at a stage layer; returns the layer's new arguments."""
        layer = self._stages[stage][0]
        batch, length = hidden.shape[:2]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(length, device=hidden.device)[None]
        position_ids = position_ids.expand(batch, length)
        cos, sin = kwargs["position_embeddings"]

        if stage == 0 and call.packed:
            call.sequence_ids = internals.packed_sequence_ids(kwargs.get("position_ids"))

        pruner = self._pruner
        with pruner.timed_selection():
            keeps = self._keeps(stage, call.image_sizes)
            scores = self._scores(call, layer, hidden, (cos, sin))
            selections = []
            for layout in image_groups(call.image_id, keeps):
                keep = int(keeps[layout.image[0]])
                if stage == 0 and pruner.config.vision_stage is not None:
                    index = self._kept_by_vision_stage(layout.take(hidden), keep)
                else:
                    index = pruner.select(self._context(hidden, scores, layout, stage), keep)
                selections.append((layout, index))
            keep = keep_masks(call.visual, selections)
            if bool((call.visual & ~keep).any()):  # else (keep-all) the batch stays exactly as it was
                keep &= call.attention_mask.bool()  # padding goes: as long as the longest kept row
            plan = plan_compaction(keep)

        shift, moved = self._renumbering(call, keep) if self._renumbered else (None, None)
        pruned_hidden, pruned_positions, call.attention_mask = plan.gather_sequence(
            hidden, position_ids, call.attention_mask
        )
        position_embeddings = (plan.gather(cos), plan.gather(sin))
        if shift is not None:
            pruned_positions = pruned_positions - plan.gather(shift)
            position_embeddings = self._renumbered_tables(call, plan, moved, pruned_hidden)
        call.visual = plan.gather(call.visual) & plan.valid
        call.image_id = torch.where(call.visual, plan.gather(call.image_id), -1)
        call.origin = plan.gather(call.origin)
        call.real = plan.gather(call.real) & plan.valid
        if call.transition is not None:  # the kept tokens carry their sums on to the next stage
            call.transition = plan.gather(call.transition)
        if call.sequence_ids is not None:
            call.sequence_ids = plan.gather(call.sequence_ids)
        config = self.language_model.config
        call.layer_kwargs = {
            "attention_mask": internals.causal_mask(
                config, pruned_hidden, call.attention_mask, cache, layer, call.sequence_ids
            ),
            "position_ids": pruned_positions,
            "position_embeddings": position_embeddings,
        }
        call.new_stages.append(_StageCache(layer, call.attention_mask, self._decode_shift(shift, plan)))
        if stage == 0:
            call.first_index = call.origin
        reached = torch.zeros(batch, call.original_length, dtype=torch.int32, device=hidden.device)
        call.keep_masks[layer] = reached.scatter_add_(1, call.origin, call.real.to(torch.int32)) > 0
        pruner.record_prefill(call.visual_in, call.visual.sum(dim=1).tolist(), dict(call.keep_masks))
        args, kwargs = internals.with_layer_hidden_states(args, kwargs, pruned_hidden)
        return args, {**kwargs, **call.layer_kwargs}

    def _renumbering(self, call: _Call, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """How far each token's position moves down ``[B, L_cur]`` when the tokens ``keep`` flags (of the
        current layout) close up (see :func:`tokenprune.positions.renumbering_shift`), and the rotary
        position ids so moved ``[A, B, L_cur]`` (``A`` axes)."""
        positions = call.rotary_positions
        batch, length = keep.shape
        axes = positions.expand(*positions.shape[:-2], batch, length).reshape(-1, batch, length)
        shift = renumbering_shift(axes, keep & call.attention_mask.bool(), call.sequence_ids)
        return shift, axes - shift

    def _renumbered_tables(
        self, call: _Call, plan: Compaction, moved: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary ``(cos, sin)`` of the pruned layout ``hidden [B, L', D]``, its tokens at the ``moved``
        positions ``[A, B, L_cur]`` (see :meth:`_renumbering`), which ``call`` keeps for a later stage."""
        lead = call.rotary_positions.shape[:-2]
        pruned = plan.gather(moved.permute(1, 2, 0).contiguous()).permute(2, 0, 1)  # [A, B, L']
        call.rotary_positions = pruned.reshape(*lead, *pruned.shape[1:])
        return internals.rotary_embedding(self.language_model)(hidden, call.rotary_positions)

    @staticmethod
    def _decode_shift(shift: torch.Tensor | None, plan: Compaction) -> torch.Tensor | None:
        """How far a stage moved its rows' last prompt token down ``[B, 1]``: the tokens after the prompt
        follow it (``None`` for original positions). The pruned layout ends each row with its last token."""
        return None if shift is None else plan.gather(shift)[:, -1:]

    @staticmethod
    def _kept_by_vision_stage(image_tokens: torch.Tensor, keep: int) -> torch.Tensor:
        """The patches a vision stage kept of the images ``image_tokens [I, N, D]``: ``[I, keep]``.

        The adapter hands the language model every dropped patch as a zero placeholder, so the kept set
        travels with the features themselves, whatever ``generate`` does with them (encoding the images
        before the forward, repeating them for several sequences per prompt).
        """
        kept = image_tokens.ne(0).any(dim=-1)
        if bool((kept.sum(dim=1) != keep).any()):
            raise ValueError(
                "the image features reaching the language model are not the ones this pruner's vision "
                "stage encoded: pass pixel_values (not features encoded elsewhere) with the prompt"
            )
        return kept.nonzero()[:, 1].view(-1, keep)

    def _keeps(self, stage: int, image_sizes: torch.Tensor) -> torch.Tensor:
        """Tokens each image keeps at ``stage`` ``[num_images]``: the stage's count, or, for a family whose
        image size varies, the config's count for each image's size (``ValueError`` for a budget over it)."""
        keep = self._stages[stage][1]
        if keep is not None:
            return torch.full_like(image_sizes, keep)
        by_size = {size: self._kept_for_size(stage, size) for size in image_sizes.unique().tolist()}
        return torch.tensor([by_size[size] for size in image_sizes.tolist()], device=image_sizes.device)

    def _kept_for_size(self, stage: int, size: int) -> int:
        """Tokens an image of ``size`` keeps at ``stage`` (a vision stage is the first) under the pruner's
        config; ``ValueError`` for a budget over the image or a decoder stage keeping more than the vision
        stage handed on."""
        config = self._pruner.config
        vision = config.vision_stage
        if vision is None:
            return config.stages(size)[stage][1]
        kept = vision.kept_per_image(size)
        if stage == 0:
            return kept
        keep = config.stages(size)[stage - 1][1]
        if keep > kept:
            raise ValueError(
                f"{config.method!r} keeps {keep} tokens of an image of {size} but {vision.method!r} in the "
                f"vision tower keeps only {kept}: keep fewer in the decoder"
            )
        return keep

    def _scores(
        self,
        call: _Call,
        layer: int,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """What the decoder-stage method declared it needs, over the whole sequence ``[B, L, ...]``."""
        needs = self._needs()
        scores = {}
        if "keys" in needs or "instruction" in needs:
            scoring_layer, scoring_input = self._scoring_layer(call, layer, hidden)
            _, keys = internals.project_queries_keys(scoring_layer, scoring_input, position_embeddings, None)
            scores["keys"] = keys.transpose(1, 2).flatten(2)
        if {"instruction", "prompt_positions"} & set(needs):  # each token's place in its prompt
            places = places_in_prompts(call.attention_mask.bool(), self._sequences(call))
        if "prompt_positions" in needs:
            scores["prompt_positions"] = places
        if "instruction" in needs:
            rows, counted = self._instruction_rows(call)
            take = lambda x: torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
            sequences = self._sequences(call)
            prompt = torch.where(counted, torch.gather(sequences, 1, rows), -1)
            scores["instruction"] = _Instructions(
                take(scores["keys"]), take(hidden), prompt, sequences, torch.gather(places, 1, rows)
            )
        if "instruction_rows" in needs:
            scores["instruction_rows"] = self._instruction_rows_attention(
                call, layer, hidden, position_embeddings
            )
        if "attention" in needs:
            scores["attention"] = self._last_token_attention(call, layer, hidden, position_embeddings)
        if "unrotated_logits" in needs:
            cos, sin = position_embeddings  # rotating by angle 0: no RoPE
            identity = (torch.ones_like(cos), torch.zeros_like(sin))
            scores["unrotated_logits"] = self._last_token_logits(call, layer, hidden, identity)
        if "instruction_attention" in needs:
            scores["instruction_attention"] = self._instruction_attention(
                call, layer, hidden, position_embeddings
            )
        if "transition" in needs:
            scores["transition"] = call.transition
        return scores

    def _context(
        self,
        hidden: torch.Tensor,
        scores: dict[str, torch.Tensor],
        layout: VisualLayout,
        stage: int,
    ) -> SelectionContext:
        """The selection context of the images of ``layout``: their tokens and ``scores``."""
        grid = self.grid_for(layout.positions.shape[1]) if stage == 0 else None  # later: a subset of it
        config = self._pruner.config
        ratio = config.schedule[stage][1] if config.schedule is not None else config.keep_ratio
        ctx = SelectionContext(
            features=layout.take(hidden),
            grid=grid,
            image_index=layout.image_index,
            stage=stage,
            keep_ratio=ratio,
        )
        for name, value in scores.items():
            of_images = isinstance(value, (_Instructions, _InstructionRows))
            setattr(ctx, name, value.of(layout) if of_images else layout.take(value))
        if "final_norm" in self._needs():
            ctx.final_norm = internals.final_norm(self.language_model)
        if ctx.keys is not None:
            ctx.key_heads = ctx.keys.shape[-1] // internals.key_head_dim(self.layers[0])
        return ctx

    def _scoring_layer(self, call: _Call, layer: int, hidden: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
        """The layer whose projections score tokens for pruning at ``layer``, and that layer's input.

        The layer before the pruning layer, as FastV and DART read layer K-1's attention and keys and
        prune from layer K on; layer 0 itself when pruning before the language model.
        """
        if layer == 0:
            return self.layers[0], hidden
        return self.layers[layer - 1], call.scoring_input

    def _last_token_attention(
        self,
        call: _Call,
        layer: int,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Attention of each prompt's last token to every token of that prompt ``[B, L]``, at the scoring
        layer: softmax over the tokens up to it, heads averaged."""
        query, keys, scaling, ends = self._last_token_projections(call, layer, hidden, position_embeddings)
        valid = call.attention_mask.bool()
        positions = torch.arange(valid.shape[1], device=valid.device)
        prompt = self._sequences(call)
        key_mask = (
            valid[:, None, :]
            & (positions <= ends[..., None])
            & (prompt[:, None, :] == torch.gather(prompt, 1, ends)[..., None])
        )  # [B, P, L]
        scores = query_logits(query, keys, scaling).masked_fill(~key_mask[:, None], float("-inf"))
        attention = scores.softmax(dim=-1).mean(dim=1)  # [B, P, L]
        return torch.gather(attention, 1, prompt[:, None, :])[:, 0]  # each token, its own prompt's row

    def _last_token_logits(
        self,
        call: _Call,
        layer: int,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Attention logits of each prompt's last token to every token of that prompt, by head ``[B, L, H]``,
        at the scoring layer (no mask: a method reads the visual tokens, all before the last token)."""
        query, keys, scaling, _ = self._last_token_projections(call, layer, hidden, position_embeddings)
        logits = query_logits(query, keys, scaling)  # [B, H, P, L]
        prompt = self._sequences(call)[:, None, None, :].expand(-1, logits.shape[1], 1, -1)
        return torch.gather(logits, 2, prompt)[:, :, 0].transpose(1, 2)

    def _last_token_projections(
        self,
        call: _Call,
        layer: int,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
        """The scoring layer's query of each prompt's last token ``[B, H, P, d]``, its keys of every token
        ``[B, H_kv, L, d]`` (RoPE as ``position_embeddings`` give it), its attention scaling, and where those
        last tokens are ``[B, P]`` (see :meth:`_prompt_ends`)."""
        scoring_layer, scoring_input = self._scoring_layer(call, layer, hidden)
        ends = self._prompt_ends(call)
        query, keys = internals.project_queries_keys(scoring_layer, scoring_input, position_embeddings, ends)
        return query, keys, internals.attention_scaling(scoring_layer), ends

    def _prompt_ends(self, call: _Call) -> torch.Tensor:
        """The position of each prompt's last real token ``[B, P]``, in the order of the prompts: ``P = 1``,
        but for a padding-free row of several prompts (a row with fewer repeats its last; reads the device
        once for P)."""
        last = self._last_rows(call)[:, None]
        if call.sequence_ids is None:
            return last
        sequence, valid = call.sequence_ids, call.attention_mask.bool()
        positions = torch.arange(valid.shape[1], device=valid.device).expand_as(sequence)
        ends = _largest_per_prompt(sequence, torch.where(valid, positions, -1))
        ends = ends[:, : int(sequence.max()) + 1]
        return torch.where(ends >= 0, ends, last)

    @staticmethod
    def _last_rows(call: _Call) -> torch.Tensor:
        """The position of each row's last real token ``[B]``."""
        valid = call.attention_mask.bool()
        positions = torch.arange(valid.shape[1], device=valid.device)
        return torch.where(valid, positions, -1).amax(dim=1)

    @staticmethod
    def _sequences(call: _Call) -> torch.Tensor:
        """The prompt each token belongs to ``[B, L]``: its packed sequence in a padding-free row, else 0."""
        if call.sequence_ids is not None:
            return call.sequence_ids
        return torch.zeros_like(call.attention_mask, dtype=torch.long)

    def _instruction_rows(self, call: _Call) -> tuple[torch.Tensor, torch.Tensor]:
        """The positions of each row's instructions ``[B, Q]``: the real tokens after the last visual token
        of their prompt (its last token, where none follows its images; a padding-free row holds several
        prompts), in order; a row with fewer is padded with its last token, and ``counted [B, Q]`` says
        which are not padding. Reads the device once (Q)."""
        valid = call.attention_mask.bool()
        batch, length = valid.shape
        positions = torch.arange(length, device=valid.device).expand(batch, length)
        sequence = self._sequences(call)

        def per_prompt(values: torch.Tensor) -> torch.Tensor:  # the largest of each token's prompt
            return torch.gather(_largest_per_prompt(sequence, values), 1, sequence)

        last = per_prompt(torch.where(valid, positions, -1))
        after_images = per_prompt(torch.where(call.visual, positions, -1))
        instruction = valid & ((positions > after_images) | (positions == last))
        count = instruction.sum(dim=1)
        width = int(count.max())
        counted = torch.arange(width, device=valid.device) < count[:, None]
        rows = torch.where(instruction, positions, length).sort(dim=1).values[:, :width]
        return torch.where(counted, rows, self._last_rows(call)[:, None]), counted

    def _instruction_attention(
        self,
        call: _Call,
        layer: int,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Attention that each prompt's instruction pays to every token ``[B, L]`` at the pruning layer
        itself (its projections of ``hidden``, its input): the queries are the real tokens after the row's
        last visual token (its last token, where none follows the images), each with causal softmax over
        the prompt; averaged over heads and queries. O(B * H * Q * L) for Q instruction tokens."""
        valid = call.attention_mask.bool()
        positions = torch.arange(valid.shape[1], device=valid.device)
        rows, counted = self._instruction_rows(call)
        scoring_layer = self.layers[layer]
        query, keys = internals.project_queries_keys(scoring_layer, hidden, position_embeddings, rows)
        sequence = self._sequences(call)  # a query sees its own prompt only
        same_prompt = sequence[:, None, :] == torch.gather(sequence, 1, rows)[..., None]
        key_mask = valid[:, None, :] & (positions[None, None, :] <= rows[..., None]) & same_prompt
        scaling = internals.attention_scaling(scoring_layer)
        return causal_rows_attention(query, keys, key_mask, counted, scaling)

    def _instruction_rows_attention(
        self,
        call: _Call,
        layer: int,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> _InstructionRows:
        """The attention rows of each prompt's instruction at the scoring layer (see :meth:`_scoring_layer`),
        by head: each instruction query's softmax over its prompt up to it. O(B * H * Q * L) for Q
        instruction tokens."""
        valid = call.attention_mask.bool()
        positions = torch.arange(valid.shape[1], device=valid.device)
        rows, counted = self._instruction_rows(call)
        scoring_layer, scoring_input = self._scoring_layer(call, layer, hidden)
        query, keys = internals.project_queries_keys(scoring_layer, scoring_input, position_embeddings, rows)
        sequences = self._sequences(call)  # a query sees its own prompt only
        prompt = torch.gather(sequences, 1, rows)
        key_mask = (
            valid[:, None, :] & (positions <= rows[..., None]) & (sequences[:, None, :] == prompt[..., None])
        )
        logits = query_logits(query, keys, internals.attention_scaling(scoring_layer))  # [B, H, Q, L]
        attention = logits.masked_fill(~key_mask[:, None], float("-inf")).softmax(dim=-1)
        return _InstructionRows(
            attention.permute(0, 3, 1, 2), rows, torch.where(counted, prompt, -1), sequences
        )
