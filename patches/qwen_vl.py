"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: prune image and video tokens before or inside the language model.

Each image becomes one run of ``image_token_id`` placeholders between vision start/end tokens, one per
2x2 group of patches, so the count depends on the image's size (``image_grid_thw``). Positions are 3-D
(multimodal RoPE): the model computes them from the unpruned prompt before the language model, and its
text model turns them into ordinary per-token rotary tables, which the decoder hooks gather with the kept
tokens; at decode the model derives each new token's position from the full 2-D mask and its stored
``rope_deltas``, so kept tokens and new tokens keep their original positions (under the ``renumbered``
rule, the decoder hooks move both down: :mod:`tokenprune.positions`). The language model is a
Llama-style decoder, pruned by :class:`~tokenprune.patches.decoder.DecoderPruningHooks`.

Supported here: images and videos of any sizes, mixed in one batch (``keep_ratio`` and ``budget`` apply per
image or video; ``media`` picks images, videos or both), ``pre_llm`` and ``llm`` methods and schedules,
and ``kv`` methods (:class:`~tokenprune.patches.retrieval.DecodeRetrievalHooks`: the prefill and the cache
are the model's own, so each decode step's query carries the rotary phase of the model's own decode
position, from its ``rope_deltas``), and ``vision`` methods among the merger's output tokens
(:class:`~tokenprune.patches.qwen_vision.QwenVisionHooks`), alone or composed with a decoder method: the
tokens the tower drops are zeros, whose placeholders the decoder's first stage drops. Qwen3-VL's DeepStack
features follow the kept tokens, and its videos (one placeholder run per frame, a timestamp between)
count as one item each.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.config import PrunerConfig
from tokenprune.kernels import gather_tokens
from tokenprune.sequence import image_ids_by_lengths, image_ids_by_runs, items_in_prompt_order

from ._internals import (
    InstanceOverride,
    InternalsMovedError,
    base_model,
    has_media_inputs,
    placeholder_mask,
    pruned_modalities,
)
from .decoder import DecoderPruningHooks, LanguageModelHooks, size_following_stages
from .qwen_vision import QwenVisionHooks
from .retrieval import DecodeRetrievalHooks

#: Qwen3-VL's text-model method that adds the DeepStack features after its first layers.
_DEEPSTACK = "_deepstack_process"


class Qwen2VLAdapter:
    """Adapter for ``model_type`` ``qwen2_vl``, ``qwen2_5_vl`` (window attention in the vision tower) and
    ``qwen3_vl`` (DeepStack, below).

    ``hooks`` are the language model's: :class:`DecoderPruningHooks` for prefill methods, replaced at
    :meth:`attach` by :class:`DecodeRetrievalHooks` for a ``kv`` method."""

    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    frames_of_images = False  # images_as_frames: decoder and kv stages only

    def __init__(self, model: nn.Module):
        config = model.config
        self.model = model
        self.base = base_model(model)
        for name in ("visual", "language_model"):
            if not isinstance(getattr(self.base, name, None), nn.Module):
                raise InternalsMovedError(f"{type(self.base).__name__} has no {name!r} module")
        for module, argument in ((self.base, "image_grid_thw"), (self.base.visual, "grid_thw")):
            if argument not in inspect.signature(type(module).forward).parameters:
                raise InternalsMovedError(f"{type(module).__name__}.forward no longer takes {argument!r}")
        self.image_token_id, self.video_token_id = config.image_token_id, config.video_token_id
        self.frames_apart = config.model_type == "qwen3_vl"  # its videos: a run of placeholders per frame
        self.deepstack = config.model_type == "qwen3_vl"
        if self.deepstack:
            step = getattr(type(self.base.language_model), _DEEPSTACK, None)
            parameters = list(inspect.signature(step).parameters)[1:] if step is not None else []
            if parameters != ["hidden_states", "visual_pos_masks", "visual_embeds"]:
                raise InternalsMovedError(
                    f"{type(self.base.language_model).__name__}.{_DEEPSTACK}"
                    "(hidden_states, visual_pos_masks, visual_embeds) moved"
                )
        self.merge = config.vision_config.spatial_merge_size
        self.tokens_per_image: int | None = None  # set per forward from the images' sizes
        self.hooks: LanguageModelHooks = DecoderPruningHooks(model, self.base.language_model, 0, None)
        self.hooks.images_by_runs = True  # each image's placeholders sit between vision start/end tokens
        self._encoded_grids: list[torch.Tensor] = []  # grid_thw the vision tower saw since the last forward
        self._modalities: tuple[str, ...] = ()
        self.vision: QwenVisionHooks | None = None  # the vision tower's hooks, for a vision-stage method

    @property
    def num_layers(self) -> int:
        return self.hooks.num_layers

    def image_grid(self) -> tuple[int, int] | None:
        """The patch grid of the last batch's images, if they all had one (for overlays)."""
        grids = set(self.hooks.grids.values())
        return grids.pop() if len(grids) == 1 else None

    def stages(self, config: PrunerConfig) -> list[tuple[int, None]]:
        """The pruning layers of ``config``, a vision stage as layer 0 (its dropped tokens' placeholders go
        before the language model); the kept counts follow each image's size."""
        name = type(self.model).__name__
        vision = config.vision_stage
        if vision is None:
            return size_following_stages(config, self.num_layers, name)
        self.vision = QwenVisionHooks(self.base.visual)
        self.vision.plan(vision, name)
        if config.spec.vision:
            return [(0, None)]
        return [
            (0, None),
            *size_following_stages(dataclasses.replace(config, vision=None), self.num_layers, name),
        ]

    def attach(self, pruner) -> list[RemovableHandle]:
        self._modalities = pruned_modalities(pruner.config.media)
        if pruner.config.spec.decode:  # a kv method: decode-time hooks on the same language model
            self.hooks = DecodeRetrievalHooks(self.base.language_model, 0, None)
            self.hooks.images_by_runs = True
        vision = pruner.config.vision_stage
        handles = [] if vision is None else self.vision.attach(pruner, vision, self.base)
        handles += [
            self.base.visual.register_forward_pre_hook(self._record_grid, with_kwargs=True),
            self.base.register_forward_pre_hook(self._find_images, with_kwargs=True),
            *self.hooks.attach(pruner, self.model),
        ]
        if self.deepstack and not pruner.config.spec.decode:  # a kv method's prefill keeps every token
            handles.append(InstanceOverride(self.base.language_model, _DEEPSTACK, self._deepstack))
        return handles

    def _deepstack(self, hidden: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
        """Qwen3-VL's DeepStack step, after the first decoder layers: add each image token's deep vision
        features to its row, wherever pruning has moved it (``visual_pos_masks`` and the features are laid
        out over the unpruned prompt)."""
        rows = self.hooks.prompt_rows()
        if rows is None:
            original = getattr(type(self.base.language_model), _DEEPSTACK)
            return original(self.base.language_model, hidden, visual_pos_masks, visual_embeds)
        origin, real = rows
        added = hidden.new_zeros(*visual_pos_masks.shape, hidden.shape[-1])
        added[visual_pos_masks.to(hidden.device)] = visual_embeds.to(hidden.device, hidden.dtype)
        return hidden + gather_tokens(added, origin) * real[..., None].to(hidden.dtype)

    def _record_grid(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Remember the grids the vision tower encodes (``generate`` encodes before the forward)."""
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is not None:
            self._encoded_grids.append(grid)

    def _find_images(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Mark the placeholders of the images and videos pruned in this call's prompt (by id, or by embedding
        for a call made with ``inputs_embeds``), and the patch grid of each image size. A call without media
        (a decode step, whose generated token may be a placeholder id) has none: ``None``."""
        self.hooks.pending_visual = self.hooks.pending_sizes = None
        modalities = [modality for modality in self._modalities if has_media_inputs(kwargs, modality)]
        if not modalities:
            return
        visual = None
        for modality in modalities:
            token = self.image_token_id if modality == "image" else self.video_token_id
            found = placeholder_mask(self.base, args, kwargs, token)
            if visual is None:
                visual = torch.zeros_like(found)
            if modality == "video" and self.frames_apart and bool(found.any()):
                self.hooks.pending_image_id = _items_with_frames_apart(
                    visual | found, found, _video_lengths(kwargs, self.merge)
                )
            visual |= found
        self.hooks.pending_visual = visual
        given = [kwargs.get(f"{modality}_grid_thw") for modality in ("image", "video")]
        grids, self._encoded_grids = [g for g in given if g is not None] or self._encoded_grids, []
        thw = torch.cat(grids).tolist() if grids else []  # the one read of the device: each item's grid
        self.hooks.grids, self.hooks.frames = self._grids(thw)
        # each item's tokens, in prompt order, where the call prunes one modality whose grids it was given
        (modality,) = modalities if len(modalities) == 1 else (None,)
        one_run_each = modality == "image" or (modality == "video" and not self.frames_apart)
        if one_run_each and given[modality == "video"] is not None:
            first = 0 if modality == "image" or given[0] is None else len(given[0])
            items = thw[first : first + len(given[modality == "video"])]
            self.hooks.pending_sizes = [t * (h // self.merge) * (w // self.merge) for t, h, w in items]

    def _grids(
        self, grid_thw: list[list[int]]
    ) -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int, int]]]:
        """Token count -> merged patch grid of single-frame images, and -> ``(frames, rows, cols)`` of
        videos (of ``grid_thw``, each item's temporal, height and width patches); a count that two shapes
        share has neither."""
        shapes: dict[int, tuple[int, int, int] | None] = {}
        for t, h, w in grid_thw:
            shape = (t, h // self.merge, w // self.merge)
            count = shape[0] * shape[1] * shape[2]
            shapes[count] = shape if shapes.get(count, shape) == shape else None
        known = {count: shape for count, shape in shapes.items() if shape is not None}
        grids = {count: (rows, cols) for count, (t, rows, cols) in known.items() if t == 1}
        return grids, {count: shape for count, shape in known.items() if shape[0] > 1}


def _video_lengths(kwargs: dict, merge: int) -> torch.Tensor:
    """Placeholder tokens of each video of a call: from its ``video_grid_thw``, or the features
    ``generate`` encoded beforehand."""
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get("video")
    if encoded is not None:
        return torch.tensor([feature.shape[0] for feature in encoded.pooler_output])
    grid = kwargs.get("video_grid_thw")
    if grid is None:
        raise ValueError("videos need their video_grid_thw in the same call")
    return grid.prod(dim=-1) // merge**2


def _items_with_frames_apart(
    visual: torch.Tensor, videos: torch.Tensor, video_lengths: torch.Tensor
) -> torch.Tensor:
    """Number each image and video ``[B, L]`` (-1 elsewhere) where a video is one placeholder run per frame:
    an image is its run, a video all its frames' runs (``video_lengths`` tokens each, in order)."""
    images = torch.where(videos, -1, image_ids_by_runs(visual & ~videos))
    return items_in_prompt_order(images, image_ids_by_lengths(videos, video_lengths.to(visual.device)))
