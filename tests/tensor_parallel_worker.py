"""Every registered method on tiny checkpoints, for comparing a tensor-parallel run with one process.

Launched by ``tests/test_tensor_parallel.py`` as one process group for every family and method::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/tensor_parallel_worker.py CHECKPOINTS OUT

``CHECKPOINTS`` holds one checkpoint directory per family (named by family). Each rank loads every case of
:data:`CASES` tensor-parallel, runs :func:`run_methods` on it, tries the shardings of :data:`REFUSED`, and
saves its results to ``OUT/rank<r>.pt``. The test runs :func:`run_methods` on the same checkpoints in one
process and compares.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Any

import torch
from transformers import AutoModelForImageTextToText

import tokenprune as tp
from tokenprune.testing import FAMILIES, tiny_inputs

KEEP_RATIO = 0.25
NEW_TOKENS = 4

_LAYERS = "model.language_model.layers.*."
#: Qwen3-VL's own plan (transformers 5.25) shards only the embeddings: this one shards its decoder as
#: ``tp_plan="auto"`` shards Qwen2-VL's, with Qwen3's per-head query and key norms.
QWEN3_VL_DECODER_PLAN = {
    **{f"{_LAYERS}self_attn.{p}": "colwise" for p in ("q_proj", "k_proj", "v_proj")},
    f"{_LAYERS}self_attn.o_proj": "rowwise",
    **{f"{_LAYERS}self_attn.{n}": "replicated_with_grad_allreduce" for n in ("q_norm", "k_norm")},
    f"{_LAYERS}mlp.gate_proj": "colwise",
    f"{_LAYERS}mlp.up_proj": "colwise",
    f"{_LAYERS}mlp.down_proj": "rowwise",
}

#: What each case loads: ``(family, tp_plan)``. Every family with ``tp_plan="auto"``, and Qwen3-VL with its
#: decoder sharded too.
CASES: dict[str, tuple[str, str | dict[str, str]]] = {
    **{family: (family, "auto") for family in FAMILIES},
    "qwen3_vl_decoder_plan": ("qwen3_vl", QWEN3_VL_DECODER_PLAN),
}

#: Shardings that ``apply_pruner`` refuses for some methods, on the tiny LLaVA: name -> (plan, methods). A
#: query/key projection sharded by input feature splits no heads; a sharded vision tower is out of reach of
#: the vision-stage methods. Only ``apply_pruner`` is called on them (the first model computes nonsense).
REFUSED: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "keys_sharded_rowwise": ({f"{_LAYERS}self_attn.k_proj": "rowwise"}, ("fastv", "sparsevila", "random")),
    "vision_tower_sharded": (
        {f"model.vision_tower.encoder.layers.*.self_attn.{p}": "colwise" for p in ("q_proj", "k_proj")},
        ("visionzip", "fastv"),
    ),
}


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


def refusals(path: pathlib.Path) -> dict[str, dict[str, str | None]]:
    """For each sharding of :data:`REFUSED`, of the checkpoint at ``path``: by method, the message of
    ``apply_pruner``'s ``ValueError``, or ``None`` where it accepts the method."""
    found = {}
    for name, (plan, methods) in REFUSED.items():
        model = load(path, tp_plan=plan)
        found[name] = {}
        for method in methods:
            try:
                tp.apply_pruner(model, method, keep_ratio=KEEP_RATIO).remove()
                found[name][method] = None
            except ValueError as error:
                found[name][method] = str(error)
    return found


def main(checkpoints: pathlib.Path, out: pathlib.Path) -> None:
    """Run every case of :data:`CASES` on the checkpoints under ``checkpoints`` tensor-parallel, and the
    :func:`refusals` of the LLaVA one; save this rank's results in ``out``."""
    torch.set_num_threads(1)
    results: dict[str, Any] = {
        case: run_methods(load(checkpoints / family, tp_plan=plan)) for case, (family, plan) in CASES.items()
    }
    results["refusals"] = refusals(checkpoints / "llava")
    out.mkdir(parents=True, exist_ok=True)
    torch.save(results, out / f"rank{os.environ['RANK']}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
