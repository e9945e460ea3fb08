"""VScan against a small re-implementation of its official code, written from reading it: the encoder stage's
global and local scans and merging on random CLS attention and projected features (a 24x24 grid), its split
of the budget between the two stages, then both stages through a tiny LLaVA's real hooks."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import tokenprune as tp
from tokenprune.config import with_decoder_stage
from tokenprune.context import SelectionContext
from tokenprune.registry import get_method
from tokenprune.testing import tiny_inputs, tiny_model


def scans_reference(shallow: torch.Tensor, deep: torch.Tensor, visual_token_num: int, window_size: int = 6):
    """The patches Tencent/SelfEvolvingAgent's VScan keeps in the encoder, a mask ``[B, N]``.

    Re-implemented from commit a82450e, ``VScan/llava/model/llava_arch.py``: ``encode_images`` (with
    ``window_cls_selection``), on the heads-averaged CLS attention of encoder layers 5 (``shallow``) and -2
    (``deep``), ``[B, 24 * 24]``. Local scan: the ``int(visual_token_num * 0.5) // windows`` patches of
    highest ``shallow`` attention in each ``window_size`` square window; global scan: the ``visual_token_num
    - int(visual_token_num * 0.5)`` of highest ``deep`` attention, the local ones set to 0 first.
    """
    batch, n = shallow.shape
    side = int(math.isqrt(n))
    per_side = side // window_size
    local_count = int(visual_token_num * 0.5)
    per_window = local_count // (per_side * per_side)
    masks = []
    for b in range(batch):
        grid = shallow[b].view(side, side)
        chosen = []
        for i in range(per_side):
            for j in range(per_side):
                tile = grid[i * window_size : (i + 1) * window_size, j * window_size : (j + 1) * window_size]
                for flat in tile.reshape(-1).topk(per_window).indices.tolist():
                    dy, dx = divmod(flat, window_size)
                    chosen.append((i * window_size + dy) * side + j * window_size + dx)
        rest = deep[b].clone()
        rest[chosen] = 0
        chosen += rest.topk(visual_token_num - local_count).indices.tolist()
        mask = torch.zeros(n, dtype=torch.bool)
        mask[chosen] = True
        masks.append(mask)
    return torch.stack(masks)


def merging_reference(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The tokens VScan's ``token_merging`` (same file, ``scaling=1``) leaves in the kept places ``[B, T,
    D]``: each other token goes to the kept token of highest cosine similarity, and a kept token becomes the
    sum of itself and those that came, over one plus their count."""
    rows = []
    for image, kept in zip(features, mask, strict=True):
        retained, others = image[kept], image[~kept]
        nearest = torch.nn.functional.cosine_similarity(others[:, None], retained[None], dim=-1).argmax(dim=1)
        total = retained.clone().index_add_(0, nearest, others)
        count = torch.ones(len(retained)).index_add_(0, nearest, torch.ones(len(others)))
        rows.append(total / count[:, None])
    return torch.stack(rows)


def layer_prune_reference(
    query: torch.Tensor, keys: torch.Tensor, image_start: int, image_tokens: int, keep: int
):
    """The image tokens VScan keeps at its language-model layer (indices within the image): same repository,
    ``VScan/llava/model/modeling_llama_x.py``, ``LlamaModel.layer_prune`` (inference branch). ``query [H,
    L, d]`` and ``keys [H, L, d]`` are that layer's projections of its input, RoPE applied; the prompt's last
    token's row, softmax in float32, averaged over heads; the ``keep`` image tokens of highest attention."""
    weights = (query[:, -1:] @ keys.transpose(1, 2) / math.sqrt(query.shape[-1])).softmax(dim=-1)
    scores = weights.mean(dim=0)[0, image_start : image_start + image_tokens]
    return scores.topk(keep).indices.sort().values


def with_exact_budget(reference: torch.Tensor, deep: torch.Tensor, keep: int) -> torch.Tensor:
    """The deviation for an exact budget, applied to the reference's mask: where its local scan falls short
    (``keep // 2`` not a multiple of the windows), the global scan takes that many more."""
    rows = []
    for mask, attention in zip(reference, deep, strict=True):
        fill = attention.masked_fill(mask, float("-inf")).topk(keep - int(mask.sum())).indices
        rows.append(mask.clone().index_fill_(0, fill, True))
    return torch.stack(rows)


def test_default_split_is_the_references():
    """``keep_ratio=32/576`` on LLaVA-1.5-7B's 32 layers: 96 patches from the encoder, 32 from layer 16 (the
    scripts' ``--visual_token_num 96 --layer_list '[16]' --image_token_list '[32]'``); Qwen2.5-VL-7B's 28
    layers: layer 14 (its script's ``--layer-list '[14]'``), a third of the encoder's tokens."""
    config = tp.PrunerConfig("vscan", keep_ratio=32 / 576).for_depth(32)
    assert (config.method, config.vision.method) == ("vscan_llm", "vscan")
    assert config.vision.kept_per_image(576) == 96 and config.stages(576) == [(16, 32)]
    assert tp.PrunerConfig("vscan", keep_ratio=0.0556).for_depth(28).stage_layers == [14]
    assert tp.PrunerConfig("vscan", budget=32).for_depth(32).vision.kept_per_image(576) == 96
    assert tp.PrunerConfig("vscan", budget=300).for_depth(32).vision.kept_per_image(576) == 576  # at most all
    with pytest.raises(ValueError, match="larger than the 576"):  # composed by hand: the budget as given
        tp.PrunerConfig(
            "vscan_llm", budget=32, vision=tp.PrunerConfig("vscan", budget=900)
        ).vision.kept_per_image(576)
    everything = tp.PrunerConfig("vscan", keep_ratio=1.0).for_depth(32)
    assert everything.vision.keep_ratio == 1.0 and everything.keep_ratio == 1.0
    encoder = tp.PrunerConfig("vscan", keep_ratio=0.5)
    assert encoder.for_depth(0) is encoder  # no language model: the encoder stage alone
    with pytest.raises(ValueError, match="names no decoder stage"):
        with_decoder_stage(tp.PrunerConfig("hiprune", keep_ratio=0.5))


@pytest.mark.parametrize("keep", [64, 144, 192])
@pytest.mark.parametrize("seed", [0, 1])
def test_encoder_stage_keeps_and_merges_what_the_reference_does(keep, seed):
    """Random CLS attention at layers 5 and 22 and projected features of 576 tokens, 3 images: the same
    patches (at 144 the local scan's 72 fill 16 windows with 4 each, 8 short: the global scan takes them),
    and the same merged tokens in their places, in patch order.

    Deviations (tokenprune/methods/vscan.py), applied: the exact budget (:func:`with_exact_budget`); the
    inputs are float32, so the reference scores and merges in float32 too.
    """
    g = torch.Generator().manual_seed(seed)
    shallow, deep = ((2 * torch.randn(3, 576, generator=g)).softmax(dim=-1) for _ in range(2))
    features = torch.randn(3, 576, 32, generator=g)
    reference = scans_reference(shallow, deep, keep)
    assert reference.sum(dim=1).tolist() == [keep - (keep == 144) * 8] * 3
    expected = with_exact_budget(reference, deep, keep)
    ctx = SelectionContext(
        features=features,
        grid=(24, 24),
        image_index=torch.zeros(3, dtype=torch.long),
        encoder_attention={5: shallow, 22: deep},
    )
    merged = get_method("vscan").select(ctx, keep, {})
    kept = torch.zeros(3, 576, dtype=torch.bool).scatter_(1, merged.index, True)
    assert torch.equal(kept, expected) and torch.equal(merged.index, merged.index.sort(dim=1).values)
    torch.testing.assert_close(merged.features, merging_reference(features, expected), atol=1e-5, rtol=1e-5)
    assert merged.sizes.sum(dim=1).tolist() == [576.0] * 3


def test_tiny_llava_runs_both_stages_as_the_reference():
    """Tiny LLaVA (an 8x8 grid, 4 decoder layers), one prompt, ``keep_ratio=0.25``: the encoder keeps 48 of 64
    patches (2x2 windows of 4x4, 6 each by layer 0's CLS attention, then 24 by the output layer's) and hands
    the language model the reference's merged projected tokens; from layer 2 (the middle), the 16 of those
    the reference's ``layer_prune`` ranks first with layer 2's own projections of its input."""
    model = tiny_model("llava", "eager")
    inputs = tiny_inputs(model, (1,))
    with torch.no_grad():
        tower = model.model.vision_tower(
            inputs["pixel_values"], output_attentions=True, output_hidden_states=True
        )
        projected = model.model.multi_modal_projector(tower.hidden_states[-2][:, 1:])
        shallow, deep = (tower.attentions[i][:, :, 0, 1:].mean(dim=1) for i in (0, -2))
    mask = scans_reference(shallow, deep, 48, window_size=4)
    layers = model.model.language_model.layers
    seen = {}

    def record(index):
        def hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            seen[index] = (
                args[0] if args else kwargs["hidden_states"],
                hidden[0],
                kwargs["position_embeddings"],
            )

        return hook

    with tp.pruned(model, "vscan", keep_ratio=0.25, local_layer=0, window=4) as pruner, torch.no_grad():
        handles = [layers[i].register_forward_hook(record(i), with_kwargs=True) for i in (0, 1)]
        try:
            model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
    assert pruner.stages == [(0, 48), (2, 16)] and mask.sum() == 48
    visual = inputs["input_ids"][0] == model.config.image_token_id
    assert torch.equal(pruner.stats.keep_masks[0][0][visual], mask[0])
    start = int(visual.float().argmax())
    embeds = seen[0][0][0]  # the language model's input: the kept tokens at consecutive places
    torch.testing.assert_close(embeds[start : start + 48], merging_reference(projected, mask)[0])
    _, hidden, (cos, sin) = seen[1]
    attn = layers[2].self_attn
    with torch.no_grad():
        normed = layers[2].input_layernorm(hidden)
        shape = (normed.shape[0], -1, attn.head_dim)
        query = attn.q_proj(normed).view(shape).transpose(0, 1)[None]
        keys = attn.k_proj(normed).view(shape).transpose(0, 1)[None]
        query, keys = apply_rotary_pos_emb(query, keys, cos[:1], sin[:1])
    heads = query.shape[1] // keys.shape[1]
    expected = layer_prune_reference(query[0], keys[0].repeat_interleave(heads, dim=0), start, 48, 16)
    kept = pruner.stats.keep_masks[2][0]
    present = pruner.stats.keep_masks[0][0]
    got = (kept[present] & visual[present]).nonzero()[:, 0] - start
    assert torch.equal(got, expected)
