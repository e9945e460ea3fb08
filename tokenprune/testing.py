"""Tiny random models and inputs for every supported family, built from configs (no downloads).

VLM families (:data:`FAMILIES`) come from :func:`tiny_model`; standalone image encoders
(:data:`ENCODER_FAMILIES`) from :func:`tiny_encoder`.

Used by the test-suite, the docs and the CLI's built-in default. The weights are random: outputs are
meaningless, but every code path (vision tower, projector, decoder, cache, generate) is the real one.
"""

from __future__ import annotations

import os
import pathlib

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next", "llava_onevision")
ANYRES_FAMILIES = ("llava_next", "llava_onevision")
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
ENCODER_FAMILIES = ("clip", "siglip", "vit", "vit-classifier")
#: The families with a tiny processor (:func:`tiny_processor`).
PROCESSOR_FAMILIES = ("llava", "llava_next")
PAD_TOKEN_ID = 0
IMAGE_TOKEN_ID = 3
VOCAB_SIZE = 256


def llava_config(vision: dict, text: dict, image_token_id: int, **extra: object) -> LlavaConfig:
    """A LLaVA-1.5-style config: a CLIP vision tower (CLS dropped, features of the second-to-last layer)
    and a Llama decoder, from the keyword arguments of ``CLIPVisionConfig`` and ``LlamaConfig``."""
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision).to_dict(),
        text_config=LlamaConfig(**text).to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **extra,
    )


#: Special ids of the tiny Qwen2-VL (``<image>`` is :data:`IMAGE_TOKEN_ID` as for LLaVA).
QWEN_VIDEO_TOKEN_ID, QWEN_VISION_START_ID, QWEN_VISION_END_ID = 250, 251, 252
#: Patches per side of a tiny Qwen2-VL image (16 x 16 patches of 4 px, merged 2 x 2 into 8 x 8 tokens).
QWEN_PATCHES_PER_SIDE = 16


#: The decoder of every tiny VLM: 4 layers of width 64, 4 query and 2 KV heads.
_TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=512,
    initializer_range=0.1,
)


#: The vision tower of the tiny LLaVA models: 32x32 images in an 8x8 grid of 4-pixel patches, 4 layers.
_TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_size=32,
    patch_size=4,
    projection_dim=32,
)

#: The AnyRes tilings of the tiny LLaVA-NeXT (32 x 32 tiles, as its vision tower).
LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def _anyres_config(family: str) -> LlavaNextConfig | LlavaOnevisionConfig:
    """LLaVA-NeXT (the tiny CLIP tower) or LLaVA-OneVision (a SigLIP tower of the same size, all its
    tokens used), both tiling 32x32 images by :data:`LLAVA_NEXT_PINPOINTS`."""
    text = dict(
        _TINY_TEXT, max_position_embeddings=2048, pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2
    )
    common = dict(
        image_token_id=IMAGE_TOKEN_ID, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, pad_token_id=PAD_TOKEN_ID
    )
    if family == "llava_onevision":
        vision = {k: v for k, v in _TINY_CLIP.items() if k != "projection_dim"}
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vision).to_dict(),
            text_config=LlamaConfig(**text).to_dict(),
            video_token_id=QWEN_VIDEO_TOKEN_ID,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            **common,
        )
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_TINY_CLIP).to_dict(),
        text_config=LlamaConfig(**text).to_dict(),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **common,
    )


def _qwen_config(family: str) -> Qwen2VLConfig | Qwen2_5_VLConfig | Qwen3VLConfig:
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = dict(_TINY_TEXT, rope_parameters=rope)
    vision = dict(num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if family == "qwen3_vl":  # DeepStack: features of both vision layers added to the first two LM layers
        vision.update(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            num_position_embeddings=256,
            deepstack_visual_indexes=[0, 1],
        )
        text.update(head_dim=16)
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
        config_class = Qwen3VLConfig
    elif family == "qwen2_5_vl":  # window attention over 2 x 2 merged tokens, the last layer full
        vision.update(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            window_size=16,
            fullatt_block_indexes=[1],
        )
        config_class = Qwen2_5_VLConfig
    else:
        vision.update(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2)
        config_class = Qwen2VLConfig
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=QWEN_VIDEO_TOKEN_ID,
        vision_start_token_id=QWEN_VISION_START_ID,
        vision_end_token_id=QWEN_VISION_END_ID,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_config(family: str = "llava", *, patches_per_side: int = 8, text_layers: int = 4):
    """The config of the tiny model of ``family``. LLaVA: 32x32 images in an 8x8 patch grid, a 6-layer
    vision tower (features of its fifth layer) and a 4-layer decoder. Qwen2-VL: 16x16 patches merged into
    8x8 tokens per image, a 2-layer vision tower (Qwen2.5-VL: window attention, then full) and a 4-layer
    decoder with multimodal RoPE.

    LLaVA only: ``patches_per_side`` (24: LLaVA-1.5's 576 image tokens) and ``text_layers`` change the grid
    (4-pixel patches) and the decoder's depth."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; tiny models exist for: {', '.join(FAMILIES)}")
    if family != "llava" and (patches_per_side, text_layers) != (8, 4):
        raise ValueError("patches_per_side and text_layers apply to the tiny LLaVA only")
    if family in QWEN_FAMILIES:
        return _qwen_config(family)
    if family in ANYRES_FAMILIES:
        return _anyres_config(family)
    text = dict(
        _TINY_TEXT, num_hidden_layers=text_layers, pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2
    )
    text["max_position_embeddings"] = max(text["max_position_embeddings"], 2 * patches_per_side**2)
    return llava_config(
        vision=dict(_TINY_CLIP, num_hidden_layers=6, image_size=4 * patches_per_side),
        text=text,
        image_token_id=IMAGE_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )


def tiny_model(
    family: str = "llava", attn_implementation: str = "sdpa", seed: int = 0, **sizes: int
) -> PreTrainedModel:
    """A tiny random model of ``family`` in eval mode, float32, on the CPU (``sizes``: see
    :func:`tiny_config`)."""
    config = tiny_config(family, **sizes)
    torch.manual_seed(seed)
    model_class = {
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": Qwen3VLForConditionalGeneration,
        "llava_next": LlavaNextForConditionalGeneration,
        "llava_onevision": LlavaOnevisionForConditionalGeneration,
    }.get(family, LlavaForConditionalGeneration)
    return model_class._from_config(config, attn_implementation=attn_implementation).eval()


_ENCODERS = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
    "vit": (ViTConfig, ViTModel),
    "vit-classifier": (ViTConfig, ViTForImageClassification),
}


def tiny_encoder(
    family: str = "clip",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    num_layers: int = 6,
    patches_per_side: int = 8,
) -> PreTrainedModel:
    """A tiny random image encoder of ``family`` (:data:`ENCODER_FAMILIES`) in eval mode, float32, on CPU.

    Images in a ``patches_per_side`` square grid of 4-pixel patches (32x32 in 8x8 by default; 24 gives
    CLIP-L/336's grid), ``num_layers`` layers of width 32 with 4 heads; CLIP and ViT prepend a CLS token,
    SigLIP does not. ``vit-classifier`` is ``ViTForImageClassification``.
    """
    if family not in _ENCODERS:
        raise ValueError(
            f"unknown encoder family {family!r}; tiny encoders exist for: {', '.join(_ENCODERS)}"
        )
    config_class, model_class = _ENCODERS[family]
    config = config_class(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        image_size=4 * patches_per_side,
        patch_size=4,
        num_channels=3,
    )
    torch.manual_seed(seed)
    return model_class._from_config(config, attn_implementation=attn_implementation).eval()


def tiny_pixels(model: PreTrainedModel, num_images: int = 2, seed: int = 0) -> torch.Tensor:
    """Random ``pixel_values`` of ``num_images`` images for ``model`` (an encoder or a VLM): ``[I, 3, H, W]``
    at its image size, or for Qwen2-VL the flattened patches ``[I * 16 * 16, 3 * 2 * 4 * 4]``."""
    config = getattr(model.config, "vision_config", model.config)
    generator = torch.Generator().manual_seed(seed)
    if model.config.model_type in QWEN_FAMILIES:
        patch = config.in_channels * config.temporal_patch_size * config.patch_size**2
        return torch.randn(num_images * QWEN_PATCHES_PER_SIDE**2, patch, generator=generator)
    return torch.randn(num_images, 3, config.image_size, config.image_size, generator=generator)


def tokens_per_image(model: PreTrainedModel) -> int:
    """Placeholder tokens of one image of the tiny inputs of ``model``."""
    vision = model.config.vision_config
    if model.config.model_type in QWEN_FAMILIES:
        return (QWEN_PATCHES_PER_SIDE // vision.spatial_merge_size) ** 2
    return (vision.image_size // vision.patch_size) ** 2


def tiny_inputs(
    model: PreTrainedModel,
    images_per_prompt: tuple[int, ...] = (1,),
    text_lengths: tuple[int, ...] | None = None,
    seed: int = 0,
    image_patches: tuple[tuple[int, int], ...] | None = None,
    videos_per_prompt: tuple[int, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """A left-padded batch for ``model``: one prompt per entry of ``images_per_prompt``.

    Prompt ``b`` is ``text_lengths[b]`` random text tokens (default 5 + 3b) split around its images, each
    image a run of placeholders followed by one text token. Returns ``input_ids``, ``attention_mask``,
    ``pixel_values`` (``None`` when no prompt has an image) and, for LLaVA, ``position_ids`` (counting real
    tokens only, as ``generate`` does); for Qwen2-VL, whose model computes its multimodal positions, each
    image is wrapped in vision start/end tokens and the batch has ``image_grid_thw`` and
    ``mm_token_type_ids`` instead. ``image_patches`` gives each Qwen2-VL image its own (rows, columns) of
    patches (even numbers; default 16 x 16, 64 tokens); ``videos_per_prompt`` adds Qwen-VL videos after
    the images (4 frames of 8 x 8 patches: 32 tokens each; ``pixel_values_videos``, ``video_grid_thw``;
    for Qwen3-VL each pair of frames is its own placeholder run after a timestamp-like word).
    """
    if model.config.model_type in ANYRES_FAMILIES:
        return _anyres_inputs(model, images_per_prompt, text_lengths, seed)
    generator = torch.Generator().manual_seed(seed)
    image_token = model.config.image_token_id
    qwen = model.config.model_type in QWEN_FAMILIES
    total_images = sum(images_per_prompt)
    if image_patches is None:
        image_patches = ((QWEN_PATCHES_PER_SIDE, QWEN_PATCHES_PER_SIDE),) * total_images
    elif not qwen or len(image_patches) != total_images:
        raise ValueError("image_patches gives one (rows, columns) per image, for Qwen2-VL only")
    videos_per_prompt = videos_per_prompt or (0,) * len(images_per_prompt)
    if any(videos_per_prompt) and not qwen:
        raise ValueError("tiny videos are built for the Qwen-VL families only")
    frames_apart = model.config.model_type == "qwen3_vl"  # a timestamp and a placeholder run per frame
    video_grid = (2, 8, 8)  # temporal groups of 2 frames, rows, columns of patches
    merge = model.config.vision_config.spatial_merge_size if qwen else 1
    sizes = iter([rows * cols // merge**2 for rows, cols in image_patches] if qwen else [])
    if text_lengths is None:
        text_lengths = tuple(5 + 3 * b for b in range(len(images_per_prompt)))

    def words(count: int) -> torch.Tensor:  # below every special id of the tiny models
        return torch.randint(5, QWEN_VIDEO_TOKEN_ID, (count,), generator=generator)

    def media(token: int, count: int) -> torch.Tensor:
        run = torch.full((count,), token)
        if qwen:
            run = torch.cat([torch.tensor([QWEN_VISION_START_ID]), run, torch.tensor([QWEN_VISION_END_ID])])
        return run

    prompts = []
    for num_images, num_videos, text_length in zip(
        images_per_prompt, videos_per_prompt, text_lengths, strict=False
    ):
        text = words(text_length)
        pieces = [text[: text_length // 2]]
        for _ in range(num_images):
            pieces += [media(image_token, next(sizes) if qwen else tokens_per_image(model)), words(1)]
        for _ in range(num_videos):
            t, h, w = video_grid
            if frames_apart:
                for _ in range(t):
                    pieces += [words(1), media(QWEN_VIDEO_TOKEN_ID, h * w // merge**2)]
                pieces.append(words(1))
            else:
                pieces += [media(QWEN_VIDEO_TOKEN_ID, t * h * w // merge**2), words(1)]
        pieces.append(text[text_length // 2 :])
        prompts.append(torch.cat(pieces))
    input_ids, attention_mask = _left_padded(prompts)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if not qwen:
        inputs["pixel_values"] = tiny_pixels(model, total_images, seed) if total_images else None
        inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return inputs
    vision = model.config.vision_config
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    rows = sum(r * c for r, c in image_patches)
    inputs["pixel_values"] = torch.randn(rows, patch, generator=generator) if total_images else None
    videos = input_ids == QWEN_VIDEO_TOKEN_ID
    inputs["mm_token_type_ids"] = (input_ids == image_token).int() + 2 * videos.int()
    grid = torch.tensor([[1, r, c] for r, c in image_patches])
    inputs["image_grid_thw"] = grid if total_images else None
    total_videos = sum(videos_per_prompt)
    if total_videos:
        t, h, w = video_grid
        inputs["pixel_values_videos"] = torch.randn(total_videos * t * h * w, patch, generator=generator)
        inputs["video_grid_thw"] = torch.tensor([video_grid] * total_videos)
    return inputs


def _anyres_inputs(
    model: PreTrainedModel,
    images_per_prompt: tuple[int, ...],
    text_lengths: tuple[int, ...] | None,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Prompts for the tiny LLaVA-NeXT / OneVision: random words and images of three aspect ratios in turn
    (so their token counts differ), each image as many placeholders as the model packs features for it."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    shapes = [(40, 80), (60, 60), (90, 30)]
    total = sum(images_per_prompt)
    images = []
    for i in range(total):
        width, height = shapes[i % len(shapes)]
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        images.append(Image.fromarray(pixels.numpy()))
    inputs: dict[str, torch.Tensor | None] = {"pixel_values": None, "image_sizes": None}
    counts: list[int] = []
    if images:
        pixels = _anyres_image_processor(model.config)(images, return_tensors="pt")
        inputs.update(pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"])
        with torch.no_grad():
            packed = model.model.get_image_features(
                pixels["pixel_values"], pixels["image_sizes"]
            ).pooler_output
        counts = [int(feature.shape[0]) for feature in packed]
    if text_lengths is None:
        text_lengths = tuple(5 + 3 * b for b in range(len(images_per_prompt)))
    sizes = iter(counts)
    prompts = []
    for num_images, length in zip(images_per_prompt, text_lengths, strict=False):
        text = torch.randint(5, QWEN_VIDEO_TOKEN_ID, (length,), generator=generator)
        pieces = [text[: length // 2]]
        for _ in range(num_images):
            pieces += [torch.full((next(sizes),), model.config.image_token_id), text[:1]]
        pieces.append(text[length // 2 :])
        prompts.append(torch.cat(pieces))
    input_ids, attention_mask = _left_padded(prompts)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **inputs}


def _left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` as a left-padded batch: ``input_ids [B, L]`` and its ``attention_mask``."""
    length = max(p.numel() for p in prompts)
    input_ids = torch.full((len(prompts), length), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        input_ids[b, length - prompt.numel() :] = prompt
        attention_mask[b, length - prompt.numel() :] = 1
    return input_ids, attention_mask


def _anyres_image_processor(config):
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
        image_processor = _anyres_image_processor(config)
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
