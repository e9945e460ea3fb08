"""Processors, tokenizers and saved checkpoints of the tiny models, loadable offline like real ones."""

from __future__ import annotations

import os
import pathlib

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from .models import (
    IMAGE_TOKEN_ID,
    LLAVA_NEXT_PINPOINTS,
    PROCESSOR_FAMILIES,
    VOCAB_SIZE,
    tiny_config,
    tiny_model,
)


def anyres_image_processor(config):
    """The PIL image processor of a tiny AnyRes model: 32x32 tiles by :data:`LLAVA_NEXT_PINPOINTS`."""
    side = config.vision_config.image_size
    if config.model_type == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        return LlavaOnevisionImageProcessorPil(
            size={"height": side, "width": side}, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS
        )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        do_center_crop=True,
    )


#: Tokens of the tiny tokenizer, in id order: the special tokens, then punctuation, digits and plain words,
#: so that the random output of a tiny model decodes to readable (if meaningless) text.
_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>", "<unk>")


_WORD_LIST = (
    ". , ? ! : ; ' - ( ) "
    "0 1 2 3 4 5 6 7 8 9 "
    "user assistant what is it this that the a an of in on at to and or but with for from by as "
    "be are was were has have had do does did can could will would should may not no yes "
    "i you he she we they me him her us them my your his its our their there here where when why how "
    "which who one two three four five six seven eight nine ten many few some all any each "
    "image picture photo scene color red green blue yellow orange purple pink black white gray brown "
    "dark light bright big small large little long short tall wide round square circle triangle line "
    "shape left right top bottom middle center side front back up down over under near far above below "
    "sky sun moon star cloud rain snow tree leaf flower grass water river lake sea sand rock hill road "
    "house door window wall roof room table chair bed lamp book cup plate box ball car bus boat train "
    "cat dog bird fish horse cow man woman child people hand face eye head "
    "see look show find count describe answer question think know say tell make take give go come "
    "very more most less also only just then now again still so too well good bad new old same other "
    "first last next number part time day place object"
)


_WORDS = tuple(_WORD_LIST.split())


def tiny_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over the tiny models' 256 ids (lower-cased words).

    Ids 0-3 are ``<pad>``, ``<s>``, ``</s>`` and ``<image>`` (:data:`PAD_TOKEN_ID`, :data:`IMAGE_TOKEN_ID`),
    then ``<unk>``, punctuation, digits and common English words (:func:`word_tokenizer`). Returns the
    tokenizer.
    """
    return word_tokenizer(_WORDS, size=VOCAB_SIZE)


def word_tokenizer(words, size: int | None = None):
    """A word-level ``PreTrainedTokenizerFast`` whose ids are the special tokens, then ``words`` in order.

    Ids 0-4 are ``<pad>``, ``<s>``, ``</s>``, ``<image>`` and ``<unk>``; repeated words keep their first id;
    ``size`` pads the vocabulary with unused ``w<i>`` entries (``ValueError`` when the words do not fit).
    Text is lower-cased and split on whitespace and punctuation; ``<s>`` is prepended to every sequence;
    padding is on the left, as batched generation wants. Built with the ``tokenizers`` library, so
    ``save_pretrained`` writes an ordinary ``tokenizer.json``. Returns the tokenizer.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = list(_SPECIAL_TOKENS)
    tokens += [word for word in dict.fromkeys(words) if word not in tokens]
    if size is not None:
        if len(tokens) > size:
            raise ValueError(f"{len(tokens)} tokens do not fit a vocabulary of {size}")
        tokens += [f"w{i}" for i in range(size - len(tokens))]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_processor(family: str = "llava"):
    """The processor matching :func:`tiny_model` of ``family`` (``llava`` or ``llava_next``).

    LLaVA: images are resized (short side 32) and centre-cropped to the tiny vision tower's 32x32, an 8x8
    grid of 4-pixel patches; the CLS token is dropped (``vision_feature_select_strategy="default"``), so
    each ``<image>`` in the text expands to 64 placeholder tokens. LLaVA-NeXT: AnyRes tiles of 32x32 by
    :data:`LLAVA_NEXT_PINPOINTS`, as many placeholders as the image's size gives. Returns the processor;
    ``ValueError`` for a family without one here.
    """
    if family not in PROCESSOR_FAMILIES:
        raise ValueError(f"no tiny processor for {family!r}; there are for: {', '.join(PROCESSOR_FAMILIES)}")
    if family == "llava_next":
        from transformers import LlavaNextProcessor

        config = tiny_config(family)
        image_processor = anyres_image_processor(config)
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tiny_tokenizer(),
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,
            image_token="<image>",
            chat_template=_CHAT_TEMPLATE,
        )
    return processor_for(tiny_config(family))


def processor_for(config: LlavaConfig, tokenizer=None):
    """A ``LlavaProcessor`` for a LLaVA-1.5-style ``config``: CLIP preprocessing (resize, centre crop) to
    its vision tower's image size, ``tokenizer`` (the word-level :func:`tiny_tokenizer` by default) and a
    plain chat template."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    vision = config.vision_config
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else tiny_tokenizer(),
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # the CLS token, dropped again by the "default" strategy
        image_token="<image>",
        chat_template=_CHAT_TEMPLATE,
    )


def save_tiny_checkpoint(path: str | os.PathLike, family: str = "llava", seed: int = 0) -> pathlib.Path:
    """Write a complete local checkpoint of the tiny ``family`` model to the directory ``path``.

    The directory holds the weights and config of ``tiny_model(family, seed=seed)`` and, for a family of
    :data:`PROCESSOR_FAMILIES`, a word-level tokenizer and the processor (:func:`tiny_processor`), so that
    ``AutoProcessor.from_pretrained(path)`` and ``AutoModelForImageTextToText.from_pretrained(path)`` load
    it offline, like any real checkpoint (the model alone for the other families, whose inputs
    :func:`tiny_inputs` builds). Returns the directory as a :class:`pathlib.Path`.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny_model(family, seed=seed).save_pretrained(path)
    if family in PROCESSOR_FAMILIES:
        tiny_processor(family).save_pretrained(path)
    return path


def save_random_checkpoint(path: str | os.PathLike, config: LlavaConfig, seed: int = 0) -> pathlib.Path:
    """Write a loadable checkpoint of a LLaVA ``config`` with random weights (for timing, e.g. the
    benchmark architectures) to ``path``, with :func:`processor_for` and the word-level tokenizer, whose
    ``<image>`` id the saved config takes. Returns the directory."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config.image_token_id = IMAGE_TOKEN_ID
    torch.manual_seed(seed)
    LlavaForConditionalGeneration._from_config(config).eval().save_pretrained(path)
    processor_for(config).save_pretrained(path)
    return path
