"""LLaVA-1.5 for vLLM with visual tokens pruned before the language model (imports vLLM: load it only
through :func:`tokenprune.vllm_plugin.register`).

Written against vLLM 0.33's ``vllm/model_executor/models/llava.py`` and not run here (vLLM needs a GPU
machine): the processing info reports K placeholder tokens per image, and the model's embedding step
returns the K rows :func:`~tokenprune.vllm_plugin.select_embeddings` keeps. Without a ``tokenprune``
config (``--hf-overrides`` or the environment) both pass everything through, as the built-in model does.
Pixtral-style LLaVA checkpoints and precomputed image embeddings are never pruned.
"""

from __future__ import annotations

from transformers import PixtralVisionConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .vllm_plugin import placeholder_count, plugin_config, select_embeddings


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
