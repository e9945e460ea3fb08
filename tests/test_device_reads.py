"""A pruned prefill reads back from the device only what the unpruned model does (counted by
``tokenprune.testing.dispatch.DeviceReads``), and compiles into at most two graphs more.

Each read of a device value by the host (``.item()``, ``.tolist()``, ``nonzero``, boolean indexing, ...) is a
host sync on a GPU: the launches queued behind it stop overlapping the GPU's work, and a compiled forward
breaks its graph there. The pruned lengths follow from the shapes and the config where every row holds the
same images (one prompt, or a uniform batch), so pruning reads nothing more there; a ragged batch reads
each row's image and real tokens once. Qwen-VL reads its images' grids once (the model reads them too, but
keeps them to itself). The counts are of a second prefill: the pruner's first checks its contracts.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import tokenprune as tp
from tokenprune.testing import tiny_inputs, tiny_model
from tokenprune.testing.dispatch import DeviceReads

STAGES = {method: stage for method, (stage, _) in tp.list_methods().items()}
METHODS = sorted(STAGES)
#: Prompts of one image each, the same images in each row, and rows of different images.
BATCHES = {"one": (1,), "uniform": (1, 1), "ragged": (2, 1)}
#: The reads a prefill may add, by family and batch.
ALLOWED = {
    "llava": {"one": 0, "uniform": 0, "ragged": 1},
    "qwen2_5_vl": {"one": 1, "uniform": 1, "ragged": 2},
}
#: Vision methods a Qwen-VL tower does not take (a merge of the merger's output).
REFUSED = {("qwen2_5_vl", method) for method in ("tome", "turbo", "saint")}
#: The reads some methods add on top, and why: DART's pivot order is its reference's, a Python set's of
#: the pivots' prompt positions, built on the host; a vision method on a Qwen-VL tower reads the items'
#: grids and longest attention segments once.
METHOD_READS = {"dart": 1}
QWEN_TOWER_READS = 1


def device_reads(reads: DeviceReads) -> int:
    """The reads counted, less those of transformers' window order, which the Qwen-VL tower's hooks have it
    compute on a host copy of the grids: reads of a CPU tensor, none on a GPU."""
    return reads.count - sum(count for site, count in reads.sites.items() if " window_order" in site)


@pytest.fixture(scope="module", params=sorted(ALLOWED))
def family_model(request):
    return request.param, tiny_model(request.param)


def second_prefill_reads(model, inputs: dict) -> DeviceReads:
    with torch.no_grad():
        model(**inputs)
        with DeviceReads() as reads:
            model(**inputs)
    return reads


@pytest.mark.parametrize("method", METHODS)
def test_a_pruned_prefill_reads_what_the_model_reads(family_model, method):
    family, model = family_model
    if (family, method) in REFUSED:
        with pytest.raises(ValueError, match="merges or drops tokens inside the encoder's layers"):
            tp.apply_pruner(model, method, keep_ratio=0.25)
        return
    for batch, images in BATCHES.items():
        inputs = tiny_inputs(model, images)
        unpruned = second_prefill_reads(model, inputs).count
        with tp.pruned(model, method, keep_ratio=0.25):
            pruned = second_prefill_reads(model, inputs)
        allowed = ALLOWED[family][batch] + METHOD_READS.get(method, 0)
        if family == "qwen2_5_vl" and STAGES[method] == "vision":
            allowed += QWEN_TOWER_READS
        assert device_reads(pruned) - unpruned <= allowed, (batch, dict(pruned.sites))


def split_image(model, inputs: dict) -> dict:
    """``inputs`` (two one-image prompts) with row 0's first placeholder made text and a text token of row 1
    a placeholder: the model's own count still matches, but an image's tokens straddle the rows."""
    ids, image = inputs["input_ids"].clone(), model.config.image_token_id
    ids[0, (ids[0] == image).nonzero()[0, 0]] = 5
    ids[1, ((ids[1] != image) & inputs["attention_mask"][1].bool()).nonzero()[0, 0]] = image
    return {**inputs, "input_ids": ids}


def test_an_image_split_between_rows_is_refused_at_the_first_prefill_or_every_one():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, (1, 1))
    bad = split_image(model, inputs)
    with (
        tp.pruned(model, "fastv", keep_ratio=0.25),
        torch.no_grad(),
        pytest.raises(ValueError, match="whole"),
    ):
        model(**bad)
    with tp.pruned(model, "fastv", keep_ratio=0.25, checks="every"), torch.no_grad():
        model(**inputs)
        with pytest.raises(ValueError, match="not whole images"):
            model(**bad)


def test_checks_takes_first_or_every():
    with pytest.raises(ValueError, match="checks must be one of"):
        tp.PrunerConfig("fastv", keep_ratio=0.5, checks="never")


#: Every method on both families but those a Qwen-VL tower refuses, and those that read where a compiled
#: forward then breaks its graph: DART (its pivots' positions, for its reference's order) and a vision method
#: on a Qwen-VL tower (its grids and segments, and transformers' window order on the host's copy of them).
COMPILED = [
    (family, method)
    for family in ALLOWED
    for method in METHODS
    if method != "dart"
    and (family, method) not in REFUSED
    and not (family == "qwen2_5_vl" and STAGES[method] == "vision")
]


def compiled_forward(model, inputs: dict) -> tuple[torch.Tensor, int]:
    """The logits of ``model`` on ``inputs`` compiled afresh (dynamo only: its graphs run eagerly), and the
    number of graphs it was cut into."""
    torch.compiler.reset()
    graphs = CompileCounter()
    try:
        with torch.no_grad():
            return torch.compile(model, backend=graphs)(**inputs).logits, graphs.frame_count
    finally:
        torch.compiler.reset()


@pytest.mark.parametrize(("family", "method"), COMPILED)
def test_a_compiled_pruned_prefill_breaks_its_graph_at_most_twice_more_and_equals_eager(family, method):
    model = tiny_model(family)
    inputs = tiny_inputs(model, (1,))
    _, unpruned = compiled_forward(model, inputs)
    with tp.pruned(model, method, keep_ratio=0.25), torch.no_grad():
        eager = model(**inputs).logits
        compiled, graphs = compiled_forward(model, inputs)
    assert graphs <= unpruned + 2
    torch.testing.assert_close(compiled, eager)
