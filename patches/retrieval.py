"""Hooks for ``kv`` methods: at every decode step, each decoder layer attends to the visual KV entries
its query selects, while the cache keeps every entry.

Shared by every family whose language model is a Llama-style decoder, like
:mod:`tokenprune.patches.decoder`; the family module says where the images are. Per-instance hooks only:

* on the language model (pre): at a prefill with images, remembers where the image tokens are, for the
  cache this forward fills; at a decode step on such a cache, starts the step.
* on every layer (pre), at a decode step: the step's last query, from the layer's own projections and
  RoPE, scores the cached keys; the method picks each image's visible tokens; the layer gets the mask
  that hides the others (text and generated tokens stay visible).
* on the language model (post): keys the prompt by the returned cache; records the step's selections.

Prefill runs unpruned, and per layer the cache holds ``prompt + generated`` entries as without a pruner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.attention import query_attention
from tokenprune.context import SelectionContext
from tokenprune.sequence import VisualLayout, image_groups, keep_masks

from . import _internals as internals
from .decoder import LanguageModelHooks

if TYPE_CHECKING:
    from tokenprune.pruner import Pruner


@dataclass
class _Prompt:
    """Where the image tokens of a cached prompt are."""

    visual: torch.Tensor  # [B, L]
    layouts: list[VisualLayout]  # the images, in groups of one size


@dataclass
class _Step:
    """One decode step on a cache with images: its 2-D mask and each layer's visible prompt tokens."""

    prompt: _Prompt
    mask: torch.Tensor  # [B, C + T] over the cache and the new tokens
    visible: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, L]


class DecodeRetrievalHooks(LanguageModelHooks):
    """Installs and removes the hooks of one ``kv``-stage pruner on one decoder-only language model."""

    def __init__(self, language_model: nn.Module, tokens_per_image: int, grid: tuple[int, int] | None):
        super().__init__(language_model, tokens_per_image, grid)
        self._new_prompt: _Prompt | None = None
        self._step: _Step | None = None

    def attach(self, pruner: Pruner, model: nn.Module) -> list[RemovableHandle]:
        """Register the hooks for ``pruner``, whose VLM is ``model``; returns their handles."""
        self._pruner = pruner
        lm = self.language_model
        handles = [
            lm.register_forward_pre_hook(self._before_language_model, with_kwargs=True),
            lm.register_forward_hook(self._after_language_model, with_kwargs=True, always_call=True),
            *self.generation_overrides(model),
        ]
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(partial(self._select, i), with_kwargs=True))
        return handles

    def masks_for_generate(self, model: nn.Module) -> Callable:
        """A ``create_masks_for_generate`` that hands a step on a cache with images its 2-D mask (and a
        prefill too): each layer's mask hides what that layer's query does not select, so it is built per
        layer from the 2-D one. Elsewhere the model's own function."""
        original = internals.mask_for_generate_function(model)

        def create_masks_for_generate(**kwargs):  # generate passes every argument by keyword
            prompt = internals.cache_record(internals.cache_argument(kwargs))
            if isinstance(prompt, _Prompt) or kwargs.get("is_first_iteration"):
                return kwargs.get("attention_mask")
            return original(**kwargs)

        return create_masks_for_generate

    def _before_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        visual, self.pending_visual = self.pending_visual, None
        self._new_prompt = self._step = None
        cache = internals.cache_argument(kwargs)
        has_images = visual is not None and bool(visual.any())
        prompt = internals.cache_record(cache)
        if isinstance(prompt, _Prompt):
            if has_images:
                raise ValueError("cannot add images to a cache whose decode steps select visual tokens")
            self._step = _Step(prompt, self._step_mask(kwargs, cache, prompt))
            return
        if not has_images:
            if not torch.compiler.is_compiling():
                self._pruner.record_text_only(kwargs["inputs_embeds"].shape[0])
            return
        if internals.cache_length(cache, 0) > 0:
            raise ValueError("images must be in the first forward of a cache (no chunked prefill)")
        layouts = image_groups(self.image_ids(visual))
        self._new_prompt = _Prompt(visual, layouts)
        samples = torch.cat([layout.sample for layout in layouts])
        images = torch.bincount(samples, minlength=visual.shape[0])
        self._pruner.begin_prefill()
        self._pruner.record_decode_prompt(
            visual.sum(dim=1).tolist(), (images * self._pruner.keep_per_image).tolist()
        )

    @staticmethod
    def _step_mask(kwargs: dict, cache: Any, prompt: _Prompt) -> torch.Tensor:
        """The 2-D mask ``[B, C + T]`` of a decode step over the cache and its new tokens."""
        embeds = kwargs.get("inputs_embeds")
        batch, new = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is None:
            return prompt.visual.new_ones(batch, internals.cache_length(cache, 0) + new)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("decode steps need a 2-D attention mask over the cached and new tokens, or none")
        if not torch.compiler.is_compiling() and mask.shape[1] != internals.cache_length(cache, 0) + new:
            raise ValueError(
                f"decode steps need a 2-D attention mask over the {internals.cache_length(cache, 0)} cached "
                f"and {new} new tokens (or none), not over {mask.shape[1]}"
            )
        return mask.bool()

    def _after_language_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        prompt, self._new_prompt = self._new_prompt, None
        step, self._step = self._step, None
        if prompt is not None:
            cache = internals.output_cache(output)
            if cache is not None:
                internals.mark_pruned_cache(cache, prompt, [0] * self.num_layers)
        if step is not None and step.visible:
            self._pruner.record_decode_step(step.visible)

    def _select(
        self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        """At a decode step: mask the visual entries this layer's query does not select."""
        step = self._step
        if step is None:
            return None
        hidden = internals.layer_hidden_states(args, kwargs)
        cache = internals.cache_argument(kwargs)
        prompt = step.prompt
        length = prompt.visual.shape[1]
        pruner = self._pruner
        with pruner.timed_selection():
            keys = internals.cached_keys(cache, layer_idx)  # this step's entries are not in yet
            last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
            query, _ = internals.project_queries_keys(module, hidden, kwargs["position_embeddings"], last)
            cached = step.mask.shape[1] - hidden.shape[1]
            # a static cache's keys run on past its rows, into slots no token holds yet
            key_mask = torch.nn.functional.pad(step.mask[:, :cached], (0, keys.shape[2] - cached))
            weights = query_attention(query, keys, key_mask, internals.attention_scaling(module))
            selections = []
            for layout in prompt.layouts:
                ctx = SelectionContext(
                    features=layout.take(keys.mean(dim=1)[:, :length]),
                    grid=self.grid_for(layout.positions.shape[1]),
                    image_index=layout.image_index,
                    attention=layout.take(weights[:, :length]),
                )
                selections.append((layout, pruner.select(ctx, pruner.keep_per_image)))
            visible = keep_masks(prompt.visual, selections)
        step.visible[layer_idx] = visible
        mask = step.mask.clone()
        mask[:, :length] &= visible
        attention_mask = internals.causal_mask(self.language_model.config, hidden, mask, cache, layer_idx)
        return args, {**kwargs, "attention_mask": attention_mask}
