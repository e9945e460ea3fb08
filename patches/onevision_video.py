"""LLaVA-OneVision's videos: each frame's tower features projected, pooled 2x2 (bilinear, to ``ceil(side/2)``
a side), the frames' tokens one after another and one ``image_newline`` token after the last; the prompt
holds one ``video_token_id`` placeholder per token, newline included, and every video of a batch has the same
frames and size (``pixel_values_videos [V, F, 3, H, W]``).

:class:`OneVisionVideos` reads each video's token count and ``(frames, rows, cols)`` from the model's own
``get_video_features`` (shadowed on the instance) and, with a ``vision`` method that chooses among projected
tokens (the video methods, ``vscan``), runs it there on every video's frame tokens, the newline left out,
with the attention they receive in the tower and their keys where it needs them (gathered on each frame as
on an image tile, and pooled as the model pools the frames' features): the tokens it drops become zeros,
whose placeholders the decoder's first stage drops before the language model, as for images. A vision
method that chooses among the tower's own features (``visionzip``, ``hiprune``, ...) leaves videos whole,
as do ``media="images"`` pruners; decoder (``pre_llm``, ``llm``) and ``kv`` methods prune them like
images, each video one item of its frame tokens (the newline kept, as an image's).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.context import Merged, SelectionContext
from tokenprune.kernels import gather_tokens
from tokenprune.sequence import image_ids_by_lengths

from ._internals import InstanceOverride, InternalsMovedError

if TYPE_CHECKING:
    from tokenprune.config import PrunerConfig
    from tokenprune.pruner import Pruner

    from .vit import EncoderPruningHooks

_ENCODE = "get_video_features"


def video_method_runs(vision: PrunerConfig | None) -> bool:
    """Whether a pruner whose vision stage is ``vision`` prunes OneVision's videos: without a vision stage,
    or with one that chooses among projected tokens (by their features, the attention they receive in the
    tower and their keys: not by a CLS token, which the SigLIP tower has not)."""
    return vision is None or (vision.spec.projected and "class_token" not in vision.spec.needs)


class OneVisionVideos:
    """The videos of a LLaVA-OneVision model (``base``, its ``LlavaOnevisionModel``) as pruners see them."""

    def __init__(self, base: nn.Module):
        for name in (_ENCODE, "apply_pooling"):
            if not callable(getattr(type(base), name, None)):
                raise InternalsMovedError(f"{type(base).__name__}.{name} moved")
        vision = base.config.vision_config
        side = math.ceil(vision.image_size // vision.patch_size / 2)  # a frame after the model's pooling
        self.frame = (side, side)
        self.token_id = base.config.video_token_id
        self._base = base
        self._pruner: Pruner | None = None
        self._vision: PrunerConfig | None = None
        self._lengths: torch.Tensor | None = None  # placeholders of each video of the last encoding
        self.frames: dict[int, tuple[int, int, int]] = {}  # a video's frame tokens -> (frames, rows, cols)
        #: whether the current forward's selection work began (an image stage's, before the videos')
        self.started = False

    def attach(
        self, pruner: Pruner, vision: PrunerConfig | None, image_encoder: EncoderPruningHooks | None
    ) -> list[RemovableHandle]:
        """Shadow ``get_video_features`` on the model, to read each video's shape and, with a ``vision``
        method (see :func:`video_method_runs`), to prune there; the image stage's ``image_encoder`` hooks
        (on the same tower) gather on the frames the attention or keys the method needs, else sit them out."""
        self._pruner, self._vision = pruner, vision
        original = getattr(self._base, _ENCODE)

        scored = vision is not None and bool({"encoder_attention", "keys"} & set(vision.spec.needs))

        @functools.wraps(original)
        def encode(*args, **kwargs):
            if image_encoder is not None:  # gathers, each frame a tile, what the method needs; else sits out
                image_encoder.suspended = not scored
            try:
                output = original(*args, **kwargs)
            finally:
                if image_encoder is not None:
                    image_encoder.suspended = False
            tokens = output.pooler_output  # [V, F * rows * cols + 1, D]
            per_frame = self.frame[0] * self.frame[1]
            frames = (tokens.shape[1] - 1) // per_frame
            self.frames = {frames * per_frame: (frames, *self.frame)}
            self._lengths = torch.full((tokens.shape[0],), tokens.shape[1], device=tokens.device)
            if self._vision is not None:
                scores = self._pooled_scores(image_encoder, tokens.shape[0]) if scored else ({}, None)
                output.pooler_output = self._reduce(tokens, (frames, *self.frame), *scores)
            return output

        language_model = self._base.language_model
        return [
            InstanceOverride(self._base, _ENCODE, encode),
            language_model.register_forward_hook(lambda *_: setattr(self, "started", False)),
        ]

    def item_ids(self, videos: torch.Tensor) -> torch.Tensor:
        """The number of each video placeholder's video ``[B, L]`` (-1 elsewhere), from the last encoding."""
        lengths, self._lengths = self._lengths, None
        if lengths is None:
            raise ValueError("LLaVA-OneVision video pruning needs the videos encoded in this call")
        return image_ids_by_lengths(videos, lengths.to(videos.device))

    def _pooled_scores(
        self, encoder: EncoderPruningHooks, num_videos: int
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """What the tower gathered for the method over the frames (each frame a tile), pooled as the model
        pools the frames' features: the attention each token receives by layer ``{layer: [V, F * p]}``, and
        the tokens' keys ``[V, F * p, d]`` (``None`` unless the method needs them)."""
        attention, keys, _ = encoder.patch_scores()
        channels = [*(a[..., None] for a in attention.values()), *([] if keys is None else [keys])]
        pooled = self._base.apply_pooling(torch.cat(channels, dim=-1).float())  # [V * F, p, C]
        pooled = pooled.reshape(num_videos, -1, pooled.shape[-1])
        by_layer = {layer: pooled[..., i] for i, layer in enumerate(attention)}
        return by_layer, None if keys is None else pooled[..., len(attention) :]

    def _reduce(
        self,
        tokens: torch.Tensor,
        frames: tuple[int, int, int],
        attention: dict[int, torch.Tensor],
        keys: torch.Tensor | None,
    ) -> torch.Tensor:
        """``tokens`` with the frame tokens the vision method drops made zeros and those it keeps (or merges)
        in the places it chose (by their features, and the pooled ``attention`` and ``keys`` where it needs
        them); each video's newline as it was."""
        pruner, config = self._pruner, self._vision
        if not self.started:
            pruner.begin_prefill()
            self.started = True
        num_videos, length = tokens.shape[:2]
        keep = config.kept_per_image(length - 1, frames[0])
        with pruner.timed_selection():
            ctx = SelectionContext(
                features=tokens[:, :-1],
                grid=None,
                frames=frames,
                image_index=torch.zeros(num_videos, dtype=torch.long, device=tokens.device),
                encoder_attention=attention or None,
                keys=keys,
            )
            result = pruner.select_with(config, ctx, keep)
            index = result.index if isinstance(result, Merged) else result
            chosen = result.features if isinstance(result, Merged) else gather_tokens(ctx.features, index)
            pruned = torch.zeros_like(tokens)
            pruned[:, -1] = tokens[:, -1]
            pruned.scatter_(1, index[..., None].expand_as(chosen), chosen.to(tokens.dtype))
        pruner.record_encoder([length - 1] * num_videos, [keep] * num_videos)
        return pruned
