"""Hooks that prune visual tokens inside a transformers decoder-only language model.

Shared by every family whose language model is a Llama-style decoder (``layers``, rotary
``position_embeddings``, a 2-D padding mask). The family module says where the images are; this module
does the rest, with per-instance forward hooks only:

* on the language model (pre): tells prefill from decode. In decode it rewrites the 2-D mask and the
  position ids for a cache whose visual entries were pruned, so the next token keeps its original
  position and attends only to kept tokens.
* on decoder layer K (pre): at prefill, asks the method which visual tokens to keep and gathers hidden
  states, rotary tables and position ids into a dense, left-padded batch; builds the mask of layers >= K.
* on layers > K (pre): hands them the pruned mask, positions and rotary tables.
* on the language model (post): remembers how the returned cache was pruned, for the decode steps.

Layers before K see every token and keep their full cache; layers from K on see only the kept tokens.
K = 0 is the ``pre_llm`` stage.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.attention import query_attention
from tokenprune.context import SelectionContext
from tokenprune.sequence import find_images, keep_mask, plan_compaction

from . import _internals as internals

if TYPE_CHECKING:
    from tokenprune.pruner import Pruner


@dataclass
class _Session:
    """How a cache was pruned at prefill: what decode steps need to extend its mask and positions."""

    prefix_mask: torch.Tensor  # [B, L'] 2-D mask of the pruned prompt
    original_length: int  # L, the prompt length before pruning
    first_pruned_layer: int  # the first layer whose cache holds only the kept tokens
    index: torch.Tensor  # [B, L'] prompt position of each pruned-cache row


@dataclass
class _Call:
    """State of one language-model forward, shared by its hooks."""

    visual: torch.Tensor | None = None  # [B, L] image placeholders, at a prefill with images
    attention_mask: torch.Tensor | None = None  # [B, L] the caller's 2-D mask (prefill)
    session: _Session | None = None  # the cache's pruning, at a decode step
    pruned_mask_2d: torch.Tensor | None = None  # 2-D mask of layers >= K, at a decode step
    layer_kwargs: dict[str, Any] = field(default_factory=dict)  # what layers > K get
    scoring_input: torch.Tensor | None = None  # input of the layer whose attention scores tokens
    new_session: _Session | None = None


class DecoderPruningHooks:
    """Installs and removes the hooks of one pruner on one decoder-only language model."""

    def __init__(self, language_model: nn.Module, tokens_per_image: int, grid: tuple[int, int] | None):
        internals.check_decoder_internals(language_model)
        self.language_model = language_model
        self.layers = internals.decoder_layers(language_model)
        self.tokens_per_image = tokens_per_image
        self.grid = grid
        self.pending_visual: torch.Tensor | None = None
        self._call: _Call | None = None
        self._sessions: weakref.WeakKeyDictionary[Any, _Session] = weakref.WeakKeyDictionary()
        self._pruner: Pruner | None = None
        self._layer = 0

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attach(self, pruner: Pruner) -> list[RemovableHandle]:
        """Register the hooks for ``pruner``; returns their handles."""
        self._pruner = pruner
        self._layer = k = pruner.config.acting_layer
        lm = self.language_model
        handles = [
            lm.register_forward_pre_hook(self._before_language_model, with_kwargs=True),
            lm.register_forward_hook(self._after_language_model, with_kwargs=True, always_call=True),
            self.layers[k].register_forward_pre_hook(self._at_pruning_layer, with_kwargs=True),
        ]
        handles += [
            layer.register_forward_pre_hook(self._after_pruning_layer, with_kwargs=True)
            for layer in self.layers[k + 1 :]
        ]
        if "attention" in pruner.config.spec.needs and k > 0:
            handles.append(
                self.layers[k - 1].register_forward_pre_hook(self._capture_scoring_input, with_kwargs=True)
            )
        return handles

    # -- language model -------------------------------------------------------------------------

    def _before_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        visual, self.pending_visual = self.pending_visual, None
        self._call = None
        cache = internals.cache_argument(kwargs)
        has_images = visual is not None and bool(visual.any())
        session = self._sessions.get(cache) if cache is not None else None
        if session is not None:
            if has_images:
                raise ValueError(
                    "cannot add images to a cache whose visual tokens were pruned; start a new cache"
                )
            self._call = _Call(session=session)
            return args, self._decode_inputs(kwargs, cache, session)
        if not has_images:
            if visual is not None:
                self._pruner.record_text_only(visual.shape[0])
            return args, kwargs
        if internals.cache_length(cache, 0) > 0:
            raise ValueError(
                "images must be in the first forward of a cache to be pruned (no chunked prefill "
                "or continuation of an unpruned cache)"
            )
        self._call = _Call(visual=visual, attention_mask=kwargs.get("attention_mask"))
        return args, kwargs

    def _decode_inputs(self, kwargs: dict, cache: Any, session: _Session) -> dict:
        """Decode-step inputs for a pruned cache: original-space positions, pruned-space 2-D mask."""
        embeds = kwargs.get("inputs_embeds")
        batch, new = embeds.shape[:2]
        pruned_before = (
            internals.cache_length(cache, session.first_pruned_layer) - session.prefix_mask.shape[1]
        )
        mask = kwargs.get("attention_mask")
        if mask is None:
            tail = session.prefix_mask.new_ones(batch, pruned_before + new)
        elif mask.dim() == 2:
            tail = mask[:, session.original_length :].to(session.prefix_mask.dtype)
        else:
            raise ValueError("decode steps on a pruned cache need a 2-D attention mask (or none)")
        if tail.shape[1] != pruned_before + new:
            raise ValueError(
                f"attention_mask covers {mask.shape[1]} tokens but the cache holds "
                f"{session.original_length + pruned_before} before pruning, plus {new} new"
            )
        self._call.pruned_mask_2d = torch.cat([session.prefix_mask, tail], dim=1)
        kwargs = dict(kwargs)
        if kwargs.get("position_ids") is None:
            start = session.original_length + pruned_before
            kwargs["position_ids"] = torch.arange(start, start + new, device=embeds.device)[None].expand(
                batch, -1
            )
        if session.first_pruned_layer == 0:
            kwargs["attention_mask"] = self._call.pruned_mask_2d
        return kwargs

    def _after_language_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call, self._call = self._call, None
        if call is None or call.new_session is None:
            return
        cache = internals.output_cache(output)
        if cache is None:
            return
        session = call.new_session
        if self._pruner.config.drop_early_kv and session.first_pruned_layer > 0:
            internals.compact_cache_layers(cache, range(session.first_pruned_layer), session.index)
            session.first_pruned_layer = 0
        self._sessions[cache] = session

    # -- decoder layers -------------------------------------------------------------------------

    def _capture_scoring_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._call is not None and self._call.visual is not None:
            self._call.scoring_input = internals.layer_hidden_states(args, kwargs)

    def _after_pruning_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._call is None or not self._call.layer_kwargs:
            return None
        return args, {**kwargs, **self._call.layer_kwargs}

    def _at_pruning_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = self._call
        if call is None:
            return None
        hidden = internals.layer_hidden_states(args, kwargs)
        cache = internals.cache_argument(kwargs)
        config = self.language_model.config
        if call.session is not None:  # decode step
            if call.session.first_pruned_layer == 0:
                return None  # the language model already built the mask from the pruned 2-D mask
            call.layer_kwargs = {
                "attention_mask": internals.causal_mask(
                    config, hidden, call.pruned_mask_2d, cache, self._layer
                )
            }
            return args, {**kwargs, **call.layer_kwargs}
        return self._prune(call, hidden, args, kwargs, cache)

    def _prune(
        self, call: _Call, hidden: torch.Tensor, args: tuple, kwargs: dict, cache: Any
    ) -> tuple[tuple, dict]:
        batch, length = hidden.shape[:2]
        mask_2d = call.attention_mask
        if mask_2d is None:
            mask_2d = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(length, device=hidden.device)[None]
        position_ids = position_ids.expand(batch, length)
        cos, sin = kwargs["position_embeddings"]

        pruner = self._pruner
        with pruner.timed_selection():
            layout = find_images(call.visual, self.tokens_per_image)
            ctx = SelectionContext(
                features=layout.take(hidden), grid=self.grid, image_index=layout.image_index
            )
            needs = pruner.config.spec.needs
            if "keys" in needs:
                _, keys = internals.project_queries_keys(self.layers[self._layer], hidden, (cos, sin), None)
                ctx.keys = layout.take(keys.transpose(1, 2).flatten(2))
            if "attention" in needs:
                ctx.attention = self._last_token_attention(call, hidden, mask_2d, (cos, sin), layout)
            index = pruner.select(ctx)
            keep = keep_mask(call.visual, layout, index)
            plan = plan_compaction(keep)

        pruned_hidden = plan.gather(hidden)
        pruned_mask_2d = plan.gather_mask(mask_2d)
        call.layer_kwargs = {
            "attention_mask": internals.causal_mask(
                self.language_model.config, pruned_hidden, pruned_mask_2d, cache, self._layer
            ),
            "position_ids": plan.gather(position_ids),
            "position_embeddings": (plan.gather(cos), plan.gather(sin)),
        }
        call.new_session = _Session(pruned_mask_2d, length, self._layer, plan.index)
        visual_in = call.visual.sum(dim=1)
        pruner.record_prefill(visual_in.tolist(), (call.visual & keep).sum(dim=1).tolist(), keep)
        args, kwargs = internals.with_layer_hidden_states(args, kwargs, pruned_hidden)
        return args, {**kwargs, **call.layer_kwargs}

    def _last_token_attention(
        self,
        call: _Call,
        hidden: torch.Tensor,
        mask_2d: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        layout: Any,
    ) -> torch.Tensor:
        """Attention of each prompt's last token to its visual tokens ``[I, N]``.

        Uses the layer before the pruning layer (FastV reads layer K-1's attention map and prunes from
        layer K on), or layer 0 itself when pruning before the language model.
        """
        scoring_layer = max(self._layer - 1, 0)
        scoring_input = call.scoring_input if self._layer > 0 else hidden
        valid = mask_2d.bool()
        positions = torch.arange(valid.shape[1], device=valid.device)
        last = torch.where(valid, positions, -1).amax(dim=1)  # last real token of each row
        query, keys = internals.project_queries_keys(
            self.layers[scoring_layer], scoring_input, position_embeddings, last
        )
        key_mask = valid & (positions[None] <= last[:, None])
        weights = query_attention(
            query, keys, key_mask, internals.attention_scaling(self.layers[scoring_layer])
        )
        return weights[layout.sample[:, None], layout.positions]
