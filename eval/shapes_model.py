"""The shapes VLM: a small LLaVA (CLIP-style tower, Llama-style decoder) sized for the shapes suite.

The architecture is transformers' own ``LlavaForConditionalGeneration``; the tokenizer is word-level over
the suite's vocabulary (:func:`tokenprune.testing.word_tokenizer`), and the processor is a stock
``LlavaProcessor``, so a saved checkpoint loads with ``from_pretrained`` like any other. The trained
weights ship in ``tokenprune/assets/shapes-vlm`` (:func:`shipped_checkpoint`); ``eval/train_shapes.py``
trains them.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import pathlib
from collections.abc import Iterator

import torch

from ..pruned_vlm import chat_prompt
from ..testing import llava_config, processor_for, word_tokenizer
from . import suite

#: The vision tower: 192x192 pixels in 16-pixel patches, a 12x12 grid of 144 visual tokens per image.
VISION = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=5,  # LLaVA takes the features of the second-to-last layer
    num_attention_heads=4,
    image_size=suite.IMAGE_SIZE,
    patch_size=16,
)
TEXT = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
)
#: Words of the chat template around each question (``USER: <image>\n... ASSISTANT:``).
CHAT_WORDS = ("user", "assistant", ":")
ASSETS_NAME = "shapes-vlm"


def tokenizer():
    """The word-level tokenizer over :data:`CHAT_WORDS` and the suite's :func:`~suite.vocabulary`."""
    return word_tokenizer([*CHAT_WORDS, *suite.vocabulary()])


def config():
    """The model's ``LlavaConfig``; the vocabulary is exactly the tokenizer's."""
    vocab = len(tokenizer())
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return llava_config(
        vision=VISION,
        text=dict(TEXT, vocab_size=vocab, **special),
        image_token_id=3,
        pad_token_id=0,
    )


def processor(model_config=None):
    """The ``LlavaProcessor`` of the model: CLIP preprocessing at 192x192 and :func:`tokenizer`."""
    return processor_for(model_config if model_config is not None else config(), tokenizer())


def build(seed: int = 0):
    """The untrained model (float32, training mode), initialised from ``seed``."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration._from_config(config(), attn_implementation="sdpa")


def shipped_checkpoint() -> contextlib.AbstractContextManager[pathlib.Path]:
    """A context manager giving the directory of the trained checkpoint shipped with the package."""
    return importlib.resources.as_file(importlib.resources.files("tokenprune") / "assets" / ASSETS_NAME)


def batches(processor_, examples: list[suite.Example], size: int) -> Iterator[tuple[list, dict]]:
    """``examples`` in batches of ``size``: each the batch's examples and the processor's tensors of
    their prompts (left-padded) and images."""
    for start in range(0, len(examples), size):
        chunk = examples[start : start + size]
        inputs = processor_(
            images=[item.image for item in chunk],
            text=[chat_prompt(processor_, item.question) for item in chunk],
            return_tensors="pt",
            padding=True,
        )
        yield chunk, dict(inputs)
