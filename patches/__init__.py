"""Per-family adapters: how to hook each model family's forward pass.

The only package that knows transformers internals. An adapter is chosen by ``model.config.model_type``.
"""

from __future__ import annotations

from torch import nn

from ._internals import InternalsMovedError
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen_vl import Qwen2VLAdapter
from .vit import VisionEncoderAdapter

ADAPTERS = {
    model_type: adapter
    for adapter in (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, VisionEncoderAdapter)
    for model_type in adapter.model_types
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model: nn.Module):
    """A new adapter for ``model``; ``ValueError`` naming the supported families if there is none."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model type {model_type!r} ({type(model).__name__}); "
            f"tokenprune supports: {', '.join(supported_model_types())}"
        )
    return ADAPTERS[model_type](model)


__all__ = ["ADAPTERS", "InternalsMovedError", "adapter_for", "supported_model_types"]
