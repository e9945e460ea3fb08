"""What a method sees: the visual tokens of a batch of images, and what it declared it needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Instruction:
    """The prompt's instruction as a decoder-stage method sees it beside an image: the real tokens after the
    prompt's last visual token (its last token where none follows), ``Q`` per image, padded.

    Attributes:
        keys: their key states, as ``SelectionContext.keys`` ``[I, Q, H_kv * d]``, where the method declared
            the need ``keys`` too (``None`` where it did not).
        features: their hidden states, as ``SelectionContext.features`` ``[I, Q, D]``.
        mask: which of the ``Q`` are tokens (the rest pad a shorter instruction) ``[I, Q]``.
        positions: each one's place among its prompt's tokens, as ``SelectionContext.prompt_positions``
            ``[I, Q]`` (``None`` where the adapter does not number them).
    """

    keys: torch.Tensor | None
    features: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor | None = None


@dataclass
class InstructionRows:
    """The attention rows of the prompt's instruction beside an image (the tokens of :class:`Instruction`,
    ``Q`` per image, padded), by head: each query's softmax over the prompt up to it, at the scoring layer,
    restricted to the image's tokens and to the instruction's own.

    Attributes:
        visual: attention of each instruction query to each of the image's tokens ``[I, H, Q, N]``.
        text: attention of each instruction query (dim 2) to each instruction token (dim 3) ``[I, H, Q, Q]``;
            0 for a token after the query.
        mask: which of the ``Q`` are tokens (the rest pad a shorter instruction) ``[I, Q]``.
    """

    visual: torch.Tensor
    text: torch.Tensor
    mask: torch.Tensor


@dataclass
class Embeddings:
    """The language model's input embeddings of an image's tokens and of the instruction beside it, as the
    prompt holds them (every token of the image, whichever tokens earlier stages dropped).

    Attributes:
        visual: the image's tokens' ``[I, M, D]``, ``M`` the most tokens an image of the group had.
        visual_mask: which of the ``M`` are the image's tokens (the rest pad a smaller image, or hold the zero
            placeholders of patches a vision stage dropped) ``[I, M]``.
        instruction: the instruction's tokens' (those of :class:`Instruction`) ``[I, Q, D]``.
        mask: which of the ``Q`` are tokens (the rest pad a shorter instruction) ``[I, Q]``.
    """

    visual: torch.Tensor
    visual_mask: torch.Tensor
    instruction: torch.Tensor
    mask: torch.Tensor


@dataclass
class SelectionContext:
    """Inputs to a selection method for ``I`` images of ``N`` visual tokens each.

    Attributes:
        features: visual token features ``[I, N, D]``: projected embeddings before the language model
            (``pre_llm``) or the hidden states entering decoder layer K (``llm``).
        grid: ``(rows, cols)`` of the patch grid when the N tokens form one, else ``None``.
        frames: ``(T, rows, cols)`` where the N tokens are a video's: ``T`` frames one after another, each a
            ``rows x cols`` grid in raster order (a Qwen-VL video's frame is one temporal patch, two input
            frames); else ``None`` (see :meth:`frame_grid`).
        grid_neighbours: where the N tokens form several patch grids one after another instead (an AnyRes
            image's base tile and its stitched high-resolution tiles, newline tokens left out), each token's
            flat neighbours in its own grid ``[I, N, 4]``: the tokens one before and after it and one row
            above and below, clamped to that grid; else ``None``.
        image_index: index of each image within its own prompt ``[I]`` (0 for the first image), so that
            seeded methods draw the same numbers for an image whatever batch it is run in.
        stage: which pruning stage of a decoder schedule this is (0: the first, or the only one); a later
            stage sees the tokens the earlier ones kept, without a ``grid``.
        keep_ratio: the stage's keep ratio (of each image's original tokens) where the config gives one
            (``keep_ratio`` or ``schedule``), ``None`` for a ``budget``.
        keys: key states of the visual tokens (RoPE applied, heads concatenated) at the layer before the
            acting layer, or layer 0 before the language model ``[I, N, H_kv * d]`` (needs ``keys``).
        attention: attention that the prompt's last token pays to each visual token, softmax over the
            whole prompt and averaged over heads ``[I, N]`` (needs ``attention``).
        pruning_layer_attention: the same attention at the acting layer itself, from its own projections of
            its input (the first layer that runs on the kept tokens, where PyramidDrop ranks) ``[I, N]``
            (needs ``pruning_layer_attention``).
        unrotated_logits: the same query's attention logits (scaled query-key products, before any
            softmax) to each visual token by head, computed without RoPE ``[I, N, H]`` (needs
            ``unrotated_logits``).
        instruction_attention: attention that the prompt's instruction (every token after the images)
            pays to each visual token at the acting layer itself, each query's softmax over the prompt
            before it, averaged over heads and queries, in the model's dtype as TransPrune's reference
            computes it ``[I, N]`` (needs ``instruction_attention``).
        instruction: the key and hidden states of the prompt's instruction, the tokens after its images
            (needs ``instruction``; see :class:`Instruction`).
        instruction_rows: the attention rows of those instruction tokens at the layer before the acting layer,
            by head, over the image's tokens and the instruction's (needs ``instruction_rows``; see
            :class:`InstructionRows`): O(Q * L) per prompt, never the full attention matrix.
        final_norm: the language model's final norm (needs ``final_norm``): what the model applies to the
            last layer's output, for a method that compares hidden states as the model would read them.
        transition: how much the attention and MLP sub-layers changed each visual token, summed (in
            float32) from the layer before the first pruning stage on, across stages ``[I, N]`` (needs
            ``transition``; see :func:`tokenprune.transition.sublayer_transition`).
        prompt_positions: each visual token's place among its prompt's tokens at the acting layer, counted
            from 0 at the prompt's first real token, whatever padding or other prompts share its row
            ``[I, N]`` (needs ``prompt_positions``; see :func:`tokenprune.sequence.places_in_prompts`): the
            index a reference that runs one prompt unpadded gives it.
        embeddings: the language model's input embeddings of the image's tokens and of the instruction, as
            in the prompt (needs ``embeddings``; see :class:`Embeddings`).

    In the ``vision`` stage ``features`` are the image encoder's tokens (patches; a merging method also
    sees the ``protected`` CLS token first), ``keys`` are the key states of the output layer averaged
    over heads ``[I, N, d]``, and:

    In the ``kv`` stage (a decode step, in each layer) ``attention`` is the step's last query's, over the
    cached prompt; ``keys`` are the cached keys averaged over heads ``[I, N, d]``, and ``features`` the same
    keys where the method declares ``needs=("keys",)``, else empty ``[I, N, 0]`` (the prompt's hidden states
    are not kept, and reading the whole cache again in every layer and step would cost what it saves).

    Attributes:
        encoder_attention: by encoder layer (those the method's ``encoder_layers`` names), the attention
            each token receives there ``[I, N]``: from the CLS query where the encoder has one and the
            method's ``encoder_queries`` is ``"cls"``, else averaged over all queries (the CLS one
            included); heads averaged (needs ``encoder_attention``). A merging step gets one entry, the
            layer its ``keys`` come from, over every token it merges ``[I, n]`` (the protected CLS included),
            with proportional attention's ``log(size)`` bias where the method uses it.
        class_token: the encoder's CLS tokens at the output layer ``[I, C, D]`` (one for an image, one per
            tile of an AnyRes image), for a method that returns them among its ``keep`` tokens in the places
            of patches it merged away (needs ``class_token``; only from an encoder with a CLS token, and only
            when patches are merged away).
        sizes: how many patches each token stands for ``[I, N]`` (after merges; ones otherwise).
        protected: leading tokens that must survive as they are (the CLS token of a merging step).
        key_heads: how many heads ``keys`` concatenates in its last dimension (a decoder stage's ``H_kv``;
            1 where they are averaged over heads already).
    """

    features: torch.Tensor
    grid: tuple[int, int] | None
    image_index: torch.Tensor
    grid_neighbours: torch.Tensor | None = None
    frames: tuple[int, int, int] | None = None
    keys: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    pruning_layer_attention: torch.Tensor | None = None
    unrotated_logits: torch.Tensor | None = None
    instruction_attention: torch.Tensor | None = None
    instruction: Instruction | None = None
    instruction_rows: InstructionRows | None = None
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    transition: torch.Tensor | None = None
    prompt_positions: torch.Tensor | None = None
    embeddings: Embeddings | None = None
    encoder_attention: dict[int, torch.Tensor] | None = None
    class_token: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    protected: int = 0
    stage: int = 0
    keep_ratio: float | None = None
    key_heads: int = 1

    def frame_grid(self) -> tuple[int, int, int]:
        """``(T, rows, cols)`` of the tokens as frames, for a method that works frame by frame: a video's
        ``frames``; an image is one frame, its ``grid``, or one row of its ``N`` tokens where it has none."""
        if self.frames is not None:
            return self.frames
        if self.grid is not None:
            return (1, *self.grid)
        return (1, 1, self.features.shape[1])

    def require(self, name: str) -> Any:
        """What the method declared in ``needs`` (a tensor; for ``encoder_attention`` a dict of them, for
        ``instruction`` an :class:`Instruction`, for ``instruction_rows`` an :class:`InstructionRows`, for
        ``embeddings`` an :class:`Embeddings`, for ``final_norm`` a module); a clear error if the adapter
        did not provide it."""
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(
                f"the adapter did not provide {name!r}; declare it in register_method(needs=...)"
            )
        return value


@dataclass
class Merged:
    """A merging method's answer: ``index [I, k]`` the tokens that stay, each now standing for a merge.

    Attributes:
        index: the token whose place (and position) each output token takes ``[I, k]``, unique, in the
            method's layout (ToMe's: not sorted).
        features: the output tokens ``[I, k, D]``.
        sizes: how many patches each output token stands for ``[I, k]``.
        follow: the same merge applied to other tokens of the same patches ``[I, N, D'] -> [I, k, D']`` (a
            model's other feature levels: Qwen3-VL's DeepStack), for a method whose merge depends on the
            features themselves; ``None`` where it depends on attention and keys only, and the adapter runs
            the method again on the other tokens.
    """

    index: torch.Tensor
    features: torch.Tensor
    sizes: torch.Tensor
    follow: Callable[[torch.Tensor], torch.Tensor] | None = None
