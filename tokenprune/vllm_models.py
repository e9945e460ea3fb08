"""LLaVA-1.5, LLaVA-NeXT and (experimental) Qwen2.5-VL for vLLM with visual tokens pruned before the
language model (imports vLLM: load it only through :func:`tokenprune.vllm_plugin.register`).

Written against vLLM 0.33's ``vllm/model_executor/models/{llava,llava_next,qwen2_5_vl}.py`` and not run
here (vLLM needs a GPU machine): each processing step reports K placeholder tokens per image, and each
model's embedding step returns the K rows :mod:`tokenprune.vllm_plugin` keeps. Without a ``tokenprune``
config (``--hf-overrides`` or the environment) all pass everything through, as the built-in models do.
Pixtral-style LLaVA checkpoints and precomputed LLaVA / LLaVA-NeXT image embeddings are never pruned;
Qwen2.5-VL videos are never pruned.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import PixtralVisionConfig
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .vllm_plugin import (
    next_placeholder_count,
    placeholder_count,
    plugin_config,
    qwen_grid,
    qwen_placeholder_count,
    qwen_position_cells,
    select_embeddings,
    select_next_embeddings,
    unpruned_layout,
)


class PrunedLlavaProcessingInfo(LlavaProcessingInfo):
    """Reports the pruned placeholder count of each image (vLLM sizes prompts before encoding)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        tokens = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return placeholder_count(tokens, plugin_config(self.get_hf_config()))


def _build_info(ctx):
    info = _build_llava_or_pixtral_hf_info(ctx)
    return PrunedLlavaProcessingInfo(ctx) if type(info) is LlavaProcessingInfo else info


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunedLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` whose image embeddings are the kept rows of each image."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        vision = config.vision_config
        pixtral = isinstance(vision, PixtralVisionConfig)  # its own processing info: never pruned
        self.tokenprune_config = None if pixtral else plugin_config(config)
        side = vision.image_size // vision.patch_size
        self.tokenprune_grid = (side, side) if config.vision_feature_select_strategy == "default" else None

    def embed_multimodal(self, **kwargs: object):
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        embeddings = self._process_image_input(image_input)
        if self.tokenprune_config is None or isinstance(image_input, LlavaImageEmbeddingInputs):
            return embeddings
        grids = [self.tokenprune_grid] * len(embeddings)
        return select_embeddings(list(embeddings), self.tokenprune_config, grids)


class PrunedLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """Reports each image's newline rows plus the kept count of its visual rows."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        tokens = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        config = plugin_config(self.get_hf_config())
        if config is None:
            return tokens
        return next_placeholder_count(tokens, self._newline_rows(image_width, image_height), config)

    def _newline_rows(self, image_width: int, image_height: int) -> int:
        """The ``image_newline`` rows of an image: one per row of its unpadded high-resolution tiles."""
        encoder = self.get_vision_encoder_info()
        tiles_high, tiles_wide = get_anyres_image_grid_shape(
            image_size=(image_height, image_width),
            grid_pinpoints=self.get_hf_config().image_grid_pinpoints,
            patch_size=encoder.get_image_size(),
        )
        _, newlines = self._get_num_unpadded_features(
            original_height=image_height,
            original_width=image_width,
            npatches=encoder.get_patch_grid_length(),
            num_patch_height=tiles_high,
            num_patch_width=tiles_wide,
        )
        return newlines


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=PrunedLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunedLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """``LlavaNextForConditionalGeneration`` whose image embeddings are each image's newline rows and kept
    visual rows."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenprune_config = plugin_config(vllm_config.model_config.hf_config)

    def _process_image_input(self, image_input):
        embeddings = super()._process_image_input(image_input)
        if self.tokenprune_config is None or isinstance(image_input, LlavaNextImageEmbeddingInputs):
            return embeddings
        return select_next_embeddings(list(embeddings), self.image_newline, self.tokenprune_config)


class PrunedQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """Replaces each image's placeholder with its kept count of merged tokens (videos unchanged)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_config = self.info.get_hf_config()
        config = plugin_config(hf_config)
        if config is None:
            return updates
        merge = hf_config.vision_config.spatial_merge_size

        def image_tokens(item_idx: int) -> list[int]:
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data.tolist()
            return [hf_config.image_token_id] * qwen_placeholder_count(grid, merge, config)

        return [
            dataclasses.replace(update, replacement=image_tokens) if update.modality == "image" else update
            for update in updates
        ]


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2_5_VLMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class PrunedQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Experimental: ``Qwen2_5_VLForConditionalGeneration`` whose image embeddings are the kept merged
    tokens of each image, and whose multimodal RoPE positions are laid out for the pruned prompt.

    Positions: vLLM computes them when a request is admitted, from the placeholder layout and each item's
    ``grid_thw``, before any image is encoded. This class computes them for the unpruned layout and gives
    each image's K placeholders the positions of the K cells that
    :func:`~tokenprune.vllm_plugin.qwen_position_cells` names (the cells ``uniform`` keeps); text and
    videos keep their unpruned positions, and decoding continues after the unpruned prompt's last
    position, as on the transformers path. So the
    kept tokens carry their own positions under ``uniform`` only; under a content-based method the i-th
    kept token (in raster order) carries the i-th uniform cell's position. vLLM's own EVS video pruning
    (``--video-pruning-rate``) and encoder CUDA graphs (``cudagraph_mm_encoder``) are refused with it.
    """

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenprune_config = plugin_config(vllm_config.model_config.hf_config)
        bypassed = self.is_multimodal_pruning_enabled or vllm_config.compilation_config.cudagraph_mm_encoder
        if self.tokenprune_config is not None and bypassed:
            raise ValueError(
                "tokenprune's Qwen2.5-VL pruning cannot run with vLLM's video pruning (drop "
                "--video-pruning-rate) or encoder CUDA graphs (drop compilation_config."
                "cudagraph_mm_encoder): both produce image embeddings without its embedding step"
            )

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        embeddings = super()._process_image_input(image_input)
        if self.tokenprune_config is None:
            return embeddings
        merge = self.config.vision_config.spatial_merge_size
        grids = [qwen_grid(grid, merge) for grid in image_input["image_grid_thw"].tolist()]
        return tuple(select_embeddings(list(embeddings), self.tokenprune_config, grids))

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list
    ) -> tuple[torch.Tensor, int]:
        """Positions ``[3, len(input_tokens)]`` of the pruned prompt, gathered from vLLM's positions of the
        unpruned one (see the class), and the offset of the next token's position from its index."""
        if self.tokenprune_config is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        features = sorted(mm_features, key=lambda feature: feature.mm_position.offset)
        items = []
        for feature in features:
            grid = feature.data[f"{feature.modality}_grid_thw"].data.tolist()
            config = self.tokenprune_config if feature.modality == "image" else None
            total = qwen_placeholder_count(grid, merge, None)
            items.append((feature.mm_position.offset, total, qwen_position_cells(grid, merge, config)))
        index, offsets = unpruned_layout(len(input_tokens), items)
        unpruned = [
            dataclasses.replace(
                feature, mm_position=dataclasses.replace(feature.mm_position, offset=offset, length=total)
            )
            for feature, offset, (_, total, _) in zip(features, offsets, items, strict=True)
        ]
        length = len(input_tokens) + sum(total - len(cells) for _, total, cells in items)
        positions, _ = super().get_mrope_input_positions([0] * length, unpruned)
        return positions[:, index], int(positions.max()) + 1 - len(input_tokens)
