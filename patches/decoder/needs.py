"""What a decoder-stage method needs from the layer it prunes at: one provider per need name.

A method declares its needs by name (``register_method(needs=...)``, see
:data:`tokenprune.registry.KNOWN_NEEDS`); :func:`provide` looks each up in :data:`PROVIDERS` and calls it
on the :class:`LayerReading` of the stage layer. A provider returns its value over the whole batch: a
tensor over every token ``[B, L, ...]`` (the stage takes each image's rows of it), or an object whose
``of(layout)`` gives each image's part, or a module. A new need is one function here and one line in
:data:`PROVIDERS`; every projection of a layer goes through
:func:`tokenprune.patches._internals.project_queries_keys`.

Attention is recomputed from the layer's own projections for the few query rows a method reads (the last
prompt token, the instruction), never as the full attention matrix, so that FlashAttention and SDPA,
which return no weights, serve as well as eager attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenprune.attention import causal_rows_attention, query_logits
from tokenprune.context import Embeddings, Instruction, InstructionRows
from tokenprune.sequence import VisualLayout, flagged, places_in_prompts

from .. import _internals as internals
from .layout import Call, instruction_rows, prompt_ends, sequences

RotaryTables = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LayerReading:
    """What the providers read at one stage layer: the call, the language model's layers, the stage layer
    ``layer``, its input ``hidden [B, L, D]`` and rotary tables; what was provided so far, by need."""

    call: Call
    layers: nn.ModuleList
    language_model: nn.Module
    layer: int
    hidden: torch.Tensor
    position_embeddings: RotaryTables
    needs: tuple[str, ...] = ()  # what the method declared
    provided: dict[str, Any] = field(default_factory=dict)

    def need(self, name: str) -> Any:
        """The value of the need ``name``, computed once per reading."""
        if name not in self.provided:
            self.provided[name] = PROVIDERS[name](self)
        return self.provided[name]

    def scoring_layer(self) -> tuple[nn.Module, torch.Tensor]:
        """The layer whose projections score tokens for pruning at ``layer``, and that layer's input.

        The layer before the pruning layer, as FastV and DART read layer K-1's attention and keys and prune
        from layer K on; layer 0 itself when pruning before the language model.
        """
        if self.layer == 0:
            return self.layers[0], self.hidden
        return self.layers[self.layer - 1], self.call.scoring_input


@dataclass
class Instructions:
    """The instructions of a batch's rows (see :func:`instruction`)."""

    keys: torch.Tensor | None  # [B, Q, H_kv * d], where the method needs keys
    features: torch.Tensor  # [B, Q, D]
    prompt: torch.Tensor  # [B, Q] the prompt of each (-1: padding)
    sequences: torch.Tensor  # [B, L] the prompt of every token
    places: torch.Tensor  # [B, Q] the place of each in its prompt

    def of(self, layout: VisualLayout) -> Instruction:
        """Each image's: its row's instruction tokens of its own prompt."""
        sample = layout.sample
        image_prompt = self.sequences[sample, layout.positions[:, 0]]
        mask = self.prompt[sample] == image_prompt[:, None]
        keys = None if self.keys is None else self.keys[sample]
        return Instruction(keys, self.features[sample], mask, self.places[sample])


@dataclass
class InstructionAttentionRows:
    """The attention rows of a batch's instructions (see :func:`instruction_rows_attention`)."""

    to_tokens: torch.Tensor  # [B, L, H, Q] attention of each instruction query, by head, to every token
    rows: torch.Tensor  # [B, Q] the instruction tokens' positions
    prompt: torch.Tensor  # [B, Q] the prompt of each (-1: padding)
    sequences: torch.Tensor  # [B, L] the prompt of every token

    def of(self, layout: VisualLayout) -> InstructionRows:
        """Each image's: its row's instruction queries of its own prompt, over its tokens and theirs."""
        image_prompt = self.sequences[layout.sample, layout.positions[:, 0]]
        mask = self.prompt[layout.sample] == image_prompt[:, None]  # [I, Q]
        visual = layout.take(self.to_tokens).permute(0, 2, 3, 1)  # [I, H, Q, N]
        rows = self.rows[:, :, None, None].expand(-1, -1, *self.to_tokens.shape[2:])
        text = torch.gather(self.to_tokens, 1, rows).permute(0, 2, 3, 1)[layout.sample]  # [I, H, Q, Q]
        keys = mask[:, None, None, :] & mask[:, None, :, None]
        return InstructionRows(visual, text * keys, mask)


@dataclass
class PromptEmbeddings:
    """The input embeddings of a batch's prompts (see :func:`embeddings`)."""

    embeddings: torch.Tensor  # [B, L, D] the language model's input, as the prompt
    image_id: torch.Tensor  # [B, L] each prompt token's image, -1 off images
    sizes: tuple[int, ...]  # each image's tokens in the prompt
    current_image_id: torch.Tensor  # [B, L_cur] the same, of the tokens the layout holds now
    instruction: torch.Tensor  # [B, Q, D] of each row's instruction tokens
    prompt: torch.Tensor  # [B, Q] the prompt of each (-1: padding)
    sequences: torch.Tensor  # [B, L_cur] the prompt of every token of the layout

    def of(self, layout: VisualLayout) -> Embeddings:
        """Each image's: its tokens' in the prompt, and its row's instruction tokens' of its own prompt."""
        sample, first = layout.sample, layout.positions[:, 0]
        own = self.image_id[sample] == self.current_image_id[sample, first][:, None]  # [I, L]
        width = max(self.sizes[image] for image in layout.images)
        visual = self.embeddings[sample[:, None], flagged(own, width)]
        visual_mask = torch.arange(width, device=own.device) < own.sum(dim=1, keepdim=True)
        visual_mask &= visual.ne(0).any(dim=-1)  # not a placeholder of a patch a vision stage dropped
        mask = self.prompt[sample] == self.sequences[sample, first][:, None]
        return Embeddings(visual, visual_mask, self.instruction[sample], mask)


def keys(reading: LayerReading) -> torch.Tensor:
    """Key states of every token at the scoring layer ``[B, L, H_kv * d]``, RoPE applied."""
    scoring_layer, scoring_input = reading.scoring_layer()
    _, states = internals.project_queries_keys(
        scoring_layer, scoring_input, reading.position_embeddings, None
    )
    return states.transpose(1, 2).flatten(2)


def instruction(reading: LayerReading) -> Instructions:
    """The key and hidden states of each row's instruction tokens (see :func:`~.layout.instruction_rows`),
    their keys taken from every token's where the method needs those (``keys``; else ``None``: no method
    reads an instruction's keys without its image's)."""
    call = reading.call
    rows, counted = instruction_rows(call)
    prompts = sequences(call)
    prompt = torch.where(counted, torch.gather(prompts, 1, rows), -1)

    def take(x: torch.Tensor) -> torch.Tensor:
        return torch.gather(
            x.expand(rows.shape[0], *x.shape[1:]), 1, rows[..., None].expand(-1, -1, x.shape[-1])
        )

    keys = take(reading.need("keys")) if "keys" in reading.needs else None
    places = torch.gather(reading.need("prompt_positions"), 1, rows)
    return Instructions(keys, take(reading.hidden), prompt, prompts, places)


def embeddings(reading: LayerReading) -> PromptEmbeddings:
    """The language model's input embeddings of each image's tokens and of each row's instruction tokens,
    as the prompt holds them (whichever tokens the stages before dropped)."""
    call = reading.call
    if call.embeddings is None:
        raise RuntimeError("the language model got no inputs_embeds, which the need 'embeddings' reads")
    rows, counted = instruction_rows(call)
    prompts = sequences(call)
    prompt = torch.where(counted, torch.gather(prompts, 1, rows), -1)
    places = torch.gather(call.origin, 1, rows)  # the instruction tokens' places in the prompt
    instruction = torch.gather(
        call.embeddings, 1, places[..., None].expand(-1, -1, call.embeddings.shape[-1])
    )
    return PromptEmbeddings(
        call.embeddings, call.prompt_image_id, call.image_sizes, call.image_id, instruction, prompt, prompts
    )


def prompt_positions(reading: LayerReading) -> torch.Tensor:
    """Each token's place among the real tokens of its prompt ``[B, L]``, as if the prompt ran alone and
    unpadded (see :func:`tokenprune.sequence.places_in_prompts`)."""
    call = reading.call
    return places_in_prompts(call.attention_mask.bool(), sequences(call))


def last_token_attention(reading: LayerReading) -> torch.Tensor:
    """Attention of each prompt's last token to every token of that prompt ``[B, L]``, at the scoring layer:
    softmax over the tokens up to it, heads averaged."""
    return _last_token_attention(reading, *reading.scoring_layer())


def pruning_layer_attention(reading: LayerReading) -> torch.Tensor:
    """The same attention at the pruning layer itself, from its projections of its input ``[B, L]``
    (PyramidDrop ranks with the first layer that runs on the kept tokens)."""
    return _last_token_attention(reading, reading.layers[reading.layer], reading.hidden)


def _last_token_attention(reading: LayerReading, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Attention of each prompt's last token to every token of that prompt ``[B, L]`` at ``layer``, whose
    input is ``hidden``: softmax over the tokens up to it, heads averaged."""
    call = reading.call
    query, states, scaling, ends = _last_token_projections(
        reading, layer, hidden, reading.position_embeddings
    )
    valid = call.attention_mask.bool()
    positions = torch.arange(valid.shape[1], device=valid.device)
    prompt = sequences(call)
    key_mask = (
        valid[:, None, :]
        & (positions <= ends[..., None])
        & (prompt[:, None, :] == torch.gather(prompt, 1, ends)[..., None])
    )  # [B, P, L]
    scores = query_logits(query, states, scaling).masked_fill(~key_mask[:, None], float("-inf"))
    attention = scores.softmax(dim=-1).mean(dim=1)  # [B, P, L]
    return torch.gather(attention, 1, prompt[:, None, :])[:, 0]  # each token, its own prompt's row


def unrotated_logits(reading: LayerReading) -> torch.Tensor:
    """Attention logits of each prompt's last token to every token of that prompt, by head ``[B, L, H]``, at
    the scoring layer, without RoPE (no mask: a method reads the visual tokens, all before the last
    token)."""
    cos, sin = reading.position_embeddings  # rotating by angle 0: no RoPE
    identity = (torch.ones_like(cos), torch.zeros_like(sin))
    query, states, scaling, _ = _last_token_projections(reading, *reading.scoring_layer(), identity)
    logits = query_logits(query, states, scaling)  # [B, H, P, L]
    prompt = sequences(reading.call)[:, None, None, :].expand(-1, logits.shape[1], 1, -1)
    return torch.gather(logits, 2, prompt)[:, :, 0].transpose(1, 2)


def _last_token_projections(
    reading: LayerReading, layer: nn.Module, hidden: torch.Tensor, position_embeddings: RotaryTables
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """``layer``'s query of each prompt's last token ``[B, H, P, d]`` and its keys of every token
    ``[B, H_kv, L, d]``, from its input ``hidden`` (RoPE as ``position_embeddings`` give it), its attention
    scaling, and where those last tokens are ``[B, P]`` (see :func:`~.layout.prompt_ends`)."""
    ends = prompt_ends(reading.call)
    query, states = internals.project_queries_keys(layer, hidden, position_embeddings, ends)
    return query, states, internals.attention_scaling(layer), ends


def instruction_attention(reading: LayerReading) -> torch.Tensor:
    """Attention that each prompt's instruction pays to every token ``[B, L]`` at the pruning layer itself
    (its projections of its input): the queries are the real tokens after the row's last visual token (its
    last token, where none follows the images), each with causal softmax over the prompt; averaged over
    heads and queries. O(B * H * Q * L) for Q instruction tokens."""
    call = reading.call
    valid = call.attention_mask.bool()
    positions = torch.arange(valid.shape[1], device=valid.device)
    rows, counted = instruction_rows(call)
    layer = reading.layers[reading.layer]
    query, states = internals.project_queries_keys(layer, reading.hidden, reading.position_embeddings, rows)
    sequence = sequences(call)  # a query sees its own prompt only
    same_prompt = sequence[:, None, :] == torch.gather(sequence, 1, rows)[..., None]
    key_mask = valid[:, None, :] & (positions[None, None, :] <= rows[..., None]) & same_prompt
    return causal_rows_attention(query, states, key_mask, counted, internals.attention_scaling(layer))


def instruction_rows_attention(reading: LayerReading) -> InstructionAttentionRows:
    """The attention rows of each prompt's instruction at the scoring layer, by head: each instruction
    query's softmax over its prompt up to it. O(B * H * Q * L) for Q instruction tokens."""
    call = reading.call
    valid = call.attention_mask.bool()
    positions = torch.arange(valid.shape[1], device=valid.device)
    rows, counted = instruction_rows(call)
    scoring_layer, scoring_input = reading.scoring_layer()
    query, states = internals.project_queries_keys(
        scoring_layer, scoring_input, reading.position_embeddings, rows
    )
    prompts = sequences(call)  # a query sees its own prompt only
    prompt = torch.gather(prompts, 1, rows)
    key_mask = valid[:, None, :] & (positions <= rows[..., None]) & (prompts[:, None, :] == prompt[..., None])
    logits = query_logits(query, states, internals.attention_scaling(scoring_layer))  # [B, H, Q, L]
    attention = torch.softmax(logits.masked_fill_(~key_mask[:, None], float("-inf")), dim=-1, out=logits)
    return InstructionAttentionRows(
        attention.permute(0, 3, 1, 2), rows, torch.where(counted, prompt, -1), prompts
    )


def transition(reading: LayerReading) -> torch.Tensor:
    """How much the sub-layers changed each token, summed from the layer before the first stage on
    ``[B, L]`` (tracked by the hooks as the layers run, see
    :func:`tokenprune.transition.sublayer_transition`)."""
    return reading.call.transition


def final_norm(reading: LayerReading) -> nn.Module:
    """The language model's final norm."""
    return internals.final_norm(reading.language_model)


#: The provider of each need a decoder-stage method may declare.
PROVIDERS: dict[str, Callable[[LayerReading], Any]] = {
    "keys": keys,
    "instruction": instruction,
    "prompt_positions": prompt_positions,
    "embeddings": embeddings,
    "instruction_rows": instruction_rows_attention,
    "attention": last_token_attention,
    "pruning_layer_attention": pruning_layer_attention,
    "unrotated_logits": unrotated_logits,
    "instruction_attention": instruction_attention,
    "transition": transition,
    "final_norm": final_norm,
}

#: The needs read from the scoring layer's input (the layer before a stage), which the hooks capture.
SCORING_INPUT_NEEDS = frozenset({"attention", "unrotated_logits", "keys", "instruction", "instruction_rows"})


def provide(reading: LayerReading) -> dict[str, Any]:
    """The value of each of the method's needs that a decoder layer provides, at the stage layer ``reading``
    reads (a need of the encoder's stays unset: the method's ``ctx.require`` names it)."""
    return {name: reading.need(name) for name in reading.needs if name in PROVIDERS}
