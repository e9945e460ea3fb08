"""Per-family adapters: how to hook each model family's forward pass.

The only package that knows transformers internals. An adapter is chosen by ``model.config.model_type``
from :data:`ADAPTERS`, and its module imported then: importing tokenprune loads no family's hooks, nor the
transformers internals they use (``torch._dynamo`` among them, through ``transformers.masking_utils``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from ._internals import InternalsMovedError

#: The adapter of each supported ``model_type``, as ``"module:class"`` in this package.
ADAPTERS = {
    "llava": "llava:LlavaAdapter",
    "llava_next": "llava_next:LlavaNextAdapter",
    "llava_onevision": "llava_next:LlavaNextAdapter",
    "qwen2_vl": "qwen_vl:Qwen2VLAdapter",
    "qwen2_5_vl": "qwen_vl:Qwen2VLAdapter",
    "qwen3_vl": "qwen_vl:Qwen2VLAdapter",
    "clip": "vit:VisionEncoderAdapter",
    "clip_vision_model": "vit:VisionEncoderAdapter",
    "siglip": "vit:VisionEncoderAdapter",
    "siglip_vision_model": "vit:VisionEncoderAdapter",
    "vit": "vit:VisionEncoderAdapter",
}


def supported_model_types() -> list[str]:
    """The ``model_type`` values an adapter exists for, sorted: what an unsupported model's error lists."""
    return sorted(ADAPTERS)


def adapter_class(model_type: str) -> type:
    """The adapter class of ``model_type`` (a key of :data:`ADAPTERS`), its module imported on first use."""
    module, name = ADAPTERS[model_type].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def adapter_for(model: nn.Module) -> Any:
    """A new adapter for ``model``; ``ValueError`` naming the supported families if there is none."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model type {model_type!r} ({type(model).__name__}); "
            f"tokenprune supports: {', '.join(supported_model_types())}"
        )
    return adapter_class(model_type)(model)


def check_placement(model: nn.Module, vision_stage: bool, decode_stage: bool) -> None:
    """``ValueError`` where ``model``'s placement (tensor parallel, ``device_map``) keeps a pruner with a
    vision stage or a ``kv`` stage (``decode_stage``) from selecting what it selects in one process."""
    from ._device_map import check_device_map
    from ._tensor_parallel import check_tensor_parallel

    check_tensor_parallel(model, vision_stage, decode_stage)
    check_device_map(model)


def __getattr__(name: str) -> object:
    """:class:`~._internals.InternalsMovedError`, imported with the internals on first use."""
    if name != "InternalsMovedError":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ._internals import InternalsMovedError

    return InternalsMovedError


__all__ = [
    "ADAPTERS",
    "InternalsMovedError",
    "adapter_class",
    "adapter_for",
    "check_placement",
    "supported_model_types",
]
