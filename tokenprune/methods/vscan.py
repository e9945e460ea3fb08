"""VScan: complementary global and local scans in the image encoder, with token merging, then pruning at the
language model's middle layer.

Zhang et al., "VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language Models" (TMLR
2026). Reference: github.com/Tencent/SelfEvolvingAgent (commit a82450e), ``VScan/llava/model/llava_arch.py``
(``LlavaMetaForCausalLM.encode_images``, ``window_cls_selection``, ``token_merging``), the CLS attention of
``VScan/llava/model/multimodal_encoder/clip_encoder.py`` (``feature_select``), and
``VScan/llava/model/modeling_llama_x.py`` (``LlamaModel.forward_x``, ``LlamaModel.layer_prune``), run by
``VScan/scripts/llava1_5/*.sh`` (``--visual_token_num 96 --layer_list '[16]' --image_token_list '[32]'``).
"""

from __future__ import annotations

import torch

from ..context import Merged, SelectionContext
from ..kernels import gather_tokens, merge_tokens
from ..registry import register_method
from ._select import cosine_similarity_matrix, shallow_and_output_layers
from .pdrop import pdrop

#: The reference's shallow encoder layer of the local scan (``image_attentions[5]``, counted from 0).
LOCAL_LAYER = 5

#: The reference's encoder stage keeps three times the tokens its language-model stage keeps (96, then 32).
ENCODER_FACTOR = 3


@register_method(
    "vscan_llm", default_layer=16, needs=("pruning_layer_attention",), positions="renumbered", pyramid=1
)
def vscan_llm(ctx: SelectionContext, keep: int) -> torch.Tensor:
    """Keep the tokens the prompt's last token attends to most at the language model's middle layer (VScan).

    VScan's second stage, as its reference (Tencent/SelfEvolvingAgent,
    ``VScan/llava/model/modeling_llama_x.py``, ``LlamaModel.layer_prune``; tests/test_parity_vscan.py) adapts
    PyramidDrop's rank and drop to one stage (``layer_list=[16]`` of LLaVA-1.5-7B's 32 layers): the layer
    about to run projects its input to the prompt's last token's query and every token's keys, softmax over
    the prompt, heads averaged; the image's tokens with the most attention are kept, at renumbered
    positions. ``pdrop``'s selection, at one layer: without ``layer`` (or a ``schedule``), the middle of the
    language model's depth (a pyramid of one stage: 16 of 32, 14 of Qwen2.5-VL-7B's 28 as its Qwen script,
    2 of the tiny test models' 4). ``vscan`` runs it after its encoder stage by itself.

    Deviations: ``pdrop``'s (float32 attention, the last token's row only, each image ranked alone).
    """
    return pdrop(ctx, keep)


@register_method(
    "vscan",
    stage="vision",
    needs=("encoder_attention",),
    encoder_layers=shallow_and_output_layers("vscan", "local_layer", LOCAL_LAYER),
    ranges={"local_layer": (0, None), "window": (1, None)},
    positions="renumbered",
    projected=True,
    decoder_stage="vscan_llm",
    encoder_factor=ENCODER_FACTOR,
)
def vscan(ctx: SelectionContext, keep: int, *, local_layer: int | None = None, window: int = 6) -> Merged:
    """Keep each window's and the whole image's most attended tokens, the rest merged into them (VScan).

    As in the reference (Tencent/SelfEvolvingAgent, ``VScan/llava/model/llava_arch.py``,
    ``LlavaMetaForCausalLM.encode_images``; tests/test_parity_vscan.py), with the CLS query's attention
    (heads averaged) at two encoder layers: the local scan cuts the patch grid into ``window x window``
    windows (16 of LLaVA-1.5's 24x24; the rows and columns that fill no window are in none) and keeps the
    ``(keep // 2) // windows`` patches of each that ``local_layer`` (default 5) attends to most; the global
    scan keeps, of the other patches, those the output layer attends to most, up to ``keep``. Every other
    token, as the language model gets it (projected: in LLaVA, every patch is projected first), joins the kept
    token of largest cosine similarity, and a kept token becomes the mean of itself and those that joined it.
    The kept tokens stay in patch order, at consecutive positions by default (the reference hands LLaVA
    only the kept features).

    In a VLM, a config of ``vscan`` alone is VScan's two stages: this one keeps ``3 * keep_ratio`` of each
    image's tokens (or ``3 * budget``; all at most), and ``vscan_llm`` the config's ``keep_ratio``/``budget``
    from the language model's middle layer (the reference's 96 then 32 of 576 from layer 16 of 32:
    ``keep_ratio=32/576``, 64 tokens on average over the layers; its Qwen2.5-VL script's 16.7%, then a
    third of those from layer 14 of 28). Composed by hand (``vision=``), it is the encoder stage alone.

    Deviations:
    - exact budget: the local scan's shortfall (``keep // 2`` not a multiple of the windows, or more than
      a window holds) goes to the global scan (the reference keeps fewer).
    - the local scan's patches are masked out of the global one with -inf (the reference's 0 could take one
      twice where attention underflows).
    - float32 attention, similarities and merges (the reference's are in the model's dtype); attention
      recomputed from queries and keys (FlashAttention/SDPA give no weights).
    - no patch grid (an AnyRes image's packed tokens, a video): windows are runs of ``window ** 2`` tokens
      in sequence order; LLaVA-NeXT/OneVision (the reference scans each tile, 96 tokens each): one budget
      over the image's packed tokens, newline tokens kept (see :mod:`tokenprune.patches.anyres_vision`).
    - Qwen-VL (its Qwen2.5-VL script scans layer 7 in 4x4 windows of merged tokens, greedily capped, the
      last layer globally, by every query's attention): the LLaVA rule, on the merged grid with the
      attention each merger group receives; Qwen3-VL's DeepStack levels, which the adapter hands the method
      in the tokens' place, each join by their own similarities (the same kept tokens).
    - an encoder without a CLS token (SigLIP): every query's attention, averaged.
    """
    attention = ctx.require("encoder_attention")
    local, output = attention[min(attention)].float(), attention[max(attention)].float()
    kept = _scans(local, output, keep, ctx.grid, window)
    features = ctx.features
    num_images, num_tokens, _ = features.shape
    # every token joins its most similar kept token; a kept token joins itself
    joins = cosine_similarity_matrix(features, gather_tokens(features, kept)).argmax(dim=-1)  # [I, N]
    joins = joins.scatter(1, kept, torch.arange(keep, device=features.device).expand(num_images, -1))
    merged, sizes = merge_tokens(features, features.new_ones(num_images, num_tokens), joins, keep)
    return Merged(kept, merged, sizes)


def _scans(
    local: torch.Tensor, output: torch.Tensor, keep: int, grid: tuple[int, int] | None, window: int
) -> torch.Tensor:
    """Sorted indices ``[I, keep]``: each window's top ``(keep // 2) // windows`` by ``local [I, N]``, then
    the top of the others by ``output [I, N]`` up to ``keep``. Windows are ``window x window`` tiles of the
    ``grid`` (rows, columns), or without one runs of ``window ** 2`` tokens; each no larger than the grid."""
    num_images, num_tokens = local.shape
    rows, cols = grid if grid is not None else (1, num_tokens)
    high, wide = (window, window) if grid is not None else (1, window * window)
    high, wide = min(high, rows), min(wide, cols)
    down, across = rows // high, cols // wide
    per_window = min((keep // 2) // (down * across), high * wide)
    tiles = local[:, : rows * cols].view(num_images, rows, cols)[:, : down * high, : across * wide]
    tiles = tiles.reshape(num_images, down, high, across, wide).transpose(2, 3)
    top = tiles.reshape(num_images, down * across, high * wide).topk(per_window, dim=-1).indices
    device = local.device
    first_row = (torch.arange(down, device=device) * high).repeat_interleave(across)  # [W]
    first_col = (torch.arange(across, device=device) * wide).repeat(down)
    row = first_row[:, None] + torch.div(top, wide, rounding_mode="floor")
    scanned = (row * cols + first_col[:, None] + top % wide).flatten(1)  # [I, W * per_window]
    rest = output.scatter(1, scanned, float("-inf")).topk(keep - scanned.shape[1], dim=1).indices
    return torch.cat([scanned, rest], dim=1).sort(dim=1).values
