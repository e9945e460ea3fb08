"""The ``kv`` stage: decode steps attend to the visual entries their query selects, in every layer, while
the cache keeps them all. On every family: LLaVA, Qwen2/2.5/3-VL (images of several sizes and videos in one
batch) and LLaVA-NeXT / OneVision (tiles and newline rows)."""

import pytest
import torch
from conftest import shared_model
from helpers import (
    ATOL,
    cache_kwarg,
    greedy_with_logits,
    masked_recomputation,
    select_sample,
    tokenprune_hooks,
)
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

import tokenprune as tp
from tokenprune.testing import ANYRES_FAMILIES, FAMILIES, QWEN_FAMILIES, tiny_inputs, tiny_model

#: every kv method, for the invariants (the tests of sparsevila's own choices name it)
KV_METHODS = sorted(m for m, (stage, _) in tp.list_methods().items() if stage == "kv")
RAGGED = (1, 2, 1)
NEW_TOKENS = 4
#: Qwen-VL prompts: images of 64, 24, 48 and 32 tokens, and videos of 32 tokens (Qwen3-VL: 2 frames of 16)
QWEN_PATCHES = ((16, 16), (8, 12), (12, 16), (16, 8))
QWEN_VIDEOS = (1, 0, 2)


@pytest.fixture(params=FAMILIES)
def vlm(request, attn):
    """The tiny model of every VLM family for ``attn``, shared; left unpatched by the test."""
    m = shared_model(request.param, attn)
    yield m
    assert not hasattr(m, "_tokenprune_pruner"), "test left a pruner on the shared model"


def media_inputs(model) -> dict:
    """A ragged batch of ``RAGGED`` images per prompt; Qwen-VL's of several sizes, with videos too."""
    if model.config.model_type in QWEN_FAMILIES:
        return tiny_inputs(model, RAGGED, image_patches=QWEN_PATCHES, videos_per_prompt=QWEN_VIDEOS)
    return tiny_inputs(model, RAGGED)


def sample_alone(model, inputs: dict, b: int) -> dict:
    videos = QWEN_VIDEOS if model.config.model_type in QWEN_FAMILIES else None
    return select_sample(inputs, b, RAGGED, videos)


def media_items(model, inputs: dict) -> tuple[torch.Tensor, list[list[int]]]:
    """What the kv stage may hide, found from the model's own inputs: ``[B, L]`` bool over the image and
    video placeholders that hold patches (not LLaVA-NeXT's newline rows), and the patch tokens of each
    prompt's images and videos (a Qwen3-VL video is one item across its frames)."""
    ids = inputs["input_ids"]
    config = model.config
    if config.model_type in QWEN_FAMILIES:
        merge = config.vision_config.spatial_merge_size**2
        images = [int(t * h * w) // merge for t, h, w in inputs["image_grid_thw"].tolist()]
        videos = [int(t * h * w) // merge for t, h, w in inputs["video_grid_thw"].tolist()]
        images, videos = iter(images), iter(videos)
        items = [
            [next(images) for _ in range(i)] + [next(videos) for _ in range(v)]
            for i, v in zip(RAGGED, QWEN_VIDEOS, strict=True)
        ]
        return (ids == config.image_token_id) | (ids == config.video_token_id), items
    placeholders = ids == config.image_token_id
    if config.model_type not in ANYRES_FAMILIES:
        count = int(placeholders.sum()) // sum(RAGGED)
        return placeholders, [[count] * n for n in RAGGED]
    with torch.no_grad():  # the packed features of each image: newline rows are the learned newline
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    newline = [(feature == model.model.image_newline).all(dim=-1) for feature in packed]
    patches = placeholders.clone()
    patches[placeholders] = ~torch.cat(newline)
    counts = iter([int((~n).sum()) for n in newline])
    return patches, [[next(counts) for _ in range(n)] for n in RAGGED]


@pytest.mark.parametrize("method", KV_METHODS)
def test_keep_all_generates_what_the_unpatched_model_does(vlm, method):
    model, inputs = vlm, media_inputs(vlm)
    with torch.no_grad():
        expected = greedy_with_logits(model, inputs, NEW_TOKENS)
    with tp.pruned(model, method, keep_ratio=1.0) as pruner:
        got = greedy_with_logits(model, inputs, NEW_TOKENS)
    assert torch.equal(got.sequences, expected.sequences)
    for g, e in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)
    assert len(pruner.stats.decode_keep_masks) == NEW_TOKENS - 1


@pytest.mark.parametrize("method", KV_METHODS)
@pytest.mark.parametrize("keep_ratio", [0.25, 0.05])
def test_each_step_equals_recomputation_with_its_selection_masked(vlm, keep_ratio, method):
    model, inputs = vlm, media_inputs(vlm)
    with tp.pruned(model, method, keep_ratio=keep_ratio) as pruner:
        out = greedy_with_logits(model, inputs, NEW_TOKENS)
    steps = pruner.stats.decode_keep_masks
    assert len(steps) == NEW_TOKENS - 1
    for upto in range(1, NEW_TOKENS):
        expected = masked_recomputation(model, inputs, out.sequences, steps, upto)
        torch.testing.assert_close(out.logits[upto], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("family", "keep_ratio", "cache"),
    [
        ("llava", 0.25, "dynamic"),
        ("llava", 0.05, "static"),
        ("qwen3_vl", 0.25, "static"),
    ],
)
def test_the_selection_kernel_selects_what_the_method_selects(
    kernels, family, monkeypatch, keep_ratio, cache
):
    """Each layer of each step selected in one Triton kernel, attention by sdpa (where Triton runs) against
    the method itself and eager attention over the same scores (elsewhere): the same tokens visible in
    every layer and step, and the same logits. (The interpreter runs each kernel program in Python: LLaVA,
    and Qwen3-VL for grouped heads, videos and a static cache, not every family (LLaVA-NeXT's 200-500 image
    tokens a prompt take minutes); a decode step attends through the kv hooks whatever the model's
    attention.)"""
    model = shared_model(family, "sdpa")
    inputs = media_inputs(model)
    runs = []
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        with tp.pruned(model, "sparsevila", keep_ratio=keep_ratio) as pruner:
            out = greedy_with_logits(model, inputs, NEW_TOKENS, cache_implementation=cache)
        runs.append((out, pruner.stats.decode_keep_masks))
    (fused, fused_steps), (method, method_steps) = runs
    assert torch.equal(fused.sequences, method.sequences)
    for f, m in zip(fused.logits, method.logits, strict=True):
        torch.testing.assert_close(f, m, atol=1e-5, rtol=0)
    assert len(fused_steps) == len(method_steps) == NEW_TOKENS - 1
    for f, m in zip(fused_steps, method_steps, strict=True):
        assert sorted(f) == sorted(m) and all(torch.equal(f[layer], m[layer]) for layer in m)


@pytest.mark.parametrize("keep", [{"budget": 10}, {"keep_ratio": 0.25}])
def test_each_layer_selects_the_configured_count_per_image(vlm, keep):
    """Each image and video (of its own size) shows its count to every layer and step; text, and LLaVA-NeXT's
    newline rows, are never hidden."""
    model, inputs = vlm, media_inputs(vlm)
    patches, items = media_items(model, inputs)
    if "budget" in keep:
        expected = [keep["budget"] * len(sizes) for sizes in items]
    else:
        expected = [sum(round(keep["keep_ratio"] * n) for n in sizes) for sizes in items]
    with tp.pruned(model, "sparsevila", **keep) as pruner:
        greedy_with_logits(model, inputs, NEW_TOKENS)
    stats = pruner.stats
    assert stats.stage == "kv" and stats.kept_tokens == expected
    assert stats.visual_tokens == [sum(sizes) for sizes in items]
    selections = set()
    for step in stats.decode_keep_masks:
        assert sorted(step) == list(range(len(model.model.language_model.layers)))
        for visible in step.values():
            assert (visible & patches).sum(dim=1).tolist() == expected
            assert bool(visible[~patches].all())  # text (and newline rows) are never hidden
            selections.add(tuple((visible & patches).nonzero()[:, 1].tolist()))
    assert len(selections) > 1  # queries of different layers and steps choose differently


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llava"])
def test_attention_implementations_select_alike(family):
    """eager and sdpa (the route the kv hooks replace at decode) give the same steps and logits."""
    runs = []
    for attn in ("eager", "sdpa"):
        model = shared_model(family, attn)
        with tp.pruned(model, "sparsevila", keep_ratio=0.25) as pruner:
            runs.append((greedy_with_logits(model, media_inputs(model), NEW_TOKENS), pruner.stats))
    (eager, eager_stats), (sdpa, sdpa_stats) = runs
    assert torch.equal(eager.sequences, sdpa.sequences)
    for e, s in zip(eager.logits, sdpa.logits, strict=True):
        torch.testing.assert_close(e, s, atol=ATOL, rtol=0)
    for e, s in zip(eager_stats.decode_keep_masks, sdpa_stats.decode_keep_masks, strict=True):
        assert all(torch.equal(e[layer], s[layer]) for layer in e)


@pytest.mark.parametrize(("media", "token"), [("images", "video_token_id"), ("videos", "image_token_id")])
def test_media_picks_what_a_step_may_hide(media, token):
    """On Qwen-VL, ``media`` leaves the other kind of visual token always visible."""
    model = shared_model("qwen2_5_vl", "sdpa")
    inputs = media_inputs(model)
    with tp.pruned(model, "sparsevila", keep_ratio=0.25, media=media) as pruner:
        greedy_with_logits(model, inputs, NEW_TOKENS)
    untouched = inputs["input_ids"] == getattr(model.config, token)
    steps = pruner.stats.decode_keep_masks
    assert steps and all(bool(visible[untouched].all()) for step in steps for visible in step.values())
    assert all(bool((~visible).any()) for step in steps for visible in step.values())


def test_the_cache_keeps_every_visual_entry(model):
    inputs = tiny_inputs(model, RAGGED)
    cache = DynamicCache(config=model.config.text_config)
    length = inputs["input_ids"].shape[1]
    with tp.pruned(model, "sparsevila", keep_ratio=0.25), torch.no_grad():
        model.generate(**inputs, **cache_kwarg(cache), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert [cache.get_seq_length(i) for i in range(len(cache.layers))] == [length + 2] * len(cache.layers)


@pytest.mark.parametrize("method", KV_METHODS)
def test_batch_equals_each_sample_alone(vlm, method):
    model, inputs = vlm, media_inputs(vlm)
    with tp.pruned(model, method, keep_ratio=0.25):
        batched = greedy_with_logits(model, inputs, NEW_TOKENS)
        for b in range(len(RAGGED)):
            alone = greedy_with_logits(model, sample_alone(model, inputs, b), NEW_TOKENS)
            assert torch.equal(batched.sequences[b, -NEW_TOKENS:], alone.sequences[0, -NEW_TOKENS:])
            for g, a in zip(batched.logits, alone.logits, strict=True):
                torch.testing.assert_close(g[b : b + 1], a, atol=ATOL, rtol=0)


def test_text_only_and_remove(vlm):
    model = vlm
    text = tiny_inputs(model, (0, 0))
    inputs = media_inputs(model)
    with torch.no_grad():
        expected = greedy_with_logits(model, inputs, NEW_TOKENS)
        text_expected = model(**text).logits
    pruner = tp.apply_pruner(model, "sparsevila", keep_ratio=0.25)
    with torch.no_grad():
        assert torch.equal(model(**text).logits, text_expected)
    assert pruner.stats.visual_tokens == [0, 0]
    greedy_with_logits(model, inputs, NEW_TOKENS)
    tp.remove_pruner(model)
    assert not tokenprune_hooks(model)
    for layer in model.model.language_model.layers:  # each attention's own config and function again
        assert layer.self_attn.config is model.config.text_config
        assert not hasattr(layer.self_attn, "_tokenprune_attention")
    assert torch.equal(greedy_with_logits(model, inputs, NEW_TOKENS).sequences, expected.sequences)


def test_an_attention_that_reads_its_name_off_the_config_sees_its_own():
    """FlashAttention's function reads ``module.config._attn_implementation`` to pick its kernel: at a
    prefill, routed through the kv hooks, it still reads its own name, and computes what it did before."""
    seen = []

    def reads_its_name(module, *args, **kwargs):
        seen.append(module.config._attn_implementation)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, *args, **kwargs)

    AttentionInterface.register("name_reading_probe", reads_its_name)
    model = tiny_model("llava", attn_implementation="name_reading_probe")
    inputs = tiny_inputs(model, RAGGED)
    with torch.no_grad():
        expected = model(**inputs).logits
        with tp.pruned(model, "sparsevila", keep_ratio=0.25):
            got = model(**inputs).logits
    assert torch.equal(got, expected)
    assert set(seen) == {"name_reading_probe"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_ratio": 0.25, "layer": 2}, "acts at decode steps"),
        ({"keep_ratio": 0.25, "drop_early_kv": True}, "acts at decode steps"),
        ({"budget": 65}, "larger than the 64 visual tokens"),
    ],
)
def test_bad_kv_config(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tp.apply_pruner(model, "sparsevila", **kwargs)
    assert not tokenprune_hooks(model)


def test_a_static_cache_without_an_attention_mask_decodes_as_a_dynamic_one(model):
    """``generate`` with no mask (an unpadded prompt): each step's mask covers the static cache's slots."""
    unpadded = tiny_inputs(model, (2,))
    inputs = {k: v for k, v in unpadded.items() if k not in ("attention_mask", "position_ids")}
    with tp.pruned(model, "sparsevila", keep_ratio=0.25), torch.no_grad():
        dynamic = greedy_with_logits(model, inputs)
        static = greedy_with_logits(model, inputs, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    for s, d in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(s, d, atol=ATOL, rtol=0)
