"""The video VLM: a small Qwen2-VL sized for the video suite, and the inputs it takes.

The architecture is transformers' own ``Qwen2VLForConditionalGeneration``: a clip of 16 frames of 96x96
pixels is cut into temporal patches of 2 frames and 8-pixel patches, and the vision tower's 2x2 merger
gives 8 x 6 x 6 = 288 video tokens per clip. The tokenizer is word-level over the suite's vocabulary
(:func:`tokenprune.testing.word_tokenizer`). A checkpoint directory holds the model and the tokenizer and
loads with ``from_pretrained``. Transformers' Qwen2-VL video processor needs torchvision, so
:class:`VideoInputs` builds the model's inputs from the frames itself (pixel values in the processor's
patch layout, placeholders, ``video_grid_thw``, ``mm_token_type_ids``); the suite, the CLI and the tests
all use it. The trained weights ship in ``tokenprune/assets/video-vlm`` (:func:`shipped_checkpoint`);
``eval/train_video.py`` trains them.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import pathlib
from collections.abc import Sequence

import numpy
import torch

from ..testing import word_tokenizer
from . import video_suite

#: Special tokens of the prompt, whose ids follow ``word_tokenizer``'s own five.
VIDEO_TOKEN, VISION_START, VISION_END = "<video>", "<vision_start>", "<vision_end>"
#: Words of the chat prompt around each question (``user : <video> question assistant : reply </s>``).
CHAT_WORDS = ("user", "assistant", ":")
VISION = dict(
    depth=3,
    embed_dim=96,
    hidden_size=128,  # the merger's output: the decoder's width
    mlp_ratio=2,
    num_heads=4,
    in_channels=3,
    patch_size=8,
    spatial_merge_size=2,
    temporal_patch_size=2,
)
TEXT = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
)
#: Per-channel mean and standard deviation the pixels are normalised with.
MEAN, STD = 0.5, 0.5
ASSETS_NAME = "video-vlm"


def tokenizer():
    """The word-level tokenizer: its five special tokens, :data:`VIDEO_TOKEN`, :data:`VISION_START`,
    :data:`VISION_END`, :data:`CHAT_WORDS` and the suite's :func:`~video_suite.vocabulary`."""
    specials = (VIDEO_TOKEN, VISION_START, VISION_END)
    words = word_tokenizer([*specials, *CHAT_WORDS, *video_suite.vocabulary()])
    words.add_special_tokens(
        {"additional_special_tokens": list(specials)}, replace_extra_special_tokens=False
    )
    return words


def config():
    """The model's ``Qwen2VLConfig``; the vocabulary is exactly the tokenizer's."""
    from transformers import Qwen2VLConfig

    words = tokenizer()
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Qwen2VLConfig(
        text_config=dict(TEXT, vocab_size=len(words), **special),
        vision_config=VISION,
        image_token_id=3,
        video_token_id=words.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_start_token_id=words.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=words.convert_tokens_to_ids(VISION_END),
        **special,
    )


def build(seed: int = 0):
    """The untrained model (float32, training mode), initialised from ``seed``."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration._from_config(config(), attn_implementation="sdpa")


def shipped_checkpoint() -> contextlib.AbstractContextManager[pathlib.Path]:
    """A context manager giving the directory of the trained checkpoint shipped with the package."""
    return importlib.resources.as_file(importlib.resources.files("tokenprune") / "assets" / ASSETS_NAME)


class VideoInputs:
    """Builds the model's inputs from clips and questions (the part of a processor the suite needs).

    ``tokenizer`` is the checkpoint's (``VideoInputs.from_pretrained(path)`` loads it with the vision
    settings of the checkpoint's config). A conversation is a list of ``(question, reply)`` turns about
    one clip, the clip shown in the first; a reply of ``None`` ends the prompt where the model's reply
    starts.
    """

    def __init__(self, tokenizer, vision_config) -> None:
        self.tokenizer = tokenizer
        self.patch = vision_config.patch_size
        self.merge = vision_config.spatial_merge_size
        self.temporal = vision_config.temporal_patch_size
        self.video_id, self.start_id, self.end_id = tokenizer.convert_tokens_to_ids(
            [VIDEO_TOKEN, VISION_START, VISION_END]
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> VideoInputs:
        from transformers import AutoConfig, AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path).vision_config)

    def pixels(self, frames: Sequence) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """A clip's flattened patches ``[t * h * w, 3 * 2 * p * p]``, in the order of transformers' Qwen2-VL
        processors (each 2x2 merge group contiguous), and its ``(t, h, w)`` grid of patches."""
        clip = numpy.stack([numpy.asarray(frame, dtype=numpy.float32) for frame in frames]) / 255.0
        clip = (clip - MEAN) / STD  # [T, H, W, C]
        frames_, height, width, channels = clip.shape
        t, h, w = frames_ // self.temporal, height // self.patch, width // self.patch
        p, m = self.patch, self.merge
        clip = clip.transpose(0, 3, 1, 2).reshape(t, self.temporal, channels, h // m, m, p, w // m, m, p)
        patches = clip.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, -1)
        return torch.from_numpy(numpy.ascontiguousarray(patches)), (t, h, w)

    def _words(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def conversation_ids(
        self, turns: Sequence[tuple[str, str | None]], video_tokens: int
    ) -> tuple[list[int], list[int]]:
        """Token ids of one conversation and its labels: -100 except on the replies and their ``</s>``."""
        ids, labels = [self.tokenizer.bos_token_id], [-100]
        for number, (question, reply) in enumerate(turns):
            prompt = self._words("user :")
            if number == 0:
                prompt += [self.start_id, *[self.video_id] * video_tokens, self.end_id]
            prompt += self._words(f"{question} assistant :")
            ids += prompt
            labels += [-100] * len(prompt)
            if reply is not None:
                answer = [*self._words(reply), self.tokenizer.eos_token_id]
                ids += answer
                labels += answer
        return ids, labels

    def __call__(
        self, clips: Sequence[Sequence], conversations: Sequence[Sequence[tuple[str, str | None]]]
    ) -> dict[str, torch.Tensor]:
        """A left-padded batch: ``input_ids``, ``attention_mask``, ``mm_token_type_ids``,
        ``pixel_values_videos``, ``video_grid_thw`` and ``labels`` (one clip per conversation)."""
        pixels, grids = zip(*(self.pixels(frames) for frames in clips), strict=True)
        rows = [
            self.conversation_ids(turns, t * h * w // self.merge**2)
            for turns, (t, h, w) in zip(conversations, grids, strict=True)
        ]
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id)
        labels = torch.full((len(rows), length), -100)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for row, (ids, targets) in enumerate(rows):
            input_ids[row, length - len(ids) :] = torch.tensor(ids)
            labels[row, length - len(ids) :] = torch.tensor(targets)
            mask[row, length - len(ids) :] = 1
        return dict(
            input_ids=input_ids,
            attention_mask=mask,
            mm_token_type_ids=2 * (input_ids == self.video_id).int(),
            pixel_values_videos=torch.cat(pixels),
            video_grid_thw=torch.tensor(grids),
            labels=labels,
        )

    def questions(self, examples: Sequence[video_suite.Example]) -> dict[str, torch.Tensor]:
        """The batch asking each example its question, ending where the reply starts (no ``labels``)."""
        batch = self([item.frames for item in examples], [[(item.question, None)] for item in examples])
        del batch["labels"]
        return batch


@torch.no_grad()
def answers(model, inputs: VideoInputs, examples: Sequence[video_suite.Example], batch_size: int = 32):
    """The model's greedy answer to each example: the first word of at most three new tokens (``""`` when
    there are none), with whatever pruner the model has applied."""
    device, replies = next(model.parameters()).device, []
    for start in range(0, len(examples), batch_size):
        batch = inputs.questions(examples[start : start + batch_size])
        batch = {key: value.to(device) for key, value in batch.items()}
        batch["pixel_values_videos"] = batch["pixel_values_videos"].to(model.dtype)
        output = model.generate(**batch, max_new_tokens=3, do_sample=False)
        texts = inputs.tokenizer.batch_decode(
            output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        replies += [(text.split() or [""])[0] for text in texts]
    return replies
