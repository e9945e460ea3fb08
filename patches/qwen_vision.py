"""The ``vision`` stage in Qwen2-VL, Qwen2.5-VL and Qwen3-VL's vision tower: ``hiprune`` and ``visionzip``
choose among the merger's output tokens, one per 2x2 group of patches.

The tower runs whole, as without a pruner (its window attention, Qwen2.5-VL's, sees every patch); the
method chooses at its output. The encoder attention a method names is recomputed from each named block's
own query/key projection (captured from its ``qkv`` output) with the block's rotary tables, over the
block's own attention segments (Qwen2.5-VL's windows, or whole images), every query averaged (the tower
has no CLS token: the mean query, as for SigLIP): the attention each patch receives, summed over the
patches of its merger group. Keys, for ``visionzip``, are the output block's, averaged over heads and over
the group. Qwen2.5-VL's blocks see the groups in window order; the scores are put back in the merger's
output order.

The tokens a method drops become zeros in the tower's output (and in Qwen3-VL's DeepStack features); the
decoder's first stage drops their placeholders before the language model, where the tokens kept (or,
for ``visionzip``, merged into the dropped tokens' places) reach it at their original positions, or
renumbered under the ``renumbered`` rule (the vision methods' default; see :mod:`tokenprune.positions`).
A merged token's DeepStack features are merged the same way (the method re-run on them: its choice depends on
attention and keys only). ``tome`` merges inside the blocks, which the tower's packed segments and its
2x2 merger groups do not allow: it is refused before any work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.attention import query_logits
from tokenprune.context import Merged, SelectionContext
from tokenprune.kernels import gather_tokens

from ._internals import InstanceOverride, InternalsMovedError, pruned_modalities

if TYPE_CHECKING:
    from tokenprune.config import PrunerConfig
    from tokenprune.pruner import Pruner

#: The function of a Qwen vision attention's module that applies its rotary tables to queries and keys.
_ROTARY = "apply_rotary_pos_emb_vision"


@dataclass
class _Block:
    """What one named block's attention saw in the tower's current forward."""

    qkv: torch.Tensor | None = None  # [N, 3 * H * d] the qkv projection of every patch, in block order
    segments: torch.Tensor | None = None  # [S + 1] the attention's cu_seqlens: windows or whole images
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [N, d]


def window_order(visual: nn.Module, grid: list[list[int]], device: torch.device) -> torch.Tensor | None:
    """Qwen2.5-VL: the merger group each block-order group is (``window_index``), on ``device``; ``None``
    for a tower without window attention. ``InternalsMovedError`` if transformers no longer exposes it.

    transformers computes it from the items' ``grid`` ``(t, h, w)`` on the host: given the host's copy,
    it reads nothing of the device."""
    if not hasattr(visual, "fullatt_block_indexes"):
        return None
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError as error:
        raise InternalsMovedError("transformers.vision_utils.get_vision_window_index moved") from error
    index, _ = get_vision_window_index(
        torch.tensor(grid),
        spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size,
        patch_size=visual.patch_size,
    )
    return index.to(device)


class QwenVisionHooks:
    """Installs and removes the hooks of one vision-stage method on one Qwen-VL vision tower."""

    def __init__(self, visual: nn.Module):
        blocks = getattr(visual, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise InternalsMovedError(f"{type(visual).__name__} has no 'blocks'")
        attention = getattr(blocks[0], "attn", None)
        if not isinstance(getattr(attention, "qkv", None), nn.Linear) or not hasattr(attention, "num_heads"):
            raise InternalsMovedError(
                f"{type(blocks[0]).__name__}.attn has no 'qkv' projection or 'num_heads'"
            )
        rotary = getattr(sys.modules[type(attention).__module__], _ROTARY, None)
        if rotary is None:
            raise InternalsMovedError(f"{type(attention).__module__}.{_ROTARY} moved")
        self.visual = visual
        self.blocks = blocks
        self.output_layer = len(blocks) - 1  # the merger takes the last block's output
        self.heads = int(attention.num_heads)
        self.head_dim = attention.qkv.in_features // self.heads
        self.scale = self.head_dim**-0.5
        self.merge = int(visual.spatial_merge_size)
        self.unit = self.merge**2  # patches per merger group: one output token
        self._rotary: Callable = rotary
        self._layers: tuple[int, ...] = ()
        self._attention_layers: tuple[int, ...] = ()
        self._pruner: Pruner | None = None
        self._config: PrunerConfig | None = None
        self._modality: str | None = None  # 'image' or 'video' while the model encodes one
        self._modalities: tuple[str, ...] = ()
        self._blocks: dict[int, _Block] | None = None  # what the named blocks saw in this tower forward
        self._encoded = False  # an encoding since the language model's last forward

    def plan(self, config: PrunerConfig, model_name: str) -> None:
        """Check that ``config``'s vision method can run in this tower (``ValueError`` naming what can if
        not) and note the blocks whose attention or keys it needs."""
        spec = config.spec
        if spec.per_layer:
            raise ValueError(
                f"{config.method!r} merges or drops tokens inside the encoder's layers, which {model_name}'s "
                "vision tower runs as packed attention segments (windows) feeding 2x2 merger groups: use "
                "hiprune or visionzip, which choose among the merger's output tokens"
            )
        options = {**spec.options, **config.options}
        attention = (
            spec.encoder_layers(options, self.output_layer) if "encoder_attention" in spec.needs else ()
        )
        self._attention_layers = tuple(sorted(set(attention)))
        keys = (self.output_layer,) if "keys" in spec.needs else ()
        self._layers = tuple(sorted(set(self._attention_layers) | set(keys)))

    def attach(self, pruner: Pruner, config: PrunerConfig, base: nn.Module) -> list[RemovableHandle]:
        """Register the hooks of ``config`` (checked with :meth:`plan`) on the tower of ``base`` (the
        model whose ``get_image_features``/``get_video_features`` encode); returns their handles."""
        self._pruner, self._config = pruner, config
        self._modalities = pruned_modalities(pruner.config.media)
        handles = [
            self.visual.register_forward_pre_hook(self._start),
            self.visual.register_forward_hook(self._reduce, with_kwargs=True),
            base.language_model.register_forward_hook(self._language_model_ran),
            *(
                InstanceOverride(base, name, self._encoding_of(base, name, modality))
                for name, modality in (("get_image_features", "image"), ("get_video_features", "video"))
            ),
        ]
        for i in self._layers:
            attention = self.blocks[i].attn
            handles += [
                attention.register_forward_pre_hook(
                    lambda m, a, k, i=i: self._capture_call(i, k), with_kwargs=True
                ),
                attention.qkv.register_forward_hook(lambda m, a, out, i=i: self._capture_qkv(i, out)),
            ]
        return handles

    # -- hooks ----------------------------------------------------------------------------------

    def _encoding_of(self, base: nn.Module, name: str, modality: str) -> Callable:
        """``base``'s own ``name`` method, the tower's calls within it marked as encoding ``modality``; its
        signature is the method's (``generate`` reads it to pass the pixels)."""
        original = getattr(base, name)

        @functools.wraps(original)
        def encode(*args, **kwargs):
            with self._marked(modality):
                return original(*args, **kwargs)

        return encode

    @contextlib.contextmanager
    def _marked(self, modality: str) -> Iterator[None]:
        outer = self._modality
        self._modality = outer or modality  # a video encoded through the image path stays a video
        try:
            yield
        finally:
            self._modality = outer

    def _start(self, module: nn.Module, args: tuple) -> None:
        self._blocks = None
        if self._modality not in self._modalities:
            return
        if not self._encoded:  # the first encoding of a prefill: images, then videos, add up
            self._pruner.begin_prefill()
        self._blocks = {}

    def _capture_call(self, layer: int, kwargs: dict) -> None:
        if self._blocks is not None:
            block = self._blocks.setdefault(layer, _Block())
            block.segments, block.rotary = kwargs["cu_seqlens"], kwargs["position_embeddings"]

    def _capture_qkv(self, layer: int, output: torch.Tensor) -> None:
        if self._blocks is not None:
            self._blocks.setdefault(layer, _Block()).qkv = output

    def _language_model_ran(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._encoded = False

    # -- selection ------------------------------------------------------------------------------

    def _reduce(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """After the tower: each image's (or video's) chosen tokens in the output, zeros elsewhere."""
        blocks, self._blocks = self._blocks, None
        if blocks is None:
            return None
        grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        tokens = output.pooler_output  # [T, D] every item's merged tokens, in order
        deepstack = list(getattr(output, "deepstack_features", None) or [])
        grid, longest = self._read_shapes(grid_thw, blocks)
        counts = [t * h * w // self.unit for t, h, w in grid]
        starts = list(itertools.accumulate(counts, initial=0))
        pruner, config = self._pruner, self._config
        with pruner.timed_selection():
            order = window_order(self.visual, grid, tokens.device)
            attention = {
                i: self._received_attention(blocks[i], longest[i], grid_thw, order)
                for i in self._attention_layers
            }
            keys = self._token_keys(blocks[self.output_layer], order) if "keys" in config.spec.needs else None
            pruned = tokens.new_zeros(tokens.shape)
            pruned_deepstack = [feature.new_zeros(feature.shape) for feature in deepstack]
            kept = [0] * len(grid)
            for t, h, w in sorted(set(map(tuple, grid))):
                members = [item for item, shape in enumerate(grid) if shape == [t, h, w]]
                n = t * h * w // self.unit
                index = torch.stack(
                    [torch.arange(starts[m], starts[m] + n, device=tokens.device) for m in members]
                )
                keep = config.kept_per_image(n, t)
                ctx = SelectionContext(
                    features=tokens[index],
                    grid=(h // self.merge, w // self.merge) if t == 1 else None,
                    frames=(t, h // self.merge, w // self.merge) if t > 1 else None,
                    image_index=torch.zeros(len(members), dtype=torch.long, device=tokens.device),
                    encoder_attention={i: a[index] for i, a in attention.items()},
                    keys=None if keys is None else keys[index],
                )
                chosen, features, merged = self._choose(ctx, keep)
                places = torch.gather(index, 1, chosen)
                pruned[places] = features.to(tokens.dtype)
                for feature, out in zip(deepstack, pruned_deepstack, strict=True):
                    if merged is not None and merged.follow is not None:  # the method's own merge, again
                        followed = merged.follow(feature[index])
                    elif merged is not None:  # merged as the tokens were: its choice ignores the features
                        followed = self._choose(dataclasses.replace(ctx, features=feature[index]), keep)[1]
                    else:
                        followed = gather_tokens(feature[index], chosen)
                    out[places] = followed.to(feature.dtype)
                for m in members:
                    kept[m] = keep
        output.pooler_output = pruned
        if deepstack:
            output.deepstack_features = pruned_deepstack
        self._encoded = True
        pruner.record_encoder(counts, kept)
        return output

    def _read_shapes(
        self, grid_thw: torch.Tensor, blocks: dict[int, _Block]
    ) -> tuple[list[list[int]], dict[int, int]]:
        """The tower forward's one read of the device: each item's grid ``(t, h, w)``, which sets how many
        tokens it has, and the longest attention segment of each block whose attention the method needs,
        the width its scores are padded to."""
        lengths = [blocks[i].segments.diff().amax()[None].to(grid_thw) for i in self._attention_layers]
        values = torch.cat([grid_thw.flatten(), *lengths]).tolist()
        split = grid_thw.numel()
        grid = [values[item : item + 3] for item in range(0, split, 3)]
        return grid, dict(zip(self._attention_layers, values[split:], strict=True))

    def _choose(self, ctx: SelectionContext, keep: int) -> tuple[torch.Tensor, torch.Tensor, Merged | None]:
        """The method's places ``[I, keep]`` among the tokens of ``ctx``, the tokens it puts there, and its
        merge where it merged them."""
        result = self._pruner.select_with(self._config, ctx, keep)
        if isinstance(result, Merged):
            return result.index, result.features, result
        return result, gather_tokens(ctx.features, result), None

    def _projections(self, block: _Block) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys ``[N, H, d]`` of a block's patches, with its rotary tables applied."""
        qkv = block.qkv.view(block.qkv.shape[0], 3, self.heads, self.head_dim)
        cos, sin = block.rotary
        return self._rotary(qkv[:, 0], qkv[:, 1], cos, sin)

    def _received_attention(
        self, block: _Block, longest: int, grid_thw: torch.Tensor, order: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention each merger group receives at ``block`` ``[T]``: softmax over each attention segment of
        the block (a window or an image, ``longest`` patches at most), heads averaged, summed over every
        query of the group's image and divided by their count (the mean query), summed over the group's
        patches; in output order."""
        query, key = self._projections(block)
        num_patches = query.shape[0]
        segments = block.segments.long()
        lengths = segments.diff()
        slot = torch.arange(longest, device=query.device)
        valid = slot[None] < lengths[:, None]  # [S, longest]
        rows = (segments[:-1, None] + slot[None]).clamp(max=num_patches - 1)  # [S, longest] patch of a slot
        q, k = query[rows].transpose(1, 2), key[rows].transpose(1, 2)  # [S, H, longest, d]
        scores = query_logits(q, k, self.scale)  # [S, H, longest, longest], a new tensor: in place from here
        scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1, out=scores).mul_(valid[:, None, :, None])  # padding: no query
        received = weights.sum(dim=2).mean(dim=1)  # [S, longest]
        # Each patch is one valid slot; padding slots write to a spare entry past the patches.
        targets = torch.where(valid, rows, num_patches).flatten()
        per_patch = query.new_zeros(num_patches + 1, dtype=torch.float32)
        per_patch = per_patch.scatter_(0, targets, received.flatten().float())[:num_patches]
        patches = grid_thw.prod(dim=-1)
        image_patches = torch.repeat_interleave(patches, patches, output_size=num_patches)  # [N] of its image
        per_patch = per_patch / image_patches.to(per_patch)
        return self._by_token(per_patch.view(-1, self.unit).sum(dim=1), order)

    def _token_keys(self, block: _Block, order: torch.Tensor | None) -> torch.Tensor:
        """Keys of each merger group ``[T, d]`` at ``block``: its patches' (before the rotary tables),
        averaged over heads and over the group."""
        qkv = block.qkv.view(block.qkv.shape[0], 3, self.heads, self.head_dim)
        keys = qkv[:, 1].mean(dim=1)
        return self._by_token(keys.view(-1, self.unit, self.head_dim).mean(dim=1), order)

    @staticmethod
    def _by_token(values: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
        """Per-group ``values`` in block order, put in the merger's output order."""
        if order is None:
            return values
        out = torch.empty_like(values)
        out[order] = values
        return out
