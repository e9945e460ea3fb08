"""SCOPE against a small re-implementation of its official selection, written from reading that code, on
identical inputs: random CLS attention and patch features (a 24x24 grid), then a tiny LLaVA end to end."""

import pytest
import torch
from helpers import random_patches_context

import tokenprune as tp
from tokenprune.context import SelectionContext
from tokenprune.registry import get_method
from tokenprune.testing import tiny_inputs, tiny_model


def scope_reference(attention: torch.Tensor, features: torch.Tensor, keep: int, alpha: float) -> torch.Tensor:
    """The patches kinredon/SCOPE keeps (commit 6bf7306, ``scope/clip_encoder.py``: ``SCOPE`` as
    ``CLIPVisionTower_SCOPE.forward`` calls it, ``COMBINED=multi``), re-implemented: a mask ``[B, N]``.

    ``attention [B, H, N]`` is the CLS query's attention to the patches at the feature layer, ``features
    [B, N, C]`` that layer's patches. Saliency is the attention summed over heads, to the power ``alpha``.
    With a running coverage ``cur [B, N]`` (zeros), each of ``keep`` rounds scores every candidate column
    ``j`` by ``sum_i max(0, sim[i, j] - cur[i])`` (selected columns zeroed), times its saliency, masks the
    selected ones to -inf, takes the argmax and raises ``cur`` to the picked token's row of similarities.
    """
    batch, n, _ = features.shape
    normalized = features / features.norm(dim=-1, keepdim=True)
    similarity = torch.bmm(normalized, normalized.transpose(1, 2))
    rows = torch.arange(batch)
    selected = torch.zeros(batch, n, dtype=torch.bool)
    picks = torch.empty(batch, keep, dtype=torch.long)
    cur = torch.zeros(batch, n)
    saliency = attention.sum(dim=1) ** alpha
    for i in range(keep):
        unselected = ~selected
        gains = torch.maximum(
            torch.zeros(1), similarity.masked_fill(~unselected.unsqueeze(1), 0) - cur.unsqueeze(2)
        ).sum(dim=1)
        gains = (gains * saliency).masked_fill(~unselected, float("-inf"))
        best = gains.argmax(dim=1)
        selected[rows, best] = True
        picks[:, i] = best
        cur = torch.maximum(cur, similarity[rows, best])
    return torch.zeros(batch, n, dtype=torch.bool).scatter_(1, picks, True)


def kept_mask(index: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(index.shape[0], n, dtype=torch.bool).scatter_(1, index, True)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("keep", [64, 144, 192])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scope_keeps_what_the_reference_keeps(keep, seed, alpha):
    """Random attention of 4 heads and features of 576 patches, 3 images: the same patches.

    Deviations (tokenprune/methods/scope.py), applied: the inputs are float32, so the reference scores in
    float32 too; the method gets the attention averaged over heads, as the vision stage computes it.
    """
    attention, features, ctx = random_patches_context(seed)
    kept = get_method("scope").select(ctx, keep, {"alpha": alpha})
    assert torch.equal(kept_mask(kept, 576), scope_reference(attention, features, keep, alpha))


def test_a_covered_copy_comes_after_every_uncovered_token():
    """Ten copies of one token and six distinct ones, equal saliency: one copy, then the distinct ones (each
    adds its own coverage, a copy adds none), before a second copy."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, 16, 64, generator=g)
    features[0, 6:] = features[0, 6]
    ctx = SelectionContext(
        features, None, torch.zeros(1, dtype=torch.long), encoder_attention={0: torch.ones(1, 16)}
    )
    kept = get_method("scope").select(ctx, 7, {})[0]
    assert kept[:6].tolist() == list(range(6)) and kept[6] >= 6, kept


def test_llava_keeps_the_reference_patches():
    """Tiny LLaVA (features of the second-to-last encoder layer, CLS dropped), two images: the image tokens
    that reach the language model are the reference's choice from the eager tower's attention and hidden
    states."""
    model = tiny_model("llava", "eager")
    inputs = tiny_inputs(model, (1, 1))
    with torch.no_grad():
        full = model.model.vision_tower(
            inputs["pixel_values"], output_attentions=True, output_hidden_states=True
        )
        expected = scope_reference(full.attentions[-2][:, :, 0, 1:], full.hidden_states[-2][:, 1:], 16, 1.0)
        with tp.pruned(model, "scope", budget=16) as pruner:
            model(**inputs)
    visual = inputs["input_ids"] == model.config.image_token_id
    kept = pruner.stats.keep_masks[0][visual].view(expected.shape)
    assert torch.equal(kept, expected)
