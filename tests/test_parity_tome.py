"""ToMe against a small re-implementation of its official merge, written from reading that code, on
identical random inputs: the same tokens must be merged, step after step."""

import pytest
import torch

from tokenprune.context import SelectionContext
from tokenprune.kernels.gather import merge_tokens_reference
from tokenprune.merge import bipartite_soft_matching, merge_schedule
from tokenprune.registry import get_method


def tome_reference_step(
    x: torch.Tensor, size: torch.Tensor, source: torch.Tensor, metric: torch.Tensor, r: int, class_token: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One merge of facebookresearch/ToMe (commit af95e4b, ``tome/merge.py``: ``bipartite_soft_matching``
    with ``class_token``, then ``merge_wavg`` and ``merge_source``), re-implemented: the alternate tokens
    are sources and destinations; the ``r`` sources whose best cosine match is highest are summed into
    it, weighted by size; the result is ``[unmerged sources, destinations]``, the unmerged sources sorted
    by position when there is a class token (whose row may not merge). ``source [B, n, n0]`` marks the
    original tokens each token holds."""
    unit = metric / metric.norm(dim=-1, keepdim=True)
    similarity = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)
    if class_token:
        similarity[:, 0, :] = float("-inf")
    best, partner = similarity.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    merged, unmerged = ranked[:, :r], ranked[:, r:]
    if class_token:
        unmerged = unmerged.sort(dim=-1).values
    into = partner.gather(1, merged)

    def merge(t: torch.Tensor, reduce: str) -> torch.Tensor:
        even, odd = t[:, ::2], t[:, 1::2]
        rows = lambda index: index[..., None].expand(-1, -1, t.shape[-1])  # noqa: E731
        odd = odd.scatter_reduce(1, rows(into), even.gather(1, rows(merged)), reduce=reduce)
        return torch.cat([even.gather(1, rows(unmerged)), odd], dim=1)

    total = merge(size[..., None], "sum")
    return merge(x * size[..., None], "sum") / total, total[..., 0], merge(source, "amax")


@pytest.mark.parametrize(
    ("patches", "protected", "keep", "steps"),
    [(576, 1, 64, 22), (576, 1, 144, 22), (576, 1, 192, 22), (196, 0, 50, 11), (196, 1, 30, 11)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_tome_merges_what_the_reference_merges_over_a_schedule(patches, protected, keep, steps, seed):
    """Every step of a schedule (CLIP-L's 22 merge points, 577 tokens with CLS; a 196-token encoder with
    and without CLS) lays out and merges the tokens as ToMe does: the same original tokens in every slot,
    and the same size-weighted averages. The metric is a fixed projection of the current tokens, as keys
    are, so a step's choice depends on the merges before it."""
    g = torch.Generator().manual_seed(seed)
    n = patches + protected
    x = torch.randn(2, n, 32, generator=g)
    projection = torch.randn(32, 16, generator=g)
    size, source = torch.ones(2, n), torch.eye(n).expand(2, n, n)
    tokens, sizes, groups = x, size, source  # ours
    for r in merge_schedule(n, keep + protected, steps, protected):
        x, size, source = tome_reference_step(x, size, source, x @ projection, r, bool(protected))
        ctx = SelectionContext(
            features=tokens,
            grid=None,
            image_index=torch.zeros(2, dtype=torch.long),
            keys=tokens @ projection,
            sizes=sizes,
            protected=protected,
        )
        merged = get_method("tome").select(ctx, tokens.shape[1] - r, {})
        dest, _ = bipartite_soft_matching(ctx.keys, r, protected)  # what the method merged, token by token
        before = groups
        groups = merge_tokens_reference(groups, torch.ones_like(sizes), dest, tokens.shape[1] - r)[0] > 0
        tokens, sizes, groups = merged.features, merged.sizes, groups.float()
        assert torch.equal(groups, source)
        held = before.gather(1, merged.index[..., None].expand(-1, -1, n))  # each slot's own token's
        assert bool((held <= groups).all())  # a slot takes the place of a token it holds
        torch.testing.assert_close(sizes, size)
        torch.testing.assert_close(tokens, x, atol=1e-5, rtol=1e-5)
    assert tokens.shape[1] == keep + protected
