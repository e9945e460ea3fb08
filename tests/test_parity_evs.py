"""EVS against a small re-implementation of vLLM's, written from reading it: the tokens kept on random videos
of several shapes (static patches and repeated frames included), its retained count against the config's,
images and budgets below one frame, batching, then through a tiny Qwen2.5-VL's tower on a video."""

import pytest
import torch
from conftest import shared_model
from helpers import video_pruned_through_qwen

import tokenprune as tp
from tokenprune.context import SelectionContext
from tokenprune.methods.baselines import grid_sample
from tokenprune.registry import get_method

SHAPES = [(2, 4, 4), (3, 5, 7), (8, 6, 6), (4, 1, 9)]


def retained_count_reference(tokens_per_frame: int, frames: int, q: float) -> int:
    """vLLM's ``compute_retained_tokens_count``: ``int(N * (1 - q))`` of the ``N`` tokens, never fewer than
    one frame's."""
    return max(tokens_per_frame, int(tokens_per_frame * frames * (1 - q)))


def retention_mask_reference(video: torch.Tensor, frames: tuple[int, int, int], q: float) -> torch.Tensor:
    """The tokens vLLM's EVS keeps of one video ``[N, D]`` (``T`` frames of ``rows x cols``), a mask ``[N]``.

    Re-implemented from vllm-project/vllm commit 926c71f, ``vllm/multimodal/evs.py``,
    ``compute_retention_mask`` (the merged grid given directly: ``spatial_merge_size=1``): each token of a
    later frame scores one minus its cosine similarity to the same place of the frame before, the first
    frame's tokens 255; a stable descending sort, and the first ``compute_retained_tokens_count`` kept.
    """
    t, rows, cols = frames
    grid = video.view(t, rows, cols, -1)
    scores = [torch.full((rows, cols), 255.0)]
    for i in range(1, t):
        scores.append(1 - torch.nn.functional.cosine_similarity(grid[i], grid[i - 1], dim=-1))
    flat = torch.stack(scores).flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[: retained_count_reference(rows * cols, t, q)]] = True
    return mask


def rate_keeping(count: int, num_tokens: int) -> float:
    """A pruning rate ``q`` at which the reference keeps ``count`` of ``num_tokens`` (one frame or more)."""
    return 1 - (count + 0.5) / num_tokens


def video_context(features: torch.Tensor, frames: tuple[int, int, int]) -> SelectionContext:
    return SelectionContext(
        features=features, grid=None, frames=frames, image_index=torch.zeros(len(features), dtype=torch.long)
    )


def random_video(frames: tuple[int, int, int], seed: int, items: int = 1, dim: int = 24) -> torch.Tensor:
    """Random tokens ``[items, N, dim]``, with static patches (the same token in consecutive frames) and, past
    two frames, a frame repeated whole: ties the reference breaks by its stable sort."""
    t, rows, cols = frames
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(items, t, rows * cols, dim, generator=generator)
    static = torch.rand(rows * cols, generator=generator) < 0.3
    video[:, 1:, static] = video[:, :1, static]
    if t > 2:
        video[:, 2] = video[:, 1]
    return video.view(items, t * rows * cols, dim)


@pytest.mark.parametrize("frames", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_reference_from_one_frame_up(frames, seed):
    t, rows, cols = frames
    num_tokens, per_frame = t * rows * cols, rows * cols
    video = random_video(frames, seed)
    for keep in sorted({per_frame, per_frame + 1, num_tokens // 2, (3 * num_tokens) // 4, num_tokens}):
        expected = retention_mask_reference(video[0], frames, rate_keeping(keep, num_tokens))
        got = get_method("evs").select(video_context(video, frames), keep, {})
        assert got.shape == (1, keep)
        assert torch.equal(got[0], expected.nonzero().flatten()), (frames, seed, keep)
        assert bool(expected[:per_frame].all())  # the first frame, whole


def test_repeated_frames_keep_the_earlier_of_equal_tokens():
    """A static video of one-hot tokens: every later token's dissimilarity is exactly 0, so the budget past
    the first frame goes to the second frame's first tokens in order, as the reference's stable sort."""
    frames = (3, 2, 3)
    video = torch.eye(6).expand(3, 6, 6).reshape(1, 18, 6)
    got = get_method("evs").select(video_context(video, frames), 9, {})
    assert got[0].tolist() == list(range(9))
    assert torch.equal(
        retention_mask_reference(video[0], frames, rate_keeping(9, 18)).nonzero().flatten(), got[0]
    )


@pytest.mark.parametrize("keep_ratio", [0.05, 0.25, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("frames", SHAPES)
def test_the_count_is_the_configs_within_one_of_the_references(keep_ratio, frames):
    """Deviation: the config's ``max(1, round(keep_ratio * N))`` against vLLM's ``max(S, int(N * (1 - q)))``:
    at most one more (rounding against flooring), and below one frame fewer than the reference's floor."""
    t, rows, cols = frames
    num_tokens, per_frame = t * rows * cols, rows * cols
    ours = tp.PrunerConfig("evs", keep_ratio=keep_ratio).kept_per_image(num_tokens)
    theirs = retained_count_reference(per_frame, t, 1 - keep_ratio)
    if ours >= per_frame:
        assert 0 <= ours - theirs <= 1
    else:
        assert theirs == per_frame


@pytest.mark.parametrize("frames", SHAPES)
def test_below_one_frame_the_first_frame_is_spread_over_its_grid(frames):
    t, rows, cols = frames
    video = random_video(frames, seed=3, items=2)
    for keep in range(1, rows * cols):
        got = get_method("evs").select(video_context(video, frames), keep, {})
        assert torch.equal(got, grid_sample(keep, rows, cols).expand(2, keep))


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), None])
def test_an_image_is_one_frame_spread_over_its_grid(grid):
    num_tokens = 16 if grid is None else grid[0] * grid[1]
    features = torch.randn(2, num_tokens, 12)
    ctx = SelectionContext(features=features, grid=grid, image_index=torch.zeros(2, dtype=torch.long))
    rows, cols = grid or (1, num_tokens)
    for keep in (1, 5, num_tokens):
        got = get_method("evs").select(ctx, keep, {})
        assert torch.equal(got, grid_sample(keep, rows, cols).expand(2, keep))
    assert get_method("evs").select(ctx, num_tokens, {})[0].tolist() == list(range(num_tokens))


@pytest.mark.parametrize("frames", SHAPES)
def test_a_batch_equals_each_video_alone_and_keep_all_keeps_all(frames):
    t, rows, cols = frames
    num_tokens = t * rows * cols
    videos = random_video(frames, seed=5, items=3)
    for keep in (1, rows * cols, num_tokens // 2, num_tokens):
        batched = get_method("evs").select(video_context(videos, frames), keep, {})
        for i in range(3):
            alone = get_method("evs").select(video_context(videos[i : i + 1], frames), keep, {})
            assert torch.equal(batched[i : i + 1], alone)
    everything = get_method("evs").select(video_context(videos, frames), num_tokens, {})
    assert torch.equal(everything, torch.arange(num_tokens).expand(3, -1))


def test_through_qwen2_5_vl_the_video_keeps_what_the_reference_keeps():
    """A tiny Qwen2.5-VL prompt with an image and a video (2 temporal patches of 4x4 merged tokens): only
    the video is pruned, to half its tokens, and the kept ones are those vLLM's EVS keeps of the tower's
    tokens."""
    ctx, stats, video = video_pruned_through_qwen(shared_model("qwen2_5_vl", "sdpa"), "evs")
    expected = retention_mask_reference(ctx.features[0].float(), ctx.frames, rate_keeping(16, 32))
    assert torch.equal(stats.keep_mask[0][video], expected)
