"""DyCoke against a small re-implementation of its official code, written from reading it: the temporal token
merging on random frames (several frame counts, grids and budgets, keep-all), its budgets where the
reference sets none, and the decode-time KV pruning; then both through a tiny Qwen2.5-VL with videos."""

import pytest
import torch
from conftest import shared_model
from helpers import ATOL, extend, greedy_with_logits, masked_recomputation, select_sample, selection_contexts

import tokenprune as tp
from tokenprune.context import SelectionContext
from tokenprune.methods.dycoke import frame_budgets, reference_frames
from tokenprune.registry import get_method
from tokenprune.testing import tiny_inputs

NEW_TOKENS = 4


def ttm_reference(feature: torch.Tensor, per_frame: int, merging_ratio: float, windows: bool = True):
    """The tokens KD-TAO/DyCoke's ``dycole_ttm`` keeps of a video ``[N, D]``, as indices in its output order.

    Re-implemented from commit dd74634, ``llava/model/llava_arch.py``: frames of ``per_frame`` tokens; each
    pair ``(i, i + 1)`` of even ``i``: frame ``i`` whole, frame ``i + 1`` its ``int((1 - merging_ratio) *
    per_frame)`` tokens least cosine-similar to frame ``i``'s same patch (``topk(largest=False)``); then for
    each ``i`` in ``range(0, frames - 4, 4)``, frame ``i + 2`` likewise against frame ``i``, replacing its
    entry. ``torch.stack`` of the second pass's empty list fails with four frames or fewer, as the
    reference does; ``windows=False`` skips that pass there (the deviation for short videos).
    """
    frames = feature.shape[0] // per_frame
    count = int((1 - merging_ratio) * per_frame)

    def tokens(f):
        return feature[f * per_frame : (f + 1) * per_frame]

    def whole(f):
        return torch.arange(f * per_frame, (f + 1) * per_frame)

    pairs = [
        torch.nn.functional.cosine_similarity(
            torch.nn.functional.normalize(tokens(i), dim=1),
            torch.nn.functional.normalize(tokens(i + 1), dim=1),
            dim=1,
        )
        for i in range(0, frames - 1, 2)
    ]
    pairs = torch.stack(pairs)
    kept = []
    for i in range(0, frames - 1, 2):
        kept.append(whole(i))
        kept.append((i + 1) * per_frame + pairs[i // 2].topk(count, largest=False).indices)
    starts = list(range(0, frames - 4, 4))
    if windows or starts:
        others = torch.stack(
            [torch.nn.functional.cosine_similarity(tokens(i), tokens(i + 2), dim=1) for i in starts]
        )
        for i in starts:
            kept[i] = whole(i)
            kept[i + 2] = (i + 2) * per_frame + others[i // 4].topk(count, largest=False).indices
    return torch.cat(kept)


def kv_reference(attention: torch.Tensor, start: int, length: int, ratio: float, previous=None):
    """What KD-TAO/DyCoke's decode step attends to from layer ``dycoke_l`` on: commit dd74634,
    ``llava/model/language_model/modeling_qwen2.py``, ``PrunableDynamicCache.dycoke_pruning`` and
    ``update_cache``. ``attention [H, C]`` is the step's token's row at layer ``dycoke_l - 1`` (softmax over
    the cache); its heads' mean at the ``length`` visual tokens from ``start`` is compared with the previous
    step's (``previous``): at cosine 0.9 or more the kept list stays reset, ``None`` (every entry); else the
    cache's indices outside the visual span and its ``int(length * (1 - ratio))`` of most attention.
    Returns that and this step's visual attention."""
    image = attention.mean(dim=0)[start : start + length]
    similarity = 0 if previous is None else torch.nn.functional.cosine_similarity(image, previous, dim=0)
    if similarity >= 0.9:
        return None, image
    top = image.topk(int(length * (1 - ratio)), sorted=False).indices + start
    every = torch.arange(attention.shape[1])
    return torch.cat([every[:start], top, every[start + length :]]), image


def ttm(features: torch.Tensor, frames: tuple[int, int, int] | None, keep: int, grid=None) -> torch.Tensor:
    ctx = SelectionContext(
        features=features, grid=grid, image_index=torch.zeros(len(features), dtype=torch.long), frames=frames
    )
    return get_method("dycoke").select(ctx, keep, {})


@pytest.mark.parametrize("frames", [5, 6, 8, 9, 12, 16])
@pytest.mark.parametrize(("rows", "cols"), [(4, 4), (3, 5), (7, 7)])
@pytest.mark.parametrize("merging_ratio", [0.7, 0.3, 0.55])
def test_merging_keeps_what_the_reference_keeps(frames, rows, cols, merging_ratio):
    """At the reference's count, the reference's tokens, each item of a batch of 3 as alone; a last frame
    without a partner (9 frames) is kept whole, where the reference drops it (the deviation, applied)."""
    per_frame = rows * cols
    g = torch.Generator().manual_seed(frames * 100 + per_frame)
    features = torch.randn(3, frames * per_frame, 16, generator=g)
    features[:, per_frame:] += 2 * features[:, :-per_frame]  # frames that resemble the one before
    expected = []
    for item in features:
        kept = ttm_reference(item, per_frame, merging_ratio)
        if frames % 2:
            kept = torch.cat([kept, torch.arange((frames - 1) * per_frame, frames * per_frame)])
        expected.append(kept.sort().values)
    expected = torch.stack(expected)
    got = ttm(features, (frames, rows, cols), expected.shape[1])
    assert torch.equal(got, expected)
    alone = ttm(features[1:2], (frames, rows, cols), expected.shape[1])
    assert torch.equal(alone, got[1:2])


@pytest.mark.parametrize("frames", [2, 3, 4])
def test_short_videos_follow_the_pairs(frames):
    """The reference fails on four frames or fewer (no full window); here its pairs prune them."""
    per_frame = 16
    features = torch.randn(2, frames * per_frame, 8, generator=torch.Generator().manual_seed(frames))
    with pytest.raises(RuntimeError):
        ttm_reference(features[0], per_frame, 0.7)
    expected = []
    for item in features:
        kept = ttm_reference(item, per_frame, 0.7, windows=False)
        if frames % 2:
            kept = torch.cat([kept, torch.arange((frames - 1) * per_frame, frames * per_frame)])
        expected.append(kept.sort().values)
    assert torch.equal(ttm(features, (frames, 4, 4), len(expected[0])), torch.stack(expected))


def test_budgets_of_any_size():
    """Anchors whole and the compared frames an equal share (the first ones one more); below the anchors'
    tokens, the anchors share the budget, each spread over its grid; keep-all keeps all."""
    refs = reference_frames(8)
    assert refs == [None, 0, 0, 2, None, 4, None, 6]  # the last window's third frame stays whole
    assert frame_budgets(refs, 16, 70) == [16, 5, 5, 4, 16, 4, 16, 4]
    assert frame_budgets(refs, 16, 20) == [7, 0, 0, 0, 7, 0, 6, 0]
    assert frame_budgets(refs, 16, 128) == [16] * 8
    features = torch.randn(2, 128, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ttm(features, (8, 4, 4), 128), torch.arange(128).expand(2, -1))
    for keep in (1, 20, 48, 70, 127):
        kept = ttm(features, (8, 4, 4), keep)
        assert kept.shape == (2, keep) and torch.equal(kept, kept.sort(dim=1).values)
        per_frame = torch.zeros(2, 128, dtype=torch.long).scatter_(1, kept, 1).view(2, 8, 16).sum(dim=-1)
        assert per_frame.tolist() == [frame_budgets(refs, 16, keep)] * 2
    kept = ttm(features, (8, 4, 4), 20)[0]
    first = kept[kept < 16]
    uniform = get_method("uniform").select(SelectionContext(features[:, :16], (4, 4), torch.zeros(2)), 7, {})
    assert torch.equal(first, uniform[0])


def test_an_image_is_one_frame():
    """No frames: one anchor, kept whole at keep-all, else the tokens ``uniform`` keeps."""
    features = torch.randn(2, 24, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ttm(features, None, 24, grid=(4, 6)), torch.arange(24).expand(2, -1))
    ctx = SelectionContext(features, (4, 6), torch.zeros(2, dtype=torch.long))
    for keep in (1, 9, 17):
        assert torch.equal(
            ttm(features, None, keep, grid=(4, 6)), get_method("uniform").select(ctx, keep, {})
        )
    assert ttm(features, None, 5).shape == (2, 5)  # no grid: a row


def test_kv_selection_is_the_references_at_each_step():
    """Random attention rows ``[H, C]``: the reference's kept visual entries are the method's, for each
    image alone (the reference's one video) and re-chosen at every step (its gate left out: a deviation)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 4, 60, generator=g).softmax(dim=-1)
    start, length = 7, 40
    for dycoke_p in (0.8, 0.5, 0.0):
        keep = int(length * (1 - dycoke_p))  # the reference's floor: 7 of 40 at 0.8 (round(0.2 * 40) is 8)
        ctx = SelectionContext(
            features=torch.empty(3, length, 0),
            grid=None,
            image_index=torch.zeros(3, dtype=torch.long),
            attention=rows.mean(dim=1)[:, start : start + length],
        )
        got = get_method("dycoke_kv").select(ctx, keep, {})
        for row, kept in zip(rows, got, strict=True):
            indices, _ = kv_reference(row, start, length, dycoke_p)
            expected = indices[(indices >= start) & (indices < start + length)] - start
            assert torch.equal(kept, expected.sort().values)
    _, first = kv_reference(rows[0], start, length, 0.8)
    assert kv_reference(rows[0], start, length, 0.8, previous=first)[0] is None  # the gate: every entry


def test_kv_layer_config():
    config = tp.PrunerConfig("dycoke_kv", keep_ratio=0.2)
    assert config.acting_layer == 3 and config.stage == "kv"
    assert tp.PrunerConfig("dycoke_kv", keep_ratio=0.2, layer=1).acting_layer == 1
    with pytest.raises(ValueError, match="layer must be >= 1"):
        tp.PrunerConfig("dycoke_kv", keep_ratio=0.2, layer=0)
    with pytest.raises(ValueError, match="acts at decode steps, from a decoder layer"):
        tp.PrunerConfig("dycoke_kv", keep_ratio=0.2, vision=tp.PrunerConfig("dycoke", keep_ratio=0.5))
    for family in ("qwen2_5_vl", "llava"):
        model = shared_model(family, "sdpa")
        with pytest.raises(ValueError, match="outside the language model's 4 layers"):
            tp.apply_pruner(model, "dycoke_kv", keep_ratio=0.2, layer=4)
        assert not hasattr(model, "_tokenprune_pruner")


def video_inputs(model, temporal_patches: int = 2) -> dict:
    """One prompt with one video: ``temporal_patches`` frames of 4x4 merged tokens."""
    inputs = tiny_inputs(model, (0,), videos_per_prompt=(1,), video_grid=(temporal_patches, 8, 8))
    return {name: value for name, value in inputs.items() if value is not None}  # no images


@pytest.mark.parametrize(("keep_ratio", "per_frame"), [(1 / 3, 0), (0.5, 4), (0.75, 10), (1.0, 16)])
def test_tiny_qwen_video_keeps_the_references_tokens(keep_ratio, per_frame):
    """A video of 6 frames of 16 merged tokens, as the method got them from the merger: anchors 0 and 4
    whole, and of frames 1, 2, 3 and 5 the tokens the reference keeps at its ``dycoke_k`` for that count;
    forward and a short ``generate``."""
    model = shared_model("qwen2_5_vl", "sdpa")
    inputs = video_inputs(model, 6)
    video = inputs["input_ids"][0] == model.config.video_token_id
    with (
        tp.pruned(model, "dycoke", keep_ratio=keep_ratio, media="videos") as pruner,
        selection_contexts() as contexts,
        torch.no_grad(),
    ):
        logits = model(**inputs).logits
        out = greedy_with_logits(model, inputs, NEW_TOKENS)
    stats, kept = pruner.stats, 32 + 4 * per_frame
    assert stats.stage == "vision" and stats.visual_tokens == [96] and stats.kept_tokens == [kept]
    assert contexts[0].frames == (6, 4, 4)
    expected = ttm_reference(contexts[0].features[0], 16, 1 - per_frame / 16).sort().values
    assert torch.equal(stats.keep_masks[0][0][video].nonzero()[:, 0], expected)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
    torch.testing.assert_close(out.logits[0], logits[:, -1], atol=ATOL, rtol=0)


def test_tiny_onevision_videos_keep_the_references_tokens():
    """LLaVA-OneVision, the reference's model: two videos of 4 frames of 4x4 pooled tokens (and a newline),
    ``keep_ratio=0.75``: frames 0 and 2 whole, 8 of frames 1 and 3 each, the reference's pairs (its window
    pass fails on 4 frames); the newline kept."""
    model = shared_model("llava_onevision", "sdpa")
    inputs = tiny_inputs(model, (0, 0), videos_per_prompt=(1, 1))
    inputs = {name: value for name, value in inputs.items() if value is not None}
    videos = inputs["input_ids"] == model.config.video_token_id
    with (
        tp.pruned(model, "dycoke", keep_ratio=0.75) as pruner,
        selection_contexts() as contexts,
        torch.no_grad(),
    ):
        model(**inputs)
    (ctx,) = [ctx for ctx in contexts if ctx.frames is not None]
    assert ctx.frames == (4, 4, 4) and pruner.stats.kept_tokens == [48, 48]  # the newline is structure
    for b in range(2):
        kept = pruner.stats.keep_masks[0][b][videos[b]]
        expected = ttm_reference(ctx.features[b], 16, 0.5, windows=False).sort().values
        assert torch.equal(kept[:-1].nonzero()[:, 0], expected) and bool(kept[-1])


def test_tiny_qwen_batch_equals_each_sample_alone():
    model = shared_model("qwen2_5_vl", "sdpa")
    images, videos = (1, 0, 2), (1, 2, 0)
    inputs = tiny_inputs(model, images, videos_per_prompt=videos)
    with tp.pruned(model, "dycoke", keep_ratio=0.75), torch.no_grad():
        batched = model(**inputs).logits[:, -1]
        for b in range(len(images)):
            alone = model(**select_sample(inputs, b, images, videos)).logits[:, -1]
            torch.testing.assert_close(batched[b : b + 1], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("budget", [8, 32])
def test_tiny_qwen_kv_steps_are_the_references(budget):
    """Eager Qwen2.5-VL, one video of 32 tokens, 4 layers: at each decode step layers 0-2 attend to every
    entry and layer 3 to the video tokens the reference ranks first by layer 2's attention of the step's
    token (from the unpatched model: the layers before 3 are unpruned), and the logits are the unpatched
    model's with the other video tokens hidden from that step's row in layer 3."""
    model = shared_model("qwen2_5_vl", "eager")
    inputs = video_inputs(model)
    ids = inputs["input_ids"][0]
    video = ids == model.config.video_token_id
    start, length = int(video.float().argmax()), int(video.sum())
    with tp.pruned(model, "dycoke_kv", budget=budget) as pruner:
        out = greedy_with_logits(model, inputs, NEW_TOKENS)
    stats = pruner.stats
    steps = stats.decode_keep_masks
    assert stats.stage == "kv" and stats.layer == 3 and stats.kept_tokens == [budget] and len(steps) == 3
    prompt = ids.shape[0]
    with torch.no_grad():
        grown = extend(inputs, out.sequences[:, prompt:-1])
        attentions = model(**grown, output_attentions=True, use_cache=False).attentions
    for s, step in enumerate(steps, start=1):
        row = prompt + s - 1
        assert all(bool(step[layer].all()) for layer in (0, 1, 2))
        indices, _ = kv_reference(attentions[2][0, :, row, : row + 1], start, length, 1 - budget / length)
        indices = indices.sort().values
        assert torch.equal(step[3][0].nonzero()[:, 0], indices[indices < prompt])
    for upto in range(1, NEW_TOKENS):
        expected = masked_recomputation(model, inputs, out.sequences, steps, upto)
        torch.testing.assert_close(out.logits[upto], expected, atol=ATOL, rtol=0)
