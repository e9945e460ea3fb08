"""VisPruner against a small re-implementation of its official selection, written from reading that code, on
identical inputs: random CLS attention and patch features (a 24x24 grid), then a tiny LLaVA end to end."""

import pytest
import torch
from helpers import random_patches_context

import tokenprune as tp
from tokenprune.context import SelectionContext
from tokenprune.registry import get_method
from tokenprune.testing import tiny_inputs, tiny_model


def vispruner_reference(
    attention: torch.Tensor, features: torch.Tensor, keep: int, ratio: float
) -> torch.Tensor:
    """The patches Theia-4869/VisPruner keeps (commit aefa01a, ``llava/model/llava_arch.py``:
    ``LlavaMetaForCausalLM.encode_images``), re-implemented: a mask ``[B, N]``.

    ``attention [B, H, N]`` is the CLS query's attention to the patches at the feature layer
    (``clip_encoder.py``: ``feature_select``), ``features [B, N, C]`` that layer's patches. The mean over
    heads, argsorted descending, gives the ``int(keep * ratio)`` important patches and the residual, in that
    order. While the residual holds more than the diverse count, ``r = min(8, excess)`` of its even-place
    tokens are removed: those with the highest maximum cosine similarity to an odd-place token; the rest of
    the even-place ones (by falling similarity), then the odd-place ones, are the next residual.
    """
    batch, n, _ = features.shape
    important = int(keep * ratio)
    diverse = keep - important
    order = attention.mean(dim=1).argsort(dim=-1, descending=True)
    important_indices, residual = order[:, :important], order[:, important:]
    normalized = features / features.norm(dim=-1, keepdim=True)
    rows = torch.arange(batch)[:, None]
    while diverse > 0:
        size = residual.shape[1]
        r = min(8, size - diverse)
        if r <= 0:
            break
        tokens = normalized[rows.expand(-1, size), residual]
        scores = (tokens[:, ::2] @ tokens[:, 1::2].transpose(-1, -2)).max(dim=-1).values
        distinct = scores.argsort(dim=-1, descending=True)[:, r:]
        residual = torch.cat(
            [residual[:, ::2][rows.expand(-1, size // 2 - r), distinct], residual[:, 1::2]], dim=-1
        )
    selected = torch.cat([important_indices, residual], dim=-1) if diverse > 0 else important_indices
    return torch.zeros(batch, n, dtype=torch.bool).scatter_(1, selected, True)


def kept_mask(index: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(index.shape[0], n, dtype=torch.bool).scatter_(1, index, True)


@pytest.mark.parametrize("ratio", [0.5, 0.25, 1.0])
@pytest.mark.parametrize("keep", [64, 144, 192])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vispruner_keeps_what_the_reference_keeps(keep, seed, ratio):
    """Random attention of 4 heads and features of 576 patches, 3 images: the same patches.

    Deviations (tokenprune/methods/vispruner.py), applied: the inputs are float32, so the reference scores in
    float32 too; the method gets the attention averaged over heads, as the vision stage computes it.
    """
    attention, features, ctx = random_patches_context(seed)
    kept = get_method("vispruner").select(ctx, keep, {"important_ratio": ratio})
    assert torch.equal(kept_mask(kept, 576), vispruner_reference(attention, features, keep, ratio))


def test_duplicates_go_before_distinct_tokens():
    """A residual of 20 distinct patches and 24 near-copies of one: the copies are removed first."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, 64, 16, generator=g)
    features[0, 40:] = features[0, 40] + 1e-3 * torch.randn(24, 16, generator=g)
    attention = torch.linspace(1, 0, 64)[None]  # patches ranked in order
    ctx = SelectionContext(features, None, torch.zeros(1, dtype=torch.long), encoder_attention={0: attention})
    kept = get_method("vispruner").select(ctx, 40, {})[0]
    assert (kept >= 40).sum() <= 5, kept  # 24 of the 44 residual tokens, 4 of the 20 diverse places
    assert torch.equal(kept[:20], torch.arange(20))  # the important ones


def test_llava_keeps_the_reference_patches():
    """Tiny LLaVA (features of the second-to-last encoder layer, CLS dropped): the image tokens that reach the
    language model are the reference's choice from the eager tower's attention and hidden states."""
    model = tiny_model("llava", "eager")
    inputs = tiny_inputs(model, (1, 1))
    with torch.no_grad():
        full = model.model.vision_tower(
            inputs["pixel_values"], output_attentions=True, output_hidden_states=True
        )
        expected = vispruner_reference(
            full.attentions[-2][:, :, 0, 1:], full.hidden_states[-2][:, 1:], 16, 0.5
        )
        with tp.pruned(model, "vispruner", budget=16) as pruner:
            model(**inputs)
    visual = inputs["input_ids"] == model.config.image_token_id
    kept = pruner.stats.keep_masks[0][visual].view(expected.shape)
    assert torch.equal(kept, expected)
