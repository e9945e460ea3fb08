"""The vLLM plugin's logic, tested without vLLM: the config it reads, the placeholder count it reports and
the embedding rows it keeps, which must be the ones the transformers path keeps."""

import pytest
import torch
from helpers import recorded_image_features

import tokenprune as tp
from tokenprune.testing import tiny_inputs
from tokenprune.vllm_plugin import placeholder_count, plugin_config, select_embeddings


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


@pytest.mark.parametrize("method", ["divprune", "idpruner", "uniform"])
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


def test_register_replaces_llava_only_on_the_vllm_series_it_is_written_for(monkeypatch):
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
        "LlavaForConditionalGeneration": "tokenprune.vllm_models:PrunedLlavaForConditionalGeneration"
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
