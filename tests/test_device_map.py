"""A model dispatched by accelerate with a ``device_map`` (modules in memory and offloaded to disk, weights
loaded by hooks at each module's forward) keeps the tokens and computes the logits of the same model in
memory, for every family and every method."""

from __future__ import annotations

import pytest
import tensor_parallel_worker as worker
import torch
from torch import nn

import tokenprune as tp
from tokenprune.testing import FAMILIES, save_tiny_checkpoint, tiny_model


def alternating_offload(model: nn.Module) -> dict[str, str]:
    """A ``device_map`` for ``model``: every other layer of each list of layers (the decoder's and the vision
    tower's) on disk, everything else in memory ("cpu"). Among the rest are LLaVA-NeXT's ``image_newline`` and
    the SigLIP pooling head of LLaVA-OneVision, which transformers uses outside a forward of their own
    module (``generate`` and ``nn.MultiheadAttention`` read them directly): offloaded, they fail even
    without a pruner."""
    device_map = {}

    def place(module: nn.Module, prefix: str) -> None:
        if not any(isinstance(m, nn.ModuleList) for m in module.modules()):
            device_map[prefix.rstrip(".")] = "cpu"
            return
        for name, _ in module.named_parameters(recurse=False):
            device_map[prefix + name] = "cpu"
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList):
                device_map.update(
                    {f"{prefix}{name}.{i}": "disk" if i % 2 else "cpu" for i in range(len(child))}
                )
            else:
                place(child, f"{prefix}{name}.")

    place(model, "")
    return device_map


def _offloaded(path, tmp_path, placement: str, in_memory: nn.Module) -> nn.Module:
    """The checkpoint at ``path`` (``in_memory`` loaded) dispatched with part of it on disk."""
    if placement == "alternating":
        kwargs = {"device_map": alternating_offload(in_memory)}
    else:  # accelerate places what fits in half the model's size, the rest on disk
        size = sum(p.numel() * p.element_size() for p in in_memory.parameters())
        kwargs = {"device_map": "auto", "max_memory": {"cpu": size // 2}}
    model = worker.load(path, offload_folder=tmp_path / placement, **kwargs)
    assert "disk" in model.hf_device_map.values()
    return model


@pytest.fixture
def one_thread():
    """Tiny models on one thread: fastest, and by far so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_model_prunes_as_in_memory(family, tmp_path, one_thread):
    path = save_tiny_checkpoint(tmp_path / "checkpoint", family)
    in_memory = worker.load(path)
    # built from the model in memory: LLaVA-NeXT's run its image features, which an offloaded model
    # computes only inside a forward
    inputs = worker.tiny_inputs(in_memory, (1, 2))
    expected = {method: worker.run_method(in_memory, method, inputs) for method in tp.list_methods()}
    for placement in ("alternating", "auto"):
        model = _offloaded(path, tmp_path, placement, in_memory)
        for method, reference in expected.items():
            got = worker.run_method(model, method, inputs)
            what = f"{family}, {placement} offload, {method}"
            if "refused" in reference:
                assert got == reference, what
                continue
            assert torch.equal(got["tokens"], reference["tokens"]), f"{what}: other tokens"
            torch.testing.assert_close(got["logits"], reference["logits"], atol=1e-6, rtol=0, msg=what)
            for name in ("prefill_masks", "generate_masks"):
                assert got[name].keys() == reference[name].keys(), what
                assert all(torch.equal(got[name][k], m) for k, m in reference[name].items()), what
            assert len(got["decode_masks"]) == len(reference["decode_masks"]), what
            for step, masks in zip(got["decode_masks"], reference["decode_masks"], strict=True):
                assert all(torch.equal(step[k], m) for k, m in masks.items()), what


def test_a_device_map_over_several_devices_is_refused():
    model = tiny_model("llava")
    model.hf_device_map = {"model": "cuda:0", "lm_head": "cuda:1"}  # as accelerate records it
    with pytest.raises(ValueError, match=r"several devices \(cuda:0, cuda:1\)"):
        tp.apply_pruner(model, "fastv", keep_ratio=0.25)
    model.hf_device_map = {"model.vision_tower": "cpu", "model.language_model": "disk", "lm_head": "cuda:0"}
    tp.apply_pruner(model, "fastv", keep_ratio=0.25).remove()  # one device, the rest offloaded
