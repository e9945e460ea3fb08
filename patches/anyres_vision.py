"""The ``vision`` stage on LLaVA-NeXT and LLaVA-OneVision: ``hiprune``, ``visionzip`` and ``vispruner`` choose
among the tokens an image's tiles leave after the model's own packing.

The CLIP/SigLIP tower runs whole on every tile, as without a pruner; its hooks
(:class:`~tokenprune.patches.vit.EncoderPruningHooks`) gather, per tile, the attention each patch receives
at the layers the method names, the output layer's keys and CLS token, and a hook on the projector takes the
tower's features it projects. The model's packing step (``pack_image_features``) then runs twice: on the
projected features, as the model runs it, and on those per-patch scores and tower features, so that each
packed token gets the scores and features of the patch it is (after the unpadding, and OneVision's bilinear
downsizing of large images, which blends them as it blends the projected features). The method chooses
among an image's packed tokens, the newline tokens left out, as on a single tile: on the tower's features
(a ``projected`` method's on the projected ones), with each tile's CLS token, and with HiPrune's buffers
in the grid each token sits in (the base tile, or the stitched high-resolution tiles). Kept tokens are the
model's projected ones; merged ones are projected from the merged tower features (``visionzip``'s), or are
the merged projected tokens (``vscan``'s, a ``projected`` method). The
tokens it drops become zeros in the packed features; the decoder's first stage drops their placeholders
before the language model, each row of the kept ones still ended by its newline.

Forced by the contract (the budget is the image's tokens as the model packs them, ``keep_ratio`` of them
exactly, and keeping them all must give the unpatched model), where the references' LLaVA-NeXT code (HiPrune,
VisionZip, VisPruner) selects a fixed count in every tile and then packs without unpadding or newline tokens:
one budget over an image's packed tokens (a tile's own count would fall partly in the padding the model
removes), the model's unpadding and newline tokens kept (they are the tokens the processor gave placeholders
for); so a buffer or a row crosses from tile to tile in the stitched grid, where the reference's stay in their
24x24 tile. ``tome`` and ``turbo`` merge inside each tile's encoder layers, and ``saint`` drops there, which
leaves their tokens no place in the tile grid that the packing unpads: refused.
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
from tokenprune.sequence import grid_neighbours

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
        self._tower_features: torch.Tensor | None = None

    def attach(self, pruner: Pruner) -> list[RemovableHandle]:
        self._pruner = pruner
        handles = self.encoder.attach(pruner, self._config, standalone=False)
        return [*handles, self.projector.register_forward_pre_hook(self._capture_tower_features)]

    def _capture_tower_features(self, module: nn.Module, args: tuple) -> None:
        """Keep the tower's features the projector is about to project ``[T, N, C]`` (every tile's)."""
        self._tower_features = args[0]

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
        tower, self._tower_features = self._tower_features, None
        pruner, config = self._pruner, self._config
        with pruner.timed_selection():
            channels = [*(a[..., None] for a in attention.values()), *([] if keys is None else [keys]), tower]
            packed_scores, tiles = self._packed_scores(pack, args, kwargs, torch.cat(channels, -1).float())
            first_tiles = itertools.accumulate(tiles[:-1], initial=0)
            num_scores = len(attention) + (0 if keys is None else keys.shape[-1])
            out, visual, kept = [], [], []
            for features, image_scores, image_tiles, first_tile in zip(
                packed, packed_scores, tiles, first_tiles, strict=True
            ):
                newline = image_scores[:, 0].isnan()
                places = newline.logical_not().nonzero()[:, 0]
                keep = config.kept_per_image(len(places))
                visual.append(len(places))
                kept.append(keep)
                if keep == len(places):
                    out.append(features)
                    continue
                values = image_scores[places]
                ctx = SelectionContext(
                    features=features[places][None]
                    if config.spec.projected
                    else values[None, :, num_scores:],
                    grid=None,
                    image_index=torch.zeros(1, dtype=torch.long, device=features.device),
                    encoder_attention={layer: values[None, :, i] for i, layer in enumerate(attention)},
                    keys=None if keys is None else values[None, :, len(attention) : num_scores],
                    grid_neighbours=self._grid_neighbours(newline, image_tiles, len(places))[None],
                )
                if class_token is not None:
                    ctx.class_token = class_token[None, first_tile : first_tile + image_tiles].float()
                result = pruner.select_with(config, ctx, keep)
                if isinstance(result, Merged) and config.spec.projected:  # merged projected tokens
                    index, chosen = result.index, result.features
                elif isinstance(result, Merged):  # merged in the tower's space, then projected, as one tile's
                    index = result.index
                    chosen = self.projector(result.features.to(next(self.projector.parameters()).dtype))
                else:
                    index, chosen = result, gather_tokens(features[places][None], result)
                pruned = features.clone()
                pruned[places] = 0
                pruned[places[index[0]]] = chosen[0].to(features.dtype)
                out.append(pruned)
        pruner.record_encoder(visual, kept)
        return out

    def _grid_neighbours(self, newline: torch.Tensor, tiles: int, num_tokens: int) -> torch.Tensor:
        """Each of an image's ``num_tokens`` packed tokens' (its ``newline [L]`` flags left out) flat
        neighbours in its own grid ``[N, 4]`` (:func:`~tokenprune.sequence.grid_neighbours`), as HiPrune's
        buffers take them in a tile. The grids are the base tile's and, with more tiles, the stitched
        high-resolution grid the model unpads (and OneVision may downsize), as wide as its first row."""
        rows, cols = self.encoder.grid
        base = rows * cols if tiles > 1 else num_tokens
        width = int(newline.int().argmax()) - base if tiles > 1 else cols
        in_base = torch.arange(num_tokens, device=newline.device) < base
        start, end = torch.where(in_base, 0, base), torch.where(in_base, base, num_tokens)
        return grid_neighbours(start, end, torch.where(in_base, cols, width))

    def _packed_scores(
        self, pack: Callable, args: tuple, kwargs: dict, scores: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Each image's packed ``scores`` (per tile and patch ``[T, N, C]``, packed as the features are,
        newline rows NaN), and each image's tile count (how many the model gave it)."""
        bound = self._signature.bind(self._base, *args, **kwargs)
        tiles = [features.shape[0] for features in bound.arguments["image_features"]]
        bound.arguments["image_features"] = list(torch.split(scores, tiles))
        bound.arguments["image_newline"] = scores.new_full(scores.shape[-1:], float("nan"))
        packed, _ = pack(*bound.args, **bound.kwargs)
        return packed, tiles
