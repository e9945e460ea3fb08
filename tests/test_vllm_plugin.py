"""The vLLM plugin's logic, tested without vLLM: the config it reads, the placeholder count it reports and
the embedding rows it keeps, which must be the ones the transformers path keeps (LLaVA-1.5, LLaVA-NeXT,
Qwen2.5-VL), and the unpruned layout the Qwen2.5-VL positions are gathered from."""

import pytest
import torch
from helpers import recorded_image_features

import tokenprune as tp
from tokenprune.sequence import image_ids_by_runs
from tokenprune.testing import tiny_inputs, tiny_model
from tokenprune.vllm_plugin import (
    next_placeholder_count,
    placeholder_count,
    plugin_config,
    qwen_grid,
    qwen_placeholder_count,
    qwen_position_cells,
    select_embeddings,
    select_next_embeddings,
    unpruned_layout,
)

METHODS = ["divprune", "idpruner", "uniform"]


class HFConfig:
    def __init__(self, **attributes):
        self.__dict__.update(attributes)


def test_config_from_hf_overrides_then_environment():
    config = plugin_config(HFConfig(tokenprune_method="divprune", tokenprune_keep_ratio=0.25), environ={})
    assert (config.method, config.keep_ratio) == ("divprune", 0.25)
    env = {"TOKENPRUNE_METHOD": "uniform", "TOKENPRUNE_BUDGET": "64"}
    config = plugin_config(HFConfig(), environ=env)
    assert (config.method, config.budget) == ("uniform", 64)
    assert plugin_config(HFConfig(), environ={}) is None


@pytest.mark.parametrize(
    ("attributes", "match"),
    [
        (
            {"tokenprune_method": "fastv", "tokenprune_keep_ratio": 0.25},
            "not 'fastv' \\(llm, needs \\['attention'\\]\\)",
        ),
        ({"tokenprune_method": "tome", "tokenprune_keep_ratio": 0.25}, "not 'tome'"),
        ({"tokenprune_method": "uniform", "tokenprune_keep_ratio": 1.5}, r"\(0, 1\]"),
        ({"tokenprune_method": "nope", "tokenprune_budget": 4}, "registered methods"),
    ],
)
def test_methods_the_plugin_cannot_run_are_refused(attributes, match):
    with pytest.raises(ValueError, match=match):
        plugin_config(HFConfig(**attributes), environ={})


def test_placeholder_count():
    config = tp.PrunerConfig("uniform", keep_ratio=0.111)
    assert placeholder_count(576, config) == 64
    assert placeholder_count(576, None) == 576
    with pytest.raises(ValueError, match="larger than the 10 visual tokens"):
        placeholder_count(10, tp.PrunerConfig("uniform", budget=11))


@pytest.mark.parametrize("method", METHODS)
def test_the_plugin_keeps_what_the_transformers_path_keeps(model, method):
    """The same tiny LLaVA pruned before the language model by the HF adapter: the rows it keeps of each
    image's projected features are the rows the plugin returns. (``random`` is seeded by an image's place
    in its prompt, which the plugin does not see: it draws every image as a prompt's first.)"""
    images = (1, 2, 1)
    inputs = tiny_inputs(model, images)
    config = tp.PrunerConfig(method, keep_ratio=0.25)
    with tp.pruned(model, config) as pruner, recorded_image_features(model) as recorded, torch.no_grad():
        model(**inputs)
    features = recorded[-1]  # [4, 64, D], the images in prompt order
    keep = pruner.stats.keep_mask
    visual = inputs["input_ids"] == model.config.image_token_id
    expected = []
    for b, count in enumerate(images):
        kept_positions = keep[b][visual[b]].view(count, 64)
        expected += [features[sum(images[:b]) + i][kept_positions[i]] for i in range(count)]
    got = select_embeddings(list(features), config, [(8, 8)] * 4)
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


def test_images_of_different_sizes_are_selected_apart():
    g = torch.Generator().manual_seed(0)
    embeddings = [
        torch.randn(64, 8, generator=g),
        torch.randn(36, 8, generator=g),
        torch.randn(64, 8, generator=g),
    ]
    config = tp.PrunerConfig("divprune", keep_ratio=0.25)
    got = select_embeddings(embeddings, config, [(8, 8), (6, 6), (8, 8)])
    assert [tuple(t.shape) for t in got] == [(16, 8), (9, 8), (16, 8)]
    for rows, source in zip(got, embeddings, strict=True):
        positions = [int((source == row).all(-1).nonzero()) for row in rows]
        assert positions == sorted(positions)  # kept rows in their original order
    assert select_embeddings(embeddings, None, [None] * 3) == embeddings


@pytest.fixture(scope="module")
def llava_next():
    return tiny_model("llava_next")


@pytest.fixture(scope="module")
def qwen2_5_vl():
    return tiny_model("qwen2_5_vl")


def transformers_path(model, inputs: dict, config: tp.PrunerConfig):
    """Run ``model`` pruned by its HF adapter; returns the rows the language model received for each image
    ``[N_i, D]`` (in prompt order), the keep flags ``[N_i]`` the adapter gave them, and its keep mask over
    the prompt ``[B, L]``."""
    received = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: received.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        with tp.pruned(model, config) as pruner, torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    images = image_ids_by_runs(inputs["input_ids"] == model.config.image_token_id)
    embeds, keep = received[0], pruner.stats.keep_mask
    rows, flags = [], []
    for image in range(int(images.max()) + 1):  # numbered prompt by prompt
        run = images == image
        rows.append(embeds[run])
        flags.append(keep[run])
    return rows, flags, keep


@pytest.mark.parametrize("method", METHODS)
def test_llava_next_counts_and_rows_are_the_transformers_paths(llava_next, method):
    """Tiny LLaVA-NeXT, images of three aspect ratios: each image's placeholder count is its newline rows
    plus the kept count of its other rows, and the rows the plugin returns are the rows the adapter kept."""
    config = tp.PrunerConfig(method, keep_ratio=0.3)
    rows, flags, _ = transformers_path(llava_next, tiny_inputs(llava_next, (1, 2, 1)), config)
    newline = llava_next.model.image_newline.detach()
    got = select_next_embeddings(rows, newline, config)
    assert len({r.shape[0] for r in rows}) == 3  # the three sizes
    for image, kept, flag in zip(rows, got, flags, strict=True):
        newline_rows = int((image == newline).all(-1).sum())
        assert newline_rows > 0
        assert int(flag.sum()) == next_placeholder_count(image.shape[0], newline_rows, config)
        assert torch.equal(kept, image[flag])


@pytest.mark.parametrize("method", METHODS)
def test_qwen2_5_vl_counts_and_rows_are_the_transformers_paths(qwen2_5_vl, method):
    """Tiny Qwen2.5-VL, images of two sizes: the placeholder count is the kept count of the merged tokens of
    each image's grid_thw, and the rows the plugin returns (uniform on the merged grid) are the kept rows."""
    patches = ((16, 16), (8, 12), (16, 16))
    inputs = tiny_inputs(qwen2_5_vl, (2, 1), image_patches=patches)
    config = tp.PrunerConfig(method, keep_ratio=0.3)
    rows, flags, _ = transformers_path(qwen2_5_vl, inputs, config)
    merge = qwen2_5_vl.config.vision_config.spatial_merge_size
    grids = inputs["image_grid_thw"].tolist()
    got = select_embeddings(rows, config, [qwen_grid(grid, merge) for grid in grids])
    for image, kept, flag, grid in zip(rows, got, flags, grids, strict=True):
        assert image.shape[0] == qwen_placeholder_count(grid, merge, None)
        assert int(flag.sum()) == qwen_placeholder_count(grid, merge, config)
        assert torch.equal(kept, image[flag])


@pytest.mark.parametrize("method", METHODS)
def test_qwen2_5_vl_positions_gathered_from_the_unpruned_layout(qwen2_5_vl, method):
    """The pruned prompt's tokens mapped back into the unpruned prompt: text keeps its own place (hence its
    unpruned mRoPE positions) under every method; each image's placeholders stand for the cells uniform
    keeps, which under ``uniform`` are exactly the tokens the transformers path kept, so their positions
    are those tokens' own."""
    inputs = tiny_inputs(qwen2_5_vl, (2,), image_patches=((16, 16), (8, 12)))
    config = tp.PrunerConfig(method, keep_ratio=0.3)
    _, _, keep = transformers_path(qwen2_5_vl, inputs, config)
    merge = qwen2_5_vl.config.vision_config.spatial_merge_size
    visual = inputs["input_ids"][0] == qwen2_5_vl.config.image_token_id
    images = image_ids_by_runs(visual[None])[0]
    kept = keep[0].nonzero().squeeze(1)  # unpruned indices of the tokens that reached the language model
    pruned_images = images[kept]
    items = [
        (
            int((pruned_images == i).nonzero()[0]),
            int((images == i).sum()),
            qwen_position_cells(grid, merge, config),
        )
        for i, grid in enumerate(inputs["image_grid_thw"].tolist())
    ]
    index, offsets = unpruned_layout(kept.numel(), items)
    assert offsets == [int((images == i).nonzero()[0]) for i in range(len(items))]
    text = pruned_images < 0
    assert torch.equal(index[text], kept[text])
    assert bool((images[index] == pruned_images).all())  # every placeholder maps into its own image
    if method == "uniform":
        assert torch.equal(index, kept)


def test_unpruned_layout_by_hand():
    """Text, an image of 6 tokens kept as cells 1 and 4, text, a video of 3 tokens kept whole, text."""
    index, offsets = unpruned_layout(9, [(2, 6, torch.tensor([1, 4])), (5, 3, torch.arange(3))])
    assert index.tolist() == [0, 1, 3, 6, 8, 9, 10, 11, 12]
    assert offsets == [2, 9]
    assert torch.equal(
        qwen_position_cells((2, 8, 8), 2, tp.PrunerConfig("uniform", budget=4)), torch.arange(32)
    )


@pytest.mark.parametrize(
    ("count", "match"),
    [
        (lambda config: next_placeholder_count(100, 10, config), "larger than the 90 visual tokens"),
        (lambda config: qwen_placeholder_count((1, 8, 8), 2, config), "larger than the 16 visual tokens"),
        (lambda config: placeholder_count(16, config), "larger than the 16 visual tokens"),
    ],
)
def test_a_budget_larger_than_an_image_is_refused(count, match):
    with pytest.raises(ValueError, match=match):
        count(tp.PrunerConfig("uniform", budget=91 if "90" in match else 17))


def test_llava_next_selection_refuses_a_budget_over_the_visual_rows():
    newline = torch.ones(4)
    rows = torch.cat([torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), newline[None]])
    with pytest.raises(ValueError, match="larger than the 6 visual tokens"):
        select_next_embeddings([rows], newline, tp.PrunerConfig("divprune", budget=7))
    (kept,) = select_next_embeddings([rows], newline, tp.PrunerConfig("divprune", budget=6))
    assert torch.equal(kept, rows)


def test_register_replaces_the_supported_architectures_on_its_vllm_series(monkeypatch):
    """With a stand-in ``vllm`` module: the entry point registers the pruned class by its import path on
    0.33.x, and only warns on another release (vLLM itself cannot run on this CPU-only machine)."""
    import sys
    import types

    import tokenprune.vllm_plugin as plugin

    registered = {}
    fake = types.ModuleType("vllm")
    fake.ModelRegistry = types.SimpleNamespace(
        register_model=lambda arch, cls: registered.update({arch: cls})
    )
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(plugin, "version", lambda name: "0.33.1")
    plugin.register()
    assert registered == {
        arch: f"tokenprune.vllm_models:Pruned{arch}"
        for arch in (
            "LlavaForConditionalGeneration",
            "LlavaNextForConditionalGeneration",
            "Qwen2_5_VLForConditionalGeneration",
        )
    }
    registered.clear()
    monkeypatch.setattr(plugin, "version", lambda name: "0.34.0")
    with pytest.warns(UserWarning, match="written for vLLM 0.33.x, found 0.34.0"):
        plugin.register()
    assert registered == {}


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "tokenprune"]
    assert entry.value == "tokenprune.vllm_plugin:register"
