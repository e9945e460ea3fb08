"""SparseVLM against a small re-implementation of its official selection, written from reading that code:
its table of stages, three stages over random input embeddings and attention maps at LLaVA-1.5's 576 image
tokens, and a tiny model's own embeddings and attention through the real hooks."""

import math

import pytest
import torch
from conftest import shared_model
from helpers import stage_attention_maps

import tokenprune as tp
from tokenprune.context import Embeddings, InstructionRows, SelectionContext
from tokenprune.registry import get_method
from tokenprune.testing import tiny_inputs

SYSTEM, IMAGE = 35, 576  # LLaVA-1.5: the system prompt's tokens, then 24x24 image tokens, then the text


def sparsevlm_raters(embeddings: torch.Tensor, image_start: int, image_length: int) -> torch.Tensor:
    """The text raters of Gumpest/SparseVLMs for one prompt: positions within the text after the image.

    Re-implemented from commit 26a5f48813c46cd1c7364160354e7fdd3febaa67 (``main``, ``USE_VERSION`` unset:
    v1.5), ``llava/model/language_model/modelling_sparse_llama.py``, ``LlamaDynamicvitModel.forward``
    ("Select Text Raters"): the image's input embeddings times the text's (every token after the image),
    softmax over the text, mean over the image; the text tokens above that vector's mean.
    """
    text_start = image_start + image_length
    relevance = (embeddings[image_start:text_start] @ embeddings[text_start:].T).softmax(dim=1).mean(dim=0)
    return (relevance > relevance.mean()).nonzero()[:, 0]


def sparsevlm_reference(
    weights: torch.Tensor, image_start: int, image_length: int, raters: torch.Tensor, keep: int
) -> torch.Tensor:
    """The image tokens SparseVLM keeps at one stage of one prompt (sorted indices within the image).

    Same commit, ``llava/model/language_model/score.py``, ``attn_postprocess_topk``, fed the pruning layer's
    causal softmax map ``weights [H, L, L]`` as ``forward`` does: heads averaged, the raters' rows over the
    image's columns averaged, the top ``min(count, image_length - 1)`` kept (``count`` from its table).
    """
    text_start = image_start + image_length
    rows = weights.mean(dim=0)[raters + text_start, image_start:text_start].mean(dim=0)
    return rows.topk(min(keep, image_length - 1)).indices.sort().values


def causal_map(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The causal softmax attention map ``[H, L, L]`` of ``query [H, L, d]`` over ``keys [H, L, d]``."""
    length = query.shape[1]
    scores = query @ keys.transpose(1, 2) / math.sqrt(query.shape[-1])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def test_stages_are_the_references_table_on_a_32_layer_model():
    """The reference's settings of 64, 96, 128 and 192 tokens (``score.py``) are the budgets of their last
    stage: after its layers 2, 6 and 15, tokenprune's stages 3, 7 and 16, scaled with the depth."""
    table = {17: (66, 30), 26: (238, 48), 36: (303, 110), 110: (300, 200)}
    for last, earlier in table.items():
        config = tp.PrunerConfig("sparsevlm", budget=last).for_depth(32)
        assert config.stages(IMAGE) == list(zip([3, 7, 16], [*earlier, last], strict=True))
    assert tp.PrunerConfig("sparsevlm", budget=17).for_depth(4).stage_layers == [1, 2, 3]
    assert tp.PrunerConfig("sparsevlm", budget=17, layer=6).for_depth(32).stage_layers == [6, 14, 32]


@pytest.mark.parametrize("final", [17, 64, 192])
@pytest.mark.parametrize("seed", [0, 1])
def test_each_stage_keeps_what_the_reference_keeps(final, seed):
    """Two prompts of different text lengths, batched for ours (the shorter instruction padded and masked)
    and run alone for the reference, over three stages, each with new attention maps over the tokens still
    kept; the raters come from the prompt's input embeddings, once.

    Deviations (tokenprune/methods/sparsevlm.py), applied: our counts are given to the reference (17 is its
    setting of 64, exactly its table); float32 inputs.
    """
    g = torch.Generator().manual_seed(seed)
    heads, dim, texts = 8, 32, (20, 12)
    width = max(texts)
    embeds = [torch.randn(SYSTEM + IMAGE + text, dim, generator=g) for text in texts]
    raters = [sparsevlm_raters(e, SYSTEM, IMAGE) for e in embeds]
    mask = torch.stack([torch.arange(width) < text for text in texts])
    instruction = torch.stack(
        [
            torch.nn.functional.pad(e[SYSTEM + IMAGE :], (0, 0, 0, width - len(e) + SYSTEM + IMAGE))
            for e in embeds
        ]
    )
    embeddings = Embeddings(
        torch.stack([e[SYSTEM : SYSTEM + IMAGE] for e in embeds]),
        torch.ones(2, IMAGE, dtype=torch.bool),
        instruction,
        mask,
    )
    count = IMAGE
    for _, keep in tp.PrunerConfig("sparsevlm", budget=final).for_depth(32).stages(IMAGE):
        visual, expected = [], []
        for text, rater in zip(texts, raters, strict=True):
            total = SYSTEM + count + text
            weights = causal_map(*torch.randn(2, heads, total, dim, generator=g))
            rows = weights[:, SYSTEM + count :, SYSTEM : SYSTEM + count]  # [H, T, N]: the text's rows
            visual.append(torch.nn.functional.pad(rows, (0, 0, 0, width - text)))
            expected.append(sparsevlm_reference(weights, SYSTEM, count, rater, keep))
        rows = InstructionRows(torch.stack(visual), torch.zeros(2, heads, width, width), mask)
        ctx = SelectionContext(
            features=torch.randn(2, count, 16, generator=g),
            grid=None,
            image_index=torch.zeros(2, dtype=torch.long),
            instruction_rows=rows,
            embeddings=embeddings,
        )
        kept = get_method("sparsevlm").select(ctx, keep, {})
        assert torch.equal(kept, torch.stack(expected))
        count = keep
    assert count == final


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_hooks_keep_what_the_reference_keeps_at_each_stage(family):
    """A tiny model's prompt with one image, the default stages (1, 2 and 3 of 4 layers) at renumbered
    positions: the raters come from the model's input embeddings; each stage's reference reads the eager
    attention map, at the layer before the stage, of the unpatched model with the tokens dropped by the
    stages before hidden and the kept ones renumbered, restricted to those kept tokens (the pruned sequence's
    own map). The pruner recomputes only the instruction's rows, with sdpa."""
    eager, model = shared_model(family, "eager"), shared_model(family, "sdpa")
    inputs = tiny_inputs(eager, (1,))
    captured = []
    language_model = model.model.language_model
    handle = language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["inputs_embeds"][0]), with_kwargs=True
    )
    try:
        with torch.no_grad(), tp.pruned(model, "sparsevlm", keep_ratio=0.25) as pruner:
            model(**inputs)
    finally:
        handle.remove()
    image = (inputs["input_ids"][0] == eager.config.image_token_id).nonzero()[:, 0]
    raters = sparsevlm_raters(captured[0].float(), int(image[0]), len(image))
    stages = pruner.config.stages(len(image))
    maps = stage_attention_maps(eager, inputs, pruner.stats.keep_masks, [layer for layer, _ in stages])
    for (_, keep), (layer, weights, visual, kept) in zip(stages, maps, strict=True):
        expected = sparsevlm_reference(weights, int(visual[0]), len(visual), raters, keep)
        assert torch.equal(kept, expected), layer
