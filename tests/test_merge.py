"""Vision methods and token merging as pure functions on random tensors."""

import pytest
import torch

from tokenprune.context import Merged, SelectionContext
from tokenprune.merge import bipartite_soft_matching, constant_schedule, max_merges, merge_schedule
from tokenprune.registry import get_method


def vision_context(images=2, rows=6, cols=8, dim=16, layers=(2, 5), seed=0, protected=0) -> SelectionContext:
    g = torch.Generator().manual_seed(seed)
    n = rows * cols + protected
    return SelectionContext(
        features=torch.randn(images, n, dim, generator=g),
        grid=(rows, cols) if not protected else None,
        image_index=torch.zeros(images, dtype=torch.long),
        keys=torch.randn(images, n, 8, generator=g),
        encoder_attention={layer: torch.rand(images, n, generator=g).softmax(-1) for layer in layers},
        protected=protected,
    )


@pytest.mark.parametrize("protected", [0, 1])
@pytest.mark.parametrize("r", [1, 9, 24])
def test_bipartite_matching_lays_tokens_out_as_tome_and_keeps_protected_ones(protected, r):
    """Slots: the unmerged sources (even positions; in order where a token is protected), then every
    destination (odd positions) in order; each token's slot is its own or its destination's."""
    metric = torch.randn(3, 49, 8, generator=torch.Generator().manual_seed(r))
    r = min(r, max_merges(49, protected))
    dest, kept = bipartite_soft_matching(metric, r, protected)
    unmerged = 25 - r
    assert kept.shape == (3, 49 - r)
    assert bool((kept[:, :unmerged] % 2 == 0).all())
    assert torch.equal(kept[:, unmerged:], torch.arange(1, 49, 2).expand(3, -1))
    assert bool((kept[:, :unmerged].diff(dim=1) > 0).all()) == bool(protected) or unmerged == 1
    assert torch.equal(torch.gather(dest, 1, kept), torch.arange(49 - r).expand(3, -1))
    assert torch.equal(dest[:, :protected], torch.zeros(3, protected, dtype=torch.long))
    merged_away = torch.ones(3, 49, dtype=torch.bool).scatter_(1, kept, False)
    assert bool((merged_away.nonzero()[:, 1] % 2 == 0).all())  # only sources merge
    assert bool((dest[merged_away] >= unmerged).all())  # into destinations


def test_bipartite_matching_without_merges_is_the_identity():
    dest, kept = bipartite_soft_matching(torch.randn(2, 9, 4), 0, protected=1)
    assert torch.equal(dest, torch.arange(9).expand(2, -1)) and torch.equal(kept, dest)


def test_bipartite_matching_merges_a_token_into_its_copy():
    metric = torch.randn(1, 10, 4, generator=torch.Generator().manual_seed(0))
    metric[0, 4] = 3 * metric[0, 7]  # same direction: cosine 1
    dest, kept = bipartite_soft_matching(metric, 1, protected=0)
    assert 4 not in kept[0].tolist() and dest[0, 4] == dest[0, 7]


def test_bipartite_matching_refuses_too_many_merges():
    with pytest.raises(ValueError, match="cannot merge 26 of 49"):
        bipartite_soft_matching(torch.randn(1, 49, 4), 26, protected=0)


@pytest.mark.parametrize(
    ("tokens", "keep", "steps", "protected"), [(65, 17, 2, 1), (197, 50, 11, 1), (64, 5, 4, 0)]
)
def test_merge_schedule_reaches_the_target_within_each_step(tokens, keep, steps, protected):
    schedule = merge_schedule(tokens, keep, steps, protected)
    assert len(schedule) == steps and sum(schedule) == tokens - keep
    n = tokens
    for r in schedule:
        assert 0 <= r <= max_merges(n, protected)
        n -= r


def test_merge_schedule_says_when_the_target_is_unreachable():
    with pytest.raises(ValueError, match="cannot merge 65 tokens down to 10 in 2 layers"):
        merge_schedule(65, 10, 2, 1)
    with pytest.raises(ValueError, match="at least one encoder layer"):
        merge_schedule(65, 33, 0, 1)


def test_constant_schedule_caps_r_where_a_step_cannot_merge_it():
    assert constant_schedule(17, 8, 3, 1) == [8, 4, 2]


def test_tome_keeps_size_weighted_sums():
    ctx = vision_context(protected=1)
    ctx.sizes = torch.randint(1, 4, ctx.features.shape[:2]).float()
    merged = get_method("tome").select(ctx, 30, {})
    assert isinstance(merged, Merged) and merged.features.shape == (2, 30, 16)
    torch.testing.assert_close(merged.sizes.sum(1), ctx.sizes.sum(1))
    weighted = (ctx.features * ctx.sizes[..., None]).sum(1)
    torch.testing.assert_close(
        (merged.features * merged.sizes[..., None]).sum(1), weighted, atol=1e-4, rtol=0
    )
    torch.testing.assert_close(merged.features[:, 0], ctx.features[:, 0])  # the protected CLS token


def test_visionzip_keeps_the_dominant_and_accounts_for_every_token():
    ctx = vision_context(layers=(5,))
    merged = get_method("visionzip").select(ctx, 16, {})
    num_contextual = round(10 / 64 * 16)
    dominant = ctx.encoder_attention[5].topk(16 - num_contextual, dim=1).indices
    assert all(set(dominant[i].tolist()) <= set(merged.index[i].tolist()) for i in range(2))
    assert torch.equal(merged.sizes.sum(1), torch.full((2,), 48.0))  # every token is in exactly one output
    assert int((merged.sizes == 1).sum()) >= 2 * (16 - num_contextual)


def test_visionzip_without_contextual_tokens_is_a_top_k():
    ctx = vision_context(layers=(5,))
    merged = get_method("visionzip").select(ctx, 12, {"contextual": 0.0})
    expected = ctx.encoder_attention[5].topk(12, dim=1).indices.sort(dim=1).values
    assert torch.equal(merged.index, expected)


def test_hiprune_keeps_anchors_their_neighbours_and_registers():
    """Anchors: the ``round(keep * alpha / 5)`` best at the anchor layer; buffers: the tokens 1 and one
    row (8) before and after each in the flat sequence, clamped to it; registers: the rest."""
    ctx = vision_context(rows=6, cols=8, layers=(2, 5))
    keep, alpha = 20, 0.5
    index = get_method("hiprune").select(ctx, keep, {"alpha": alpha})
    anchors = ctx.encoder_attention[2].topk(round(alpha * keep / 5), dim=1).indices
    for i in range(2):
        kept = set(index[i].tolist())
        anchored = {min(max(a + d, 0), 47) for a in anchors[i].tolist() for d in (0, -1, 1, -8, 8)}
        assert anchored <= kept
        taken = torch.zeros(48, dtype=torch.bool).index_fill_(0, torch.tensor(sorted(anchored)), True)
        top_register = int(ctx.encoder_attention[5][i].masked_fill(taken, -1).argmax())
        assert top_register in kept
