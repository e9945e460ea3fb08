"""Parity of ``feather`` with the official FEATHER selection, on identical random attention logits.

The reference is re-implemented below; the model-level tests check what the adapter feeds it (the
RoPE-free logits of layer K-1's last query) and that its variable count runs through a model.
"""

import math

import pytest
import torch
from helpers import assert_kept_rows_match, masked_reference

import tokenprune as tp
from tokenprune.context import SelectionContext
from tokenprune.methods._select import top_k
from tokenprune.patches import _internals as internals
from tokenprune.registry import _REGISTRY, get_method
from tokenprune.testing import tiny_inputs, tiny_model, tokens_per_image

TOKENS, GRID, HEADS, STRIDE = 576, (24, 24), 8, 3
BUDGETS = (64, 144, 192)
SEEDS = (0, 1, 2)


def reference_first_layer(logits: torch.Tensor, top_count: int, stride: int = STRIDE) -> torch.Tensor:
    """The image tokens FEATHER keeps at its first pruning layer, sorted, of ``logits [N, H]``.

    Re-implemented from markendo/FEATHER, commit c2a09b2765967601054c7b1fd513ac3e94ee4fc9, file
    prismatic-vlms/prismatic/models/backbones/llm/llama2_models.py, ``FastVLlamaModel.forward`` (its
    ``no_rope_s=`` branch) with ``FastVLlamaModel.calculate_attention_weight``: the last query's
    RoPE-free logits over the image tokens, softmax over those tokens, heads averaged (here in
    float32); the union (``torch.unique``, sorted) of the top ``top_count`` and the square grid's
    every ``stride``-th row and column from the first.
    """
    num_tokens = logits.shape[0]
    side = int(math.sqrt(num_tokens))
    top = logits.float().softmax(dim=0).mean(dim=1).topk(top_count).indices
    grid = torch.arange(num_tokens).view(side, side)[::stride, ::stride].flatten()
    return torch.unique(torch.cat([top, grid]), sorted=True)


def reference_later_layer(logits: torch.Tensor, count: int) -> torch.Tensor:
    """Which of the tokens still there (``logits [U, H]``) FEATHER keeps at its second layer, sorted:
    the same function's later branch ranks them by that attention alone and keeps the top ``count``
    (the reference's count is ``int(U * ratio**2)``)."""
    return logits.float().softmax(dim=0).mean(dim=1).topk(count).indices.sort().values


def random_logits(seed: int, images: int = 1) -> torch.Tensor:
    return torch.randn(images, TOKENS, HEADS, generator=torch.Generator().manual_seed(seed))


def context(logits: torch.Tensor, stage: int = 0, keep_ratio: float | None = None) -> SelectionContext:
    return SelectionContext(
        features=torch.zeros(*logits.shape[:2], 1),
        grid=GRID if stage == 0 else None,
        image_index=torch.zeros(logits.shape[0], dtype=torch.long),
        unrotated_logits=logits,
        stage=stage,
        keep_ratio=keep_ratio,
    )


def feather(ctx: SelectionContext, keep: int, **options) -> torch.Tensor:
    return get_method("feather").select(ctx, keep, options)


@pytest.mark.parametrize("budget", BUDGETS)
def test_reference_mode_keeps_the_reference_union_for_a_budget(budget):
    """Three images in one call: each row, its repeats removed, is that image's reference union."""
    logits = torch.cat([random_logits(seed) for seed in SEEDS])
    rows = feather(context(logits), budget, exact_budget=False)
    counts = set()
    for row, image in zip(rows, logits, strict=True):
        expected = reference_first_layer(image, budget)
        assert torch.equal(torch.unique(row), expected)
        counts.add(len(expected))
    assert len(counts) > 1  # the count varies per image


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("seed", SEEDS)
def test_reference_mode_schedule_keeps_the_reference_sets(budget, seed):
    """A two-stage schedule ``(r, r**2)``, as the reference's: identical sets at both layers."""
    first, second = random_logits(seed), random_logits(seed + 100)
    ratio = budget / TOKENS
    expected = reference_first_layer(first[0], int(TOKENS * ratio))
    kept = torch.unique(feather(context(first, keep_ratio=ratio), round(ratio * TOKENS), exact_budget=False))
    assert torch.equal(kept, expected)
    later = context(second[:, kept], stage=1, keep_ratio=ratio**2)
    chosen = torch.unique(feather(later, round(ratio**2 * TOKENS), exact_budget=False))
    assert torch.equal(chosen, reference_later_layer(second[0, kept], int(len(kept) * ratio**2)))


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("seed", SEEDS)
def test_exact_budget_is_the_reference_union_that_holds_the_budget(budget, seed):
    """Default: the reference's union at the top count whose union has exactly ``budget`` tokens; at a
    later stage, the reference's ranking of the tokens still there, with the schedule's count."""
    first, second = random_logits(seed), random_logits(seed + 100)
    kept = feather(context(first), budget)[0]
    unions = (reference_first_layer(first[0], count) for count in range(TOKENS + 1))
    assert torch.equal(kept, next(union for union in unions if len(union) == budget))
    later_keep = budget // 4
    chosen = feather(context(second[:, kept], stage=1), later_keep)[0]
    assert torch.equal(chosen, reference_later_layer(second[0, kept], later_keep))


def test_the_adapter_scores_with_layer_k_minus_1_without_rope():
    """``unrotated_logits`` are layer K-1's last-query logits over the visual keys, no RoPE, by head,
    as the reference's ``calculate_attention_weight`` computes them before its softmax."""
    seen, layer_inputs = [], []

    @tp.register_method("_record_unrotated", default_layer=2, needs=("unrotated_logits",))
    def record(ctx, keep):
        seen.append(ctx.unrotated_logits)
        return top_k(ctx.unrotated_logits[..., 0], keep)

    model = tiny_model()
    layer = model.model.language_model.layers[1]
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: layer_inputs.append(internals.layer_hidden_states(args, kwargs)),
        with_kwargs=True,
    )
    try:
        inputs = tiny_inputs(model, (1,))
        with tp.pruned(model, "_record_unrotated", keep_ratio=0.5), torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
        del _REGISTRY["_record_unrotated"]
    attn = layer.self_attn
    with torch.no_grad():
        normed = layer.input_layernorm(layer_inputs[0][0])
        query = attn.q_proj(normed[-1]).view(-1, attn.head_dim)  # [H, d], the last token, no RoPE
        keys = attn.k_proj(normed).view(normed.shape[0], -1, attn.head_dim)  # [L, H_kv, d]
        keys = keys.repeat_interleave(query.shape[0] // keys.shape[1], dim=1)
        logits = torch.einsum("hd,lhd->lh", query, keys) / math.sqrt(attn.head_dim)
    visual = inputs["input_ids"][0] == model.config.image_token_id
    torch.testing.assert_close(seen[0][0], logits[visual], atol=1e-5, rtol=0)


def test_reference_mode_runs_a_variable_count_through_the_model():
    """``exact_budget=False`` in a model: each image keeps its top count and up to its grid on top of
    it (counts differing per image), and dropping equals masking at both stages."""
    model = tiny_model()
    images = (1, 2, 1)
    inputs = tiny_inputs(model, images)
    tokens = tokens_per_image(model)
    top, grid = int(tokens * 0.25), len(range(0, int(math.sqrt(tokens)), STRIDE)) ** 2
    schedule = ((1, 0.25), (2, 0.0625))
    with tp.pruned(model, "feather", schedule=schedule, exact_budget=False) as pruner, torch.no_grad():
        got = model(**inputs).logits
    stats = pruner.stats
    visual = inputs["input_ids"] == model.config.image_token_id
    first = (stats.keep_masks[1] & visual).sum(dim=1).tolist()
    assert all(top * n <= kept <= (top + grid) * n for kept, n in zip(first, images, strict=True))
    assert [kept / n for kept, n in zip(first, images, strict=True)] != [top + grid] * len(images)
    expected = masked_reference(model, inputs, stats.keep_masks)
    assert_kept_rows_match(got, expected, stats.keep_mask, inputs["attention_mask"])
