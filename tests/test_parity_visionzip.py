"""VisionZip against a small re-implementation of its official selection and merge, written from reading
that code, on identical inputs: random attention, keys and hidden states (577 tokens: CLS and a 24x24
grid), then a tiny CLIP encoder and a tiny LLaVA end to end."""

import pytest
import torch
from helpers import recorded_image_features

import tokenprune as tp
from tokenprune.attention import query_attention
from tokenprune.context import SelectionContext
from tokenprune.patches import _encoder_internals as encoder_internals
from tokenprune.registry import get_method
from tokenprune.testing import tiny_encoder, tiny_inputs, tiny_model, tiny_pixels


def visionzip_reference(
    attention: torch.Tensor, hidden: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, ...]:
    """The token selection and merge of dvlab-research/VisionZip (commit 3151f6d,
    ``visionzip/clip_encoder.py``: ``CLIPVisionTower_VisionZip.forward``; ``visionzip/main.py``:
    ``visionzip(model, dominant, contextual)`` passes it ``dominant - 1``), re-implemented.

    ``attention [B, H, n, n]`` is the encoder layer's softmax attention, ``hidden [B, n, D]`` its output
    and ``metric [B, n, d]`` its keys averaged over heads (token 0 is CLS). The CLS token's attention to
    the patches, summed over heads, ranks them; the CLS token and the top ``dominant - 1`` patches (in
    token order) are the dominant tokens. Of the other ``R`` tokens (in order), the first ``contextual``
    of ``range(0, R, max(1, R // contextual))`` are targets; each other one joins its most cosine-similar
    target by ``metric``, and a contextual token is its target plus the mean of those that joined it.

    Returns the output ``[CLS, dominant, contextual]`` ``[B, dominant + contextual, D]`` and, as patch
    indices (token index - 1): the dominant patches ``[B, dominant - 1]``, the targets ``[B, contextual]``,
    the merged-away patches ``[B, R - contextual]`` and the target each joined ``[B, R - contextual]``.
    """
    batch, n, dim = hidden.shape
    ranked = attention[:, :, 0, 1:].sum(dim=1).topk(dominant - 1, dim=1).indices + 1
    chosen = torch.cat([torch.zeros(batch, 1, dtype=torch.long), ranked], dim=1)
    rest_mask = torch.ones(batch, n, dtype=torch.bool).scatter_(1, chosen, False)
    dominant_tokens = hidden[~rest_mask].view(batch, dominant, dim)
    rest_tokens = hidden[rest_mask].view(batch, n - dominant, dim)
    rest_metric = metric[rest_mask].view(batch, n - dominant, -1)
    rest_metric = rest_metric / rest_metric.norm(dim=-1, keepdim=True)
    rest_patches = rest_mask.nonzero()[:, 1].view(batch, -1) - 1

    num_rest = n - dominant
    target_rows = torch.arange(0, num_rest, max(1, num_rest // contextual))[:contextual]
    other_rows = torch.tensor([r for r in range(num_rest) if r not in set(target_rows.tolist())])
    assignment = (rest_metric[:, other_rows] @ rest_metric[:, target_rows].transpose(1, 2)).argmax(dim=2)
    one_hot = torch.zeros(batch, len(other_rows), contextual).scatter_(2, assignment[..., None], 1.0)
    counts = one_hot.sum(dim=1).clamp(min=1)[..., None]
    joined = one_hot.transpose(1, 2) @ rest_tokens[:, other_rows] / counts
    contextual_tokens = rest_tokens[:, target_rows] + joined
    targets = rest_patches[:, target_rows]
    return (
        torch.cat([dominant_tokens, contextual_tokens], dim=1),
        chosen[:, 1:].sort(dim=1).values - 1,
        targets,
        rest_patches[:, other_rows],
        targets.gather(1, assignment),
    )


#: (budget, the reference's ``dominant``, ``contextual``): the paper's splits of 64/128/192 tokens, and
#: 144 split as the method's default ``contextual`` share splits it.
SPLITS = [(64, 54, 10), (128, 108, 20), (144, 122, 22), (192, 162, 30)]


def random_layer(seed: int, images: int = 3, heads: int = 4, patches: int = 576, dim: int = 16):
    """Queries and keys ``[I, H, 1 + patches, 8]`` and hidden states ``[I, 1 + patches, dim]``."""
    g = torch.Generator().manual_seed(seed)
    n = 1 + patches
    query, keys = (torch.randn(images, heads, n, 8, generator=g) for _ in range(2))
    return query, keys, torch.randn(images, n, dim, generator=g)


def context(query, keys, hidden, class_token: bool) -> SelectionContext:
    """What the vision stage hands VisionZip: the CLS query's attention (recomputed, heads averaged) or,
    without CLS, every query's, and the keys averaged over heads, of the patches; the CLS token apart."""
    images, n = hidden.shape[:2]
    rows = query[:, :, :1] if class_token else query
    attention = query_attention(rows, keys, torch.ones(images, n, dtype=torch.bool), 8**-0.5)
    return SelectionContext(
        features=hidden[:, 1:],
        grid=(24, 24),
        image_index=torch.zeros(images, dtype=torch.long),
        keys=keys.mean(dim=1)[:, 1:],
        encoder_attention={0: attention[:, 1:]},
        class_token=hidden[:, :1] if class_token else None,
    )


@pytest.mark.parametrize(("keep", "dominant", "contextual"), SPLITS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_visionzip_selects_and_merges_what_the_reference_does(keep, dominant, contextual, seed):
    """The same output tokens in the same order ``[CLS, dominant, contextual]``; in that order they take
    the places of the dominant patches, the targets and the first merged-away patch; sizes count the
    patches each stands for (the CLS token none); with one-hot patches, each contextual token is made of
    the reference's target and the patches that joined it."""
    query, keys, hidden = random_layer(seed)
    attention = (query @ keys.transpose(-1, -2) * 8**-0.5).softmax(dim=-1)  # eager, every row
    expected, dominant_patches, targets, others, joined = visionzip_reference(
        attention, hidden, keys.mean(dim=1), dominant, contextual
    )
    ctx = context(query, keys, hidden, class_token=True)
    merged = get_method("visionzip").select(ctx, keep, {})
    torch.testing.assert_close(merged.features, expected, atol=1e-6, rtol=0)
    places = torch.cat([dominant_patches, targets, others[:, :1]], dim=1).sort(dim=1).values
    assert torch.equal(merged.index, places)
    members = (joined[:, None, :] == targets[:, :, None]).float()  # [I, c, merged away]
    sizes = torch.cat([torch.zeros(3, 1), torch.ones(3, dominant - 1), 1 + members.sum(dim=2)], dim=1)
    assert torch.equal(merged.sizes, sizes)

    ctx.features, ctx.class_token = torch.eye(576).expand(3, -1, -1), torch.zeros(3, 1, 576)
    made_of = get_method("visionzip").select(ctx, keep, {}).features[:, dominant:]
    share = members / members.sum(dim=2, keepdim=True).clamp(min=1)
    expected_made_of = torch.zeros(3, contextual, 576).scatter_(2, targets[..., None], 1.0)
    expected_made_of.scatter_add_(2, others[:, None].expand(-1, contextual, -1), share)
    torch.testing.assert_close(made_of, expected_made_of)


@pytest.mark.parametrize(("keep", "dominant", "contextual"), SPLITS[::3])
@pytest.mark.parametrize("seed", [0, 1])
def test_visionzip_without_a_class_token_ranks_by_every_query(keep, dominant, contextual, seed):
    """An encoder without CLS (no reference): the reference's selection with the attention averaged over
    every query in the CLS row, and its CLS token left out of the output and of the budget."""
    query, keys, hidden = random_layer(seed)
    query, keys, hidden = query[:, :, 1:], keys[:, :, 1:], hidden[:, 1:]  # 576 patches, no CLS
    received = (query @ keys.transpose(-1, -2) * 8**-0.5).softmax(dim=-1).mean(dim=2)  # [I, H, 576]
    attention = torch.zeros(3, 4, 577, 577)
    attention[:, :, 0, 1:] = received
    padded = lambda t: torch.cat([torch.zeros_like(t[:, :1]), t], dim=1)  # noqa: E731
    expected, dominant_patches, targets, _, _ = visionzip_reference(
        attention, padded(hidden), padded(keys.mean(dim=1)), dominant + 1, contextual
    )
    images = torch.ones(3, 576, dtype=torch.bool)
    ctx = SelectionContext(
        features=hidden,
        grid=(24, 24),
        image_index=torch.zeros(3, dtype=torch.long),
        keys=keys.mean(dim=1),
        encoder_attention={0: query_attention(query, keys, images, 8**-0.5)},
    )
    merged = get_method("visionzip").select(ctx, keep, {})
    torch.testing.assert_close(merged.features, expected[:, 1:], atol=1e-6, rtol=0)
    assert torch.equal(merged.index, torch.cat([dominant_patches, targets], dim=1).sort(dim=1).values)


def encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return encoder_internals.encoder_layers(getattr(model, "vision_model", model))


def captured_keys(layer: torch.nn.Module, heads: int) -> tuple[list[torch.Tensor], object]:
    """A list that receives the keys of ``layer`` averaged over heads ``[B, n, d]`` at each call, and the
    hook's handle."""
    keys: list[torch.Tensor] = []
    projection = encoder_internals.layer_attention(layer).k_proj
    handle = projection.register_forward_hook(
        lambda module, args, out: keys.append(out.view(*out.shape[:2], heads, -1).mean(dim=2))
    )
    return keys, handle


@pytest.mark.parametrize(("keep", "dominant", "contextual"), [(16, 14, 2), (32, 27, 5)])
def test_clip_encoder_returns_the_reference_tower_output(keep, dominant, contextual):
    """A standalone CLIP encoder returns what the reference's tower returns at its output layer."""
    model = tiny_encoder("clip", "eager")
    pixels = tiny_pixels(model, 3)
    keys, handle = captured_keys(encoder_layers(model)[-1], 4)
    with torch.no_grad():
        full = model(pixel_values=pixels, output_attentions=True)
    handle.remove()
    expected = visionzip_reference(
        full.attentions[-1], full.last_hidden_state, keys[0], dominant, contextual
    )[0]
    with tp.pruned(model, "visionzip", budget=keep), torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_llava_language_model_reads_the_reference_tokens_in_order():
    """LLaVA (features of the second-to-last layer, CLS dropped): the image tokens the language model
    reads, in prompt order, are the reference tower's output, projected."""
    model = tiny_model("llava", "eager")
    inputs = tiny_inputs(model, (1, 2))
    keys, handle = captured_keys(encoder_layers(model.model.vision_tower)[-2], 4)
    with torch.no_grad():
        full = model.model.vision_tower(
            inputs["pixel_values"], output_attentions=True, output_hidden_states=True
        )
        handle.remove()
        towered = visionzip_reference(full.attentions[-2], full.hidden_states[-2], keys[0], 14, 2)[0]
        expected = model.model.multi_modal_projector(towered)
        with tp.pruned(model, "visionzip", budget=16), recorded_image_features(model) as recorded:
            model(**inputs)
    placed = recorded[-1]
    read = placed[placed.ne(0).any(dim=-1)].view(expected.shape)
    torch.testing.assert_close(read, expected, atol=1e-5, rtol=0)
