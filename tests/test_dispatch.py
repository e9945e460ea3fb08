"""The CPU's view of GPU launch cost: how many torch ops a pruned forward dispatches.

On a GPU each op is at least one kernel launch, and at batch 1 a 7B model's eager forward is bound by them.
Selection must cost a fixed number of ops whatever the budget (a loop over kept tokens is a GPU bug even
where CPU timings look fine), and a decode step on a pruned cache only a few more than an unpruned step.
The Triton kernels run under the interpreter here, as they would run compiled on a GPU.
"""

import pytest
import torch
from helpers import cache_kwarg
from triton.runtime import interpreter

import tokenprune as tp
from tokenprune.patches._cache_internals import output_cache
from tokenprune.testing import tiny_inputs, tiny_model
from tokenprune.testing.dispatch import CountOps, DeviceReads

PREFILL_METHODS = sorted(m for m, (stage, _) in tp.list_methods().items() if stage != "kv")


@pytest.fixture(scope="module")
def llava():
    return tiny_model("llava")


def prefill_ops(model, inputs: dict) -> int:
    with torch.no_grad(), CountOps() as ops:
        model(**inputs)
    return ops.count


@pytest.mark.parametrize("method", PREFILL_METHODS)
def test_prefill_ops_do_not_grow_with_the_budget(kernels, llava, method):
    """16 or 40 of each image's 64 tokens kept: the same number of ops (DART's loop is over its 8 pivots,
    the greedy loops of DivPrune and IDPruner are one kernel)."""
    inputs = tiny_inputs(llava, (1, 2, 1))
    counts = []
    for budget in (16, 40):
        with tp.pruned(llava, method, budget=budget):
            counts.append(prefill_ops(llava, inputs))
    assert counts[1] <= counts[0], counts


class CountLaunches(CountOps):
    """Counts the torch ops dispatched in the block, and each Triton kernel launched under the interpreter as
    one op: as a GPU launches it (the interpreter's own copies of the arguments are not counted)."""

    def __enter__(self):
        executor = interpreter.GridExecutor
        launch = self._launch = executor.__call__
        self._inside = False

        def counted(*args, **kwargs):
            self.count, self._inside = self.count + 1, True
            try:
                return launch(*args, **kwargs)
            finally:
                self._inside = False

        executor.__call__ = counted
        return super().__enter__()

    def __exit__(self, *exc):
        interpreter.GridExecutor.__call__ = self._launch
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not self._inside
        return func(*args, **(kwargs or {}))


def decode_steps(model, inputs: dict, steps: int, counter: type[CountOps]) -> list[int]:
    """What ``counter`` counts in each of the first ``steps`` decode steps after a cached prefill."""
    counts = []
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        mask, positions = inputs["attention_mask"], inputs["position_ids"][:, -1:]
        for _ in range(steps):
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            mask, positions = torch.cat([mask, torch.ones_like(token)], dim=1), positions + 1
            step = {"input_ids": token, "attention_mask": mask, "position_ids": positions}
            with counter() as count:
                out = model(**step, **cache_kwarg(output_cache(out)))
            counts.append(count.count)
    return counts


@pytest.mark.parametrize("method", PREFILL_METHODS)
def test_a_decode_step_on_a_pruned_cache_costs_about_an_unpruned_one(llava, method):
    """Within 15% of the unpruned step's ops per pruning stage: the step's positions and masks, nothing else
    of ours (the layers of each stage hold caches of their own length, so each stage has its mask)."""
    inputs = tiny_inputs(llava, (1, 2, 1))
    (unpruned,) = decode_steps(llava, inputs, 1, CountOps)
    with tp.pruned(llava, method, keep_ratio=0.25) as pruner:
        (pruned,) = decode_steps(llava, inputs, 1, CountOps)
    assert pruned <= (1 + 0.15 * len(pruner.stages)) * unpruned, (pruned, unpruned)


def test_a_merging_tower_reads_the_device_once(llava):
    """ToMe merges before every CLIP layer: no sync per merge (the selection timer uses CUDA events, and the
    method's answer is checked at its first merge only)."""
    pixels = tiny_inputs(llava, (1, 2, 1))["pixel_values"]
    with tp.pruned(llava, "tome", keep_ratio=0.25), torch.no_grad(), DeviceReads() as reads:
        llava.model.get_image_features(pixel_values=pixels)
    assert reads.count == 1


def test_a_kv_decode_step_costs_about_an_unpruned_one(kernels, llava):
    """SparseVILA selects in every layer of every step, each in one kernel (and the two masks it writes):
    the same ops whatever the budget and the step, within 15% of an unpruned step, and no device read of
    ours after the first step's checks."""
    inputs = tiny_inputs(llava, (1, 1))
    unpruned = decode_steps(llava, inputs, 3, CountLaunches)
    unpruned_reads = decode_steps(llava, inputs, 3, DeviceReads)  # transformers' mask code reads too
    counts = []
    for budget in (4, 40):
        with tp.pruned(llava, "sparsevila", budget=budget):
            counts.append(decode_steps(llava, inputs, 3, CountLaunches))
            assert decode_steps(llava, inputs, 3, DeviceReads)[1:] == unpruned_reads[1:]
    assert counts[0] == counts[1]
    assert counts[0][1] == counts[0][2] and max(counts[0]) <= 1.15 * max(unpruned), (counts, unpruned)
