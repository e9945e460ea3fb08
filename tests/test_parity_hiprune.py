"""HiPrune against a small re-implementation of its official selection, written from reading that code, on
identical random inputs: the same patches must be kept once the deviations its docstring lists are
applied."""

import pytest
import torch

import tokenprune as tp
from tokenprune.attention import query_attention
from tokenprune.context import SelectionContext
from tokenprune.registry import get_method
from tokenprune.testing import tiny_encoder, tiny_pixels

SIDE = 24  # CLIP-L/336's 24x24 patch grid, the one the reference hard-codes
OBJECT_LAYER = 9  # the reference's HIPRUNE_OBJECT_LAYER default, counted from 1
HEADS, HEAD_DIM = 4, 16


def reference_received(maps: torch.Tensor) -> torch.Tensor:
    """What the reference ranks patches by, from one layer's attention weights ``[B, H, 1 + N, 1 + N]``
    (CLS first): the mean over heads, then over every query (CLS included), without the CLS key."""
    return maps.mean(dim=1).mean(dim=1)[:, 1:]


def reference_anchors_and_buffers(shallow: torch.Tensor, budget: int, alpha: float, width: int | None):
    """The reference's anchors and buffers of one image, ``shallow [N]``: the ``round(budget * alpha / 5)``
    top patches, each with the patches at flat offsets -1, +1, -width, +width, clamped to ``[0, N)`` and
    deduplicated (``width=None``: anchors alone, the documented deviation without a grid)."""
    anchors = shallow.topk(round(budget * alpha / 5)).indices
    offsets = [0] if width is None else [0, -1, 1, -width, width]
    return torch.cat([anchors + o for o in offsets]).clamp(0, shallow.shape[0] - 1).unique()


def reference_selection(
    shallow_maps: torch.Tensor,
    deep_maps: torch.Tensor,
    budget: int,
    alpha: float = 0.1,
    width: int | None = SIDE,
) -> list[set[int]]:
    """Danielement321/HiPrune (commit 6e83a12, ``LLaVA/llava/model/llava_arch.py``:
    ``LlavaMetaForCausalLM.encode_images``, with the attentions ``CLIPVisionTower`` returns from
    ``LLaVA/llava/model/multimodal_encoder/clip_encoder.py``), re-implemented: image by image, the anchors
    and buffers from the object layer's attention, then ``budget`` minus their count registers, the top of
    the feature layer's attention after 1 is subtracted from the patches already chosen. Returns the kept
    patches of each image. (The reference's 24 is ``width`` here, as its Qwen2.5-VL code takes the grid's.)"""
    shallow, deep = reference_received(shallow_maps), reference_received(deep_maps)
    kept = []
    for i in range(shallow.shape[0]):
        chosen = reference_anchors_and_buffers(shallow[i], budget, alpha, width)
        taken = torch.zeros_like(deep[i], dtype=torch.int).index_fill_(0, chosen, 1)
        registers = (deep[i] - taken).topk(budget - chosen.numel()).indices
        kept.append(set(torch.cat([chosen, registers]).tolist()))
    return kept


def random_projections(images: int, patches: int, seed: int, hot: tuple[int, ...] = ()):
    """Random queries and keys ``[B, H, 1 + N, d]`` of one layer; the ``hot`` patches get a key component
    every query matches, so that they receive the most attention (anchors at the grid's edges)."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(images, HEADS, 1 + patches, HEAD_DIM, generator=g)
    keys = torch.randn(images, HEADS, 1 + patches, HEAD_DIM, generator=g)
    for rank, patch in enumerate(hot):
        query[..., -1] = 4.0
        keys[..., 1 + patch, -1] = 3.0 - 0.1 * rank
    return query, keys


def ours_and_reference_inputs(query: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's attention as our vision adapter computes it (from queries and keys, every query,
    ``[B, N]``) and the eager attention weights the reference reads ``[B, H, 1 + N, 1 + N]``."""
    scale = HEAD_DIM**-0.5
    mask = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool)
    ours = query_attention(query, keys, mask, scale)[:, 1:]
    return ours, (query @ keys.transpose(-1, -2) * scale).softmax(dim=-1)


def select(anchor: torch.Tensor, output: torch.Tensor, keep: int, grid, **options) -> list[set[int]]:
    """Our method's kept patches of each image, given the attention at layers 8 and 22."""
    num_images, num_patches = anchor.shape
    ctx = SelectionContext(
        features=torch.zeros(num_images, num_patches, 4),
        grid=grid,
        image_index=torch.zeros(num_images, dtype=torch.long),
        encoder_attention={8: anchor, 22: output},
    )
    index = get_method("hiprune").select(ctx, keep, options)
    return [set(row.tolist()) for row in index]


# first and last rows (a row away clamps to patch 0 or 575), a row's end and a row's start (1 away wraps)
EDGES = (5, 570, 24 * 5 + 23, 24 * 7)


@pytest.mark.parametrize("budget", [64, 144, 192])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("alpha", "hot"), [(0.1, ()), (0.5, EDGES)])
def test_hiprune_keeps_what_the_reference_keeps(budget, seed, alpha, hot):
    """576 patches (+CLS) of 4 images on a 24x24 grid, random attention at the object and output layers;
    with ``hot`` edge patches as anchors, their buffers wrap across rows and clamp to the sequence."""
    anchor, anchor_maps = ours_and_reference_inputs(*random_projections(4, SIDE * SIDE, seed, hot))
    output, output_maps = ours_and_reference_inputs(*random_projections(4, SIDE * SIDE, seed + 100))
    expected = reference_selection(anchor_maps, output_maps, budget, alpha)
    assert select(anchor, output, budget, (SIDE, SIDE), alpha=alpha) == expected
    cls_row = anchor_maps.mean(dim=1)[:, 0, 1:]  # the CLS query's attention would choose otherwise
    assert select(cls_row, output, budget, (SIDE, SIDE), alpha=alpha) != expected


@pytest.mark.parametrize("seed", [0, 1])
def test_hiprune_buffers_follow_the_grid_width(seed):
    """A 16x16 grid: the buffers one row away are 16 patches away (the reference's Qwen2.5-VL width)."""
    anchor, anchor_maps = ours_and_reference_inputs(*random_projections(3, 256, seed, (3, 250, 15, 16 * 4)))
    output, output_maps = ours_and_reference_inputs(*random_projections(3, 256, seed + 100))
    expected = reference_selection(anchor_maps, output_maps, 64, 0.5, width=16)
    assert select(anchor, output, 64, (16, 16), alpha=0.5) == expected


def test_hiprune_keeps_the_best_anchors_and_buffers_when_they_outnumber_the_budget():
    """Deviation: 2 anchors with their buffers (up to 10) for a budget of 8, where the reference fails;
    ours keeps the 8 of them most attended at the anchor layer."""
    anchor, anchor_maps = ours_and_reference_inputs(*random_projections(3, SIDE * SIDE, 0))
    output, output_maps = ours_and_reference_inputs(*random_projections(3, SIDE * SIDE, 100))
    with pytest.raises(RuntimeError):
        reference_selection(anchor_maps, output_maps, 8, alpha=1.0)
    shallow = reference_received(anchor_maps)
    expected = []
    for i in range(3):
        chosen = reference_anchors_and_buffers(shallow[i], 8, 1.0, SIDE)
        assert chosen.numel() > 8
        expected.append(set(chosen[shallow[i][chosen].topk(8).indices].tolist()))
    assert select(anchor, output, 8, (SIDE, SIDE), alpha=1.0) == expected


def test_hiprune_without_a_grid_keeps_anchors_and_registers():
    """Deviation: without a patch grid the anchors get no buffers."""
    anchor, anchor_maps = ours_and_reference_inputs(*random_projections(3, SIDE * SIDE, 2))
    output, output_maps = ours_and_reference_inputs(*random_projections(3, SIDE * SIDE, 102))
    expected = reference_selection(anchor_maps, output_maps, 144, 0.5, width=None)
    assert select(anchor, output, 144, None, alpha=0.5) == expected
    assert expected != reference_selection(anchor_maps, output_maps, 144, 0.5)


def test_hiprune_reads_the_object_layer_and_the_output_layer():
    """The anchor layer defaults to the reference's object layer 9 (8 counted from 0), or the output
    layer of a shallower encoder; registers come from the output layer; every query's attention."""
    spec = get_method("hiprune")
    assert spec.encoder_layers({}, 22) == (8, 22)
    assert spec.encoder_layers({}, 5) == (5, 5)
    assert spec.encoder_layers({"anchor_layer": 3}, 22) == (3, 22)
    assert spec.encoder_queries == "all"


@pytest.mark.parametrize("budget", [64, 144, 192])
def test_hiprune_on_an_encoder_keeps_what_the_reference_keeps(budget):
    """End to end on a CLIP encoder (3 images, batched): the reference reads the encoder's own eager
    attention weights at the object layer and at the layer whose output is used (the last here, a
    standalone encoder's); ours recomputes attention in its hooks. The kept patches are the rows of the
    pruned output found, unchanged, in the unpruned one."""
    model = tiny_encoder("clip", "eager", num_layers=10, patches_per_side=24)  # CLIP-L/336's 24x24 grid
    pixels = tiny_pixels(model, 3, seed=budget)
    with torch.no_grad():
        full = model(pixel_values=pixels, output_attentions=True)
        with tp.pruned(model, "hiprune", budget=budget):
            pruned = model(pixel_values=pixels).last_hidden_state
    expected = reference_selection(full.attentions[OBJECT_LAYER - 1], full.attentions[-1], budget)
    patches = full.last_hidden_state[:, 1:]
    for i in range(3):
        found = (pruned[i, 1:, None] == patches[i, None]).all(dim=-1).nonzero()
        assert found[:, 0].tolist() == list(range(budget))  # each kept row is exactly one patch
        assert set(found[:, 1].tolist()) == expected[i]
