"""Every registered method on tiny checkpoints, for comparing a tensor-parallel run with one process.

Launched by ``tests/test_tensor_parallel.py`` as one process group for every family and method::

    python -m torch.distributed.run --nproc_per_node 2 tests/tensor_parallel_worker.py CHECKPOINTS OUT

``CHECKPOINTS`` holds one checkpoint directory per family (named by family). Each rank loads every family
with ``tp_plan="auto"``, runs :func:`run_methods` on it and saves the results to ``OUT/rank<r>.pt``. The test
runs :func:`run_methods` on the same checkpoints in one process and compares.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Any

import torch
from transformers import AutoModelForImageTextToText

import tokenprune as tp
from tokenprune.testing import tiny_inputs

KEEP_RATIO = 0.25
NEW_TOKENS = 4


def run_method(model: torch.nn.Module, method: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """What ``method`` (``keep_ratio`` :data:`KEEP_RATIO`) does on ``model`` and ``inputs``: the pruned
    prefill's logits, the tokens of a greedy ``generate`` of :data:`NEW_TOKENS` tokens, and the keep masks of
    each (prefill stages by layer, and a ``kv`` method's per-step masks). ``{"refused": message}`` where
    :func:`tokenprune.apply_pruner` refuses the method on this model."""
    try:
        pruner = tp.apply_pruner(model, method, keep_ratio=KEEP_RATIO)
    except ValueError as error:
        return {"refused": str(error)}
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            prefill_masks = dict(pruner.stats.keep_masks)
            tokens = model.generate(
                **inputs,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
                suppress_tokens=[model.config.image_token_id],
            )
        return {
            "logits": logits,
            "tokens": tokens,
            "prefill_masks": prefill_masks,
            "generate_masks": dict(pruner.stats.keep_masks),
            "decode_masks": list(pruner.stats.decode_keep_masks),
        }
    finally:
        pruner.remove()


def run_methods(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """:func:`run_method` of every registered method on ``model``, by method, on a batch of two prompts
    (one and two images, left-padded)."""
    inputs = tiny_inputs(model, (1, 2))
    return {method: run_method(model, method, inputs) for method in tp.list_methods()}


def load(path: pathlib.Path, **kwargs: Any) -> torch.nn.Module:
    """The checkpoint at ``path`` with sdpa attention, in eval mode (``kwargs``: to ``from_pretrained``)."""
    return AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa", **kwargs).eval()


def main(checkpoints: pathlib.Path, out: pathlib.Path) -> None:
    """Run every family under ``checkpoints`` tensor-parallel; save this rank's results in ``out``."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    results = {}
    for path in sorted(p for p in checkpoints.iterdir() if p.is_dir()):
        results[path.name] = run_methods(load(path, tp_plan="auto"))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
