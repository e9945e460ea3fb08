"""Real loading code on a local checkpoint, inputs given as embeddings, and a hand-written decode loop."""

import pytest
import torch
from helpers import ATOL, cache_kwarg, extend, masked_reference
from transformers import LlavaForConditionalGeneration

import tokenprune as tp
from tokenprune.patches._cache_internals import output_cache
from tokenprune.testing import save_tiny_checkpoint, tiny_config, tiny_inputs, tiny_model, tokens_per_image


def test_from_pretrained_local_checkpoint(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "tiny")
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    inputs = tiny_inputs(model, (2,))
    with tp.pruned(model, "dart", keep_ratio=0.111) as pruner, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert pruner.stats.kept_tokens == [2 * round(0.111 * 64)]
    summary = pruner.stats.as_dict()
    assert summary["visual_tokens"] == [128] and summary["kept_tokens"] == [14] and summary["layer"] == 2


def test_inputs_embeds_are_pruned_like_input_ids(model):
    inputs = tiny_inputs(model, (1, 2))
    with tp.pruned(model, "fastv", keep_ratio=0.25) as pruner, torch.no_grad():
        by_ids = model(**inputs).logits
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        by_embeds = model(**{**inputs, "input_ids": None, "inputs_embeds": embeds}).logits
        assert pruner.stats.kept_tokens == [16, 32]
    torch.testing.assert_close(by_embeds, by_ids, atol=1e-5, rtol=0)


def test_manual_decode_loop_without_positions_or_mask(model):
    """A caller's own loop (cache, new token only, no mask, no positions) continues the pruned prompt."""
    inputs = tiny_inputs(model, (1,))
    inputs.pop("position_ids")  # no padding: the model's default positions are the original ones
    with tp.pruned(model, "dart", keep_ratio=0.25) as pruner, torch.no_grad():
        out = model(**inputs, use_cache=True)
        tokens = out.logits[:, -1:].argmax(-1)
        step = model(input_ids=tokens, **cache_kwarg(output_cache(out)))
    keep = pruner.stats.keep_mask
    grown = extend({**inputs, "position_ids": inputs["attention_mask"].cumsum(-1) - 1}, tokens)
    grown_keep = torch.cat([keep, torch.ones(1, 1, dtype=torch.bool)], dim=1)
    expected = masked_reference(model, grown, {pruner.config.acting_layer: grown_keep})[:, -1]
    torch.testing.assert_close(step.logits[:, -1], expected, atol=ATOL, rtol=0)


def test_a_random_benchmark_architecture_saves_and_loads(tmp_path):
    """save_random_checkpoint writes a loadable checkpoint whose processor matches its vision tower."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tokenprune.testing import IMAGE_TOKEN_ID, save_random_checkpoint, tiny_config

    config = tiny_config()
    config.vision_config.image_size = 48  # a 12x12 grid: not the tiny processor's 32x32
    config.image_token_id = 99
    path = save_random_checkpoint(tmp_path / "ckpt", config)
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path)
    assert model.config.image_token_id == IMAGE_TOKEN_ID
    from PIL import Image

    inputs = processor(images=Image.new("RGB", (80, 60)), text="<image> what", return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == 144
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_the_tiny_llava_takes_llava_15s_grid_and_a_deeper_decoder():
    """``tokenprune.testing`` builds the tiny LLaVA at LLaVA-1.5's 576 image tokens for tests that need its
    grid, and refuses the sizes for a family they do not apply to."""
    model = tiny_model(patches_per_side=24, text_layers=6)
    assert tokens_per_image(model) == 576 and len(model.model.language_model.layers) == 6
    with pytest.raises(ValueError, match="tiny LLaVA only"):
        tiny_config("qwen2_vl", text_layers=6)
