"""ToMe against a small re-implementation of its official merge, written from reading that code, on
identical random inputs (the same tokens must be merged, step after step) and in tiny encoders against
``tome.patch``'s block (merged inside each layer, between its attention and its MLP)."""

import pytest
import torch
from helpers import tome_block

import tokenprune as tp
from tokenprune.context import SelectionContext
from tokenprune.kernels.gather import merge_tokens_reference
from tokenprune.merge import bipartite_soft_matching, merge_schedule
from tokenprune.patches import _encoder_internals as encoder_internals
from tokenprune.registry import get_method
from tokenprune.testing import tiny_encoder, tiny_inputs, tiny_model, tiny_pixels


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


def tome_reference_encoder(
    layers, hidden: torch.Tensor, r: list[int], class_token: bool, proportional: bool
) -> torch.Tensor:
    """``hidden`` through ``layers`` as ``tome.patch`` runs them (see ``helpers.tome_block``): in layer
    ``i``, after its attention, ``r[i]`` tokens merged by :func:`tome_reference_step` on that attention's
    keys (averaged over heads), capped as ToMe's ``bipartite_soft_matching`` caps ``r`` (at half the
    unprotected tokens); sizes from the first merge on, for proportional attention. The last layer's
    output."""
    size = None
    for layer, step_r in zip(layers, r, strict=True):

        def merge(x, size, metric, weights, step_r=step_r):
            step_r = min(step_r, (x.shape[1] - class_token) // 2)
            if step_r <= 0:
                return x, size
            size = torch.ones(x.shape[:2]) if size is None else size
            source = torch.ones(*x.shape[:2], 1)  # not traced here
            x, size, _ = tome_reference_step(x, size, source, metric, step_r, class_token)
            return x, size

        hidden, size = tome_block(layer, hidden, size, merge, proportional)
    return hidden


def encoder_run(family: str, attn: str):
    """A tiny encoder (or LLaVA, for its vision tower) of ``family``: the model, a function running it on
    two images, its layers and the index of the layer whose output is used."""
    if family == "llava":
        model = tiny_model("llava", attn)
        layers = encoder_internals.encoder_layers(model.model.vision_tower)
        inputs = tiny_inputs(model, (1, 1))
        return model, lambda: model(**inputs), layers, len(layers) + model.config.vision_feature_layer
    model = tiny_encoder(family, attn)
    pixels = tiny_pixels(model, 2)
    layers = encoder_internals.encoder_layers(getattr(model, "vision_model", model))
    return model, lambda: model(pixel_values=pixels), layers, len(layers) - 1


OPTIONS = {
    "r=6": {"r": 6},
    "keep=0.25": {"keep_ratio": 0.25},
    "keep=0.5-plain": {"keep_ratio": 0.5, "proportional": False},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["clip", "siglip", "vit", "llava"])
def test_tome_merges_inside_each_layer_as_tome_patch(family, attn, options):
    """Through the real hooks, every layer up to the one whose output is used (LLaVA's tower: its feature
    layer) merges between its attention and its MLP, with that attention's keys and under proportional
    attention, as ``tome.patch``'s block does: that layer's output equals the reference's, run on the same
    input of the first layer with ToMe's per-layer ``r`` (``r=6`` at every layer, or the schedule that
    ends at ``keep_ratio``)."""
    model, run, layers, output_layer = encoder_run(family, attn)
    class_token = family != "siglip"
    seen = {}

    def first_input(module, args, kwargs):
        seen.setdefault("input", args[0] if args else kwargs["hidden_states"])

    with tp.pruned(model, "tome", **options) as pruner, torch.no_grad():
        handles = [
            layers[0].register_forward_pre_hook(first_input, with_kwargs=True),
            layers[output_layer].register_forward_hook(lambda module, args, out: seen.update(output=out)),
        ]
        run()
        for handle in handles:
            handle.remove()
    tokens, steps = seen["input"].shape[1], output_layer + 1
    if "r" in options:
        r = [options["r"]] * steps
    else:
        keep = round(options["keep_ratio"] * (tokens - class_token)) + class_token
        r = merge_schedule(tokens, keep, steps, int(class_token))
    with torch.no_grad():  # the unpatched layers
        proportional = options.get("proportional", True)
        expected = tome_reference_encoder(layers[:steps], seen["input"], r, class_token, proportional)
    assert pruner.stats.kept_tokens[0] == expected.shape[1] - class_token
    torch.testing.assert_close(seen["output"], expected, atol=1e-5, rtol=1e-5)
