"""Compiled decoding: ``generate`` arguments for a static KV cache and transformers' compiled decode step."""

from __future__ import annotations

import torch
from transformers import CompileConfig


def compiled_decoding(device: torch.device) -> dict[str, object]:
    """``generate`` keyword arguments for a static cache and a compiled decode step (the prefill, where a
    pruner selects, stays eager). transformers compiles by itself on a GPU only; on ``device`` of any type
    it is asked to, since the point is to measure or serve that path."""
    config = CompileConfig(fullgraph=False)
    config._compile_all_devices = device.type != "cuda"
    return {"cache_implementation": "static", "compile_config": config}
