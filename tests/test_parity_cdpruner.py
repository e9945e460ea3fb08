"""CDPruner against a small re-implementation of its official selection, written from reading that code, on
identical inputs: random visual tokens and instructions (a 24x24 grid), then a tiny LLaVA end to end."""

import pytest
import torch

import tokenprune as tp
from tokenprune.context import Instruction, SelectionContext
from tokenprune.registry import get_method
from tokenprune.testing import tiny_inputs, tiny_model


def cdpruner_reference(
    image_features: torch.Tensor,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    keep: int,
    negate: bool = True,
    theta: float | None = None,
) -> torch.Tensor:
    """The tokens Theia-4869/CDPruner keeps (commit 9541616, ``llava/model/llava_arch.py``:
    ``LlavaMetaForCausalLM.encode_images``), re-implemented: sorted indices ``[B, keep]``.

    ``image_features [B, N, D]`` are the projected visual tokens, ``image_embeds [B, N, C]`` the tokens'
    embeddings in the text encoder's space (CLIP's projected patches: ``clip_encoder.py``, ``forward``) and
    ``text_embeds [M, C]`` the instruction's (CLIP's text tower, one per 77-token segment). Similarity: the
    cosine of the tokens, normalised in their dtype, then float32. Relevance: the mean over the text
    embeddings of the negated (``negate``) cosine, less its minimum over the batch plus 1e-6, over its range;
    ``exp(theta / (2 (1 - theta)) r)`` with the commented-out ``theta``. The kernel
    ``r_i * similarity_ij * r_j``; from its diagonal, ``keep`` rounds of: pick the largest gain, its new
    factor row ``(kernel[pick] - sum_t factor[t, pick] * factor[t]) / sqrt(gain[pick])``, the gains less the
    row's squares, the pick's gain -inf.
    """
    batch, num_tokens, _ = image_features.shape
    normalized = (image_features / image_features.norm(dim=-1, keepdim=True)).float()
    similarity = torch.matmul(normalized, normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance if negate else relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros(keep, batch, num_tokens)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty(keep, batch, dtype=torch.long)
    every = torch.arange(batch)
    for i in range(keep):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[every, j] - torch.einsum("tb,tbn->bn", cis[:i, every, j], cis[:i])) / torch.sqrt(
            di2s[every, j]
        ).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[every, j] = -float("inf")
    return torch.sort(select_idx.t()).values


def random_tokens(images: int, seed: int, dim: int = 256) -> torch.Tensor:
    """Visual tokens ``[I, 576, dim]`` of a few directions each (so that similarity matters) plus noise (so
    that the kernel's rank exceeds every budget), of various norms."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(images, 576, 12, generator=g) @ torch.randn(images, 12, dim, generator=g)
    tokens = directions + 0.7 * torch.randn(images, 576, dim, generator=g)
    return tokens * (0.5 + torch.rand(images, 576, 1, generator=g))


def random_instruction(images: int, seed: int, dim: int = 256, length: int = 9) -> Instruction:
    """Instruction embeddings ``[I, length, dim]``, the last image's instruction two tokens shorter."""
    g = torch.Generator().manual_seed(seed + 100)
    mask = torch.ones(images, length, dtype=torch.bool)
    mask[-1, -2:] = False
    features = torch.randn(images, length, dim, generator=g)
    return Instruction(torch.randn(images, length, 8, generator=g), features, mask)


def deviated_text(instruction: Instruction, image: int) -> torch.Tensor:
    """The deviation of tokenprune/methods/cdpruner.py: the instruction's embedding is the mean input
    embedding of its tokens, one text embedding ``[1, D]`` (in place of CLIP's text tower's)."""
    return instruction.features[image][instruction.mask[image]].mean(dim=0, keepdim=True)


@pytest.mark.parametrize("options", [{}, {"negative_relevance": True}, {"theta": 0.5}])
@pytest.mark.parametrize("keep", [64, 144, 192])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cdpruner_keeps_what_the_reference_keeps(options, keep, seed):
    """Three images of 576 tokens (a 24x24 grid), each with its own instruction, each selected alone by the
    reference and together by ours, at the defaults, negated as the reference and with its ``theta``.

    Deviations (tokenprune/methods/cdpruner.py), applied: the visual tokens stand for CLIP's patch embeddings
    and the mean of the instruction's input embeddings for CLIP's text embedding; the relevance is negated
    only with ``negative_relevance``; each image is rescaled alone (the reference's batch is one image).
    """
    tokens = random_tokens(3, seed)
    instruction = random_instruction(3, seed)
    ctx = SelectionContext(tokens, (24, 24), torch.zeros(3, dtype=torch.long), instruction=instruction)
    kept = get_method("cdpruner").select(ctx, keep, options)
    negate = options.get("negative_relevance", False)
    for image in range(3):
        alone = tokens[image : image + 1]
        text = deviated_text(instruction, image)
        expected = cdpruner_reference(alone, alone, text, keep, negate, options.get("theta"))
        assert expected.unique().numel() == keep
        assert torch.equal(kept[image : image + 1], expected), (image, kept[image] != expected[0])


def test_a_wrong_selection_fails():
    """The comparison above can fail: a reference that does not condition on the pick's earlier rows (a
    diagonal-only greedy, relevance alone) keeps other tokens."""
    tokens, instruction = random_tokens(1, 0), random_instruction(1, 0)
    ctx = SelectionContext(tokens, (24, 24), torch.zeros(1, dtype=torch.long), instruction=instruction)
    kept = get_method("cdpruner").select(ctx, 64, {})
    text = deviated_text(instruction, 0)
    assert not torch.equal(kept, cdpruner_reference(tokens, tokens, text, 64, negate=True))
    unit = torch.nn.functional.normalize(tokens[0], dim=-1)
    by_relevance = (unit @ torch.nn.functional.normalize(text, dim=-1).T)[:, 0].topk(64).indices.sort().values
    assert not torch.equal(kept[0], by_relevance)


def test_more_picks_than_the_kernel_rank_keep_distinct_tokens():
    """Past the feature dimension the gains are rounding noise (the reference's square roots turn NaN there):
    the picks go on, each token once, the first ``dim`` as the reference's."""
    tokens, instruction = random_tokens(2, 3, dim=32), random_instruction(2, 3, dim=32)
    ctx = SelectionContext(tokens[:, :96], None, torch.zeros(2, dtype=torch.long), instruction=instruction)
    kept = get_method("cdpruner").select(ctx, 80, {})
    assert all(row.unique().numel() == 80 for row in kept)
    first = get_method("cdpruner").select(ctx, 24, {})
    for image in range(2):
        alone = tokens[image : image + 1, :96]
        text = deviated_text(instruction, image)
        assert torch.equal(first[image : image + 1], cdpruner_reference(alone, alone, text, 24, negate=False))


def test_llava_keeps_the_reference_tokens():
    """Tiny LLaVA, two prompts of one image each: the image tokens that reach the language model are the
    reference's choice from the projected image features and the mean input embedding of the tokens after
    the image."""
    model = tiny_model("llava")
    inputs = tiny_inputs(model, (1, 1))
    image_token = model.config.image_token_id
    with torch.no_grad():
        encoded = model.model.get_image_features(pixel_values=inputs["pixel_values"])
        features = torch.stack(list(encoded.pooler_output))  # the projected tokens of each image
        embeddings = model.get_input_embeddings()(inputs["input_ids"])
        with tp.pruned(model, "cdpruner", budget=16) as pruner:
            model(**inputs)
    for row in range(2):
        ids, real = inputs["input_ids"][row], inputs["attention_mask"][row].bool()
        visual = ids == image_token
        after = real & (torch.arange(len(ids)) > visual.nonzero().max())
        text = embeddings[row][after].float().mean(dim=0, keepdim=True)
        image = features[row : row + 1].float()
        expected = cdpruner_reference(image, image, text, 16, negate=False)
        kept = pruner.stats.keep_masks[0][row][visual].nonzero()[:, 0]
        assert torch.equal(kept, expected[0])
