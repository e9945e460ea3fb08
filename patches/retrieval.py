"""Hooks for ``kv`` methods: at every decode step, each decoder layer attends to the visual KV entries
its query selects, while the cache keeps every entry.

Shared by every family whose language model is a Llama-style decoder, like
:mod:`tokenprune.patches.decoder`; the family module says where the images are. Per-instance hooks, and
each decoder layer's attention routed through :meth:`DecodeRetrievalHooks._attend`:

* on the language model (pre): at a prefill with images, remembers where the image tokens are, for the
  cache this forward fills; at a decode step on such a cache, starts the step.
* in every layer's attention, at a decode step: the scores of the layer's own queries over the cached
  keys (computed once, as eager attention does) rank each image's tokens by the last query's attention;
  the method picks each image's visible tokens; the same scores, with the others hidden, give the
  layer's output (text and generated tokens stay visible). A method whose ``default_layer`` (or the
  config's ``layer``) is K >= 1 picks once, in layer K - 1 (which sees every entry), for layers K onward;
  the layers before K see every entry. A method that keeps the top-k of that
  attention (``attention_top_k``) selects in one Triton kernel instead where Triton runs, and sdpa
  attends under the masks it writes: a few launches per layer, not a few dozen. Elsewhere the layer's
  own attention runs.
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

from tokenprune.context import SelectionContext
from tokenprune.kernels import use_triton
from tokenprune.kernels.retrieval import attention_top_k
from tokenprune.sequence import VisualLayout, image_layouts, keep_masks

from . import _cache_internals as caches
from . import _internals as internals
from . import _tensor_parallel as tensor_parallel
from .decoder import LanguageModelHooks

if TYPE_CHECKING:
    from tokenprune.pruner import Pruner


@dataclass
class _Prompt:
    """Where the image tokens of a cached prompt are."""

    visual: torch.Tensor  # [B, L]
    layouts: list[VisualLayout]  # the images, in groups of one size
    keeps: list[int]  # of each group: the visual tokens of each image that a step's query attends to
    text: torch.Tensor  # [B, L] ~visual, contiguous: what a layer's query sees before its selection


@dataclass
class _Step:
    """One decode step on a cache with images: where its new tokens go, and each layer's visible prompt
    tokens."""

    prompt: _Prompt
    mask: torch.Tensor  # [B, M] bool over the cache's slots: M = rows held + new tokens, or a static capacity
    rows: torch.Tensor  # [T] the cache slot of each new token
    visible: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, L]
    chosen: torch.Tensor | None = None  # [B, L] a method's choice in one layer for the layers after it
    _hidden: dict[tuple[int, int | None], torch.Tensor] = field(default_factory=dict)
    _allowed: dict[tuple[int, int | None], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def hidden(self, keys: int, window: int | None) -> torch.Tensor:
        """``[B, 1, 1, T, keys]`` bool, True where a new token may not attend: padding, a later new token or
        an empty slot of a static cache, and outside the sliding ``window`` if any. Built once per step for
        each shape, in the layout of the step's scores; no shape depends on the step's length (a compiled
        step on a static cache is one graph)."""
        if (keys, window) not in self._hidden:
            mask = torch.nn.functional.pad(self.mask, (0, keys - self.mask.shape[1]))
            columns = torch.arange(keys, device=mask.device)
            causal = columns <= self.rows[:, None]
            if window is not None:
                causal &= columns > self.rows[:, None] - window
            self._hidden[keys, window] = ~(mask[:, None, :] & causal)[:, None, None]
        return self._hidden[keys, window]

    def allowed(self, keys: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The complement of :meth:`hidden`, contiguous, as the selection kernel takes it: ``[B, 1, T, keys]``
        (an sdpa mask) and the last new token's row ``[B, keys]``. Built once per step for each shape."""
        if (keys, window) not in self._allowed:
            allowed = ~self.hidden(keys, window)[:, :, 0]
            self._allowed[keys, window] = allowed, allowed[:, 0, -1].contiguous()
        return self._allowed[keys, window]


class DecodeRetrievalHooks(LanguageModelHooks):
    """Installs and removes the hooks of one ``kv``-stage pruner on one decoder-only language model."""

    def __init__(self, language_model: nn.Module, tokens_per_image: int, grid: tuple[int, int] | None):
        super().__init__(language_model, tokens_per_image, grid)
        self._new_prompt: _Prompt | None = None
        self._step: _Step | None = None

    def attach(self, pruner: Pruner, model: nn.Module) -> list[RemovableHandle]:
        """Register the hooks for ``pruner``, whose VLM is ``model``; returns their handles."""
        self._pruner = pruner
        # 0: each layer selects; K >= 1: layer K - 1 selects for layers K onward, the others see every entry
        self._first_layer = pruner.config.acting_layer
        lm = self.language_model
        # the kernel selects by the heads it is given: on a tensor-parallel rank, its own (see _visible)
        self._in_one_kernel = pruner.config.spec.attention_top_k and not tensor_parallel.is_sharded(lm)
        return [
            lm.register_forward_pre_hook(self._before_language_model, with_kwargs=True),
            lm.register_forward_hook(self._after_language_model, with_kwargs=True, always_call=True),
            *self.generation_overrides(model),
            *(internals.AttentionRoute(layer.self_attn, self._attend) for layer in self.layers),
        ]

    def masks_for_generate(self, model: nn.Module) -> Callable:
        """A ``create_masks_for_generate`` that hands a step on a cache with images its 2-D mask (or none),
        padded to a static cache's slots, and a prefill its 2-D mask: each layer's attention hides what that
        layer's query does not select, from the 2-D mask. Elsewhere the model's own function."""
        original = internals.mask_for_generate_function(model)

        def create_masks_for_generate(**kwargs):  # generate passes every argument by keyword
            cache = caches.cache_argument(kwargs)
            mask = kwargs.get("attention_mask")
            if isinstance(caches.cache_record(cache), _Prompt):
                capacity = caches.cache_capacity(cache, 0)  # a static cache: one shape for every step
                if mask is None or capacity is None:
                    return mask
                return torch.nn.functional.pad(mask, (0, capacity - mask.shape[1]))
            if kwargs.get("is_first_iteration"):
                return mask
            return original(**kwargs)

        return create_masks_for_generate

    def _before_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        visual, self.pending_visual = self.pending_visual, None
        image_id, self.pending_image_id = self.pending_image_id, None
        sizes, self.pending_sizes = self.pending_sizes, None
        self._new_prompt = self._step = None
        cache = caches.cache_argument(kwargs)
        has_images = visual is not None and (bool(sizes) if sizes is not None else bool(visual.any()))
        prompt = caches.cache_record(cache)
        if isinstance(prompt, _Prompt):
            if has_images:
                raise ValueError("cannot add images to a cache whose decode steps select visual tokens")
            new = kwargs["inputs_embeds"].shape[1]
            rows = caches.cache_fill(cache, 0) + torch.arange(new, device=prompt.visual.device)
            self._step = _Step(prompt, self._step_mask(kwargs, cache, prompt), rows)
            return
        if not has_images:
            if not torch.compiler.is_compiling():
                self._pruner.record_text_only(kwargs["inputs_embeds"].shape[0])
            return
        if caches.cache_length(cache, 0) > 0:
            raise ValueError("images must be in the first forward of a cache (no chunked prefill)")
        image_id = self.image_ids(visual) if image_id is None else image_id
        _, rows = self.item_rows(visual, image_id, None, sizes)
        # each image's count from its own size (a budget larger than an image raises here, before any work)
        config = self._pruner.config
        kept = [config.kept_per_image(size, (self.frames_for(size) or (1,))[0]) for size in rows.sizes]
        layouts = image_layouts(visual, rows)
        keeps = [kept[layout.images[0]] for layout in layouts]
        self._new_prompt = _Prompt(visual, layouts, keeps, ~visual)
        self._pruner.begin_prefill()
        self._pruner.record_decode_prompt(rows.tokens_in_rows, rows.in_rows(kept))

    @staticmethod
    def _step_mask(kwargs: dict, cache: Any, prompt: _Prompt) -> torch.Tensor:
        """The 2-D mask ``[B, M]`` of a decode step over the cache's slots: the cached and new tokens, or
        every slot of a static cache (as :meth:`masks_for_generate` pads it)."""
        batch, new = kwargs["inputs_embeds"].shape[:2]
        mask = kwargs.get("attention_mask")
        capacity = caches.cache_capacity(cache, 0)
        if mask is None:
            return prompt.visual.new_ones(batch, capacity or caches.cache_length(cache, 0) + new)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("decode steps need a 2-D attention mask over the cached and new tokens, or none")
        checked = torch.compiler.is_compiling() or mask.shape[1] == capacity  # no reading a static length
        if not checked and mask.shape[1] != caches.cache_length(cache, 0) + new:
            raise ValueError(
                f"decode steps need a 2-D attention mask over the {caches.cache_length(cache, 0)} cached "
                f"and {new} new tokens (or none), not over {mask.shape[1]}"
            )
        return mask.bool()

    def _after_language_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        prompt, self._new_prompt = self._new_prompt, None
        step, self._step = self._step, None
        if prompt is not None:
            cache = caches.output_cache(output)
            if cache is not None:
                caches.mark_pruned_cache(cache, prompt, [0] * self.num_layers)
        if step is not None and step.visible and not torch.compiler.is_compiling():  # a list grows: a guard
            self._pruner.record_decode_step(step.visible)

    def _attend(
        self,
        original: Callable,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer's attention. At a decode step on a cache with images: the new tokens' attention over
        the cache (``key``/``value [B, H_kv, C', d]``, this step's entries in) with the visual entries this
        layer's last query does not select hidden, as eager attention computes it; ``[B, T, H, d]`` and the
        weights. Elsewhere the layer's ``original`` attention function on the same arguments."""
        step = self._step
        if step is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        batch, heads, new, head_dim = query.shape
        kv_heads, keys = key.shape[1], key.shape[2]
        groups = heads // kv_heads
        scaling = kwargs.get("scaling") or head_dim**-0.5
        if self._in_one_kernel and use_triton(key) and not torch.compiler.is_compiling():
            # selection in one kernel, attention by sdpa (a compiled step fuses the torch path below instead)
            attend, allowed = step.allowed(keys, kwargs.get("sliding_window"))
            attend, visible = attend.clone(), step.prompt.text.clone()
            with self._pruner.timed_selection():
                for layout, keep in zip(step.prompt.layouts, step.prompt.keeps, strict=True):
                    args = (layout.positions, layout.sample, keep, scaling)
                    attention_top_k(query, key, allowed, *args, attend, visible)
            step.visible[module.layer_idx] = visible
            output = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attend, scale=scaling, enable_gqa=groups > 1
            )
            return output.transpose(1, 2).contiguous(), None
        # grouped queries share their key head: [B, H_kv, groups * T, C'] without repeating the cache
        scores = torch.matmul(query.reshape(batch, kv_heads, groups * new, head_dim), key.transpose(2, 3))
        scores = (scores * scaling).view(batch, kv_heads, groups, new, keys)
        lowest = torch.finfo(scores.dtype).min
        scores = scores.masked_fill(step.hidden(keys, kwargs.get("sliding_window")), lowest)
        layer, first = module.layer_idx, self._first_layer
        if first == 0 or layer == first - 1:
            with self._pruner.timed_selection():
                chosen = self._visible(step, module, key, scores[:, :, :, -1])
            step.chosen = None if first == 0 else chosen
        visible = chosen if first == 0 else step.chosen if layer >= first else None
        if visible is None:  # a layer before the first that hides entries
            step.visible[layer] = torch.ones_like(step.prompt.visual)
        else:
            step.visible[layer] = visible
            scores[..., : visible.shape[1]].masked_fill_(~visible[:, None, None, None], lowest)
        weights = scores.view(batch, heads, new, keys).softmax(dim=-1, dtype=torch.float32).to(query.dtype)
        output = torch.matmul(weights.view(batch, kv_heads, groups * new, keys), value)
        return output.view(batch, heads, new, head_dim).transpose(1, 2).contiguous(), weights

    def _visible(
        self, step: _Step, module: nn.Module, key: torch.Tensor, last_scores: torch.Tensor
    ) -> torch.Tensor:
        """``[B, L]`` bool over the prompt: the tokens one layer's last query may see (text, and the visual
        tokens the method keeps of each image), from that query's scores ``[B, H_kv, groups, C]`` over the
        cache, its own entry included (masked where it may not attend); ``key [B, H_kv, C', d]``. Both hold
        the heads of ``module`` (the layer's attention) this rank computes: every head under tensor
        parallelism, gathered, so that each rank selects as one process does."""
        pruner = self._pruner
        all_heads = partial(tensor_parallel.gather_output, module.k_proj, dim=1, width=key.shape[-1])
        prompt = step.prompt
        length = prompt.visual.shape[1]
        # what the method ranks by: the query's attention row, averaged over heads
        attention = all_heads(last_scores).softmax(dim=-1, dtype=torch.float32).mean(dim=(1, 2))[:, :length]
        keys = all_heads(key[:, :, :length]).mean(dim=1) if "keys" in pruner.config.spec.needs else None
        selections = []
        for layout, keep in zip(prompt.layouts, prompt.keeps, strict=True):
            # the kv stage has no hidden states of the prompt: features are its keys, or nothing
            taken = None if keys is None else layout.take(keys)
            ctx = SelectionContext(
                features=attention.new_empty(*layout.positions.shape, 0) if taken is None else taken,
                grid=self.grid_for(layout.positions.shape[1]),
                frames=self.frames_for(layout.positions.shape[1]),
                image_index=layout.image_index,
                keys=taken,
                attention=layout.take(attention),
            )
            selections.append((layout, pruner.select(ctx, keep)))
        return keep_masks(prompt.visual, selections)
