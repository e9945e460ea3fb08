"""VidCom2 against a small re-implementation of its official code, written from reading it: the tokens kept on
random videos of several shapes, the frames' counts where the reference's rounding misses the budget (the
exact-budget deviation), images, batching, then through a tiny Qwen2.5-VL's tower on a video."""

import pytest
import torch
from conftest import shared_model
from helpers import video_pruned_through_qwen

from tokenprune.context import SelectionContext
from tokenprune.registry import get_method

SHAPES = [(2, 4, 4), (3, 5, 7), (8, 6, 6), (4, 1, 9)]


def scores_reference(video: torch.Tensor, tokens_per_frame: int, base_scale: float):
    """VidCom2's scores of one video ``[N, D]``: each token's summed similarity ``[T, S]`` (lowest kept) and
    each frame's share of the budget ``[T]`` before rounding and clamping.

    Re-implemented from xuyang-liu16/VidCom2 commit 944a17d, ``token_compressor/vidcom2/vidcom2.py``:
    ``select_low_var_channels`` (the half of the channels of lowest variance over the video's tokens),
    ``compute_gaussian_scores`` (tokens as frames, unit vectors, similarity to the video's and the frame's
    mean as the sum over ``a = 2**k``, ``k`` in -3..1, of ``exp(-d^2 / 2a)``) and ``compute_scales`` (softmax
    over frames of minus the mean similarity to the video's mean, temperature 0.01; ``base * (1 + p - mean
    p)``).
    """
    variance = video.var(dim=0, unbiased=False)
    channels = torch.topk(variance, k=int(video.shape[-1] * 0.5), largest=False).indices
    frames = torch.nn.functional.normalize(
        video[:, channels].view(-1, tokens_per_frame, len(channels)), dim=-1
    )

    def kernels(centre):
        squared = ((frames - centre) ** 2).sum(dim=-1)
        return sum(torch.exp(-squared / (2 * 2.0**k)) for k in range(-3, 2))

    to_video = kernels(frames.mean(dim=(0, 1), keepdim=True))
    to_frame = kernels(frames.mean(dim=1, keepdim=True))
    importance = -to_video.mean(dim=-1)
    probs = torch.softmax((importance - importance.max()) / 0.01, dim=0)
    scales = base_scale * (1 + probs - probs.mean())
    return to_video + to_frame, scales * tokens_per_frame


def reference_counts(shares: torch.Tensor, tokens_per_frame: int) -> list[int]:
    """The reference's per-frame counts (``select_outlier_indices``): the share rounded, clamped to a frame
    (its scale to 1), at least one."""
    return (shares.clamp(max=tokens_per_frame)).round().long().clamp(min=1).tolist()


def kept_reference(scores: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The tokens kept (flat, sorted): each frame's ``count`` of lowest score, offset by the frame
    (``select_outlier_indices``, ``_map_linear_offset``)."""
    tokens_per_frame = scores.shape[1]
    kept = [
        torch.topk(frame, k=count, largest=False).indices.sort().values + t * tokens_per_frame
        for t, (frame, count) in enumerate(zip(scores, counts, strict=True))
    ]
    return torch.cat(kept)


def webster_counts(shares: list[float], keep: int, capacity: int) -> list[int]:
    """The exact-budget deviation, as the sequential highest-averages rule: one token to each frame (to the
    ``keep`` frames of largest share where there are fewer tokens than frames), then each next token to the
    frame of largest ``share / (count + 1/2)`` that has room; on a tie (shares half-way between two counts),
    to a frame whose count is odd (rounding half to even, as the reference's ``round``), then the earlier
    frame."""
    frames = len(shares)
    if keep < frames:
        first = sorted(range(frames), key=lambda t: (-shares[t], t))[:keep]
        return [int(t in first) for t in range(frames)]
    counts = [1] * frames
    for _ in range(keep - frames):
        open_frames = [t for t in range(frames) if counts[t] < capacity]
        best = max(open_frames, key=lambda t: (shares[t] / (counts[t] + 0.5), counts[t] % 2, -t))
        counts[best] += 1
    return counts


def video_context(features: torch.Tensor, frames: tuple[int, int, int] | None, grid=None) -> SelectionContext:
    items = len(features)
    return SelectionContext(
        features=features, grid=grid, frames=frames, image_index=torch.zeros(items).long()
    )


def random_video(frames: tuple[int, int, int], seed: int, items: int = 1, dim: int = 24) -> torch.Tensor:
    """Random tokens ``[items, N, dim]`` around a per-frame offset, so that frames differ in uniqueness."""
    t, rows, cols = frames
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randn(items, t, 1, dim, generator=generator) * torch.linspace(0.2, 1.5, t)[:, None, None]
    tokens = offsets + torch.randn(items, t, rows * cols, dim, generator=generator)
    return tokens.view(items, t * rows * cols, dim)


@pytest.mark.parametrize("frames", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_reference_and_its_counts_by_a_divisor(frames, seed):
    """Where the reference's rounded counts add up to the budget, the same tokens; everywhere, each frame
    keeps the reference's choice for its count, and the counts are the shares apportioned by Webster's
    rule."""
    t, rows, cols = frames
    num_tokens, per_frame = t * rows * cols, rows * cols
    video = random_video(frames, seed)
    agreed = 0
    for keep in sorted({1, t, t + 1, num_tokens // 4, num_tokens // 3, num_tokens // 2, num_tokens - 1}):
        scores, shares = scores_reference(video[0], per_frame, keep / num_tokens)
        got = get_method("vidcom2").select(video_context(video, frames), keep, {})[0]
        counts = torch.bincount(got // per_frame, minlength=t).tolist()
        assert counts == webster_counts(shares.tolist(), keep, per_frame), (frames, seed, keep)
        assert torch.equal(got, kept_reference(scores, counts))
        if sum(reference_counts(shares, per_frame)) == keep:
            agreed += 1
            assert counts == reference_counts(shares, per_frame)
    assert agreed >= 1  # the reference's own count is the budget at least once per video


@pytest.mark.parametrize("frames", [(2, 6, 6), (4, 3, 4)])
def test_at_every_budget_its_own_count_the_reference_keeps_the_same_tokens(frames):
    """Every budget from 1 to N: wherever the reference's rounded counts add up to it (most budgets), the
    tokens are the reference's."""
    t, rows, cols = frames
    num_tokens, per_frame = t * rows * cols, rows * cols
    video = random_video(frames, seed=7)
    agreed = 0
    for keep in range(1, num_tokens + 1):
        scores, shares = scores_reference(video[0], per_frame, keep / num_tokens)
        counts = reference_counts(shares, per_frame)
        if sum(counts) == keep:
            agreed += 1
            got = get_method("vidcom2").select(video_context(video, frames), keep, {})[0]
            assert torch.equal(got, kept_reference(scores, counts)), keep
    assert agreed >= num_tokens // 4


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), None])
def test_an_image_is_one_frame(grid):
    """One frame: the reference's rule with ``T = 1`` (its share is the budget) keeps its tokens least
    similar to its mean."""
    num_tokens = 16 if grid is None else grid[0] * grid[1]
    features = torch.randn(2, num_tokens, 12)
    ctx = video_context(features, None, grid)
    for keep in (1, 5, num_tokens - 1, num_tokens):
        got = get_method("vidcom2").select(ctx, keep, {})
        for i in range(2):
            scores, shares = scores_reference(features[i], num_tokens, keep / num_tokens)
            assert reference_counts(shares, num_tokens) == [keep]
            assert torch.equal(got[i], kept_reference(scores, [keep]))


@pytest.mark.parametrize("frames", SHAPES)
def test_a_batch_equals_each_video_alone_and_keep_all_keeps_all(frames):
    t, rows, cols = frames
    num_tokens = t * rows * cols
    videos = random_video(frames, seed=5, items=3)
    for keep in (1, t, num_tokens // 2, num_tokens):
        batched = get_method("vidcom2").select(video_context(videos, frames), keep, {})
        for i in range(3):
            alone = get_method("vidcom2").select(video_context(videos[i : i + 1], frames), keep, {})
            assert torch.equal(batched[i : i + 1], alone)
    everything = get_method("vidcom2").select(video_context(videos, frames), num_tokens, {})
    assert torch.equal(everything, torch.arange(num_tokens).expand(3, -1))


def test_through_qwen2_5_vl_the_video_keeps_what_the_reference_keeps():
    """A tiny Qwen2.5-VL prompt with an image and a video (2 temporal patches of 4x4 merged tokens): only the
    video is pruned, to half its tokens, and the kept ones are those VidCom2 keeps of the tower's tokens."""
    ctx, stats, video = video_pruned_through_qwen(shared_model("qwen2_5_vl", "sdpa"), "vidcom2")
    scores, shares = scores_reference(ctx.features[0].float(), 16, 0.5)
    counts = torch.bincount(torch.arange(32)[stats.keep_mask[0][video]] // 16, minlength=2).tolist()
    assert counts == webster_counts(shares.tolist(), 16, 16)
    expected = torch.zeros(32, dtype=torch.bool)
    expected[kept_reference(scores, counts)] = True
    assert torch.equal(stats.keep_mask[0][video], expected)
