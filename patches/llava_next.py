"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): prune image tokens before or inside the language model.

AnyRes: each image is its base tile's tokens followed by the unpadded high-resolution tiles, row by row,
each row ended by the learned ``image_newline`` token; the prompt holds one ``image_token_id`` placeholder
per token, newlines included, and an image's count depends on its size and aspect ratio. The adapter
takes each image's count from the model's own packing step (``pack_image_features``, shadowed on this
instance to read the lengths it returns), numbers the placeholders image by image, and leaves the newline
rows, found by their exact ``image_newline`` features, out of the visual tokens: they are structure and
always kept. ``keep_ratio`` and ``budget`` count the visual tokens of all tiles of an image together.
``pre_llm`` and ``llm`` methods drop tokens at prefill
(:class:`~tokenprune.patches.decoder.DecoderPruningHooks`); a ``kv`` method
(:class:`~tokenprune.patches.retrieval.DecodeRetrievalHooks`) keeps the prompt whole and hides, at each
decode step, the visual tokens its query does not select: newline rows, being text to it, stay visible.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.config import PrunerConfig
from tokenprune.sequence import image_ids_by_lengths, items_in_prompt_order

from ._internals import (
    InstanceOverride,
    InternalsMovedError,
    base_model,
    has_media_inputs,
    placeholder_mask,
    pruned_modalities,
)
from .anyres_vision import AnyResVisionHooks
from .decoder import DecoderPruningHooks, LanguageModelHooks, size_following_stages
from .onevision_video import OneVisionVideos, video_method_runs
from .retrieval import DecodeRetrievalHooks

_PACK = "pack_image_features"


class LlavaNextAdapter:
    """Adapter for ``model_type`` ``llava_next`` and ``llava_onevision`` (``pre_llm``, ``llm``, ``kv`` and
    ``vision`` methods on images; OneVision's videos: :mod:`~tokenprune.patches.onevision_video`). ``hooks``
    are the language model's, chosen at :meth:`attach` by the method's stage."""

    model_types = ("llava_next", "llava_onevision")
    frames_of_images = False  # images_as_frames: decoder and kv stages only

    def __init__(self, model: nn.Module):
        self.model = model
        self.base = base_model(model)
        if not isinstance(getattr(self.base, "image_newline", None), torch.Tensor):
            raise InternalsMovedError(f"{type(self.base).__name__} has no 'image_newline' parameter")
        pack = getattr(type(self.base), _PACK, None)
        if pack is None or "image_newline" not in inspect.signature(pack).parameters:
            raise InternalsMovedError(f"{type(self.base).__name__}.{_PACK}(..., image_newline) moved")
        self.image_token_id = model.config.image_token_id
        self.tokens_per_image: int | None = None  # varies with each image's size
        self.hooks: LanguageModelHooks = DecoderPruningHooks(model, self.base.language_model, 0, None)
        self._lengths: torch.Tensor | None = None  # tokens of each image of the last encoding
        self.vision: AnyResVisionHooks | None = None  # the vision tower's hooks, for a vision-stage method
        onevision = model.config.model_type == "llava_onevision"
        self.videos = OneVisionVideos(self.base) if onevision else None
        self._modalities: tuple[str, ...] = ("image",)  # what the pruner prunes, of what the model takes
        self._found: list[str] = []  # of those, what this call carries
        self._videos: torch.Tensor | None = None  # [B, L] this call's video placeholders

    @property
    def num_layers(self) -> int:
        return self.hooks.num_layers

    def image_grid(self) -> None:
        """Tiles and newlines: an image's tokens are not one patch grid."""
        return None

    def stages(self, config: PrunerConfig) -> list[tuple[int, None]]:
        """The pruning layers of ``config``, a vision stage as layer 0 (its dropped tokens' placeholders go
        before the language model); the kept counts follow each image's size."""
        name = type(self.model).__name__
        vision = config.vision_stage
        if vision is None:
            return size_following_stages(config, self.num_layers, name)
        self.vision = AnyResVisionHooks(self.model, self.base, vision)
        if config.spec.vision:
            return [(0, None)]
        return [
            (0, None),
            *size_following_stages(dataclasses.replace(config, vision=None), self.num_layers, name),
        ]

    def attach(self, pruner) -> list[RemovableHandle]:
        if pruner.config.spec.decode:  # a kv method: decode-time hooks on the same language model
            self.hooks = DecodeRetrievalHooks(self.base.language_model, 0, None)
        config = pruner.config
        vision = [] if config.vision_stage is None else self.vision.attach(pruner)
        self._modalities = pruned_modalities(config.media)
        if self.videos is None or not video_method_runs(config.vision_stage):
            self._modalities = tuple(m for m in self._modalities if m == "image")
        elif "video" in self._modalities:
            encoder = None if self.vision is None else self.vision.encoder
            vision += self.videos.attach(pruner, config.vision_stage, encoder)
        return [
            *vision,
            InstanceOverride(self.base, _PACK, self._pack),
            self.base.register_forward_pre_hook(self._find_images, with_kwargs=True),
            self.hooks.language_model.register_forward_pre_hook(self._drop_newlines, with_kwargs=True),
            *self.hooks.attach(pruner, self.model),
        ]

    def _pack(self, *args, **kwargs):
        """The model's packing step; remembers each image's token count. With a vision method, the tokens
        it drops are zeros (see :class:`~tokenprune.patches.anyres_vision.AnyResVisionHooks`)."""
        pack = getattr(type(self.base), _PACK)
        features, lengths = pack(self.base, *args, **kwargs)
        if self.vision is not None and self.vision.encoded:
            features = self.vision.reduce(pack, args, kwargs, features)
            if self.videos is not None:  # the videos' selection adds to this forward's, after the images'
                self.videos.started = True
        self._lengths = lengths
        return features, lengths

    def _find_images(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Mark the placeholders of this call's pruned images and videos, by id or by embedding (``None``
        without either)."""
        self.hooks.pending_visual = self._videos = None
        self._found = modalities = [m for m in self._modalities if has_media_inputs(kwargs, m)]
        if "image" in modalities:
            self.hooks.pending_visual = placeholder_mask(self.base, args, kwargs, self.image_token_id)
        if "video" in modalities:
            self._videos = placeholder_mask(self.base, args, kwargs, self.videos.token_id)
            images = self.hooks.pending_visual
            self.hooks.pending_visual = self._videos if images is None else images | self._videos

    def _drop_newlines(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before the language model (registered ahead of the decoder hooks): number the placeholders by
        image, then take the newline rows out of the visual tokens."""
        visual = self.hooks.pending_visual
        if visual is None or not bool(visual.any()):
            return
        videos, self._videos = self._videos, None
        images = visual if videos is None else visual & ~videos
        item_id = self._image_ids(images) if "image" in self._found else None
        if videos is not None:
            video_id = self.videos.item_ids(videos)
            self.hooks.frames = self.videos.frames
            item_id = video_id if item_id is None else items_in_prompt_order(item_id, video_id)
        embeds = kwargs["inputs_embeds"]
        newline = (embeds == self.base.image_newline.to(embeds)).all(dim=-1) & visual
        self.hooks.pending_visual = visual & ~newline
        self.hooks.pending_image_id = torch.where(newline, -1, item_id)

    def _image_ids(self, images: torch.Tensor) -> torch.Tensor:
        """The number of each image placeholder's image ``[B, L]`` (-1 elsewhere), from the last packing."""
        lengths, self._lengths = self._lengths, None
        if lengths is None:
            raise ValueError("LLaVA-NeXT pruning needs the images encoded in this call (pass pixel_values)")
        return image_ids_by_lengths(images, lengths.to(images.device))
