"""Every transformers internal of the image encoders (CLIP, SigLIP, ViT) the vision stage depends on.

The encoder counterpart of :mod:`tokenprune.patches._internals`: adapters call only these helpers, and
:func:`check_encoder_internals` fails loudly, naming what moved, when a release moves one.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ._internals import InternalsMovedError


def encoder_layers(vision_model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a CLIP/SigLIP vision transformer (``encoder.layers``) or a ViT
    (``layers``)."""
    encoder = getattr(vision_model, "encoder", None)
    layers = (
        getattr(encoder, "layers", None) if encoder is not None else getattr(vision_model, "layers", None)
    )
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise InternalsMovedError(f"{type(vision_model).__name__} has neither 'encoder.layers' nor 'layers'")
    return layers


def layer_attention(layer: nn.Module) -> nn.Module:
    """The self-attention module of an encoder layer (``self_attn`` in CLIP/SigLIP, ``attention`` in ViT)."""
    attention = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
    if attention is None:
        raise InternalsMovedError(f"{type(layer).__name__} has neither 'self_attn' nor 'attention'")
    return attention


def layer_mlp(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The norm and MLP of an encoder layer's second half (``layer_norm2`` in CLIP/SigLIP,
    ``layernorm_after`` in ViT; ``mlp``): the layer adds ``mlp(norm(h))`` to ``h``, its input plus its
    attention's output, and returns that sum."""
    norm = getattr(layer, "layer_norm2", None) or getattr(layer, "layernorm_after", None)
    mlp = getattr(layer, "mlp", None)
    if norm is None or mlp is None:
        raise InternalsMovedError(
            f"{type(layer).__name__} has no 'layer_norm2'/'layernorm_after' and 'mlp' after its attention"
        )
    return norm, mlp


def attention_shape(attention: nn.Module) -> tuple[int, int, float]:
    """``(heads, head_dim, softmax scale)`` of an encoder self-attention module."""
    heads = getattr(attention, "num_heads", None) or getattr(attention, "num_attention_heads", None)
    scale = getattr(attention, "scale", None) or getattr(attention, "scaling", None)
    head_dim = getattr(attention, "head_dim", None)
    if heads is None or scale is None or head_dim is None:
        raise InternalsMovedError(
            f"{type(attention).__name__} lacks the head count, head_dim or softmax scale attributes"
        )
    return int(heads), int(head_dim), float(scale)


def has_class_token(vision_model: nn.Module) -> bool:
    """Whether the encoder prepends a CLS token (CLIP, ViT) or not (SigLIP)."""
    embeddings = vision_model.embeddings
    return hasattr(embeddings, "class_embedding") or hasattr(embeddings, "cls_token")


def patch_grid(vision_model: nn.Module) -> tuple[int, int]:
    """Rows and columns of patches at the encoder's configured image size."""
    config = vision_model.config
    image, patch = config.image_size, config.patch_size
    image = image if isinstance(image, (tuple, list)) else (image, image)
    patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
    return image[0] // patch[0], image[1] // patch[1]


def layer_attention_mask(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The attention mask an encoder layer was called with."""
    return args[1] if len(args) > 1 else kwargs.get("attention_mask")


def with_layer_inputs(
    args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of an encoder layer call with hidden states and attention mask replaced."""
    rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "attention_mask")}
    return (hidden, attention_mask, *args[2:]), rest


def check_encoder_internals(vision_model: nn.Module) -> None:
    """Raise :class:`InternalsMovedError` naming the first encoder internal that is not where expected."""
    layers = encoder_layers(vision_model)
    if getattr(vision_model, "embeddings", None) is None:
        raise InternalsMovedError(f"{type(vision_model).__name__} has no 'embeddings'")
    layer = layers[0]
    attention = layer_attention(layer)
    layer_mlp(layer)
    for name in ("q_proj", "k_proj"):
        if not isinstance(getattr(attention, name, None), nn.Linear):
            raise InternalsMovedError(f"{type(attention).__name__} has no {name!r} projection")
    attention_shape(attention)
    params = list(inspect.signature(type(layer).forward).parameters)
    if params[1:3] != ["hidden_states", "attention_mask"]:
        raise InternalsMovedError(
            f"{type(layer).__name__}.forward no longer takes (hidden_states, attention_mask) first"
        )
