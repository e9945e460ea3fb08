"""TransPrune against a small re-implementation of its official selection code, written from reading that
code, on identical inputs: the same tokens must be kept, stage after stage, once the deviations of its
docstring are applied; in the model's dtype, with the kept tokens renumbered after each stage, as there.

Reference: liaolea/TransPrune, commit c9e8284f5808f7692c40590ffc99537e9220a01d,
``llava/model/modeling_llama_transprune.py``: ``LlamaDecoderLayer_TransPrune.compute_transf_weight`` (the
transition of one sub-layer), ``LlamaModel.transprune_forward`` (which layers accumulate, where stages
prune) and ``LlamaModel.transprune_rank_drop`` (IGA, the score, the kept tokens, the carried sums).
"""

import math

import pytest
import torch
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import tokenprune as tp
from tokenprune.attention import causal_rows_attention
from tokenprune.context import SelectionContext
from tokenprune.registry import get_method
from tokenprune.testing import IMAGE_TOKEN_ID, tiny_inputs, tiny_model
from tokenprune.transition import sublayer_transition

SYSTEM, IMAGE, TEXT = 35, 576, 40  # LLaVA-1.5: system prompt, 24x24 image tokens, then the instruction


def reference_transition(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``compute_transf_weight`` of one sub-layer for one prompt, ``[L, D]`` each -> ``[L]``, in their dtype:
    the norm ratio times ``exp(1 - cos)`` over its sum across the prompt."""
    exp = torch.exp(1 - F.cosine_similarity(before, after, dim=-1))
    return after.norm(dim=-1) / before.norm(dim=-1) * (exp / exp.sum())


def reference_iga(query: torch.Tensor, keys: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """IGA of ``transprune_rank_drop`` ``[count]``, in the states' dtype: the causal attention map of the
    pruning layer (``query [H, L, d]``, ``keys [H_kv, L, d]``, RoPE applied), rows of the tokens after the
    image, softmax over every key (in float32, then back), averaged over heads, then over those rows, over
    the image's columns."""
    keys = keys.repeat_interleave(query.shape[0] // keys.shape[0], dim=0)
    length = query.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()[start + count :]
    scores = query[:, start + count :] @ keys.transpose(1, 2) / math.sqrt(query.shape[-1])
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    return weights.mean(dim=0)[:, start : start + count].mean(dim=0)


def reference_keep(carried: list[torch.Tensor], iga: torch.Tensor, start: int, count: int, keep: int):
    """The kept image tokens (indices within the current image ``[keep]``, sorted) and the carried
    per-layer transitions gathered to the kept layout: the transitions summed in float32 (from a float32
    zero) and IGA, each over its sum (+1e-8) in its dtype, added; top ``keep``."""
    ttv = sum((weight[start : start + count] for weight in carried), torch.zeros(count))
    score = ttv / (ttv.sum() + 1e-8) + iga / (iga.sum() + 1e-8)
    kept = score.topk(keep).indices.sort().values
    rows = torch.cat([torch.arange(start), kept + start, torch.arange(start + count, len(carried[0]))])
    return kept, [weight[rows] for weight in carried]


@pytest.mark.parametrize("keep", [64, 144, 192])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_transprune_scores_as_the_reference(keep, seed):
    """The sub-layer transitions of two layers and the instruction's attention, on random states of a
    576-token image between a system prompt and an instruction: TransPrune keeps the reference's tokens.
    Ours run batched: a second, left-padded prompt must not change the first one's choice."""
    g = torch.Generator().manual_seed(seed)
    length, dim, heads, kv_heads, head_dim = SYSTEM + IMAGE + TEXT, 64, 4, 2, 16
    sublayers = [
        (torch.randn(length, dim, generator=g), torch.randn(length, dim, generator=g)) for _ in range(4)
    ]
    query = torch.randn(heads, length, head_dim, generator=g)
    keys = torch.randn(kv_heads, length, head_dim, generator=g)

    carried = [reference_transition(*sublayers[0]) + reference_transition(*sublayers[1])]
    carried.append(reference_transition(*sublayers[2]) + reference_transition(*sublayers[3]))
    expected, _ = reference_keep(carried, reference_iga(query, keys, SYSTEM, IMAGE), SYSTEM, IMAGE, keep)

    pad = 7  # a second prompt, shorter by 7 tokens and left-padded, filled with other states
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :pad] = False

    def batched(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x, torch.randn(x.shape, generator=g)])

    transition = sum(sublayer_transition(batched(a), batched(b), valid) for a, b in sublayers)
    rows = torch.arange(SYSTEM + IMAGE, length).expand(2, -1)  # the instruction's tokens
    key_mask = valid[:, None] & (torch.arange(length) <= rows[..., None])
    counted = torch.ones(rows.shape, dtype=torch.bool)
    attention = causal_rows_attention(
        batched(query)[:, :, SYSTEM + IMAGE :], batched(keys), key_mask, counted, head_dim**-0.5
    )
    image = slice(SYSTEM, SYSTEM + IMAGE)
    ctx = SelectionContext(
        features=torch.zeros(2, IMAGE, 1),
        grid=(24, 24),
        image_index=torch.zeros(2, dtype=torch.long),
        transition=transition[:, image],
        instruction_attention=attention[:, image],
    )
    got = get_method("transprune").select(ctx, keep, {})
    assert torch.equal(got[0], expected)


class Recorder:
    """Hooks that record, for each decoder layer of a run, what the reference reads: the inputs and outputs
    of its attention and MLP, and the layer's output (the next layer's input)."""

    def __init__(self, model):
        self.sublayers, self.outputs = {}, {}
        self.handles = []
        for i, layer in enumerate(model.model.language_model.layers):
            self.handles += [
                layer.self_attn.register_forward_hook(self._attention(i), with_kwargs=True),
                layer.mlp.register_forward_hook(self._mlp(i)),
                layer.register_forward_hook(self._output(i)),
            ]

    def _attention(self, i):
        def hook(module, args, kwargs, output):
            self.sublayers[i] = [(kwargs["hidden_states"][0], output[0][0])]

        return hook

    def _mlp(self, i):
        def hook(module, args, output):
            self.sublayers[i].append((args[0][0], output[0]))

        return hook

    def _output(self, i):
        def hook(module, args, output):
            self.outputs[i] = (output[0] if isinstance(output, tuple) else output)[0]

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def reference_run(model, record: Recorder, start: int, stages: list[tuple[int, int]]) -> list[torch.Tensor]:
    """``transprune_forward`` and ``transprune_rank_drop`` over the recorded run of one prompt: the
    transitions of the layers from the one before the first stage to the one before the last (the
    reference's scripts: ``accmulating_layer_list`` ``[7..12]`` for ``pruning_layer_list`` ``[7, 9, 12]``)
    are carried, the kept tokens' gathered at each stage; a stage's IGA reads the pruning layer's queries
    and keys at the positions ``0..L_s-1`` of the tokens present (the reference renumbers the sequence
    after each stage). Returns the image tokens kept at each stage (indices within the original image)."""
    language_model = model.model.language_model
    layers = language_model.layers
    pruning = dict(stages)
    carried, count, origin, kept_per_stage = [], IMAGE, torch.arange(IMAGE), []
    for i in range(stages[0][0] - 1, stages[-1][0]):
        carried.append(sum(reference_transition(before, after) for before, after in record.sublayers[i]))
        if i + 1 not in pruning:
            continue
        layer, hidden = layers[i + 1], record.outputs[i]  # the pruning layer and its input
        attn, length = layer.self_attn, hidden.shape[0]
        normed = layer.input_layernorm(hidden)
        query = attn.q_proj(normed).view(length, -1, attn.head_dim).transpose(0, 1)[None]
        keys = attn.k_proj(normed).view(length, -1, attn.head_dim).transpose(0, 1)[None]
        cos, sin = language_model.rotary_emb(hidden[None], torch.arange(length)[None])  # renumbered
        query, keys = apply_rotary_pos_emb(query, keys, cos, sin)
        iga = reference_iga(query[0], keys[0], start, count)
        kept, carried = reference_keep(carried, iga, start, count, pruning[i + 1])
        origin, count = origin[kept], pruning[i + 1]
        kept_per_stage.append(origin)
    return kept_per_stage


SCHEDULES = {
    "reference": ((7, 0.875), (9, 0.625), (12, 0.125)),  # the official scripts' on LLaVA-1.5: 504, 360, 72
    "two": ((2, 0.5), (4, 0.25)),
    "64": ((4, 64 / IMAGE),),
    "144": ((4, 144 / IMAGE),),
    "192": ((2, 192 / IMAGE),),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize("seed", [0, 1])
def test_transprune_in_the_model_keeps_what_the_reference_keeps(schedule, seed, dtype):
    """The real hooks on a 13-layer tiny LLaVA with 576 image tokens, with TransPrune's defaults (the kept
    tokens renumbered after each stage): at every stage the image tokens kept are those the reference
    keeps from the same layers' sub-layer states and attention, in float32 and in bfloat16, where both
    compute in the model's dtype."""
    model = tiny_model(patches_per_side=24, text_layers=13, seed=seed).to(dtype)  # LLaVA-1.5's 576 tokens
    inputs = tiny_inputs(model, (1,), text_lengths=(2 * TEXT,), seed=seed)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    start = int((inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[0])
    stages = tp.PrunerConfig("transprune", schedule=schedule).stages(IMAGE)
    with tp.pruned(model, "transprune", schedule=schedule) as pruner, torch.no_grad():
        record = Recorder(model)
        model(**inputs)
        record.remove()
        expected = reference_run(model, record, start, stages)
    for (layer, keep), reference in zip(stages, expected, strict=True):
        kept = pruner.stats.keep_masks[layer][0, start : start + IMAGE].nonzero()[:, 0]
        assert len(kept) == keep
        assert torch.equal(kept, reference), f"stage at layer {layer}"
