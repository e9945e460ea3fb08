"""The hooks that attach one pruner to a decoder-only language model and hand each call to the stage loop.

Per-instance forward hooks only:

* on the language model (pre): tells prefill from decode. At a prefill with images it reads the call's
  layout (:class:`~.layout.Call`); at a decode step on a pruned cache it rewrites the 2-D mask and the
  position ids (:func:`~.session.decode_inputs`), so the next token keeps its original position and
  attends only to kept tokens.
* on each pruning layer K (pre): at prefill, prunes (:meth:`~.stages.Stages.prune`); at a decode step,
  hands it the mask (and positions) of the rows its cache holds (:func:`~.session.step_layer_inputs`).
* on the other layers after the first K (pre): hands them the pruned mask, positions and rotary tables.
* on the layer before each K (pre), the sub-layers, the rotary embedding: capture what the method needs.
* on the language model (post): leaves on the returned cache how it was pruned, for the decode steps.
* on the generation head: the loss over the rows that came back (:mod:`.labels`).

Layers before the first K see every token and keep their full cache (unless ``drop_early_kv``); layers
from K on see only the kept tokens. K = 0 is the ``pre_llm`` stage.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.sequence import ImageRows, as_videos, image_ids_by_count, image_ids_by_runs
from tokenprune.transition import sublayer_transition

from .. import _cache_internals as caches
from .. import _internals as internals
from .labels import LabelHooks
from .layout import Call, image_rows
from .needs import SCORING_INPUT_NEEDS
from .session import decode_inputs, masks_for_generate, record_session, session_of, step_layer_inputs
from .stages import Stages

if TYPE_CHECKING:
    from tokenprune.pruner import Pruner


class LanguageModelHooks:
    """What every set of hooks on a decoder-only language model holds: the model, its layers, the image
    token layout, and the image placeholders of the next forward (``pending_visual [B, L]``, set by the
    family adapter, with ``pending_sizes``, each image's tokens in order, where the adapter knows them
    without reading the device)."""

    def __init__(self, language_model: nn.Module, tokens_per_image: int, grid: tuple[int, int] | None):
        internals.check_decoder_internals(language_model)
        self.language_model = language_model
        self.layers = internals.decoder_layers(language_model)
        self.tokens_per_image = tokens_per_image
        self.grid = grid
        self.pending_visual: torch.Tensor | None = None
        self.pending_sizes: list[int] | None = None
        self.pending_rows: ImageRows | None = None  # the images' rows, where the adapter had to find them
        self.pending_image_id: torch.Tensor | None = None  # [B, L] set by adapters that number images
        # families whose image size varies: each image is one run of placeholders, and the patch grid
        # of an image of a given token count, where known (set per forward by the family adapter)
        self.images_by_runs = False
        self.grids: dict[int, tuple[int, int]] = {}
        # and the (frames, rows, cols) of a video of a given token count, where known
        self.frames: dict[int, tuple[int, int, int]] = {}
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
        if self.images_by_runs:
            return self.grids.get(tokens)
        return self.grid if tokens == self.tokens_per_image else None  # a video of images has frames

    def frames_for(self, tokens: int) -> tuple[int, int, int] | None:
        """The ``(frames, rows, cols)`` of a video of ``tokens`` tokens, if known."""
        return self.frames.get(tokens)

    def item_rows(
        self, visual: torch.Tensor, image_id: torch.Tensor, mask: torch.Tensor | None, sizes: list[int] | None
    ) -> tuple[torch.Tensor, ImageRows]:
        """The numbering ``[B, L]`` and rows of the items of a prefill whose image placeholders are
        ``visual [B, L]`` (see :func:`~.layout.image_rows`): its images, or, under the config's
        ``images_as_frames``, the video of each prompt's images, whose frames (each image's grid, or a row of
        its tokens) :meth:`frames_for` then gives. Reads nothing more from the device; takes the rows the
        adapter found for this prefill (``pending_rows``), if it did, without reading them again."""
        pruner = self._pruner
        rows, self.pending_rows = self.pending_rows, None
        if rows is None:
            rows = image_rows(visual, image_id, mask, sizes, pruner.checking("the prompts' image rows"))
        if not pruner.config.images_as_frames:
            return image_id, rows
        videos, video_of = as_videos(rows)
        counts = [count for count in rows.per_row if count]
        for size, count in zip(videos.sizes, counts, strict=True):
            frame = size // count
            self.frames[size] = (count, *(self.grid_for(frame) or (1, frame)))
        video_id = torch.tensor(video_of, dtype=torch.long).to(visual.device, non_blocking=True)
        return torch.where(visual, video_id[image_id.clamp(min=0)], -1), videos

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
    """Installs and removes the hooks of one prefill pruner on one decoder-only language model."""

    def __init__(
        self, model: nn.Module, language_model: nn.Module, tokens_per_image: int, grid: tuple[int, int] | None
    ):
        """Hooks for the language model of the VLM ``model`` (whose generation head, if it has one, computes
        the loss of labels: read here, so that a head whose loss moved fails before any hook is placed)."""
        super().__init__(language_model, tokens_per_image, grid)
        self._labels = LabelHooks.of(model)
        self._call: Call | None = None
        self._stages: Stages | None = None

    def attach(self, pruner: Pruner, model: nn.Module) -> list[RemovableHandle]:
        """Register the hooks for ``pruner``, whose VLM is ``model``; returns their handles."""
        self._pruner = pruner
        self._stages = stages = Stages(pruner, self)
        stage_layers = stages.layers
        lm = self.language_model
        handles = [
            lm.register_forward_pre_hook(self._before_language_model, with_kwargs=True),
            lm.register_forward_hook(self._after_language_model, with_kwargs=True, always_call=True),
            *self.generation_overrides(model),
            *(self._labels.attach(model) if self._labels is not None else []),
        ]
        if stages.renumbered:
            rotary = internals.rotary_embedding(lm)
            handles.append(rotary.register_forward_pre_hook(self._capture_positions, with_kwargs=True))
        for i, layer in enumerate(self.layers[stage_layers[0] :], start=stage_layers[0]):
            hook = (
                partial(self._at_stage_layer, stage_layers.index(i))
                if i in stage_layers
                else self._after_stage
            )
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        if "transition" in stages.needs:  # from the layer before the first stage to the one before the last
            handles += [
                sublayer.register_forward_hook(self._track_transition, with_kwargs=True)
                for layer in self.layers[stage_layers[0] - 1 : stage_layers[-1]]
                for sublayer in internals.sublayers(layer)
            ]
        if SCORING_INPUT_NEEDS & set(stages.needs):
            # registered last, so that each sees its layer's input after any pruning at that layer
            handles += [
                self.layers[k - 1].register_forward_pre_hook(self._capture_scoring_input, with_kwargs=True)
                for k in stage_layers
                if k > 0
            ]
        return handles

    def prompt_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """During a prefill with images: the prompt position of each current row ``[B, L_cur]`` and
        whether the row holds a prompt token (not re-padding); ``None`` otherwise."""
        call = self._call
        if call is None or call.visual is None:
            return None
        return call.origin, call.real

    def masks_for_generate(self, model: nn.Module) -> Callable:
        return masks_for_generate(model, self.language_model)

    # -- language model -------------------------------------------------------------------------

    def _before_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        visual, self.pending_visual = self.pending_visual, None
        image_id, self.pending_image_id = self.pending_image_id, None
        sizes, self.pending_sizes = self.pending_sizes, None
        self._call = None
        cache = caches.cache_argument(kwargs)
        # ``visual`` is None in a call without images, so that a decode step (compiled, perhaps) reads no data
        has_images = visual is not None and (bool(sizes) if sizes is not None else bool(visual.any()))
        session = session_of(cache)
        if session is not None:
            if has_images:
                raise ValueError(
                    "cannot add images to a cache whose visual tokens were pruned; start a new cache"
                )
            renumbered_first = self._stages.layers[0] == 0
            kwargs, self._call = decode_inputs(kwargs, cache, session, renumbered_first)
            return args, kwargs
        if not has_images:
            if not torch.compiler.is_compiling():
                self._pruner.record_text_only(kwargs["inputs_embeds"].shape[0])
            return args, kwargs
        if caches.cache_length(cache, 0) > 0:
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
        packed = mask is None and cache is None  # as the model's mask code, which then reads the positions
        image_id = self.image_ids(visual) if image_id is None else image_id
        image_id, rows = self.item_rows(visual, image_id, mask, sizes)
        self._call = Call.prefill(visual, image_id, mask, packed, rows, kwargs.get("inputs_embeds"))
        if self._labels is not None:
            self._labels.check(self._call, lambda: self._stages.drops_tokens(rows.sizes))
        return args, kwargs

    def _after_language_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call, self._call = self._call, None
        if call is not None and call.visual is not None and self._labels is not None:
            self._labels.returned(call)
        if call is None or not call.new_stages:
            return
        record_session(call, output, self._pruner.config.drop_early_kv, self.num_layers)

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
        if call.session is None:
            return self._stages.prune(call, stage, hidden, args, kwargs, caches.cache_argument(kwargs))
        layer = self._stages.layers[stage]
        update = step_layer_inputs(call, stage, layer, self.language_model, hidden, kwargs)
        if not update:
            return None
        call.layer_kwargs = {**call.layer_kwargs, **update}
        return args, {**kwargs, **call.layer_kwargs}
