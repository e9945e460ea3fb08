"""Tiny random models and inputs for every supported family, built from configs (no downloads).

VLM families (:data:`FAMILIES`) come from :func:`tiny_model`; standalone image encoders
(:data:`ENCODER_FAMILIES`) from :func:`tiny_encoder`; their inputs from :func:`tiny_inputs` and
:func:`tiny_pixels`; checkpoints loadable with ``from_pretrained`` from :func:`save_tiny_checkpoint`.

:mod:`tokenprune.testing.dispatch` counts what a forward asks of the device on a CPU: the torch ops it
dispatches and the values it reads back (each a host sync on a GPU).

Used by the test-suite, the docs and the CLI's built-in default. The weights are random: outputs are
meaningless, but every code path (vision tower, projector, decoder, cache, generate) is the real one.
"""

from .inputs import tiny_inputs, tiny_pixels, tokens_per_image
from .models import (
    ANYRES_FAMILIES,
    ENCODER_FAMILIES,
    FAMILIES,
    IMAGE_TOKEN_ID,
    LLAVA_NEXT_PINPOINTS,
    PAD_TOKEN_ID,
    PROCESSOR_FAMILIES,
    QWEN_FAMILIES,
    QWEN_PATCHES_PER_SIDE,
    QWEN_VIDEO_TOKEN_ID,
    QWEN_VISION_END_ID,
    QWEN_VISION_START_ID,
    VOCAB_SIZE,
    llava_config,
    tiny_config,
    tiny_encoder,
    tiny_model,
)
from .processors import (
    processor_for,
    save_random_checkpoint,
    save_tiny_checkpoint,
    tiny_processor,
    tiny_tokenizer,
    word_tokenizer,
)

__all__ = [
    "ANYRES_FAMILIES",
    "ENCODER_FAMILIES",
    "FAMILIES",
    "IMAGE_TOKEN_ID",
    "LLAVA_NEXT_PINPOINTS",
    "PAD_TOKEN_ID",
    "PROCESSOR_FAMILIES",
    "QWEN_FAMILIES",
    "QWEN_PATCHES_PER_SIDE",
    "QWEN_VIDEO_TOKEN_ID",
    "QWEN_VISION_END_ID",
    "QWEN_VISION_START_ID",
    "VOCAB_SIZE",
    "llava_config",
    "processor_for",
    "save_random_checkpoint",
    "save_tiny_checkpoint",
    "tiny_config",
    "tiny_encoder",
    "tiny_inputs",
    "tiny_model",
    "tiny_pixels",
    "tiny_processor",
    "tiny_tokenizer",
    "tokens_per_image",
    "word_tokenizer",
]
