"""HoliTom's outer stage against a small re-implementation of its official code, written from reading it:
its temporal segmentation, static and dynamic tokens and their merging on random videos (scene changes, still
places, several shapes and budgets), batched and alone, an image; then both stages through a tiny
Qwen2.5-VL's tower and language model (the inner stage alone: test_parity_holitom_llm.py)."""

import math

import pytest
import torch
from conftest import shared_model
from helpers import selection_contexts, tower_outputs

import tokenprune as tp
from tokenprune.context import Merged, SelectionContext
from tokenprune.registry import get_method
from tokenprune.testing import tiny_inputs

OUTPUT_LAYER = 3


def windows_reference(
    similarity: torch.Tensor, tau: float, max_window: int
) -> tuple[list[tuple[int, int]], int]:
    """cokeshao/HoliTom's segments ``[(start, end)]`` and the tokens they merge away, from the consecutive
    frames' similarities ``[T - 1, S]``: ``select_static_windows`` of ``holitom/llava_arch.py`` (commit
    e9b2972). A window ``s..e`` merges its places alike in every pair of its frames, ``(e - s)`` times
    each; the dynamic program takes, frame ``i`` by frame ``i``, the best of ``i`` alone and the windows of
    2 up to ``max_window`` frames ending at ``i``, a longer window only where it merges strictly more."""
    frames = similarity.shape[0] + 1
    saved = torch.zeros(frames, frames, dtype=torch.long)
    for s in range(frames - 1):
        alike = torch.ones(similarity.shape[1], dtype=torch.bool)
        for e in range(s + 1, frames):
            alike &= similarity[e - 1] > tau
            saved[s, e] = int(alike.sum()) * (e - s)
    dp, prev = [0] * frames, [0] * frames
    for i in range(frames):
        best, best_start = (dp[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            value = (dp[j] if j >= 0 else 0) + int(saved[j + 1, i])
            if value > best:
                best, best_start = value, j + 1
        dp[i], prev[i] = best, best_start
    segments, i = [], frames - 1
    while i >= 0:
        segments.append((prev[i], i))
        i = prev[i] - 1
    return segments[::-1], dp[-1]


def dpc_reference(x: torch.Tensor, count: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cluster_dpc_knn`` (same file) on ``x [n, D]``, without its 1e-6 random noise on the densities: the
    ``count`` centres (sorted) and the distance matrix."""
    dist = torch.cdist(x[None].float(), x[None].float())[0] / x.shape[-1] ** 0.5
    dist.fill_diagonal_(0)  # as the method: no rounding of a matrix product on it (cdist's for many tokens)
    nearest = dist.topk(k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    denser = (density[None, :] > density[:, None]).float()
    reach = (dist * denser + dist.max() * (1 - denser)).min(dim=-1).values
    # ties (every density is 1 for k = 1: the reference's noise picks one) to the lower index, as the method
    return (reach * density).argsort(descending=True, stable=True)[:count].sort().values, dist


def clustering_reference(
    x: torch.Tensor, centres: torch.Tensor, dist: torch.Tensor, beta: float
) -> torch.Tensor:
    """``merge_tokens_by_clustering`` (same file, its ``NO_BETA=0`` branch, the default there): each other
    token joins its nearest centre; a centre that others joined is ``beta`` itself plus ``1 - beta`` their
    mean. ``[count, D]``."""
    others = [i for i in range(x.shape[0]) if i not in set(centres.tolist())]
    joins = dist[others][:, centres].argmin(dim=-1)
    out = []
    for c, centre in enumerate(centres.tolist()):
        members = [o for o, j in zip(others, joins.tolist(), strict=True) if j == c]
        out.append(beta * x[centre] + (1 - beta) * x[members].mean(dim=0) if members else x[centre])
    return torch.stack(out) if out else x[:0]


def shares_of(sizes: list[int], keep: int) -> list[int]:
    """The method's exact budget (a deviation): ``keep`` shared by largest remainders, first of equal ones."""
    total = sum(sizes)
    base = [size * keep // total for size in sizes]
    order = sorted(range(len(sizes)), key=lambda g: -(sizes[g] * keep % total))
    for g in order[: keep - sum(base)]:
        base[g] += 1
    return base


def holitom_reference(x, attention, keep, tau=0.8, beta=0.6, d=0.0, k=7, max_window=1024):
    """The outer stage of one video ``x [T, S, D]`` (attention ``[T, S]``): ``prepare_inputs_labels_for_
    multimodal``'s video branch with ``get_static_dynamic_features``, ``holitom`` (its ``one_token`` layout),
    ``merge_tokens_by_attention_density`` and ``merge_tokens_by_density``, each group's count by the
    method's exact budget in place of the reference's rounding. Returns ``{place: feature}`` with the
    method's places (a static token at its segment's first frame), and the reference's own counts."""
    frames, places, _ = x.shape
    normed = torch.nn.functional.normalize(x, dim=-1)
    similarity = torch.nn.functional.cosine_similarity(normed[:-1], normed[1:], dim=-1)
    segments, reduced = windows_reference(similarity, tau, max_window)
    if keep > frames * places - reduced:  # the method's fallback (a deviation): no temporal merging
        segments, reduced = [(t, t) for t in range(frames)], 0
    retain = min(keep / (frames * places - reduced), 1)
    static = {}
    for s, e in segments:
        static[s] = torch.zeros(places, dtype=torch.bool) if s == e else (similarity[s:e] > tau).all(dim=0)
    sizes = [int(static[s].sum()) if s in static else 0 for s in range(frames)]
    sizes += [places - int(static[s].sum()) for s, e in segments for _ in range(s, e + 1)]
    shares = shares_of(sizes, keep)
    theirs = [round(n * retain) for n in sizes[:frames]] + [math.ceil(n * retain) for n in sizes[frames:]]
    out = {}
    for s, e in segments:
        mask = static[s]
        if mask.any():
            means, positions = x[s : e + 1, mask].mean(dim=0), mask.nonzero()[:, 0]
            count = shares[s]
            if count:
                centres, dist = dpc_reference(means, count, min(k, count))
                for c, feature in zip(
                    centres.tolist(), clustering_reference(means, centres, dist, beta), strict=True
                ):
                    out[s * places + int(positions[c])] = feature
        for t in range(s, e + 1):
            positions = (~mask).nonzero()[:, 0]
            count = shares[frames + t]
            dominant = round(count * (1 - d))
            top = attention[t, positions].topk(dominant).indices if dominant else positions[:0]
            for i in top.tolist():
                out[t * places + int(positions[i])] = x[t, positions[i]]
            rest = [i for i in range(len(positions)) if i not in set(top.tolist())]
            if count - dominant:
                feats = x[t, positions[rest]]
                centres, dist = dpc_reference(feats, count - dominant, min(k, count - dominant))
                for c, feature in zip(
                    centres.tolist(), clustering_reference(feats, centres, dist, beta), strict=True
                ):
                    out[t * places + int(positions[rest[c]])] = feature
    return out, shares, theirs


def video(frames: int, places: int, dim: int, cuts: tuple[int, ...], seed: int) -> torch.Tensor:
    """A random video ``[T, S, D]`` of scenes starting at ``cuts``, each place still (a little noise) or
    moving."""
    g = torch.Generator().manual_seed(seed)
    moving = torch.rand(places, generator=g) < 0.3
    scenes, scene = [], None
    for t in range(frames):
        if t == 0 or t in cuts:
            scene = torch.randn(places, dim, generator=g)
        noise = torch.randn(places, dim, generator=g) * torch.where(moving, 2.0, 0.2)[:, None]
        scenes.append(scene + noise)
    return torch.stack(scenes)


def context(x: torch.Tensor, attention: torch.Tensor, frames) -> SelectionContext:
    num = x.shape[0]
    return SelectionContext(
        features=x.flatten(1, 2) if x.dim() == 4 else x,
        grid=None if frames[0] > 1 else frames[1:],
        frames=frames if frames[0] > 1 else None,
        image_index=torch.zeros(num, dtype=torch.long),
        encoder_attention={OUTPUT_LAYER: attention.view(num, -1)},
    )


def assert_matches(result: Merged, expected: dict, row: int = 0) -> None:
    index = result.index[row]
    assert sorted(index.tolist()) == sorted(expected)
    for place, feature in zip(index.tolist(), result.features[row], strict=True):
        torch.testing.assert_close(feature, expected[place], atol=1e-5, rtol=1e-5)


SHAPES = [(6, 3, 4, (3,)), (8, 4, 4, (2, 5)), (5, 2, 3, ()), (2, 4, 4, (1,)), (7, 3, 3, (1, 2, 3, 4, 5, 6))]


@pytest.mark.parametrize(("frames", "rows", "cols", "cuts"), SHAPES)
@pytest.mark.parametrize("ratio", [0.05, 0.15, 0.3, 0.6, 1.0])
@pytest.mark.parametrize(
    "options", [{}, {"contextual": 0.5, "beta": 0.3, "neighbours": 3}, {"threshold": 0.6}]
)
def test_outer_stage_matches_the_reference(frames, rows, cols, cuts, ratio, options):
    places = rows * cols
    keep = max(1, round(ratio * frames * places))
    x = torch.stack([video(frames, places, 16, cuts, seed) for seed in range(3)])
    attention = torch.rand(3, frames, places, generator=torch.Generator().manual_seed(1))
    batched = get_method("holitom").select(context(x, attention, (frames, rows, cols)), keep, options)
    ref_options = {"tau": options.get("threshold", 0.8), "beta": options.get("beta", 0.6)}
    ref_options |= {"d": options.get("contextual", 0.0), "k": options.get("neighbours", 7)}
    for b in range(3):
        expected, shares, theirs = holitom_reference(x[b], attention[b], keep, **ref_options)
        assert_matches(batched, expected, b)
        assert sum(shares) == keep and all(abs(m - r) <= 1 for m, r in zip(shares, theirs, strict=True))
        alone = get_method("holitom").select(
            context(x[b : b + 1], attention[b : b + 1], (frames, rows, cols)), keep, options
        )
        assert torch.equal(alone.index, batched.index[b : b + 1])
        torch.testing.assert_close(alone.features, batched.features[b : b + 1], atol=1e-6, rtol=0)


def test_segments_follow_the_scenes_and_merge_the_still_places():
    x = video(9, 12, 16, (3, 6), seed=4)[None]
    result = get_method("holitom").select(context(x, torch.rand(1, 9, 12), (9, 3, 4)), 20, {})
    # three scenes: static tokens stand for three frames each, at their scene's first frame
    assert set(result.sizes[0].tolist()) >= {1.0} and result.sizes[0].max() >= 3
    frames_kept = (result.index[0] // 12).tolist()
    assert {0, 3, 6} <= set(frames_kept)
    normed = torch.nn.functional.normalize(x[0], dim=-1)
    similarity = torch.nn.functional.cosine_similarity(normed[:-1], normed[1:], dim=-1)
    assert windows_reference(similarity, 0.8, 1024)[0] == [(0, 2), (3, 5), (6, 8)]


def test_keep_all_returns_every_token_as_it_was():
    x = video(4, 9, 8, (2,), seed=2)[None]
    result = get_method("holitom").select(context(x, torch.rand(1, 4, 9), (4, 3, 3)), 36, {})
    assert torch.equal(result.index[0], torch.arange(36)) and torch.equal(result.features, x.flatten(1, 2))


def test_an_image_is_one_frame_its_most_attended_tokens():
    x, attention = torch.randn(2, 1, 12, 8), torch.rand(2, 1, 12)
    result = get_method("holitom").select(context(x, attention, (1, 3, 4)), 5, {})
    assert torch.equal(result.index, attention[:, 0].topk(5).indices.sort().values)
    expected, _, _ = holitom_reference(x[1], attention[1], 5)
    assert_matches(result, expected, 1)


@pytest.mark.parametrize("threshold", [0.8, 0.0, -1.0])
def test_both_stages_through_qwen25_vl_videos(threshold):
    """``holitom`` alone is both stages; its tower stage gets each video's frames and keeps what the
    reference keeps of them (with ``threshold=-1``, every place alike: one segment, its two frames merged)."""
    model = shared_model("qwen2_5_vl", "sdpa")
    inputs = tiny_inputs(model, (1, 0), videos_per_prompt=(1, 1))
    config = tp.PrunerConfig("holitom", keep_ratio=0.25, media="videos", options={"threshold": threshold})
    with (
        tp.pruned(model, config) as pruner,
        selection_contexts() as contexts,
        tower_outputs(model) as encoded,
        torch.no_grad(),
    ):
        model(**inputs)
    stats = pruner.stats
    assert sorted(stats.keep_masks) == [0, 3] and stats.stage == "llm"  # 21 of 32 layers: 3 of 4
    assert stats.visual_tokens == [32, 32] and stats.kept_tokens == [8, 8]  # 16 after the tower
    video = inputs["input_ids"] == model.config.video_token_id
    assert (stats.keep_masks[0] & video).sum(dim=1).tolist() == [16, 16]
    assert (stats.keep_masks[3] & video).sum(dim=1).tolist() == [8, 8]
    ctx = contexts[0]
    assert ctx.frames == (2, 4, 4) and ctx.features.shape[:2] == (2, 32)
    handed_on = encoded[-1][0].view(2, 32, -1)
    attention = ctx.encoder_attention[max(ctx.encoder_attention)]
    for v in range(2):
        x = ctx.features[v].float().view(2, 16, -1)
        expected, _, _ = holitom_reference(x, attention[v].view(2, 16), 16, tau=threshold)
        kept = handed_on[v].ne(0).any(dim=-1).nonzero()[:, 0].tolist()
        assert kept == sorted(expected)
        assert threshold > -1 or kept == list(range(16))
        for i in kept:
            torch.testing.assert_close(handed_on[v, i].float(), expected[i], atol=1e-4, rtol=1e-4)
