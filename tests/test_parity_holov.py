"""HoloV against a small re-implementation of its official selection, written from reading that code, on
identical inputs: random CLS attention and projected features (a 24x24 grid), then a tiny LLaVA end to end."""

import pytest
import torch

import tokenprune as tp
from tokenprune.context import SelectionContext
from tokenprune.methods.holov import crop_count
from tokenprune.registry import get_method
from tokenprune.testing import tiny_inputs, tiny_model


def holov_reference(
    tokens: torch.Tensor, attention: torch.Tensor, crops: int, keep: int, alpha: float = 0.09
) -> torch.Tensor:
    """The tokens obananas/HoloV keeps (commit 1d2e65e, ``llava/model/utils.py``: ``HoloV``, called with the
    projected features and the heads-averaged CLS attention, ``num_patches=crops``,
    ``new_image_token_num=keep``), re-implemented: a mask ``[B, N]`` (short of ``keep`` where the reference
    pads zero tokens).

    Per image: the ``N`` tokens are split in order into ``crops`` runs, the first ``N % crops`` one longer
    (empty ones skipped). A run of one token scores its attention; a longer one of ``n`` tokens: ``S`` their
    cosine similarities (norms plus 1e-6) times ``1 - eye``, ``mean = S.sum(1) / (n - 1)``, ``var = ((S -
    mean[:, None]) ** 2).sum(1) / (n - 1)``, ``a = attention * 1e3``, ``scale = mean(|a|) / (mean(|var|) +
    1e-6)``, the run's score ``mean(a + alpha * (var * scale))``. Weights are the scores over their sum plus
    1e-6; a run gets ``floor(weight * keep)`` tokens, the ``keep - sum`` runs of largest weight (``topk``) one
    more; a run keeps all its tokens where it got as many, else its ``topk`` by attention.
    """
    masks = []
    for image_tokens, image_attention in zip(tokens, attention, strict=True):
        n_tokens = image_tokens.shape[0]
        size, remainder = divmod(n_tokens, crops)
        runs, start = [], 0
        for p in range(crops):
            length = size + (1 if p < remainder else 0)
            if length > 0:
                runs.append(torch.arange(start, start + length))
            start += length
        scores = []
        for run in runs:
            run_tokens, run_attention = image_tokens[run], image_attention[run]
            n = len(run)
            if n <= 1:
                scores.append(run_attention.mean())
                continue
            normalized = run_tokens / (run_tokens.norm(dim=1, keepdim=True) + 1e-6)
            similarity = torch.mm(normalized, normalized.transpose(0, 1)) * (1 - torch.eye(n))
            mean = similarity.sum(dim=1) / (n - 1)
            variance = ((similarity - mean.unsqueeze(1)) ** 2).sum(dim=1) / (n - 1)
            scaled = run_attention * 1e3
            scale = torch.mean(torch.abs(scaled)) / (torch.mean(torch.abs(variance)) + 1e-6)
            scores.append((scaled + alpha * (variance * scale)).mean())
        scores = torch.stack(scores)
        weights = scores / (scores.sum() + 1e-6)
        allocated = (weights * keep).floor().long()
        remaining = keep - allocated.sum()
        if remaining > 0:
            for p in torch.topk(weights, k=min(int(remaining), len(weights))).indices:
                allocated[p] += 1
        mask = torch.zeros(n_tokens, dtype=torch.bool)
        for run, count in zip(runs, allocated.tolist(), strict=True):
            if count >= len(run):
                mask[run] = True
            elif count > 0:
                mask[run[torch.topk(image_attention[run], k=count).indices]] = True
        masks.append(mask)
    return torch.stack(masks)


def kept_mask(index: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(index.shape[0], n, dtype=torch.bool).scatter_(1, index, True)


def with_exact_budget(reference: torch.Tensor, attention: torch.Tensor, keep: int) -> torch.Tensor:
    """The deviation for an exact budget, applied to the reference's mask: where it keeps fewer than ``keep``
    (a crop got more than it holds; the reference pads zero tokens), the most attended of the other tokens
    too."""
    rows = []
    for mask, image_attention in zip(reference, attention, strict=True):
        short = keep - int(mask.sum())
        fill = image_attention.masked_fill(mask, float("-inf")).topk(short).indices
        rows.append(mask.clone().index_fill_(0, fill, True))
    return torch.stack(rows)


def select(features, attention, keep, **options) -> torch.Tensor:
    ctx = SelectionContext(
        features=features,
        grid=None,
        image_index=torch.zeros(features.shape[0], dtype=torch.long),
        encoder_attention={22: attention},
    )
    return get_method("holov").select(ctx, keep, options)


@pytest.mark.parametrize("crops", [None, 16])
@pytest.mark.parametrize("keep", [64, 144, 192])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_holov_keeps_what_the_reference_keeps(keep, seed, crops):
    """Random attention and features of 576 tokens, 3 images: the same tokens, with the default crop count
    (16, 7 and 5 crops of 576 at 64, 144 and 192: uneven at 144 and 192, every crop taking what it got) and
    the LLaVA code's 16 (where a crop gets more than its 36 tokens at 144 and 192).

    Deviations (tokenprune/methods/holov.py), applied: the inputs are float32, so the reference scores in
    float32 too; the method gets the attention averaged over heads, as the reference does; the budget is
    exact (:func:`with_exact_budget`).
    """
    g = torch.Generator().manual_seed(seed)
    attention = (2 * torch.randn(3, 576, generator=g)).softmax(dim=-1)
    features = torch.randn(3, 576, 64, generator=g)
    reference = holov_reference(features, attention, crop_count(576, keep) if crops is None else crops, keep)
    if crops is None:
        assert reference.sum(dim=1).tolist() == [keep] * 3  # every crop could take what it got
    expected = with_exact_budget(reference, attention, keep)
    assert torch.equal(kept_mask(select(features, attention, keep, crops=crops), 576), expected)


def test_the_variance_cancels_in_the_shares():
    """The reference rescales each crop's variances to its mean attention, so the variance term adds ``alpha``
    times the crop's mean attention to its score: crops weigh as their attention, whatever ``alpha``."""
    g = torch.Generator().manual_seed(0)
    attention = (2 * torch.randn(2, 576, generator=g)).softmax(dim=-1)
    features = torch.randn(2, 576, 64, generator=g) + 4 * torch.rand(2, 576, 1, generator=g) ** 2
    kept = [select(features, attention, 64, alpha=alpha) for alpha in (0.0, 0.09, 5.0)]
    assert torch.equal(kept[0], kept[1]) and torch.equal(kept[0], kept[2])


def test_crop_counts():
    """The reference's Qwen code's rule, 16 at LLaVA-1.5's 64 of 576 (the constant of its LLaVA code)."""
    assert [crop_count(576, k) for k in (64, 128, 144, 192, 576)] == [16, 8, 7, 5, 1]


@pytest.mark.parametrize("n_tokens", [5, 40, 47])
def test_short_images_and_crops_of_one_token(n_tokens):
    """More crops than tokens (every crop of one token, scored by its attention) and runs of one or two
    tokens: the reference's choice."""
    g = torch.Generator().manual_seed(n_tokens)
    attention = torch.rand(2, n_tokens, generator=g).softmax(dim=-1)
    features = torch.randn(2, n_tokens, 16, generator=g)
    keep = 4
    expected = with_exact_budget(holov_reference(features, attention, 24, keep), attention, keep)
    assert torch.equal(kept_mask(select(features, attention, keep, crops=24), n_tokens), expected)


def test_a_crop_given_more_than_it_holds_leaves_the_rest_to_the_most_attended():
    """One crop with almost all the attention is allocated more than its 36 tokens: the reference keeps them
    and pads with zero tokens; here the rest of the budget goes to the most attended of the others."""
    g = torch.Generator().manual_seed(0)
    attention = torch.rand(2, 576, generator=g)
    attention[:, 36:72] += 50.0
    attention = attention / attention.sum(dim=1, keepdim=True)
    features = torch.randn(2, 576, 32, generator=g)
    reference = holov_reference(features, attention, 16, 64)
    assert (reference.sum(dim=1) < 64).all() and reference[:, 36:72].all()
    kept = kept_mask(select(features, attention, 64, crops=16), 576)
    assert torch.equal(kept, with_exact_budget(reference, attention, 64))


def test_llava_keeps_the_reference_tokens():
    """Tiny LLaVA, two images: the reference's choice from the projected features of the second-to-last
    encoder layer (CLS dropped) and the eager tower's CLS attention there, averaged over heads; 7 uneven crops
    of 64 tokens at a budget of 16."""
    model = tiny_model("llava", "eager")
    inputs = tiny_inputs(model, (1, 1))
    with torch.no_grad():
        full = model.model.vision_tower(
            inputs["pixel_values"], output_attentions=True, output_hidden_states=True
        )
        projected = model.model.multi_modal_projector(full.hidden_states[-2][:, 1:])
        attention = full.attentions[-2][:, :, 0, 1:].mean(dim=1)
        expected = holov_reference(projected, attention, crop_count(64, 16), 16)
        with tp.pruned(model, "holov", budget=16) as pruner:
            model(**inputs)
    assert expected.sum(dim=1).tolist() == [16, 16]
    visual = inputs["input_ids"] == model.config.image_token_id
    kept = pruner.stats.keep_masks[0][visual].view(expected.shape)
    assert torch.equal(kept, expected)
