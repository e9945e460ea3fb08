"""LLaVA-1.5 (``LlavaForConditionalGeneration``): prune image tokens in the vision tower, before or inside
the language model.

Each image becomes a run of ``image_token_id`` placeholders in the prompt, one per patch of the vision
tower (the CLS token is dropped by the default feature strategy). The language model is a Llama-style
decoder, pruned by :class:`~tokenprune.patches.decoder.DecoderPruningHooks`; this module says where the
images are. For a ``vision`` method it also hooks the tower
(:class:`~tokenprune.patches.vit.EncoderPruningHooks`) and the projector: only the kept patches are
projected, and the decoder's first stage (before the language model) drops the placeholders of the
others, so the language model sees one token per kept patch, at its original position or, under the
``renumbered`` rule (the vision methods' default, as their references hand LLaVA fewer features), at
consecutive ones. A ``projected`` method (its reference prunes after the projector) chooses after it,
among every patch projected.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.config import PrunerConfig

from ._internals import base_model, has_media_inputs, placeholder_mask
from .decoder import DecoderPruningHooks, check_layer
from .decoder.layout import image_rows
from .retrieval import DecodeRetrievalHooks
from .vit import EncoderPruningHooks


class LlavaAdapter:
    """Adapter for ``model_type == "llava"``."""

    model_types = ("llava",)
    frames_of_images = True  # a vision stage chooses among a prompt's images as one video

    def __init__(self, model: nn.Module):
        config = model.config
        self.model = model
        self.base = base_model(model)
        self.image_token_id = config.image_token_id
        vision = config.vision_config
        patches_per_side = vision.image_size // vision.patch_size
        self.tokens_per_image = patches_per_side**2
        grid: tuple[int, int] | None = (patches_per_side, patches_per_side)
        if config.vision_feature_select_strategy == "full":  # the CLS token is kept among the patches
            self.tokens_per_image += 1
            grid = None
        self.hooks = DecoderPruningHooks(model, self.base.language_model, self.tokens_per_image, grid)
        self.encoder: EncoderPruningHooks | None = None
        self._kept_patches: torch.Tensor | None = None  # [I, k] of the current forward's images
        self._after_projector = False  # the vision method chooses among projected patches
        self._frames = 1  # images of each video, under images_as_frames: the prompt's
        self._pruner = None
        self._language_model: DecoderPruningHooks | DecodeRetrievalHooks = self.hooks

    @property
    def num_layers(self) -> int:
        return self.hooks.num_layers

    def image_grid(self) -> tuple[int, int] | None:
        """Rows and columns of an image's tokens, for overlays; ``None`` when they are not a grid."""
        return self.hooks.grid

    def stages(self, config: PrunerConfig) -> list[tuple[int, int]]:
        """``(decoder layer, visual tokens kept per image)`` of each stage of ``config``; a vision stage
        is layer 0 (its placeholders are dropped before the language model). ``ValueError`` for a layer
        outside the language model, a budget larger than an image or a vision stage this model cannot
        take."""
        if config.spec.decode:  # nothing is pruned at prefill
            check_layer(config.acting_layer, self.num_layers)
            config.kept_per_image(self.tokens_per_image)  # a budget larger than an image raises
            return []
        vision = config.vision_stage
        decoder = [] if config.spec.vision else config.stages(self.tokens_per_image)
        if decoder:
            check_layer(config.last_layer, self.num_layers)
        if vision is None:
            return decoder
        encoder = self._encoder_hooks(vision)
        kept = encoder.plan(vision)
        if any(keep > kept for _, keep in decoder):
            raise ValueError(
                f"{config.method!r} keeps {max(keep for _, keep in decoder)} tokens per image but "
                f"{vision.method!r} in the vision tower keeps only {kept}: keep fewer in the decoder"
            )
        return [(0, kept), *decoder]

    def _encoder_hooks(self, vision: PrunerConfig) -> EncoderPruningHooks:
        if self.encoder is None:
            self.encoder = feature_layer_encoder(self.model.config, self.base.vision_tower, vision.method)
        return self.encoder

    def attach(self, pruner) -> list[RemovableHandle]:
        self._pruner = pruner
        handles = [self.base.register_forward_pre_hook(self._find_images, with_kwargs=True)]
        vision = pruner.config.vision_stage
        self._after_projector = vision is not None and vision.spec.projected
        if vision is not None:
            projector = self.base.multi_modal_projector
            handles += [
                *self.encoder.attach(pruner, vision, standalone=False),
                projector.register_forward_pre_hook(self._select_patches),
                projector.register_forward_hook(self._place_patches),
            ]
        language_model = self.hooks
        if pruner.config.spec.decode:  # a kv method: decode-time hooks on the same language model
            language_model = DecodeRetrievalHooks(
                self.base.language_model, self.tokens_per_image, self.hooks.grid
            )
        self._language_model = language_model
        return [*handles, *language_model.attach(pruner, self.model)]

    def _find_images(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Mark the image placeholders of this call's prompt, for the language-model hooks (``None`` in a call
        without images: a decode step that generated the placeholder id is text)."""
        images = has_media_inputs(kwargs)
        placeholders = placeholder_mask(self.base, args, kwargs, self.image_token_id) if images else None
        self._language_model.pending_visual = placeholders
        count = image_count(kwargs) if images else None
        sizes = None if count is None else [self.tokens_per_image] * count
        self._language_model.pending_sizes = sizes
        self._language_model.pending_rows = None
        if images and self._after_projector and self._pruner.config.images_as_frames:
            mask = kwargs.get("attention_mask")  # the padding mask the language model gets (else it refuses)
            mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            self._frames = self._images_per_prompt(placeholders, mask, sizes)

    def _images_per_prompt(
        self, placeholders: torch.Tensor, mask: torch.Tensor | None, sizes: list[int] | None
    ) -> int:
        """The images of each prompt that holds any, under ``images_as_frames`` with a vision stage (it
        chooses among a video's frames before the language model numbers them): from the shapes where they
        tell, else read once (the rows are handed on to the language-model hooks, which then read nothing).
        ``ValueError`` where prompts hold different numbers of images."""
        hooks = self._language_model
        check = self._pruner.checking("the prompts' image rows")
        rows = image_rows(placeholders, hooks.image_ids(placeholders), mask, sizes, check)
        hooks.pending_rows = rows
        counts = {count for count in rows.per_row if count}
        if len(counts) != 1:
            raise ValueError(
                "images_as_frames with a vision method needs as many images in each prompt, not "
                f"{sorted(counts)}: batch prompts of as many frames, or run them one by one"
            )
        return counts.pop()

    def _select_patches(self, module: nn.Module, args: tuple) -> tuple | None:
        """Before the projector: the patches the vision method kept (merging methods chose them already)."""
        (features,) = args
        if not self.encoder.encoded or self._after_projector:  # not the tower's features, or chosen after
            return None
        if self.encoder.merging:
            self._kept_patches = self.encoder.merged_origin(features.shape[0], features.device)
            return None
        self._kept_patches, kept = self.encoder.reduce(features)
        return (kept,)

    def _place_patches(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """After the projector: the kept patches in their placeholders' places and zeros in the others',
        so that the prompt's placeholder count still matches; the decoder drops the zero placeholders
        before the language model (see :func:`tokenprune.patches.decoder.stages.kept_by_vision_stage`). A
        ``projected`` method chooses here, among the projected patches."""
        frames = 1
        if self._after_projector and self.encoder.encoded:
            frames, self._frames = self._frames, 1
            self._kept_patches, output = self.encoder.reduce(output, frames)
        index, self._kept_patches = self._kept_patches, None
        if index is None:
            return output
        items, _, dim = output.shape
        full = output.new_zeros(items, self.tokens_per_image * frames, dim)
        full.scatter_(1, index[..., None].expand(-1, -1, dim), output)
        return full.view(items * frames, self.tokens_per_image, dim)


def image_count(kwargs: dict) -> int | None:
    """The images of a forward call as its inputs' shapes tell: one per ``pixel_values [I, 3, H, W]``, or per
    feature that ``generate`` encoded beforehand; ``None`` for other shapes."""
    pixels = kwargs.get("pixel_values")
    if isinstance(pixels, torch.Tensor):
        return pixels.shape[0] if pixels.dim() == 4 else None
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    features = getattr(encoded, "pooler_output", None)
    return None if features is None else len(features)


def feature_layer_encoder(config, tower: nn.Module, method: str) -> EncoderPruningHooks:
    """Hooks for a vision method on a LLaVA-style model's ``tower``, whose output layer is the layer
    ``config.vision_feature_layer`` names. ``ValueError`` naming the fix if the features handed to the
    projector are not exactly the patches of that one layer's output (a CLS token kept or a patch dropped
    by ``vision_feature_select_strategy``, several feature layers, or the embeddings)."""
    vision_model = getattr(tower, "vision_model", tower)
    encoder = EncoderPruningHooks(vision_model)
    strategy = "default" if encoder.protected else "full"  # "default" drops the first token: the CLS
    if config.vision_feature_select_strategy != strategy:
        raise ValueError(
            f"{method!r} needs the vision tower's patches only, which {type(vision_model).__name__} hands on "
            f"with vision_feature_select_strategy={strategy!r}, not {config.vision_feature_select_strategy!r}"
        )
    feature_layer = config.vision_feature_layer
    num_layers = len(encoder.layers)
    hidden_index = (
        feature_layer + num_layers + 1
        if isinstance(feature_layer, int) and feature_layer < 0
        else feature_layer
    )
    if not isinstance(hidden_index, int) or not 1 <= hidden_index <= num_layers:
        raise ValueError(
            f"{method!r} needs a single vision feature layer that is a layer's output "
            f"(1..{num_layers} or -{num_layers}..-1), not vision_feature_layer={feature_layer!r}"
        )
    encoder.output_layer = hidden_index - 1  # hidden_states[i] is the output of layer i - 1
    return encoder
