"""The ``vision`` stage on LLaVA-NeXT and LLaVA-OneVision: ``hiprune`` and ``visionzip`` choose among the
tokens an image's tiles leave after the model's own packing.

The CLIP/SigLIP tower runs whole on every tile, as without a pruner; its hooks
(:class:`~tokenprune.patches.vit.EncoderPruningHooks`) gather, per tile, the attention each patch receives
at the layers the method names and the output layer's keys. The model's packing step
(``pack_image_features``) then runs twice: on the projected features, as the model runs it, and on those
per-patch scores, so that each packed token gets the scores of the patch it is (after the unpadding, and
OneVision's bilinear downsizing of large images, which blends the scores as it blends the features). The
method chooses among an image's packed tokens, the newline tokens left out: one budget for all tiles of an
image, counted over the tokens that survive the unpadding. The tokens it drops become zeros in the packed
features; the decoder's first stage drops their placeholders before the language model, where the kept (or,
for ``visionzip``, merged) tokens reach it at their original positions, each row still ended by its newline.

Deviations from a single-tile tower: the packed tokens form no single patch grid (``hiprune`` anchors get no
buffers); attention is normalized within each tile; ``visionzip`` merges projected features (the packing
follows the projector) and, where it takes the CLS token, takes the base tile's. ``tome`` and ``turbo`` merge
inside each tile's encoder layers, and ``saint`` drops there, which leaves their tokens no place in the tile
grid that the packing unpads: refused.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.context import Merged, SelectionContext
from tokenprune.kernels import gather_tokens

from .llava import feature_layer_encoder

if TYPE_CHECKING:
    from tokenprune.config import PrunerConfig
    from tokenprune.pruner import Pruner


class AnyResVisionHooks:
    """Installs and removes the hooks of one vision-stage method on an AnyRes model (``base``: the model
    with ``vision_tower``, ``multi_modal_projector`` and ``pack_image_features``). ``ValueError`` (before any
    work) if ``vision`` cannot run on this model, naming what can."""

    def __init__(self, model: nn.Module, base: nn.Module, vision: PrunerConfig):
        name = type(model).__name__
        if vision.spec.per_layer:
            raise ValueError(
                f"{vision.method!r} merges or drops patches inside each tile's encoder layers, which leaves"
                f" the tokens no place in {name}'s tile grid (the model unpads it and packs it row by row, "
                "with newline tokens): use hiprune or visionzip, which choose among the packed tokens"
            )
        self.encoder = feature_layer_encoder(model.config, base.vision_tower, vision.method)
        self.encoder.plan(vision)
        self.projector = base.multi_modal_projector
        self._signature = inspect.signature(type(base).pack_image_features)
        self._base = base
        self._pruner: Pruner | None = None
        self._config = vision

    def attach(self, pruner: Pruner) -> list[RemovableHandle]:
        self._pruner = pruner
        return self.encoder.attach(pruner, self._config, standalone=False)

    @property
    def encoded(self) -> bool:
        """Whether the tower encoded tiles whose packed features :meth:`reduce` has not taken yet."""
        return self.encoder.encoded

    def reduce(
        self, pack: Callable, args: tuple, kwargs: dict, packed: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The packed features ``packed`` (each image's ``[L, D]``, of ``pack(base, *args, **kwargs)``) with
        the tokens the method drops made zeros and the ones it keeps (or merges) in the places it chose."""
        attention, keys, class_token = self.encoder.patch_scores()
        pruner, config = self._pruner, self._config
        with pruner.timed_selection():
            scores = torch.cat(
                [*(a[..., None] for a in attention.values()), *([] if keys is None else [keys])], -1
            )
            packed_scores = self._packed_scores(pack, args, kwargs, scores.float())
            first_tiles = itertools.accumulate((s.shape[0] for s in packed_scores[1][:-1]), initial=0)
            out, visual, kept = [], [], []
            for features, image_scores, first_tile in zip(packed, packed_scores[0], first_tiles, strict=True):
                places = image_scores[:, 0].isnan().logical_not().nonzero()[:, 0]  # not a newline
                keep = config.kept_per_image(len(places))
                values = image_scores[places]
                ctx = SelectionContext(
                    features=features[places][None],
                    grid=None,
                    image_index=torch.zeros(1, dtype=torch.long, device=features.device),
                    encoder_attention={layer: values[None, :, i] for i, layer in enumerate(attention)},
                    keys=None if keys is None else values[None, :, len(attention) :],
                )
                if class_token is not None and keep < len(places):
                    ctx.class_token = self.projector(class_token[first_tile : first_tile + 1])
                result = pruner.select_with(config, ctx, keep)
                index, chosen = (
                    (result.index, result.features) if isinstance(result, Merged) else (result, None)
                )
                chosen = gather_tokens(ctx.features, index) if chosen is None else chosen
                pruned = features.clone()
                pruned[places] = 0
                pruned[places[index[0]]] = chosen[0].to(features.dtype)
                out.append(pruned)
                visual.append(len(places))
                kept.append(keep)
        pruner.record_encoder(visual, kept)
        return out

    def _packed_scores(
        self, pack: Callable, args: tuple, kwargs: dict, scores: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each image's packed ``scores`` (per tile and patch ``[T, N, C]``, packed as the features are,
        newline rows NaN), and each image's tiles of ``scores`` (how many the model gave it)."""
        bound = self._signature.bind(self._base, *args, **kwargs)
        tiles = [features.shape[0] for features in bound.arguments["image_features"]]
        per_image = list(torch.split(scores, tiles))
        bound.arguments["image_features"] = per_image
        bound.arguments["image_newline"] = scores.new_full(scores.shape[-1:], float("nan"))
        packed, _ = pack(*bound.args, **bound.kwargs)
        return packed, per_image
