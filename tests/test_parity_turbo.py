"""Turbo against a small re-implementation of its official merge, written from reading that code: on
identical random inputs over a whole schedule, and on tiny encoders through the real hooks."""

import pytest
import torch
from helpers import tome_block

import tokenprune as tp
from tokenprune.context import SelectionContext
from tokenprune.merge import merge_schedule
from tokenprune.patches import _encoder_internals as encoder_internals
from tokenprune.registry import get_method
from tokenprune.testing import tiny_encoder

HEADS, HEAD_DIM = 4, 8


def turbo_reference_step(
    x: torch.Tensor,
    size: torch.Tensor,
    metric: torch.Tensor,
    cls_attention: torch.Tensor,
    r: int,
    class_token: bool,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One merge of anakin-skywalker-Joseph/Folder (commit d4750b9, ``BLIP_turbo/turbo/merge.py``:
    ``bipartite_unimodal_matching`` at its defaults ``beta=1, gamma=0``, then ``merge_wavg_ours``; called
    by ``TurboBlock.forward`` of ``BLIP_turbo/turbo/patch/turbo.py``), re-implemented: tokens alternate
    between sources and destinations; each source's score is its best cosine similarity to a destination
    (on ``metric``, the keys averaged over heads) minus ``alpha * 30`` times the attention the CLS query
    pays it (``cls_attention [B, n]``); the ``r`` highest-scoring sources are summed into their match,
    weighted by size. Returns ``[unmerged sources (by position with a class token), destinations]`` and
    their sizes. Only where the reference merges ``r`` tokens (40 tokens or more, ``r`` at most half of
    the unprotected ones)."""
    protected = int(class_token)
    assert x.shape[1] >= 40 and r <= (x.shape[1] - protected) // 2
    unit = metric / metric.norm(dim=-1, keepdim=True)
    score = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2) - alpha * 30 * cls_attention[:, ::2, None]
    if class_token:
        score[:, 0] = float("-inf")
    best, partner = score.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    gone, stay = order[:, :r], order[:, r:]
    if class_token:
        stay = stay.sort(dim=-1).values
    rows = []
    for b in range(x.shape[0]):  # image by image: sums of size-weighted tokens, and sizes, in one table
        table = torch.cat([x[b] * size[b, :, None], size[b, :, None]], dim=1)
        sources, destinations = table[::2], table[1::2].clone()
        destinations.index_add_(0, partner[b, gone[b]], sources[gone[b]])
        rows.append(torch.cat([sources[stay[b]], destinations]))
    table = torch.stack(rows)
    return table[..., :-1] / table[..., -1:], table[..., -1]


def reference_cls_attention(attention: torch.Tensor, class_token: bool) -> torch.Tensor:
    """``TurboAttention``'s ``attn_cls`` from one layer's weights ``[B, H, n, n]``: the CLS query's row,
    heads averaged. Without a class token, the mean over every query (the documented deviation)."""
    rows = attention[:, :, :1] if class_token else attention
    return rows.mean(dim=(1, 2))


@pytest.mark.parametrize(
    ("patches", "protected", "keep", "steps", "alpha"),
    [(576, 1, 64, 22, 1.0), (576, 1, 192, 22, 1.0), (576, 1, 144, 22, 3.0), (196, 0, 50, 11, 1.0)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_turbo_merges_what_the_reference_merges_over_a_schedule(patches, protected, keep, steps, alpha, seed):
    """Every step of a schedule (CLIP-L's 22 merge points, 577 tokens with CLS; 196 tokens without) merges
    the tokens the reference merges, into the same size-weighted averages in the same layout. Keys and
    queries are fixed projections of the current tokens, the CLS attention carries proportional
    attention's ``log(size)`` bias, so each step's choice depends on the merges before it; the semantic
    value changes what is merged."""
    g = torch.Generator().manual_seed(seed)
    n = patches + protected
    x = torch.randn(2, n, 32, generator=g)
    to_query, to_key = (torch.randn(32, HEADS * HEAD_DIM, generator=g) for _ in range(2))
    heads = lambda t: t.view(*t.shape[:2], HEADS, HEAD_DIM).transpose(1, 2)  # noqa: E731
    size, tokens, sizes, changed = torch.ones(2, n), x, torch.ones(2, n), False
    for r in merge_schedule(n, keep + protected, steps, protected):
        query, key = heads(x @ to_query), heads(x @ to_key)
        logits = query @ key.transpose(-1, -2) * HEAD_DIM**-0.5 + size.log()[:, None, None, :]
        attention = reference_cls_attention(logits.softmax(dim=-1), bool(protected))
        metric = key.mean(dim=1)
        plain, _ = turbo_reference_step(x, size, metric, attention, r, bool(protected), alpha=0.0)
        x, size = turbo_reference_step(x, size, metric, attention, r, bool(protected), alpha)
        changed |= plain.shape != x.shape or not torch.allclose(plain, x)
        ctx = SelectionContext(
            features=tokens,
            grid=None,
            image_index=torch.zeros(2, dtype=torch.long),
            keys=metric,
            encoder_attention={0: attention},
            sizes=sizes,
            protected=protected,
        )
        merged = get_method("turbo").select(ctx, tokens.shape[1] - r, {"alpha": alpha})
        tokens, sizes = merged.features, merged.sizes
        torch.testing.assert_close(sizes, size)
        torch.testing.assert_close(tokens, x, atol=1e-5, rtol=1e-5)
    assert tokens.shape[1] == keep + protected
    assert changed  # the semantic value merges other tokens than the similarity alone would


def reference_encoder(model, hidden: torch.Tensor, schedule: list[int], proportional: bool) -> torch.Tensor:
    """``hidden`` through the encoder's layers (eager) as the reference's ``TurboBlock`` runs them, as
    ``tome.patch``'s block (``helpers.tome_block``): ``schedule[i]`` tokens merged inside layer ``i``,
    between its attention and its MLP, from the keys and the attention weights that attention computed;
    with ``proportional`` (the reference's ``prop_attn``), ``log(size)`` as its attention mask once merged."""
    vision_model = getattr(model, "vision_model", model)
    layers = encoder_internals.encoder_layers(vision_model)
    class_token = encoder_internals.has_class_token(vision_model)
    size = None
    with torch.no_grad():
        for layer, r in zip(layers, schedule, strict=True):

            def merge(x, size, metric, weights, r=r):
                if not r:
                    return x, size
                size = torch.ones(x.shape[:2]) if size is None else size
                cls_attention = reference_cls_attention(weights, class_token)
                return turbo_reference_step(x, size, metric, cls_attention, r, class_token)

            hidden, size = tome_block(layer, hidden, size, merge, proportional)
    return hidden


@pytest.mark.parametrize(
    ("family", "attn", "proportional"),
    [("clip", "eager", True), ("clip", "sdpa", True), ("clip", "sdpa", False), ("siglip", "sdpa", True)],
)
def test_hooks_merge_what_the_reference_merges(family, attn, proportional):
    """Through the real hooks (CLS attention recomputed from the captured projections, with the
    ``log(size)`` bias under proportional attention; sdpa returns no weights), a 12x12-patch encoder of six
    layers merged down to 48 patches, inside each layer, equals the reference run on the eager model's own
    keys and attention weights."""
    model, eager = (
        tiny_encoder(family, attn, patches_per_side=12),
        tiny_encoder(family, "eager", patches_per_side=12),
    )
    protected = int(family == "clip")
    hidden = torch.randn(2, protected + 144, 32, generator=torch.Generator().manual_seed(3))
    schedule = merge_schedule(protected + 144, protected + 48, 6, protected)
    expected = reference_encoder(eager, hidden, schedule, proportional)
    with tp.pruned(model, "turbo", budget=48, proportional=proportional) as pruner, torch.no_grad():
        got = hidden
        for layer in encoder_internals.encoder_layers(getattr(model, "vision_model", model)):
            out = layer(got, None)
            got = out[0] if isinstance(out, tuple) else out
    assert pruner.stats.kept_tokens == [48, 48] and got.shape[1] == protected + 48
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
