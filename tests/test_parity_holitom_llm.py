"""HoliTom's inner stage (``holitom_llm``) against a small re-implementation of its official code, written
from reading it: the merging on random hidden states, then what the merging layer receives in a tiny LLaVA
(images) and a tiny Qwen2.5-VL (videos), through the decoder stage loop's handling of a :class:`Merged`."""

import pytest
import torch
from conftest import shared_model
from test_parity_holitom import assert_matches

import tokenprune as tp
from tokenprune.context import SelectionContext
from tokenprune.registry import get_method
from tokenprune.testing import tiny_inputs


def inner_reference(hidden: torch.Tensor, attention: torch.Tensor, keep: int) -> dict:
    """cokeshao/HoliTom's ``Qwen2Model_holitom.forward`` (``holitom/modeling_qwen2.py``, commit e9b2972) at
    layer ``HOLITOM_k``, on one image's hidden states ``[N, D]`` and the last token's attention ``[N]``: the
    ``keep`` most attended stay; every other token, in order, is averaged into the kept one of highest cosine
    similarity (similarities taken before any merge), ``kept = (kept + other) / 2``. Returns ``{index: hidden
    state}`` of the kept."""
    top = attention.topk(keep).indices
    others = [i for i in range(hidden.shape[0]) if i not in set(top.tolist())]
    similarity = torch.nn.functional.cosine_similarity(hidden[others][:, None], hidden[top][None], dim=-1)
    out = hidden.clone()
    for other, nearest in zip(others, similarity.argmax(dim=1).tolist(), strict=True):
        out[top[nearest]] = (out[top[nearest]] + out[other]) / 2
    return {int(i): out[i] for i in top}


@pytest.mark.parametrize(("tokens", "keep"), [(16, 4), (30, 11), (9, 9), (24, 1)])
def test_inner_stage_matches_the_reference(tokens, keep):
    g = torch.Generator().manual_seed(tokens)
    hidden, attention = torch.randn(3, tokens, 12, generator=g), torch.rand(3, tokens, generator=g)
    ctx = SelectionContext(features=hidden, grid=None, image_index=torch.zeros(3, dtype=torch.long))
    ctx.attention = attention
    result = get_method("holitom_llm").select(ctx, keep, {})
    for b in range(3):
        expected = inner_reference(hidden[b], attention[b], keep)
        if keep == tokens:  # nothing to merge: plain indices
            assert torch.equal(result[b], torch.arange(tokens))
            continue
        assert_matches(result, expected, b)
        assert result.sizes[b].sum() == tokens


def runs(flags: torch.Tensor) -> list[list[int]]:
    """The runs of consecutive True entries of ``flags [L]``, as lists of indices."""
    out, run = [], []
    for i, flag in enumerate(flags.tolist()):
        if flag:
            run.append(i)
        elif run:
            out.append(run)
            run = []
    return out + ([run] if run else [])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_the_merging_layer_receives_the_merged_hidden_states(family):
    """What a decoder stage's :class:`Merged` features do: the layer it acts at gets them in its kept visual
    tokens' places (the other tokens as they came), in a tiny LLaVA (images) and Qwen2.5-VL (videos)."""
    model = shared_model(family, "sdpa")
    qwen = family != "llava"
    inputs = tiny_inputs(model, (1, 2), videos_per_prompt=(1, 1)) if qwen else tiny_inputs(model, (1, 2))
    token = model.config.video_token_id if qwen else model.config.image_token_id
    layer, before, received = 2, [], []
    layers = model.model.language_model.layers
    media = {"media": "videos"} if qwen else {}
    with tp.pruned(model, "holitom_llm", keep_ratio=0.25, layer=layer, **media) as pruner, torch.no_grad():
        handles = [
            layers[layer - 1].register_forward_hook(
                lambda m, a, out: before.append(out[0] if isinstance(out, tuple) else out)
            ),
            layers[layer].register_forward_pre_hook(
                lambda m, a, kw: received.append(a[0] if a else kw["hidden_states"]), with_kwargs=True
            ),
        ]
        try:
            model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
    keep = pruner.stats.keep_masks[layer]
    visual = inputs["input_ids"] == token
    merged_somewhere = False
    for b in range(keep.shape[0]):
        kept = keep[b].nonzero()[:, 0].tolist()
        got = dict(zip(kept, received[0][b, received[0].shape[1] - len(kept) :], strict=True))
        expected = {i: before[0][b, i] for i in kept}
        for run in runs(visual[b]):
            stays = [i for i in run if keep[b, i]]
            # the method's choice (FastV's ranking: test_parity_fastv.py) as an attention favouring it
            attention = torch.tensor([1.0 + (i in stays) for i in run])
            image = inner_reference(before[0][b, run].float(), attention, len(stays))
            expected |= {run[i]: state for i, state in image.items()}
            merged_somewhere |= len(stays) < len(run)
        for i in kept:
            torch.testing.assert_close(got[i].float(), expected[i].float(), atol=1e-5, rtol=1e-5)
    assert merged_somewhere
