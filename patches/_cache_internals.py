"""The transformers KV cache as the adapters use it, each internal behind one small helper.

What a cache is called in a forward's arguments and outputs, how many rows a layer holds, the record a
pruner leaves on a cache it pruned, and compaction of a layer's rows. A release that moves one of these
fails here, loudly (:class:`~tokenprune.patches._internals.InternalsMovedError`), not inside a forward.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer

from tokenprune.kernels import gather_kv

from ._internals import CACHE_NAMES, InternalsMovedError


def cache_argument(kwargs: dict[str, Any]) -> Any:
    """The KV cache passed to a model or layer forward, under whichever name this release uses."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(output: Any) -> Any:
    """The KV cache returned in a model output, under whichever name this release uses."""
    for name in CACHE_NAMES:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def cache_length(cache: Any, layer_idx: int) -> int:
    """Rows held by layer ``layer_idx`` of a cache (0 when there is no cache), whatever a pruned cache reports
    to ``generate`` (see :func:`mark_pruned_cache`)."""
    return 0 if cache is None else int(type(cache).get_seq_length(cache, layer_idx))


def cache_fill(cache: Any, layer_idx: int) -> int | torch.Tensor:
    """Rows held by layer ``layer_idx`` of a cache as the cache counts them, without reading the device: an
    int for a dynamic cache, the 0-d device tensor a static one keeps (which its next update advances in
    place; a compiled step reads it without recompiling as it grows)."""
    return type(cache).get_seq_length(cache, layer_idx)


def cache_capacity(cache: Any, layer_idx: int) -> int | None:
    """The slots of layer ``layer_idx`` of a static cache (its keys run past the rows held), or ``None``."""
    layer = _cache_layer(cache, layer_idx)
    return layer.max_cache_len if isinstance(layer, StaticLayer) else None


#: The attribute of a cache that holds what a pruner recorded about the prompt in it.
_CACHE_RECORD = "_tokenprune_prompt"


def cache_record(cache: Any) -> Any:
    """What a pruner recorded on ``cache`` at its prefill (see :func:`mark_pruned_cache`), or ``None``.

    The record lives on the cache itself, not in a table of the pruner's: a compiled decode step reads it as
    an attribute, which ``torch.compile`` guards without recompiling for every new cache."""
    return None if cache is None else getattr(cache, _CACHE_RECORD, None)


def mark_pruned_cache(cache: Any, record: Any, dropped: list[int]) -> None:
    """Attach ``record`` to ``cache`` and, where its prefill dropped tokens, make the cache count what its
    prompt was, not what it holds, until ``cache.reset()`` (which also drops the record).

    ``dropped[i]`` prompt tokens were pruned from layer ``i``. ``get_seq_length(i)`` then reports the tokens
    processed so far, the rows held plus ``dropped[i]``: ``generate`` slices the tokens still to feed by it
    when it continues from the cache, and the models place new tokens' positions by it. ``get_query_offset``,
    which the mask code reads to place the new rows among the held ones, keeps counting the rows held.
    These are shadowed on this cache instance only; the cache class and every other cache are unchanged.
    """
    held = type(cache).get_seq_length

    def get_seq_length(layer_idx: int = 0):
        return held(cache, layer_idx) + dropped[layer_idx]

    def get_query_offset(layer_idx: int = 0):
        return held(cache, layer_idx)

    def reset() -> None:
        for name in (_CACHE_RECORD, "get_seq_length", "get_query_offset", "reset"):
            vars(cache).pop(name, None)
        cache.reset()

    setattr(cache, _CACHE_RECORD, record)
    cache.reset = reset
    if any(dropped):
        cache.get_seq_length = get_seq_length
        cache.get_query_offset = get_query_offset


def _cache_layer(cache: Any, layer_idx: int) -> Any:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise InternalsMovedError(f"{type(cache).__name__} has no 'layers' list")
    layer = layers[layer_idx]
    if not isinstance(layer, (DynamicLayer, StaticLayer)):
        raise ValueError(
            f"tokenprune supports dynamic and static caches, not {type(layer).__name__} layers; "
            'use generate\'s default cache or cache_implementation="static"'
        )
    for name in ("keys", "values"):
        if not isinstance(getattr(layer, name, None), torch.Tensor):
            raise InternalsMovedError(f"{type(layer).__name__} no longer holds its states in {name!r}")
    return layer


def cache_nbytes(cache: Any) -> int:
    """Bytes of the keys and values a cache holds, over all its layers."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise InternalsMovedError(f"{type(cache).__name__} has no 'layers' list")
    tensors = [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def compact_cache_layers(cache: Any, layer_indices: range, index: torch.Tensor) -> None:
    """Keep only the sequence rows ``index [B, L']`` in the keys and values of the listed cache layers.

    A dynamic layer's tensors are replaced by the gathered rows; a static layer's are overwritten in place
    (their addresses are what a compiled decode step reads) and its row count set to ``L'``, the slots after
    it left for the tokens to come.
    """
    for i in layer_indices:
        layer = _cache_layer(cache, i)
        if isinstance(layer, StaticLayer):
            rows = cache_length(cache, i)
            keys, values = gather_kv(layer.keys[:, :, :rows], layer.values[:, :, :rows], index)
            layer.keys[:, :, : index.shape[1]].copy_(keys)
            layer.values[:, :, : index.shape[1]].copy_(values)
            layer.cumulative_length.fill_(index.shape[1])
        else:
            layer.keys, layer.values = gather_kv(layer.keys, layer.values, index)
