"""FastVID against a small re-implementation of its official Qwen2.5-VL code, written from reading it: random
videos with scene changes and near-duplicate frames (segmentation, per-segment quotas, salient tokens,
density-peak anchors and their merges), an image as one frame, batch equal to alone; then a tiny
Qwen2.5-VL's video through the real hooks."""

import pytest
import torch
from helpers import selection_contexts, tower_outputs

import tokenprune as tp
from tokenprune.context import Merged, SelectionContext
from tokenprune.registry import get_method
from tokenprune.testing import tiny_inputs, tiny_model


def split_sizes(cuts: list[int], frames: int) -> list[int]:
    """Segment lengths of ``frames`` frames cut after each frame of ``cuts`` (sorted)."""
    bounds = [-1, *cuts, frames - 1]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def density_scores(tokens: torch.Tensor) -> torch.Tensor:
    """The reference's DPC-KNN score of each of a frame's remaining tokens ``[m, D]``: ``cdist`` over
    ``sqrt(D)``, density from the 4 nearest (itself included), times the distance to the nearest denser
    token, the largest distance for the densest. Deviation applied: ties by token order, not a jitter."""
    dist = torch.cdist(tokens[None].float(), tokens[None].float())[0] / tokens.shape[1] ** 0.5
    near = torch.topk(dist, k=min(4, len(tokens)), dim=-1, largest=False).values
    density = (-(near**2).mean(dim=-1)).exp()
    order = torch.arange(len(tokens))
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (order[None, :] < order[:, None])
    )
    far = dist.max()
    parent = torch.where(denser, dist, far).min(dim=-1).values
    return parent * density


def fastvid_reference(hidden, attn, frames, shares, c=8, tau=0.84, ignore=0.95, d=0.4, p=4, beta=0.6):
    """The tokens LunarShen/FastVID's Qwen2.5-VL code hands the language model for one video, as sorted
    indices and features: commit a40a109,
    ``fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py``,
    ``Qwen2_5_VLForConditionalGeneration.forward`` (the block after ``get_rope_index``), re-implemented;
    ``hidden [T * P, D]`` the merger's tokens, ``attn [T, P]`` each frame's saliency, ``shares`` each frame's
    retained tokens (the reference's ``int(P * retention_ratio)`` for every frame).

    Deviations applied (tokenprune/methods/fastvid.py): the ``c - 1`` lowest similarities at most ``T - 1``;
    each segment's share is its frames' ``shares`` (the reference's are equal); the budget the caps leave
    goes to the most salient tokens left, as salient ones; density ties by token order; an image (``T =
    1``) is one segment.
    """
    n, _ = hidden.shape
    frm_len = n // frames
    g = hidden.view(frames, frm_len, -1).mean(dim=1)
    g = g / g.norm(dim=1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(dim=1)
    cuts = set(torch.topk(sim, min(c - 1, frames - 1), largest=False).indices.tolist())
    cuts |= set((sim < tau).nonzero()[:, 0].tolist())
    sizes = split_sizes(sorted(cuts), frames)
    salient, anchors_of_frame, segment_of, runs = [], {}, {}, []
    start = 0
    for length in sizes:
        frames_here = list(range(start, start + length))
        seg_retain = sum(shares[f] for f in frames_here)
        seg_context = min(max(int(seg_retain * d), 1), seg_retain)
        seg_salient = seg_retain - seg_context
        if length == 1:
            frm_salient, frm_context = [seg_salient], [seg_context]
            runs.append(1)
        else:
            inner = [t for t in frames_here[:-1] if sim[t] < ignore]
            sub = split_sizes([t - start for t in inner], length)
            valid = len(sub)
            runs.append(valid)
            salient_chunks = [seg_salient // valid + (i < seg_salient % valid) for i in range(valid)]
            temp = (valid + p - 1) // p
            temp_context = [seg_context // temp + (i < seg_context % temp) for i in range(temp)]
            context_chunks, used = [], 0
            for i in range(valid):
                if i % p == 0:
                    context_chunks.append(min(temp_context[used], frm_len // 2))
                    used += 1
                else:
                    context_chunks.append(0)
            context_chunks.reverse()
            frm_salient, frm_context = [], []
            for size, sal, ctx in zip(sub, salient_chunks, context_chunks, strict=True):
                frm_salient += [0] * (size - 1)
                frm_context += [0] * (size - 1)
                if ctx == 0:
                    frm_salient.append(min(sal, frm_len))
                    frm_context.append(0)
                else:
                    frm_context.append(min(ctx, frm_len // 2))
                    frm_salient.append(min(sal, frm_len - frm_context[-1]))
        for i, f in enumerate(frames_here):
            segment_of[f] = (start, length)
            top = torch.topk(attn[f], frm_salient[i]).indices if frm_salient[i] > 0 else torch.tensor([])
            salient += (top.long() + f * frm_len).tolist()
            if frm_context[i] > 0:
                rest = torch.tensor([t for t in range(frm_len) if t not in set(top.tolist())])
                score = density_scores(hidden[f * frm_len + rest])
                picked = torch.topk(score, frm_context[i]).indices.sort().values
                anchors_of_frame[f] = rest[picked] + f * frm_len
        start += length
    kept_count = len(salient) + sum(len(a) for a in anchors_of_frame.values())
    taken = set(salient) | {int(t) for a in anchors_of_frame.values() for t in a}
    fill = attn.flatten().clone()
    fill[list(taken)] = float("-inf")
    salient += torch.topk(fill, sum(shares) - kept_count).indices.tolist()
    # merges: in each anchor frame's segment, every token neither salient nor that frame's anchor
    unit = hidden / hidden.norm(dim=-1, keepdim=True)
    out = {t: hidden[t] for t in salient}
    for f, anchors in anchors_of_frame.items():
        seg_start, length = segment_of[f]
        tokens = range(seg_start * frm_len, (seg_start + length) * frm_len)
        retained = set(salient) | set(anchors.tolist())
        merge = torch.tensor([t for t in tokens if t not in retained], dtype=torch.long)
        assign = torch.zeros(len(merge), len(anchors))
        if len(merge):
            assign.scatter_(1, (unit[merge] @ unit[anchors].T).argmax(dim=1, keepdim=True), 1)
        weights = (1 / (assign.sum(dim=0)[:, None] + 1)).clamp(min=beta)
        counts = assign.sum(dim=0).clamp(min=1)[:, None]
        joined = assign.T @ hidden[merge] / counts if len(merge) else torch.zeros(len(anchors), 1)
        for a, row in zip(anchors.tolist(), weights * hidden[anchors] + (1 - weights) * joined, strict=True):
            out[a] = row
    index = sorted(out)
    info = dict(sizes=sizes, runs=runs, short=sum(shares) - kept_count)
    return torch.tensor(index), torch.stack([out[t] for t in index]), info


def random_videos(seed, items, frames, rows, cols, dim=32, scenes=None):
    """``items`` videos ``[I, T * rows * cols, dim]`` of scenes (their lengths ``scenes``, default random):
    each frame is its scene's tokens plus noise, small (a near-duplicate frame) or larger; and each frame's
    saliency ``[I, T * rows * cols]``, a softmax over the frame."""
    g = torch.Generator().manual_seed(seed)
    per_frame = rows * cols
    videos = []
    for _ in range(items):
        lengths = list(scenes or [])
        while sum(lengths) < frames:
            lengths.append(int(torch.randint(1, 7, (1,), generator=g)))
        video = []
        for length in lengths:
            base = torch.randn(per_frame, dim, generator=g) + torch.randn(dim, generator=g)
            for _ in range(length):
                sigma = [0.03, 0.3, 0.45][int(torch.randint(0, 3, (1,), generator=g))]
                shift = torch.randn(dim, generator=g)  # moves the frame's mean: its global feature
                video.append(base + sigma * (torch.randn(per_frame, dim, generator=g) + shift))
        videos.append(torch.cat(video[:frames]))
    saliency = (2 * torch.randn(items, frames, per_frame, generator=g)).softmax(dim=-1)
    return torch.stack(videos), saliency.view(items, -1)


def video_context(features, saliency, frames, rows, cols) -> SelectionContext:
    return SelectionContext(
        features=features,
        grid=None,
        frames=(frames, rows, cols),
        image_index=torch.zeros(len(features), dtype=torch.long),
        encoder_attention={31: saliency},
    )


def shares_of(keep: int, frames: int) -> list[int]:
    return [keep // frames + (f < keep % frames) for f in range(frames)]


def assert_matches_reference(merged, features, saliency, frames, keep, **options):
    """``merged`` (of ``keep`` tokens of each video) is what the reference hands on for each."""
    shares = shares_of(keep, frames)
    for item in range(len(features)):
        view = saliency[item].view(frames, -1)
        index, tokens, _ = fastvid_reference(features[item], view, frames, shares, **options)
        assert torch.equal(merged.index[item], index)
        torch.testing.assert_close(merged.features[item], tokens, atol=1e-5, rtol=1e-5)


#: (frames, rows, cols, keeps): Qwen-VL-like frames; keeps of 10-40% of the tokens, some not a multiple of T.
SHAPES = [(16, 4, 4, (26, 64, 80)), (12, 6, 5, (36, 90, 101)), (24, 3, 4, (48, 96)), (2, 4, 4, (8, 16, 13))]


@pytest.mark.parametrize(("frames", "rows", "cols", "keeps"), SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_keeps_and_merges_what_the_reference_does(frames, rows, cols, keeps, seed):
    features, saliency = random_videos(seed, 3, frames, rows, cols)
    ctx = video_context(features, saliency, frames, rows, cols)
    for keep in keeps:
        merged = get_method("fastvid").select(ctx, keep, {})
        assert isinstance(merged, Merged) and merged.index.shape == (3, keep)
        assert_matches_reference(merged, features, saliency, frames, keep)


def test_the_test_videos_exercise_every_branch():
    """The random videos above cut where scenes change, into one-frame segments and longer ones, hold
    near-duplicate runs and segments of several runs (several anchor frames where more than 4), and hit the
    caps whose budget the fill spends."""
    lengths, runs, short = set(), set(), 0
    cases = [(f, r, c, keeps, 3, None) for f, r, c, keeps in SHAPES] + [(24, 3, 4, LONG_KEEPS, 2, [12, 12])]
    for frames, rows, cols, keeps, items, scenes in cases:
        options = {} if scenes is None else dict(c=2)
        for seed in (0, 1) if scenes is None else (5,):
            features, saliency = random_videos(seed, items, frames, rows, cols, scenes=scenes)
            for item in range(items):
                for keep in keeps:
                    shares = shares_of(keep, frames)
                    view = saliency[item].view(frames, -1)
                    info = fastvid_reference(features[item], view, frames, shares, **options)[2]
                    lengths |= set(info["sizes"])
                    runs |= set(info["runs"])
                    short += info["short"]
    assert {1, 2, 3} <= lengths and max(lengths) >= 8
    assert {1, 2} <= runs and max(runs) > 4 and short > 0


LONG_KEEPS = (48, 100, 150)


@pytest.mark.parametrize("options", [dict(min_segments=2), dict(min_segments=2, tau=0.5, anchor_stride=2)])
def test_long_segments_and_options(options):
    """Few cuts (``min_segments=2``): long segments of many near-duplicate runs, several anchor frames each,
    and the caps of a run given many frames' share."""
    names = dict(min_segments="c", tau="tau", duplicate="ignore", anchor_ratio="d", anchor_stride="p")
    features, saliency = random_videos(5, 2, 24, 3, 4, scenes=[12, 12])
    ctx = video_context(features, saliency, 24, 3, 4)
    for keep in LONG_KEEPS:
        merged = get_method("fastvid").select(ctx, keep, options)
        assert_matches_reference(
            merged, features, saliency, 24, keep, **{names[k]: v for k, v in options.items()}
        )


def test_keep_all_and_one_token():
    features, saliency = random_videos(0, 2, 4, 2, 3)
    ctx = video_context(features, saliency, 4, 2, 3)
    everything = get_method("fastvid").select(ctx, 24, {})
    assert torch.equal(everything, torch.arange(24).expand(2, -1))
    one = get_method("fastvid").select(ctx, 1, {})
    assert one.index.shape == (2, 1)
    assert_matches_reference(one, features, saliency, 4, 1)


def test_batch_equals_each_video_alone():
    features, saliency = random_videos(3, 4, 12, 4, 4)
    batched = get_method("fastvid").select(video_context(features, saliency, 12, 4, 4), 50, {})
    for item in range(4):
        ctx = video_context(features[item : item + 1], saliency[item : item + 1], 12, 4, 4)
        alone = get_method("fastvid").select(ctx, 50, {})
        assert torch.equal(batched.index[item : item + 1], alone.index)
        assert torch.equal(batched.features[item : item + 1], alone.features)


@pytest.mark.parametrize("grid", [(6, 5), None])
def test_an_image_is_one_frame(grid):
    """An image (its grid, or no grid: one row of tokens) is a one-frame video: one segment, its salient
    tokens and anchors merging every other token."""
    features, saliency = random_videos(2, 2, 1, 6, 5)
    ctx = SelectionContext(
        features=features,
        grid=grid,
        image_index=torch.zeros(2, dtype=torch.long),
        encoder_attention={23: saliency},
    )
    merged = get_method("fastvid").select(ctx, 12, {})
    assert_matches_reference(merged, features, saliency, 1, 12)
    assert merged.sizes.sum(dim=1).tolist() == [30.0, 30.0]


def test_tiny_qwen_video_through_the_hooks():
    """Tiny Qwen2.5-VL, a video of 2 temporal patches of 4x4 merged tokens (and an image, untouched under
    ``media="videos"``): 16 of the video's 32 tokens reach the language model, the reference's tokens for the
    features and encoder attention the tower handed the method."""
    model = tiny_model("qwen2_5_vl", "sdpa")
    inputs = tiny_inputs(model, (1,), videos_per_prompt=(1,))
    video = inputs["input_ids"] == model.config.video_token_id
    pruner = tp.apply_pruner(model, "fastvid", keep_ratio=0.5, media="videos")
    try:
        with selection_contexts() as contexts, tower_outputs(model) as handed_on, torch.no_grad():
            model(**inputs)
    finally:
        tp.remove_pruner(model)
    assert pruner.stats.visual_tokens == [32] and pruner.stats.kept_tokens == [16]  # the video's
    image = inputs["input_ids"] == model.config.image_token_id
    assert int((pruner.stats.keep_mask & video).sum()) == 16 and bool(pruner.stats.keep_mask[image].all())
    (ctx,) = contexts
    assert ctx.frames == (2, 4, 4)
    saliency = ctx.encoder_attention[max(ctx.encoder_attention)]
    index, tokens, _ = fastvid_reference(ctx.features[0], saliency[0].view(2, 16), 2, [8, 8])
    videos = handed_on[-1][0]  # the video's encoding: the kept tokens in place, zeros elsewhere
    assert torch.equal(videos.ne(0).any(dim=-1).nonzero()[:, 0], index)
    torch.testing.assert_close(videos[index], tokens.to(videos.dtype), atol=1e-5, rtol=1e-5)
