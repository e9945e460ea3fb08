"""SAINT against small re-implementations of its official selections, written from reading that code, on
identical inputs: random keys (577 tokens: CLS and a 24x24 grid) for the encoder's graph-degree drop and
clustered keys for the language model's bipartite rule, then tiny CLIP and LLaVA models through the real
hooks."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tome_block

import tokenprune as tp
from tokenprune.context import SelectionContext
from tokenprune.patches import _encoder_internals as encoder_internals
from tokenprune.registry import get_method
from tokenprune.testing import tiny_encoder, tiny_inputs, tiny_model, tiny_pixels

# github.com/ArmenJeddi/saint
COMMIT = "baaff9526bfe0bcfe79406c6a637238d4b3277d1"


def iterative_drop_full_graph_reference(keys: torch.Tensor, keep_num: int, r: int = 16) -> torch.Tensor:
    """``VLM/saint/prune.py``: ``iterative_drop_full_graph`` (commit above), re-implemented for one image.

    ``keys [n, d]`` are the layer's keys averaged over heads, CLS first; the CLS token stays and
    ``keep_num - 1`` patches with it. While more patches stand, their cosine-similarity graph's degrees
    (row sums among the standing patches, self included) rank them and the top ``r`` fall, with
    ``r = min(standing - (keep_num - 1), standing // r)``, ``r`` being the previous round's count.
    Returns the kept patch indices (token index - 1), ascending.
    """
    patches = F.normalize(keys[1:], dim=-1)
    similarity = patches @ patches.T
    standing = torch.arange(patches.shape[0])
    while standing.shape[0] > keep_num - 1:
        n = standing.shape[0]
        degree = similarity[standing][:, standing].sum(dim=-1)
        r = min(n - (keep_num - 1), n // r)
        fall = degree.argsort(descending=True)[:r]
        stays = torch.ones(n, dtype=torch.bool)
        stays[fall] = False
        standing = standing[stays]
    return standing


def saint_drop_reference(
    metric: torch.Tensor, threshold: float, k: int = 5, gamma: float = 10.0
) -> torch.Tensor:
    """``VLM/transformers/src/transformers/models/llama/modeling_llama.py``: ``saint_drop`` (commit above),
    re-implemented for one image: ``metric [N, d]`` are the visual tokens' cached keys averaged over heads.

    Even tokens are candidates, odd ones the other side; a candidate's neighbours are the odd tokens at
    least ``threshold`` cosine-similar; ``r`` is the number of candidates with ``k`` neighbours or more, and
    the ``r`` of largest ``n * exp(gamma * (mean neighbour similarity - threshold))`` (the mean similarity
    to every odd token where ``n = 0``) fall. Returns the kept token indices, sorted, as the model sorts
    them before gathering.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[0::2], metric[1::2]
    scores = a @ b.T
    valid = scores >= threshold
    counts = valid.sum(dim=-1)
    r = int((counts >= k).sum())
    if r <= 0:
        return torch.arange(metric.shape[0])
    candidate = counts * torch.exp(gamma * ((scores * valid).sum(dim=-1) / counts.clamp(min=1) - threshold))
    final = torch.where(counts > 0, candidate, scores.mean(dim=-1))
    unmatched = final.argsort(descending=True)[r:]
    return torch.cat([unmatched * 2, torch.arange(b.shape[0]) * 2 + 1]).sort().values


@pytest.mark.parametrize("keep", [64, 144, 192, 375])
def test_encoder_drop_matches_the_reference(keep):
    """The reference's setting is 375 patches (``keep_num = 376`` with CLS) of 576."""
    generator = torch.Generator().manual_seed(keep)
    keys = torch.randn(2, 577, 64, generator=generator)
    features = torch.randn(2, 577, 32, generator=generator)
    ctx = SelectionContext(
        features=features, grid=None, image_index=torch.zeros(2, dtype=torch.long), keys=keys, protected=1
    )
    merged = get_method("saint").select(ctx, keep + 1, {})
    for image in range(2):
        expected = iterative_drop_full_graph_reference(keys[image], keep + 1)
        assert merged.index[image, 0] == 0  # CLS
        assert torch.equal(merged.index[image, 1:] - 1, expected)
    assert torch.equal(merged.features, torch.gather(features, 1, merged.index[..., None].expand(-1, -1, 32)))
    assert torch.equal(merged.sizes, torch.ones(2, keep + 1))


def clustered_keys(generator: torch.Generator, heads: int, tokens: int, dim: int = 16) -> torch.Tensor:
    """Keys ``[heads, tokens, dim]`` of tokens in a few clusters: many pairs cross a 0.8 threshold."""
    centers = torch.randn(12, heads, dim, generator=generator)
    members = torch.randint(0, 12, (tokens,), generator=generator)
    return centers[members].transpose(0, 1) + 0.35 * torch.randn(heads, tokens, dim, generator=generator)


@pytest.mark.parametrize("threshold", [0.83, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_language_model_drop_matches_the_reference_at_its_count(seed, threshold):
    """The reference picks its own count; at that count (the budget here) the same tokens fall."""
    generator = torch.Generator().manual_seed(seed)
    heads, tokens = 4, 576
    keys = torch.stack([clustered_keys(generator, heads, tokens) for _ in range(2)])  # [I, H, N, d]
    ctx = SelectionContext(
        features=torch.randn(2, tokens, 8, generator=generator),
        grid=(24, 24),
        image_index=torch.zeros(2, dtype=torch.long),
        keys=keys.transpose(1, 2).flatten(2),  # as the decoder adapter hands them: heads concatenated
        key_heads=heads,
    )
    for image in range(2):
        expected = saint_drop_reference(keys[image].mean(dim=0), threshold)
        assert 0 < tokens - expected.shape[0] <= tokens // 2  # a count the reference's one round reaches
        kept = get_method("saint_llm").select(ctx, expected.shape[0], {"threshold": threshold})
        assert torch.equal(kept[image], expected)


def test_encoder_drop_inside_layer_drop_layer_runs_the_rest_on_the_kept_tokens():
    """Through the real hooks on a tiny CLIP: with ``drop_layer=1`` the reference's patches (chosen from
    layer 1's keys, captured here) are dropped inside layer 1, between its attention and its MLP, as the
    reference's block drops them (``helpers.tome_block``, the block SAINT's patch follows); its MLP and
    layers 2.. run on the CLS token and the kept patches."""
    model = tiny_encoder("clip", "eager", num_layers=4, patches_per_side=8)
    pixels = tiny_pixels(model, 2)
    layers = encoder_internals.encoder_layers(getattr(model, "vision_model", model))
    captured = {}
    handle = layers[1].self_attn.k_proj.register_forward_hook(lambda m, a, out: captured.update(keys=out))
    with torch.no_grad():
        full = model(pixel_values=pixels, output_hidden_states=True)
    handle.remove()
    heads = model.config.num_attention_heads
    keys = captured["keys"].view(2, 65, heads, -1).mean(dim=2)
    kept = torch.stack([iterative_drop_full_graph_reference(keys[b], 17) + 1 for b in range(2)])
    kept = torch.cat([torch.zeros(2, 1, dtype=torch.long), kept], dim=1)  # CLS and 16 patches

    def drop(x, size, metric, weights):
        return torch.gather(x, 1, kept[..., None].expand(-1, -1, x.shape[-1])), size

    with torch.no_grad():
        hidden, _ = tome_block(layers[1], full.hidden_states[1], None, drop, proportional=False)
        for layer in layers[2:]:
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out

    with tp.pruned(model, "saint", budget=16, drop_layer=1) as pruner, torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, hidden, atol=1e-5, rtol=0)
    assert pruner.stats.kept_tokens == [16, 16]


def test_llava_tower_layers_after_the_drop_run_on_the_kept_tokens():
    """In LLaVA's vision tower, the layers after ``drop_layer`` (up to the feature layer and beyond) see
    the CLS token and the kept patches."""
    model = tiny_model("llava")
    layers = encoder_internals.encoder_layers(model.model.vision_tower)
    seen = []
    inputs = tiny_inputs(model, (1, 2))
    with tp.pruned(model, "saint", budget=16, drop_layer=0) as pruner:
        handles = [
            layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for layer in layers
        ]
        with torch.no_grad():
            model(**inputs)
        for handle in handles:
            handle.remove()
    assert seen == [65] + [17] * (len(layers) - 1)
    assert pruner.stats.kept_tokens == [16, 32]  # per prompt: one image, then two


@pytest.mark.parametrize("threshold", [0.5, 0.7])
def test_language_model_drop_through_the_hooks_matches_the_reference_on_the_cached_keys(threshold):
    """On a tiny LLaVA at layer 2: the reference's rule on layer 1's cached keys (heads averaged, as it
    reads them) drops what ``saint_llm`` drops at the reference's count."""
    model = tiny_model("llava")
    inputs = tiny_inputs(model, (1,))
    image = inputs["input_ids"][0] == model.config.image_token_id
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    expected = saint_drop_reference(cache.layers[1].keys[0][:, image].mean(dim=0), threshold)
    assert 0 < image.sum() - expected.shape[0] <= image.sum() // 2
    config = tp.PrunerConfig("saint_llm", budget=expected.shape[0], options={"threshold": threshold})
    with tp.pruned(model, config) as pruner, torch.no_grad():
        model(**inputs)
    assert torch.equal(pruner.stats.keep_mask[0][image].nonzero()[:, 0], expected)
