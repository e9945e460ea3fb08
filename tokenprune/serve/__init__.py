"""``tokenprune serve``: an OpenAI-compatible chat-completions server that prunes visual tokens.

Needs the ``[serve]`` extra (fastapi, uvicorn). :func:`build_engine` loads a checkpoint with its
processor; :func:`~tokenprune.serve.app.create_app` makes the ASGI app; ``uvicorn`` serves it.
"""

from __future__ import annotations

import torch

from ..config import PrunerConfig
from .engine import Engine
from .metrics import Metrics
from .protocol import Limits


def build_engine(
    checkpoint: str,
    name: str,
    default: PrunerConfig | None,
    limits: Limits,
    *,
    attn: str = "sdpa",
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
) -> Engine:
    """Load ``checkpoint`` (a local directory) and its processor for serving as model ``name``.

    The default pruner config is applied once here, so an unsupported family or a budget over the image
    fails at startup rather than at the first request. With ``compile``, batches decode with a static
    cache and a compiled step.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..api import apply_pruner

    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, attn_implementation=attn, dtype=dtype)
    model = model.to(device or torch.device("cpu")).eval()
    if default is not None:
        apply_pruner(model, default).remove()
    return Engine(model, processor, name, default, limits, Metrics(), compile=compile)


__all__ = ["Engine", "Limits", "build_engine"]
