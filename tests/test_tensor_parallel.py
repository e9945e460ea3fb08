"""Tensor parallelism: under ``torchrun`` with ``tp_plan="auto"``, every rank keeps exactly the tokens one
process keeps, for every family and every method.

One process group (``tensor_parallel_worker.py``, 2 CPU ranks over gloo) runs every case; then this process
runs the same methods on the same checkpoints and compares each rank with it: the same generated tokens,
prefill logits within 1e-5, the same keep masks (so both ranks kept the same tokens), the same refusals.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import tensor_parallel_worker as worker
import torch

from tokenprune.testing import FAMILIES, save_tiny_checkpoint

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

RANKS = 2
TIMEOUT_S = 600


def _assert_same_masks(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), what
    for layer, mask in expected.items():
        assert torch.equal(got[layer], mask), f"{what}: layer {layer} kept other tokens"


def _assert_same_result(got: dict, expected: dict, what: str) -> None:
    if "refused" in expected:
        assert got.get("refused") == expected["refused"], what
        return
    assert "refused" not in got, f"{what}: refused under tensor parallelism only: {got.get('refused')}"
    for stage in ("prefill_masks", "generate_masks"):
        _assert_same_masks(got[stage], expected[stage], f"{what} ({stage})")
    assert len(got["decode_masks"]) == len(expected["decode_masks"]), what
    for step, (masks, reference) in enumerate(
        zip(got["decode_masks"], expected["decode_masks"], strict=True)
    ):
        _assert_same_masks(masks, reference, f"{what} (decode step {step})")
    torch.testing.assert_close(got["logits"], expected["logits"], atol=1e-5, rtol=0, msg=what)
    assert torch.equal(got["tokens"], expected["tokens"]), f"{what}: generated other tokens"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("checkpoints")
    for family in FAMILIES:
        save_tiny_checkpoint(root / family, family)
    return root


def test_every_rank_keeps_what_one_process_keeps(checkpoints, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}"]
    command += [str(pathlib.Path(worker.__file__)), str(checkpoints), str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, (run.stdout + run.stderr)[-8000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: tiny models run fastest on one thread, busy machines much so
    try:
        expected = {family: worker.run_methods(worker.load(checkpoints / family)) for family in FAMILIES}
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(RANKS)]
    for rank, results in enumerate(ranks):
        for case, (family, _) in worker.CASES.items():
            assert results[case].keys() == expected[family].keys()
            for method, reference in expected[family].items():
                _assert_same_result(results[case][method], reference, f"rank {rank}, {case}, {method}")
        refused = results["refusals"]
        assert all("self_attn.k_proj is sharded as" in m for m in refused["keys_sharded_rowwise"].values())
        vision = refused["vision_tower_sharded"]
        assert "vision tower" in vision["visionzip"] and vision["fastv"] is None
