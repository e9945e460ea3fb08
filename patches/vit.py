"""The ``vision`` stage: prune or merge tokens inside a ViT-style image encoder (CLIP, SigLIP, ViT).

:class:`EncoderPruningHooks` hooks one encoder, standalone or as a VLM's vision tower, with per-instance
forward hooks only:

* merging methods (``per_layer``, ToMe): inside every layer up to the one whose output is used, between
  its attention and its MLP, as ToMe's ``tome.patch`` merges, the tokens (the layer's input plus its
  attention's output) are merged with the keys that layer's attention computed (captured from its key
  projection); the layer's MLP and its output then hold the merged tokens. With proportional attention,
  every later layer gets ``log(size)`` as an additive attention bias over the keys. A ``per_layer``
  method with a ``drop_layer`` option (SAINT) acts in layer ``drop_layer`` only: its MLP and the later
  layers run on the tokens it kept. The hooks: the attention's output gives the merge, the MLP's norm
  gets the merged tokens as its input, and the layer's output becomes the merged tokens plus the MLP's
  output (the layer's own sum, of its unmerged rows, is discarded).
* the other methods select (or merge) once, from the output layer's tokens, with the attention they
  declared, recomputed from the query/key projections captured at those layers: the CLS row only, or
  every row for an encoder without CLS or a method that asks for every query (``encoder_queries="all"``).
  A method that needs ``class_token`` (VisionZip) also gets the output layer's CLS token and returns it
  among its tokens, in a merged-away patch's place. A standalone encoder's output layer returns the
  pruned tokens (CLS first where the method did not take it); a VLM's adapter calls
  :meth:`EncoderPruningHooks.reduce` on the features it hands its projector.

:class:`VisionEncoderAdapter` is the adapter of standalone encoders (``CLIPVisionModel``,
``SiglipVisionModel``, ``ViTModel``, ``ViTForImageClassification`` and the CLIP/SigLIP dual encoders'
image side): the last layer's output is the pruned sequence, CLS first where the model has one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.attention import query_attention
from tokenprune.context import Merged, SelectionContext
from tokenprune.kernels import gather_tokens
from tokenprune.merge import constant_schedule, merge_schedule
from tokenprune.registry import vision_methods

from . import _encoder_internals as internals
from ._internals import layer_hidden_states

if TYPE_CHECKING:
    from tokenprune.config import PrunerConfig
    from tokenprune.pruner import Pruner


@dataclass
class _EncoderCall:
    """State of one encoder forward, shared by its hooks."""

    schedule: list[int] | None = None  # tokens merged away in layers 0..output_layer
    patches: int = 0  # patch tokens per image before merging
    sizes: torch.Tensor | None = None  # [B, n] patches each token stands for, once merged
    origin: torch.Tensor | None = None  # [B, n] original token index of each token
    keys: torch.Tensor | None = None  # [B, n, d] keys of the last layer run, averaged over heads
    inputs: torch.Tensor | None = None  # [B, n, D] the input of the layer running
    merged: torch.Tensor | None = None  # [B, n', D] the layer's tokens merged after its attention
    mlp_output: torch.Tensor | None = None  # [B, n', D] its MLP's output on them
    class_token: torch.Tensor | None = None  # [B, D] the output layer's CLS token (needs class_token)
    projections: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> q, k


def layer_schedule(config: PrunerConfig, num_patches: int, output_layer: int, protected: int) -> list[int]:
    """Tokens merged away in each of the layers ``0..output_layer`` of an encoder whose images have
    ``num_patches`` patches and ``protected`` leading tokens (CLS); a method with a ``drop_layer`` option
    (SAINT) removes them all at once, in that layer."""
    steps, tokens = output_layer + 1, num_patches + protected
    if "drop_layer" in config.spec.options:
        schedule = [0] * steps
        schedule[drop_layer(config, output_layer)] = num_patches - config.kept_per_image(num_patches)
        return schedule
    r = config.options.get("r")
    if r is not None:
        return constant_schedule(tokens, r, steps, protected)
    keep = config.kept_per_image(num_patches) + protected
    return merge_schedule(tokens, keep, steps, protected)


def drop_layer(config: PrunerConfig, output_layer: int) -> int:
    """The layer in which a ``drop_layer`` method drops its tokens: the option, or by default three layers
    before the output layer; ``ValueError`` unless one layer at least runs after it."""
    layer = {**config.spec.options, **config.options}["drop_layer"]
    if layer is None:
        layer = max(0, output_layer - 3)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < output_layer:
        raise ValueError(
            f"{config.method} drop_layer must be an int in [0, {output_layer}) (a layer of this "
            f"encoder before the output layer {output_layer}), got {layer!r}"
        )
    return layer


class EncoderPruningHooks:
    """Installs and removes the hooks of one pruner's vision-stage method on one image encoder.

    Args:
        vision_model: the vision transformer (with ``embeddings`` and its layers).
        output_layer: the layer whose output is used (a VLM's feature layer); default the last.
    """

    def __init__(self, vision_model: nn.Module, output_layer: int | None = None):
        internals.check_encoder_internals(vision_model)
        self.layers = internals.encoder_layers(vision_model)
        self.output_layer = len(self.layers) - 1 if output_layer is None else output_layer
        self.protected = int(internals.has_class_token(vision_model))
        self.grid = internals.patch_grid(vision_model)
        self.num_patches = self.grid[0] * self.grid[1]
        self.heads, self.head_dim, self.scale = internals.attention_shape(
            internals.layer_attention(self.layers[0])
        )
        self._attn_implementation = getattr(vision_model.config, "_attn_implementation", None)
        self._proportional = False
        self._pruner: Pruner | None = None
        self._config: PrunerConfig | None = None
        self._attention_layers: tuple[int, ...] = ()
        self._call: _EncoderCall | None = None
        #: set while the encoder runs on something the method does not take (a VLM's video frames)
        self.suspended = False

    @property
    def merging(self) -> bool:
        """Whether the attached method merges tokens layer by layer (rather than selecting at the output)."""
        return self._config.spec.per_layer

    @property
    def encoded(self) -> bool:
        """Whether an encoder forward ran whose output :meth:`reduce` or :meth:`merged_origin` has not
        taken yet."""
        return self._call is not None

    def plan(self, config: PrunerConfig) -> int:
        """Patches kept per image under ``config`` (a vision method's) at the encoder's configured image
        size; ``ValueError`` if that is unreachable or the method cannot run on this encoder."""
        spec = config.spec
        options = {**spec.options, **config.options}
        if spec.per_layer:
            self._proportional = bool(options.get("proportional"))
            if self._proportional and str(self._attn_implementation).startswith("flash"):
                raise ValueError(
                    f"{config.method} proportional attention adds a bias to attention logits, which "
                    "flash_attention_2 cannot take: pass proportional=False or load the encoder with sdpa"
                )
            if "encoder_attention" in spec.needs:
                self._attention_layers = spec.encoder_layers(options, self.output_layer)
            schedule = layer_schedule(config, self.num_patches, self.output_layer, self.protected)
            return self.num_patches - sum(schedule)
        if "encoder_attention" in spec.needs:
            layers = spec.encoder_layers(options, self.output_layer)
            self._attention_layers = tuple(sorted(set(layers)))
        return config.kept_per_image(self.num_patches)

    def attach(self, pruner: Pruner, config: PrunerConfig, standalone: bool) -> list[RemovableHandle]:
        """Register the hooks of ``config`` (planned with :meth:`plan`); returns their handles."""
        self._pruner, self._config = pruner, config
        first = self.layers[0]
        handles = [first.register_forward_pre_hook(self._start)]
        if config.spec.per_layer:
            for i, layer in enumerate(self.layers):
                handles.append(layer.register_forward_pre_hook(partial(self._enter, i), with_kwargs=True))
            for i, layer in enumerate(self.layers[: self.output_layer + 1]):
                attention = internals.layer_attention(layer)
                norm, mlp = internals.layer_mlp(layer)
                handles += [
                    attention.k_proj.register_forward_hook(self._capture_keys),
                    attention.register_forward_hook(partial(self._merge_after_attention, i)),
                    norm.register_forward_pre_hook(self._merged_into_mlp),
                    mlp.register_forward_hook(self._capture_mlp_output),
                    # before transformers' own hooks, which record each layer's output
                    layer.register_forward_hook(self._merged_output, prepend=True),
                ]
            return handles + self._capture_projections(self._attention_layers)
        layers = set(self._attention_layers)
        if "keys" in config.spec.needs:
            layers.add(self.output_layer)
        handles += self._capture_projections(sorted(layers))
        output = self.layers[self.output_layer]
        if self.protected and "class_token" in config.spec.needs:
            handles.append(output.register_forward_hook(self._capture_class_token))
        if standalone:
            handles.append(output.register_forward_hook(self._reduce_output))
        return handles

    def _capture_projections(self, layers: Iterable[int]) -> list[RemovableHandle]:
        """Hooks capturing the query and key projections of each of ``layers``."""
        handles = []
        for i in layers:
            attention = internals.layer_attention(self.layers[i])
            handles += [
                attention.q_proj.register_forward_hook(partial(self._capture_projection, i, 0)),
                attention.k_proj.register_forward_hook(partial(self._capture_projection, i, 1)),
            ]
        return handles

    # -- hooks ----------------------------------------------------------------------------------

    def _start(self, module: nn.Module, args: tuple) -> None:
        if self.suspended:
            self._call = None
            return
        self._pruner.begin_prefill()
        self._call = _EncoderCall()

    def _capture_keys(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._call is not None:
            self._call.keys = output.view(*output.shape[:2], self.heads, self.head_dim).mean(dim=2)

    def _capture_projection(self, layer: int, which: int, module: nn.Module, args: tuple, output) -> None:
        if self._call is not None:
            pair = list(self._call.projections.get(layer, (None, None)))
            pair[which] = output
            self._call.projections[layer] = tuple(pair)

    def _capture_class_token(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._call is not None:
            self._call.class_token = output[:, 0]

    def _enter(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Before a layer of a merging method: note its input; once tokens were merged, give it the
        ``log(size)`` attention bias under proportional attention."""
        call = self._call
        if call is None:
            return None
        hidden = layer_hidden_states(args, kwargs)
        if call.schedule is None:  # the first layer: the image size is known
            call.patches = hidden.shape[1] - self.protected
            call.schedule = layer_schedule(self._config, call.patches, self.output_layer, self.protected)
        call.inputs = hidden
        if call.sizes is None or not self._proportional:
            return None
        if internals.layer_attention_mask(args, kwargs) is not None:
            raise ValueError("proportional attention cannot combine with an encoder attention mask")
        return internals.with_layer_inputs(args, kwargs, hidden, call.sizes.log()[:, None, None, :])

    def _merge_after_attention(self, layer: int, module: nn.Module, args: tuple, output: tuple) -> None:
        """After a layer's attention: merge the layer's tokens as they stand there (its input plus the
        attention's output, the sum the layer computes next) on the keys this attention computed, as ToMe's
        block does; the layer's MLP then runs on the merged tokens (see :meth:`_merged_into_mlp`)."""
        call = self._call
        if call is None:
            return
        batch, tokens = call.inputs.shape[:2]
        if call.schedule[layer] > 0:
            hidden = call.inputs + output[0]
            if call.origin is None:
                call.origin = torch.arange(tokens, device=hidden.device).expand(batch, tokens)
                call.sizes = torch.ones(batch, tokens, dtype=hidden.dtype, device=hidden.device)
            ctx = SelectionContext(
                features=hidden,
                grid=None,
                image_index=torch.zeros(batch, dtype=torch.long, device=hidden.device),
                keys=call.keys,
                sizes=call.sizes,
                protected=self.protected,
            )
            with self._pruner.timed_selection():
                if layer in self._attention_layers:  # this attention's, under the bias it ran with
                    bias = call.sizes.log() if self._proportional else None
                    ctx.encoder_attention = {layer: self._received_attention(call, layer, bias)}
                merged = self._pruner.select_with(self._config, ctx, tokens - call.schedule[layer])
            call.merged, call.sizes = merged.features, merged.sizes
            call.origin = gather_tokens(call.origin, merged.index)
        call.projections.pop(layer, None)
        self._record(batch, call.patches, tokens - call.schedule[layer] - self.protected)

    def _merged_into_mlp(self, module: nn.Module, args: tuple) -> tuple | None:
        """Before the norm of a layer's MLP: the merged tokens in place of the layer's unmerged sum."""
        call = self._call
        if call is None or call.merged is None:
            return None
        return (call.merged, *args[1:])

    def _capture_mlp_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> object:
        """After a layer's MLP on merged tokens: keep its output for :meth:`_merged_output`, and hand the
        layer rows enough for its own sum with its unmerged tokens, which that hook discards."""
        call = self._call
        if call is None or call.merged is None:
            return None
        call.mlp_output = output
        return torch.nn.functional.pad(output, (0, 0, 0, call.inputs.shape[1] - output.shape[1]))

    def _merged_output(self, module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> object:
        """After a layer that merged: its output is the merged tokens plus its MLP's output on them."""
        call = self._call
        if call is None or call.merged is None:
            return None
        hidden = call.merged + call.mlp_output
        call.merged = call.mlp_output = None
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _reduce_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self._call is None:
            return None
        num_patches = output.shape[1] - self.protected
        _, features = self.reduce(output[:, self.protected :])
        if self._takes_class_token(self._config.kept_per_image(num_patches), num_patches):
            return features  # the CLS token is among them
        return torch.cat([output[:, : self.protected], features], dim=1)

    # -- selection ------------------------------------------------------------------------------

    def reduce(self, features: torch.Tensor, frames: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Select (or merge) the output layer's patch tokens ``features [I, N, D]`` of this forward; with
        ``frames`` > 1, each ``frames`` images in a row are the frames of one video, chosen among together
        (a method that takes the CLS token does not take it then).

        Returns the kept patches ``index [I, k]`` (of a video ``[I / frames, k]``, over its frames' patches
        in order; sorted, or in a merge's layout) and their tokens ``[I, k, D]``; for a method that takes
        the CLS token (see :meth:`_takes_class_token`), the CLS token is one of them, in the place of a
        patch the method merged away.
        """
        call, self._call = self._call, None
        config, spec = self._config, self._config.spec
        num_images, num_patches = features.shape[:2]
        items, tokens = num_images // frames, num_patches * frames
        keep = config.kept_per_image(tokens, frames)
        grid = self.grid if num_patches == self.num_patches else None
        ctx = SelectionContext(
            features=features.reshape(items, tokens, features.shape[2]),
            grid=grid if frames == 1 else None,
            frames=(frames, *(grid or (1, num_patches))) if frames > 1 else None,
            image_index=torch.zeros(items, dtype=torch.long, device=features.device),
        )
        with self._pruner.timed_selection():
            if "encoder_attention" in spec.needs:
                attention = self._patch_attention(call)
                ctx.encoder_attention = {i: a.reshape(items, tokens) for i, a in attention.items()}
            if "keys" in spec.needs:
                keys = self._patch_keys(call, self.output_layer)
                ctx.keys = keys.reshape(items, tokens, keys.shape[2])
            if frames == 1 and self._takes_class_token(keep, num_patches):
                ctx.class_token = call.class_token[:, None]
            result = self._pruner.select_with(config, ctx, keep)
        self._record(items, tokens, keep)
        if isinstance(result, Merged):
            return result.index, result.features
        return result, gather_tokens(ctx.features, result)

    def patch_scores(self) -> tuple[dict[int, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """Take, for an adapter that selects elsewhere than at the output layer's tokens, what this forward
        gathered for the method: the attention each image's patches receive by encoder layer
        ``{layer: [I, N]}``, their keys at the output layer ``[I, N, d]`` (``None`` unless the method needs
        ``keys``) and the output layer's CLS token ``[I, D]`` (``None`` unless it needs ``class_token`` and
        the encoder has one)."""
        call, self._call = self._call, None
        attention = self._patch_attention(call)
        keys = self._patch_keys(call, self.output_layer) if "keys" in self._config.spec.needs else None
        return attention, keys, call.class_token

    def merged_origin(self, num_images: int, device: torch.device) -> torch.Tensor:
        """For the last merging forward: the patch index of each output patch token ``[I, k]``."""
        call, self._call = self._call, None
        if call is None or call.origin is None:  # nothing was merged
            return torch.arange(self.num_patches, device=device).expand(num_images, -1)
        return call.origin[:, self.protected :] - self.protected

    def _takes_class_token(self, keep: int, num_patches: int) -> bool:
        """Whether the method returns the CLS token among its ``keep`` tokens: it needs ``class_token``, the
        encoder has one, and a patch is merged away to leave it a place (keeping every patch, it does not)."""
        return bool(self.protected) and "class_token" in self._config.spec.needs and keep < num_patches

    def _heads(self, projection: torch.Tensor) -> torch.Tensor:
        """``[B, n, H * d]`` projections as ``[B, H, n, d]``."""
        return projection.view(*projection.shape[:2], self.heads, self.head_dim).transpose(1, 2)

    def _patch_keys(self, call: _EncoderCall, layer: int) -> torch.Tensor:
        """Keys of the patch tokens at ``layer``, averaged over heads ``[I, N, d]``."""
        return self._heads(call.projections[layer][1]).mean(dim=1)[:, self.protected :]

    def _patch_attention(self, call: _EncoderCall) -> dict[int, torch.Tensor]:
        """Attention each patch receives at each layer the method names, ``{layer: [I, N]}``."""
        return {i: self._received_attention(call, i)[:, self.protected :] for i in self._attention_layers}

    def _received_attention(
        self, call: _EncoderCall, layer: int, key_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention each token (CLS included) receives at ``layer`` ``[I, n]``: from the CLS query, else (no
        CLS, or the method's ``encoder_queries="all"``) averaged over every query, the CLS one included;
        heads averaged. ``key_bias [I, n]`` is added to every query's logits (proportional attention)."""
        query, keys = (self._heads(p) for p in call.projections[layer])
        if self.protected and self._config.spec.encoder_queries == "cls":
            query = query[:, :, :1]
        return query_attention(query, keys, None, self.scale, key_bias)

    def _record(self, num_images: int, patches: int, kept: int) -> None:
        self._pruner.record_encoder([patches] * num_images, [kept] * num_images)


class VisionEncoderAdapter:
    """Adapter of standalone image encoders: only ``vision`` methods apply."""

    model_types = ("clip_vision_model", "siglip_vision_model", "vit", "clip", "siglip")
    frames_of_images = False  # images_as_frames: decoder and kv stages only

    def __init__(self, model: nn.Module):
        vision_model = getattr(model, "vision_model", None) or getattr(model, "vit", None) or model
        self.model = model
        self.encoder = EncoderPruningHooks(vision_model)
        self.tokens_per_image = self.encoder.num_patches

    @property
    def num_layers(self) -> int:
        """No language model: no decoder layers."""
        return 0

    def image_grid(self) -> tuple[int, int]:
        return self.encoder.grid

    def stages(self, config: PrunerConfig) -> list[tuple[int, int]]:
        """The single stage of a vision method: ``[(0, patches kept per image)]``."""
        if not config.spec.vision or config.vision is not None:
            raise ValueError(
                f"{type(self.model).__name__} is an image encoder without a language model: only vision "
                f"methods apply ({', '.join(vision_methods())}), not {config.method!r}"
            )
        if config.positions not in (None, "original"):
            raise ValueError(
                f"positions={config.positions!r} renumbers a language model's positions; "
                f"{type(self.model).__name__} is an image encoder without one"
            )
        return [(0, self.encoder.plan(config))]

    def attach(self, pruner: Pruner) -> list[RemovableHandle]:
        return self.encoder.attach(pruner, pruner.config, standalone=True)
