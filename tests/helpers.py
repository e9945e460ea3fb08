"""Independent references for the invariants: written against plain transformers, not tokenprune."""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import tokenprune
from tokenprune.context import SelectionContext
from tokenprune.testing import ANYRES_FAMILIES, FAMILIES, tiny_inputs

ATOL = 1e-4
#: The families the generic invariant tests run on; LLaVA-NeXT and OneVision, whose images differ in token
#: count, have their own (test_llava_next.py).
INVARIANT_FAMILIES = [f for f in FAMILIES if f not in ANYRES_FAMILIES]


def tokenprune_hooks(model) -> list[str]:
    """Names of the modules of ``model`` holding a forward hook of tokenprune's (transformers installs
    hooks of its own, to record outputs, on a model's first forward)."""

    def ours(hook) -> bool:
        fn = hook.func if isinstance(hook, functools.partial) else hook
        return getattr(fn, "__module__", "").startswith("tokenprune")

    return [
        name
        for name, module in model.named_modules()
        if any(ours(h) for h in [*module._forward_pre_hooks.values(), *module._forward_hooks.values()])
    ]


def dense_mask(
    attention_mask: torch.Tensor, visible: torch.Tensor, dtype: torch.dtype, from_query: int = 0
) -> torch.Tensor:
    """Additive 4-D mask ``[B, 1, L, L]``: causal, padding, and keys outside ``visible`` hidden from the
    queries at positions ``from_query`` and later."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    hidden = ~visible[:, None, :] & (torch.arange(length) >= from_query)[None, :, None]
    allowed = causal[None] & attention_mask.bool()[:, None, :] & ~hidden
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


@contextlib.contextmanager
def hide_tokens_from_layers(
    model, stages: dict[int, torch.Tensor], attention_mask: torch.Tensor, early_from_query: int | None = None
):
    """In the block, the decoder layers of the unpatched ``model`` from each key of ``stages`` up to the
    next see only the keys flagged in its value ``[B, L]``; with ``early_from_query``, so do the layers
    before the first stage (with the first stage's flags), for the queries from that position on."""

    def hook_for(mask):
        def hook(module, args, kwargs):
            return args, {**kwargs, "attention_mask": mask}

        return hook

    layers = model.model.language_model.layers
    firsts = sorted(stages)
    handles = []
    for first, end in zip(firsts, [*firsts[1:], len(layers)], strict=True):
        mask = dense_mask(attention_mask, stages[first], model.dtype)
        handles += [
            layer.register_forward_pre_hook(hook_for(mask), with_kwargs=True) for layer in layers[first:end]
        ]
    if early_from_query is not None:
        early = dense_mask(attention_mask, stages[firsts[0]], model.dtype, from_query=early_from_query)
        handles += [
            layer.register_forward_pre_hook(hook_for(early), with_kwargs=True)
            for layer in layers[: firsts[0]]
        ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def image_feature_module(model) -> torch.nn.Module:
    """The module whose output is the image features the language model receives: LLaVA's projector,
    Qwen2-VL's vision tower (its merger is its last step)."""
    return getattr(model.model, "multi_modal_projector", None) or model.model.visual


@contextlib.contextmanager
def recorded_image_features(model):
    """In the block, every output of ``model``'s image-feature module is appended to the yielded list."""
    features: list[torch.Tensor] = []
    handle = image_feature_module(model).register_forward_hook(
        lambda module, args, output: features.append(output)
    )
    try:
        yield features
    finally:
        handle.remove()


@contextlib.contextmanager
def substituted_image_features(model, features: torch.Tensor | None):
    """In the block, ``model``'s multimodal projector returns ``features`` (when not ``None``): the
    reference for a vision stage, whose merged or dropped patches reach the language model this way."""
    if features is None:
        yield
        return
    handle = image_feature_module(model).register_forward_hook(lambda module, args, output: features)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def tower_outputs(model, substitutes: list | None = None):
    """In the block, every image encoding of ``model`` is appended to the yielded list: Qwen-VL's vision
    tower output (its merged tokens and DeepStack features), LLaVA-NeXT/OneVision's ``get_image_features``
    output (its packed features, one tensor per image, no DeepStack); with ``substitutes``, the encoding
    returns those instead, call by call (in turn again for each forward: images, then videos)."""
    recorded: list[tuple[torch.Tensor | list[torch.Tensor], list]] = []
    pending = itertools.cycle(substitutes or [])

    def hook(module, args, output):
        if substitutes is not None:
            output.pooler_output, deepstack = next(pending)
            if deepstack:
                output.deepstack_features = deepstack
            return output
        recorded.append((output.pooler_output, list(getattr(output, "deepstack_features", None) or [])))
        return None

    visual = getattr(model.model, "visual", None)
    if visual is not None:
        handle = visual.register_forward_hook(hook)
        remove = handle.remove
    else:  # the packing follows the tower inside get_image_features (OneVision's pooling, get_video_features)
        base = model.model
        names = [name for name in ("get_image_features", "get_video_features") if hasattr(base, name)]

        def recording(encode):
            @functools.wraps(encode)
            def encode_and_record(*args, **kwargs):
                output = encode(*args, **kwargs)
                return hook(None, args, output) or output

            return encode_and_record

        shadowed = {name: vars(base)[name] for name in names if name in vars(base)}  # a pruner's, kept
        for name in names:
            setattr(base, name, recording(getattr(base, name)))

        def remove():
            for name in names:
                delattr(base, name)
                if name in shadowed:
                    setattr(base, name, shadowed[name])

    try:
        yield recorded
    finally:
        remove()


@contextlib.contextmanager
def selection_contexts():
    """In the block, every :class:`~tokenprune.context.SelectionContext` a pruner hands a method is appended
    to the yielded list."""
    contexts: list = []
    select = tokenprune.Pruner.select_with

    def recording(self, config, ctx, keep):
        contexts.append(ctx)
        return select(self, config, ctx, keep)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenprune.Pruner, "select_with", recording)
        yield contexts


@contextlib.contextmanager
def decoder_merges():
    """In the block, the hidden states that decoder stages' merging methods (a :class:`Merged` answer) give
    their kept tokens are recorded by layer, as ``(batch rows, prompt positions, states)``, in the yielded
    dict: what :func:`masked_reference` (``merged=``) gives the same layers of the unpatched model (the
    reference for a merging stage, as substituted image features are for a merging vision stage). Nothing is
    recorded for a method that only drops."""
    from tokenprune.patches.decoder import stages as stage_loop

    merges: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    prune, merged_into = stage_loop.Stages.prune, stage_loop.merged_into
    acting: dict = {}

    def pruning(self, call, stage, *args, **kwargs):
        acting.update(layer=self.stages[stage][0], origin=call.origin)
        return prune(self, call, stage, *args, **kwargs)

    def merging(hidden, layout, merged):
        places = torch.gather(layout.positions, 1, merged.index)
        rows = layout.sample[:, None].expand_as(places)
        merges.setdefault(acting["layer"], []).append((rows, acting["origin"][rows, places], merged.features))
        return merged_into(hidden, layout, merged)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage_loop.Stages, "prune", pruning)
        patch.setattr(stage_loop, "merged_into", merging)
        yield merges


@contextlib.contextmanager
def merged_states(model, merged: dict | None):
    """In the block, the decoder layers of the unpatched ``model`` named in ``merged`` (see
    :func:`decoder_merges`) get those hidden states in those places of their input."""

    def hook_for(records):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            for rows, places, states in records:
                hidden = hidden.index_put((rows, places), states.to(hidden.dtype))
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    layers = model.model.language_model.layers
    handles = [
        layers[layer].register_forward_pre_hook(hook_for(records), with_kwargs=True)
        for layer, records in (merged or {}).items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def video_pruned_through_qwen(model, method: str) -> tuple[SelectionContext, Any, torch.Tensor]:
    """A tiny Qwen2.5-VL (``model``) prompt with an image and a video (2 temporal patches of 4x4 merged
    tokens) under ``method`` at ``keep_ratio=0.5``, videos only: checks that the forward is finite, that
    the method saw the video as its frames, that the video (alone) kept 16 of its 32 tokens and the image
    every one; returns the method's context, the pruner's stats and where the video's placeholders are
    ``[L]``."""
    inputs = tiny_inputs(model, (1,), videos_per_prompt=(1,))
    with (
        selection_contexts() as contexts,
        tokenprune.pruned(model, method, keep_ratio=0.5, media="videos") as pruner,
        torch.no_grad(),
    ):
        logits = model(**inputs).logits
    assert bool(torch.isfinite(logits).all())
    (ctx,) = contexts
    assert ctx.frames == (2, 4, 4)
    stats = pruner.stats
    video = inputs["input_ids"][0] == model.config.video_token_id
    image = inputs["input_ids"][0] == model.config.image_token_id
    assert int(video.sum()) == 32 and stats.visual_tokens == [32] and stats.kept_tokens == [16]
    assert bool(stats.keep_mask[0][image].all())
    return ctx, stats, video


def pruned_and_reference(model, config, inputs: dict):
    """Logits of ``model`` (a LLaVA-NeXT/OneVision) pruned by ``config``, its stats, and the masked reference:
    the unpatched model given the packed image (and video) features the pruned forward handed on and the
    states a decoder stage's merge gave its kept tokens, the dropped tokens hidden from attention."""
    with (
        tokenprune.pruned(model, config) as pruner,
        tower_outputs(model) as handed_on,
        decoder_merges() as merged,
        torch.no_grad(),
    ):
        got = model(**inputs).logits
    with tower_outputs(model, handed_on):
        expected = masked_reference(model, inputs, pruner.stats.keep_masks, merged=merged)
    return got, pruner.stats, expected


def masked_reference(
    model,
    inputs: dict,
    stages: dict[int, torch.Tensor],
    early_from_query: int | None = None,
    merged: dict | None = None,
) -> torch.Tensor:
    """Logits ``[B, L, V]`` of the unpatched model with, from each layer in ``stages`` on, the tokens
    outside its keep flags hidden from attention (see :func:`hide_tokens_from_layers`), positions
    unchanged, no cache; with ``merged`` (see :func:`decoder_merges`), a merging stage's states given to
    its layer."""
    mask = inputs["attention_mask"]
    with (
        torch.no_grad(),
        hide_tokens_from_layers(model, stages, mask, early_from_query),
        merged_states(model, merged),
    ):
        return model(**inputs, use_cache=False).logits


def kept_rows(
    pruned_logits: torch.Tensor, keep: torch.Tensor, attention_mask: torch.Tensor
) -> list[torch.Tensor]:
    """Per sample, the pruned logits of the real (non-padding) kept tokens, in prompt order.

    A pruned row holds its kept tokens right-aligned, in order; that is the layout the API promises.
    """
    rows = []
    for b in range(keep.shape[0]):
        n = int(keep[b].sum())
        real = attention_mask[b].bool()[keep[b]]
        rows.append(pruned_logits[b, pruned_logits.shape[1] - n :][real])
    return rows


def reference_rows(reference_logits: torch.Tensor, keep: torch.Tensor, attention_mask: torch.Tensor):
    return [reference_logits[b][keep[b] & attention_mask[b].bool()] for b in range(keep.shape[0])]


def assert_kept_rows_match(
    pruned_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    keep: torch.Tensor,
    attention_mask: torch.Tensor,
) -> None:
    """Each sample's pruned logits equal the reference's at the same (kept, real) prompt tokens."""
    for got, expected in zip(
        kept_rows(pruned_logits, keep, attention_mask),
        reference_rows(reference_logits, keep, attention_mask),
        strict=True,
    ):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def extend(inputs: dict, new_tokens: torch.Tensor) -> dict:
    """``inputs`` with ``new_tokens [B, T]`` appended, mask, positions (LLaVA) and token types (Qwen2-VL)
    extended as generate does."""
    batch, count = new_tokens.shape
    mask = torch.cat([inputs["attention_mask"], torch.ones(batch, count, dtype=torch.long)], dim=1)
    grown = {
        **inputs,
        "input_ids": torch.cat([inputs["input_ids"], new_tokens], dim=1),
        "attention_mask": mask,
    }
    if "position_ids" in inputs:
        last = inputs["position_ids"][:, -1:]
        grown["position_ids"] = torch.cat([inputs["position_ids"], last + torch.arange(1, count + 1)], dim=1)
    if "mm_token_type_ids" in inputs:
        text = torch.zeros(batch, count, dtype=inputs["mm_token_type_ids"].dtype)
        grown["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], text], dim=1)
    return grown


def step_masks(
    attention_mask: torch.Tensor, prompt_length: int, steps: list[dict[int, torch.Tensor]], layer: int
):
    """Additive 4-D mask of the unpatched model over the prompt and generated tokens: causal and padding,
    and the row of decode step ``s`` (token ``prompt_length + s - 1``) sees only the prompt tokens that
    step's selection left visible at ``layer``."""
    length = attention_mask.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & attention_mask.bool()[:, None, :]
    for s, visible in enumerate(steps, start=1):
        allowed[:, prompt_length + s - 1, :prompt_length] &= visible[layer]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def masked_recomputation(
    model, inputs: dict, sequences: torch.Tensor, steps: list, upto: int
) -> torch.Tensor:
    """Last-row logits of the unpatched model, without a cache, on the prompt and the first ``upto``
    generated tokens (positions, Qwen's multimodal ones included, from the model itself or extended as
    ``generate`` does), each decode row restricted as its step was (see :func:`step_masks`)."""
    prompt_length = inputs["input_ids"].shape[1]
    grown = extend(inputs, sequences[:, prompt_length : prompt_length + upto])
    handles = []
    for i, layer in enumerate(model.model.language_model.layers):
        dense = step_masks(grown["attention_mask"], prompt_length, steps[:upto], i)
        hook = lambda module, args, kwargs, dense=dense: (args, {**kwargs, "attention_mask": dense})  # noqa: E731
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(**grown, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return out.logits[:, -1]


def select_sample(
    inputs: dict, b: int, images_per_prompt: tuple[int, ...], videos_per_prompt: tuple[int, ...] | None = None
) -> dict:
    """Sample ``b`` of a left-padded batch on its own, without its padding."""
    real = inputs["attention_mask"][b].bool()
    first, count = sum(images_per_prompt[:b]), images_per_prompt[b]
    alone = {
        key: inputs[key][b : b + 1, real]
        for key in ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids")
        if key in inputs
    }
    pixels, grid = inputs["pixel_values"], inputs.get("image_grid_thw")
    if grid is None:  # one pixel_values entry per image
        alone["pixel_values"] = None if pixels is None or not count else pixels[first : first + count]
    else:  # Qwen2-VL: rows of patches, grid.prod() per image
        rows = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), grid.prod(-1)]), 0)
        alone["pixel_values"] = pixels[rows[first] : rows[first + count]] if count else None
        alone["image_grid_thw"] = grid[first : first + count] if count else None
    if "image_grid_thw" in inputs and grid is None:
        alone["image_grid_thw"] = None
    if "image_sizes" in inputs:  # LLaVA-NeXT: each image's original size
        alone["image_sizes"] = inputs["image_sizes"][first : first + count] if count else None
    if videos_per_prompt is not None:
        first, count, grid = sum(videos_per_prompt[:b]), videos_per_prompt[b], inputs.get("video_grid_thw")
        if count and grid is None:  # LLaVA-OneVision: one entry per video
            alone["pixel_values_videos"] = inputs["pixel_values_videos"][first : first + count]
        elif count:  # Qwen2-VL: rows of patches, grid.prod() per video
            rows = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), grid.prod(-1)]), 0)
            alone["pixel_values_videos"] = inputs["pixel_values_videos"][rows[first] : rows[first + count]]
            alone["video_grid_thw"] = grid[first : first + count]
    return alone


def assert_batch_equals_each_sample_alone(model, inputs: dict, images_per_prompt: tuple[int, ...]) -> None:
    """The last-token logits of the batch equal those of each prompt run alone (under whatever pruner the
    model has)."""
    with torch.no_grad():
        batched = model(**inputs).logits[:, -1]
        for b in range(len(images_per_prompt)):
            alone = model(**select_sample(inputs, b, images_per_prompt)).logits[:, -1]
            torch.testing.assert_close(batched[b : b + 1], alone, atol=ATOL, rtol=0)


def layer_input_lengths(model, inputs: dict) -> list[int]:
    """Run ``model`` on ``inputs`` and return the sequence length each decoder layer receives; checks on
    the way that attention kernels get ordinary dense inputs. Call it with the pruner applied: its hooks
    registered first, so each length is what the layer really receives."""
    seen = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden.shape[1])
        assert hidden.is_contiguous() and all(t.is_contiguous() for t in kwargs["position_embeddings"])

    layers = model.model.language_model.layers
    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def cache_kwarg(cache) -> dict:
    """``{name: cache}`` under the name this transformers release gives the cache argument."""
    params = inspect.signature(LlavaForConditionalGeneration.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def assert_generate_matches_reference(
    model,
    inputs: dict,
    out,
    stages: dict[int, torch.Tensor],
    early_from_query: int | None = None,
    merged: dict | None = None,
) -> None:
    """Each step's logits of a cached ``generate`` (``output_logits=True``) equal the masked reference
    recomputed from scratch, without a cache, on the prompt plus the tokens generated so far (with a
    merging stage's ``merged`` states, see :func:`decoder_merges`)."""
    for step_logits, grown, grown_stages in generated_steps(inputs, out, stages):
        expected = masked_reference(model, grown, grown_stages, early_from_query, merged)[:, -1]
        torch.testing.assert_close(step_logits, expected, atol=ATOL, rtol=0)


def generated_steps(inputs: dict, out, stages: dict[int, torch.Tensor]):
    """For each step of a cached ``generate``: its logits, ``inputs`` grown by the tokens generated before
    it (see :func:`extend`), and each stage's keep flags grown by those tokens (kept)."""
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
    for step, step_logits in enumerate(out.logits):
        grown_stages = {
            layer: torch.cat([keep, torch.ones(keep.shape[0], step, dtype=torch.bool)], dim=1)
            for layer, keep in stages.items()
        }
        yield step_logits, extend(inputs, new_tokens[:, :step]), grown_stages


def greedy_with_logits(model, inputs: dict, new_tokens: int = 4, **generate_kwargs):
    """Greedy, cached ``generate`` of ``new_tokens`` tokens: the sequences and each step's (raw) logits
    (``generate_kwargs``: a cache implementation, a compile config...).

    The image placeholder id is never generated, so that recomputing on the prompt plus the generated
    tokens sees the prompt's images only (a random model would otherwise emit it now and then)."""
    return model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        suppress_tokens=[model.config.image_token_id],
        **generate_kwargs,
    )


def renumbered(positions: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The rule of ``tokenprune.positions``, token by token: each kept token that starts (smallest axis) more
    than one past the largest position of the kept tokens before it moves down, with all after it, by the
    gap. ``positions [A, B, L]``, ``kept [B, L]``."""
    out = positions.clone()
    for b in range(positions.shape[1]):
        shift, top = 0, None
        for j in range(positions.shape[2]):
            if kept[b, j]:
                low, high = int(positions[:, b, j].min()), int(positions[:, b, j].max())
                if top is not None and low > top + 1:
                    shift += low - top - 1
                top = high if top is None else max(top, high)
            out[:, b, j] -= shift
    return out


def rotary_positions(model, inputs: dict) -> torch.Tensor:
    """The position ids ``[A, B, L]`` the unpatched ``model`` gives its rotary embedding for ``inputs``."""
    seen = []
    rotary = model.model.language_model.rotary_emb
    handle = rotary.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("position_ids", args[-1])), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    batch, length = inputs["input_ids"].shape
    return seen[0].expand(*seen[0].shape[:-2], batch, length).reshape(-1, batch, length)


@contextlib.contextmanager
def renumbered_rotary(model, inputs: dict, stages: dict[int, torch.Tensor]):
    """In the block, the decoder layers from each key of ``stages`` up to the next get the rotary tables of
    the positions renumbered by the keep flags of that stage and of the stages before it."""
    rotary = model.model.language_model.rotary_emb
    layers = model.model.language_model.layers
    positions = rotary_positions(model, inputs)
    shape = (3, *positions.shape[1:]) if positions.shape[0] == 3 else positions.shape[1:]
    real = inputs["attention_mask"].bool()
    firsts = sorted(stages)
    handles = []
    for first, end in zip(firsts, [*firsts[1:], len(layers)], strict=True):
        positions = renumbered(positions, stages[first] & real)
        tables = rotary(torch.zeros(1, dtype=model.dtype), positions.reshape(shape))

        def hook(module, args, kwargs, tables=tables):
            return args, {**kwargs, "position_embeddings": tables}

        handles += [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers[first:end]]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def tome_block(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    size: torch.Tensor | None,
    merge: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    proportional: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer of transformers' CLIP, SigLIP or ViT encoder run as facebookresearch/ToMe's ``tome.patch``
    runs a block (commit af95e4b, ``tome/patch/timm.py``: ``ToMeBlock.forward``, ``ToMeAttention.forward``),
    written against the layer's own modules: the attention on the normed input, with ``log(size)`` added
    to every key's logits once ``size`` is set and ``proportional``; its output added to the input; then
    ``merge(hidden, size, metric, weights) -> (hidden, size)`` on those tokens, ``metric`` the keys this
    attention computed averaged over heads (ToMe's ``k.mean(1)``) and ``weights`` its attention weights
    (eager only); then the MLP on the norm of the merged tokens, added to them. Returns the layer's
    output and the sizes."""
    if hasattr(layer, "layer_norm1"):  # CLIP and SigLIP
        norm1, norm2 = layer.layer_norm1, layer.layer_norm2
    else:  # ViT
        norm1, norm2 = layer.layernorm_before, layer.layernorm_after
    attention = getattr(layer, "self_attn", None) or layer.attention
    seen = {}
    handle = attention.k_proj.register_forward_hook(lambda module, args, out: seen.update(keys=out))
    bias = size.log()[:, None, None, :] if size is not None and proportional else None
    try:
        out, weights = attention(hidden_states=norm1(hidden), attention_mask=bias)
    finally:
        handle.remove()
    hidden = hidden + out
    metric = seen["keys"].view(*hidden.shape[:2], -1, attention.head_dim).mean(dim=2)
    hidden, size = merge(hidden, size, metric, weights)
    return hidden + layer.mlp(norm2(hidden)), size


def random_patches_context(seed: int) -> tuple[torch.Tensor, torch.Tensor, SelectionContext]:
    """Random attention of 4 heads ``[3, 4, 576]`` and features ``[3, 576, 32]`` of 3 images of 576 patches,
    and the vision stage's context for them: the attention averaged over heads, as the stage computes it."""
    g = torch.Generator().manual_seed(seed)
    attention = torch.rand(3, 4, 576, generator=g).softmax(dim=-1)
    features = torch.randn(3, 576, 32, generator=g)
    ctx = SelectionContext(
        features=features,
        grid=(24, 24),
        image_index=torch.zeros(3, dtype=torch.long),
        encoder_attention={22: attention.mean(dim=1)},
    )
    return attention, features, ctx


def stage_attention_maps(
    eager, inputs: dict, masks: dict[int, torch.Tensor], layers: list[int]
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each of a renumbering pruner's stage ``layers`` on one prompt (its ``keep_masks``): the layer, the
    eager attention map ``[H, L_s, L_s]`` of the layer before it over the tokens still present (the unpatched
    ``eager`` model with the tokens dropped by the stages before hidden and the kept ones renumbered: a
    hidden key gets no weight, so this is the pruned sequence's own map), the image's places in that map,
    and which of the image's still present tokens the stage kept."""
    image = inputs["input_ids"][0] == eager.config.image_token_id
    present = torch.ones_like(image)
    for layer in layers:
        before = {k: v for k, v in masks.items() if k < layer}
        with contextlib.ExitStack() as stack, torch.no_grad():
            if before:
                stack.enter_context(hide_tokens_from_layers(eager, before, inputs["attention_mask"]))
                stack.enter_context(renumbered_rotary(eager, inputs, before))
            weights = eager(**inputs, output_attentions=True, use_cache=False).attentions[layer - 1][0]
        visual = image[present].nonzero()[:, 0]
        kept = masks[layer][0][present][visual].nonzero()[:, 0]
        yield layer, weights[:, present][:, :, present].float(), visual, kept
        present = masks[layer][0]
