"""Every transformers internal the adapters depend on, each behind one small helper.

transformers renames arguments and moves functions between releases (``past_key_values`` became
``cache`` in 5.24, for instance). Adapters call only these helpers; :func:`check_decoder_internals`
verifies them on a model and fails loudly, naming what moved, so an upgrade breaks here and not
silently inside a forward pass. The KV cache's helpers are in :mod:`tokenprune.patches._cache_internals`,
the image encoders' in :mod:`tokenprune.patches._encoder_internals`.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import masking_utils
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from . import _tensor_parallel as tensor_parallel

#: What the KV cache argument of a forward is called, by release (``cache`` since 5.24).
CACHE_NAMES = ("cache", "past_key_values")


class InternalsMovedError(RuntimeError):
    """A transformers internal that tokenprune relies on is not where it used to be."""


def pruned_modalities(media: str) -> tuple[str, ...]:
    """The modalities (``"image"``, ``"video"``) a config's ``media`` (``"images"``, ``"videos"``, ``"both"``)
    prunes."""
    return {"images": ("image",), "videos": ("video",), "both": ("image", "video")}[media]


def has_media_inputs(kwargs: dict[str, Any], modality: str = "image") -> bool:
    """Whether a VLM's forward call (as its generation head makes it, by keyword) carries images (or, for
    ``modality="video"``, videos): pixels (``pixel_values``, ``pixel_values_videos``), or features that
    ``generate`` encoded beforehand (``mm_encoder_outputs``)."""
    encoded = kwargs.get("mm_encoder_outputs") or {}
    pixels = kwargs.get("pixel_values" if modality == "image" else "pixel_values_videos")
    return pixels is not None or encoded.get(modality) is not None


def causal_mask(
    config: Any,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Any,
    layer_idx: int,
    sequence_ids: torch.Tensor | None = None,
    skip_allowed: bool = True,
) -> Any:
    """The attention mask that the model's own code would build for layer ``layer_idx``; without
    ``skip_allowed``, never ``None`` for a causal mask without padding (for a caller that knows there is
    padding: the mask code would read the device to look).

    ``attention_mask`` is 2-D over the cache plus the new tokens of that layer. Position ids are not
    passed: pruned rows keep their original, non-contiguous positions, which transformers would
    otherwise read as packed sequences. Packed sequences are given instead as ``sequence_ids [B, L]``
    (see :func:`packed_sequence_ids`): a token then attends only within its own sequence.
    """
    within = None if sequence_ids is None else masking_utils.packed_sequence_mask_function(sequence_ids)
    return masking_utils.create_causal_mask(
        config,
        hidden,
        attention_mask,
        cache,
        None,
        and_mask_function=within,
        layer_idx=layer_idx,
        allow_is_causal_skip=skip_allowed,
    )


def packed_sequence_ids(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The sequence each token of a padding-free (packed) batch belongs to ``[B, L]``, read from its text
    position ids as the model's own mask code reads them (a new sequence where positions do not go up by
    one); ``None`` when every row is one sequence. The model does this only for a call with neither an
    attention mask nor a cache."""
    if position_ids is None:
        return None
    return masking_utils.find_packed_sequence_indices(position_ids)


def base_model(model: nn.Module) -> nn.Module:
    """The base model of a VLM (``LlavaModel``, ``Qwen2VLModel``, ...): ``model`` itself, or the one its
    generation head wraps. It holds the vision tower, the projector and the language model."""
    return model if hasattr(model, "language_model") else model.model


def placeholder_mask(base: nn.Module, args: tuple, kwargs: dict[str, Any], token_id: int) -> torch.Tensor:
    """Where the prompt of a call to the VLM ``base`` (its ``args`` and ``kwargs``) holds ``token_id``
    placeholders ``[B, L]``: by id, or, for a call made with ``inputs_embeds`` only, where the embedding
    equals that token's, as the model itself finds them."""
    input_ids = args[0] if args else kwargs.get("input_ids")
    if input_ids is not None:
        return input_ids == token_id
    embeds = kwargs["inputs_embeds"]
    token = torch.tensor(token_id, device=embeds.device)
    return (embeds == base.get_input_embeddings()(token).to(embeds.dtype)).all(dim=-1)


def mask_for_generate_function(model: nn.Module) -> Callable:
    """The function ``generate`` calls on ``model`` to turn the 2-D mask into the layers' masks when the cache
    is compileable (static): the model's own ``create_masks_for_generate`` or transformers' default."""
    return getattr(type(model), "create_masks_for_generate", masking_utils.create_masks_for_generate)


class HeadLabels:
    """How the generation head ``model`` takes ``labels`` and computes its loss from them, read once (the
    hooks that use it run in every forward, compiled decode steps included)."""

    def __init__(self, model: nn.Module) -> None:
        loss = getattr(model, "loss_function", None)
        if not callable(loss) or "shift_labels" not in inspect.signature(loss).parameters:
            raise InternalsMovedError(f"{type(model).__name__}.loss_function no longer takes 'shift_labels'")
        parameters = list(inspect.signature(type(model).forward).parameters)[1:]  # after self
        self.position = parameters.index("labels")
        self.named = frozenset(parameters)

    @staticmethod
    def of(model: nn.Module) -> HeadLabels | None:
        """The labels of ``model``, where it is a generation head whose forward takes them."""
        return HeadLabels(model) if "labels" in inspect.signature(type(model).forward).parameters else None

    def take(self, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, tuple, dict]:
        """The ``labels`` of a call to the head (by keyword or position; ``None`` without), and the call's
        ``(args, kwargs)`` without them, so that the head computes no loss of its own."""
        if len(args) > self.position:
            return args[self.position], (*args[: self.position], None, *args[self.position + 1 :]), kwargs
        if kwargs.get("labels") is None:
            return None, args, kwargs
        return kwargs["labels"], args, {**kwargs, "labels": None}

    @staticmethod
    def targets(labels: torch.Tensor, kwargs: dict[str, Any], ignore_index: int) -> torch.Tensor:
        """The target of each token's logits ``[B, L]`` in a call to the head with ``labels``: the call's
        ``shift_labels`` where given (already aligned with the logits, as sequence-parallel training passes
        them), else the labels shifted by one, ``ignore_index`` at the end (as the head's loss shifts
        them)."""
        shifted = kwargs.get("shift_labels")
        if shifted is not None:
            return shifted
        return nn.functional.pad(labels, (0, 1), value=ignore_index)[:, 1:]

    def loss(
        self, model: nn.Module, logits: torch.Tensor, targets: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """The loss the head computes from its ``logits [B, L, V]``, with each row's target given
        (``targets [B, L]``, -100 for none) instead of read from the labels of the row after it: its own
        loss function, handed (as the head hands it) the call's ``kwargs`` that its forward does not name."""
        extra = {
            k: v
            for k, v in kwargs.items()
            if k not in self.named and k not in ("return_dict", "shift_labels")
        }
        vocab_size = logits.shape[-1]
        return model.loss_function(
            logits=logits, labels=targets, vocab_size=vocab_size, shift_labels=targets, **extra
        )


def with_loss(output: Any, loss: torch.Tensor) -> Any:
    """A generation head's ``output`` (a model output, or its tuple when ``return_dict=False``), computed
    without labels, with ``loss`` where the head puts it (the first field)."""
    if isinstance(output, tuple):
        return (loss, *output)
    return dataclasses.replace(output, loss=loss)


def layer_hidden_states(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a decoder layer was called with."""
    return args[0] if args else kwargs["hidden_states"]


def sublayers(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The attention and MLP modules of a decoder layer, each called on the normalised residual stream
    and returning what is added back to it."""
    return layer.self_attn, layer.mlp


def sublayer_input_output(
    args: tuple, kwargs: dict[str, Any], output: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a sub-layer (attention or MLP, see :func:`sublayers`) was called with and what it returned
    (without the attention weights), ``[B, L, D]`` each."""
    inputs = args[0] if args else kwargs["hidden_states"]
    return inputs, output[0] if isinstance(output, tuple) else output


def with_layer_hidden_states(args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a decoder layer call with the hidden states replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def modeling_function(attention: nn.Module, name: str) -> Callable:
    """Function ``name`` of the modeling file that defines ``attention``: ``apply_rotary_pos_emb(q, k, cos,
    sin)``, or ``eager_attention_forward`` (what the ``eager`` implementation runs)."""
    module = sys.modules[type(attention).__module__]
    fn = getattr(module, name, None)
    if fn is None:
        raise InternalsMovedError(f"{module.__name__} no longer defines {name}")
    return fn


def _head_norm(attention: nn.Module, name: str, states: torch.Tensor) -> torch.Tensor:
    """``states [B, L, H, d]`` through the attention's per-head norm ``name`` (Qwen3's ``q_norm`` and
    ``k_norm``, before RoPE), or as they are where it has none."""
    norm = getattr(attention, name, None)
    return states if norm is None else norm(states)


def project_queries_keys(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_rows: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Query states of ``query_rows`` and key states of every token, as ``layer`` would compute them.

    Args:
        layer: a decoder layer with ``input_layernorm`` and ``self_attn.{q_proj,k_proj}``.
        hidden: the layer's input ``[B, L, D]``.
        position_embeddings: the layer's rotary ``(cos, sin)``, ``[B or 1, L, d]`` each.
        query_rows: ``[B]`` one row per sample whose queries are wanted, or ``[B, Q]`` several rows per
            sample, or ``None`` for keys only.

    Returns:
        ``(query [B, H, Q, d] or None, keys [B, H_kv, L, d])`` (``Q = 1`` for ``[B]`` rows), RoPE applied
        to both; every head, in the model's order, also on a tensor-parallel rank that computes only some.
    """
    attn = layer.self_attn
    head_dim = attn.head_dim
    normed = layer.input_layernorm(hidden)
    batch, length = hidden.shape[:2]
    keys = tensor_parallel.project(attn.k_proj, normed)  # every head, on a tensor-parallel rank too
    keys = _head_norm(attn, "k_norm", keys.view(batch, length, -1, head_dim)).transpose(1, 2)
    cos, sin = (t.expand(batch, *t.shape[1:]) for t in position_embeddings)
    rotate = modeling_function(attn, "apply_rotary_pos_emb")
    if query_rows is None:
        return None, _rotate_keys(rotate, keys, cos, sin)
    query_rows = query_rows.view(batch, -1)
    rows = torch.arange(batch, device=hidden.device)[:, None]
    query = tensor_parallel.project(attn.q_proj, normed[rows, query_rows])
    query = _head_norm(attn, "q_norm", query.view(batch, query_rows.shape[1], -1, head_dim)).transpose(1, 2)
    # RoPE of the query rows uses those rows' cos/sin; keys use all rows.
    query, _ = rotate(query, query, cos[rows, query_rows], sin[rows, query_rows])
    return query, _rotate_keys(rotate, keys, cos, sin)


def _rotate_keys(rotate: Callable, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``keys [B, H_kv, L, d]`` with RoPE applied by the modeling file's ``rotate(q, k, cos, sin)``, which
    rotates a query too: it is given one head of the keys, so that it rotates no more than that."""
    return rotate(keys[:, :1], keys, cos, sin)[1]


def key_head_dim(layer: nn.Module) -> int:
    """The width of one head of ``layer``'s key states (the ``d`` of :func:`project_queries_keys`)."""
    return layer.self_attn.head_dim


def final_norm(language_model: nn.Module) -> nn.Module:
    """The norm a decoder-only language model applies to its last layer's output (``norm``)."""
    norm = getattr(language_model, "norm", None)
    if not isinstance(norm, nn.Module):
        raise InternalsMovedError(f"{type(language_model).__name__} has no final 'norm' module")
    return norm


def rotary_embedding(language_model: nn.Module) -> nn.Module:
    """The module that turns a decoder-only language model's position ids into its layers' rotary
    ``(cos, sin)``, called as ``rotary_emb(hidden, position_ids)`` (1-D ids ``[B, L]``; Qwen-VL's
    multimodal ids ``[3, B, L]``)."""
    rotary = getattr(language_model, "rotary_emb", None)
    if not isinstance(rotary, nn.Module):
        raise InternalsMovedError(f"{type(language_model).__name__} has no 'rotary_emb' module")
    return rotary


def rotary_position_ids(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The position ids a call of :func:`rotary_embedding`'s module was given."""
    return kwargs["position_ids"] if "position_ids" in kwargs else args[1]


def attention_scaling(layer: nn.Module) -> float:
    return float(layer.self_attn.scaling)


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers decoder-only base model."""
    return language_model.layers


def check_decoder_internals(language_model: nn.Module) -> None:
    """Raise :class:`InternalsMovedError` naming the first internal that is not where the adapter expects."""
    forward_params = inspect.signature(type(language_model).forward).parameters
    if not any(name in forward_params for name in CACHE_NAMES):
        raise InternalsMovedError(
            f"{type(language_model).__name__}.forward takes neither 'cache' nor 'past_key_values'"
        )
    for name in ("position_ids", "attention_mask", "inputs_embeds"):
        if name not in forward_params:
            raise InternalsMovedError(f"{type(language_model).__name__}.forward no longer takes {name!r}")
    mask_params = inspect.signature(masking_utils.create_causal_mask).parameters
    if (
        any(name not in mask_params for name in ("layer_idx", "and_mask_function"))
        or list(mask_params)[:4][3] not in CACHE_NAMES
    ):
        raise InternalsMovedError("transformers.masking_utils.create_causal_mask changed its signature")
    for name in ("packed_sequence_mask_function", "find_packed_sequence_indices"):
        if not callable(getattr(masking_utils, name, None)):
            raise InternalsMovedError(f"transformers.masking_utils.{name} moved")
    for name in ("get_seq_length", "get_query_offset"):
        if not callable(getattr(Cache, name, None)):
            raise InternalsMovedError(f"transformers.cache_utils.Cache.{name} moved")
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise InternalsMovedError(f"{type(language_model).__name__} has no 'layers' ModuleList")
    layer = layers[0]
    for path in ("input_layernorm", "self_attn", "self_attn.q_proj", "self_attn.k_proj", "mlp"):
        obj = layer
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            raise InternalsMovedError(f"{type(layer).__name__} has no {path!r}")
    for attr in ("head_dim", "scaling"):
        if not hasattr(layer.self_attn, attr):
            raise InternalsMovedError(f"{type(layer.self_attn).__name__} has no {attr!r}")
    for name in ("apply_rotary_pos_emb", "eager_attention_forward"):
        modeling_function(layer.self_attn, name)
    if "_attn_implementation_internal" not in vars(layer.self_attn.config):
        raise InternalsMovedError("PretrainedConfig no longer keeps _attn_implementation_internal")
    layer_params = inspect.signature(type(layer).forward).parameters
    for name in ("hidden_states", "attention_mask", "position_ids", "position_embeddings"):
        if name not in layer_params:
            raise InternalsMovedError(f"{type(layer).__name__}.forward no longer takes {name!r}")


class InstanceOverride:
    """Shadows a method of one module instance with ``replacement`` until :meth:`remove` (a handle, like a
    hook's), for the model code that calls a method rather than a module: the class, and every other
    instance, keep the original."""

    def __init__(self, module: nn.Module, name: str, replacement: Callable) -> None:
        if name in vars(module):
            raise RuntimeError(f"{type(module).__name__}.{name} is already overridden on this instance")
        self.module, self.name = module, name
        setattr(module, name, replacement)

    def remove(self) -> None:
        if self.name in vars(self.module):
            delattr(self.module, self.name)


ROUTED_ATTENTION = "tokenprune_routed"  # the implementation name a routed attention module looks up


def _routed_attention(module: nn.Module, *args, **kwargs):
    return module._tokenprune_attention(module, *args, **kwargs)


class AttentionRoute:
    """Sends one attention module's call of its attention function to
    ``function(original, module, query, key, value, attention_mask, **kwargs)`` until :meth:`remove` (a
    handle, like a hook's), where ``original`` is what the module called before (sdpa, eager, flash, ...).

    A transformers attention module looks its function up by ``self.config._attn_implementation``; the module
    gets a shallow copy of its config whose implementation names a function registered for routing. The
    masks, built by the model from its own config, and every other module are unchanged. The original
    function is called with the module's own config back (FlashAttention reads its kernel's name there).
    The copy is taken when routing starts: a later ``set_attn_implementation`` reaches the module once the
    route is removed.
    """

    def __init__(self, attention: nn.Module, function: Callable) -> None:
        if "_tokenprune_attention" in vars(attention):
            raise RuntimeError(f"this {type(attention).__name__}'s attention is already routed")
        config = attention.config
        name = config._attn_implementation
        AttentionInterface.register(ROUTED_ATTENTION, _routed_attention)
        self.original = ALL_ATTENTION_FUNCTIONS.get_interface(
            name, modeling_function(attention, "eager_attention_forward")
        )
        self.attention, self.config = attention, config
        self.routed = copy.copy(config)
        self.routed._attn_implementation_internal = ROUTED_ATTENTION
        if self.routed._attn_implementation != ROUTED_ATTENTION:
            raise InternalsMovedError(
                "PretrainedConfig._attn_implementation no longer reads _attn_implementation_internal"
            )
        attention.config = self.routed
        attention._tokenprune_attention = partial(function, self.call_original)

    def call_original(self, module: nn.Module, *args, **kwargs):
        """The module's own attention function on these arguments, with the module's own config back (in a
        compiled graph, as it is: swapping a module's attribute there would recompile)."""
        if torch.compiler.is_compiling():
            return self.original(module, *args, **kwargs)
        module.config = self.config
        try:
            return self.original(module, *args, **kwargs)
        finally:
            module.config = self.routed

    def remove(self) -> None:
        if vars(self.attention).get("_tokenprune_attention") is not None:
            del self.attention._tokenprune_attention
            self.attention.config = self.config
