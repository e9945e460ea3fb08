"""SAINT: drop the most redundant visual tokens by a graph of their key similarities.

Jeddi et al., "Similarity-Aware Token Pruning: Your VLM but Faster" (2025).
Reference: github.com/ArmenJeddi/saint at baaff9526bfe0bcfe79406c6a637238d4b3277d1: ``VLM/saint/prune.py``
(``iterative_drop_full_graph``, the ViT mode, called from ``VLM/saint/patch/clip.py``) and
``VLM/transformers/src/transformers/models/llama/modeling_llama.py`` (``saint_drop``, the LLM mode).
Its hybrid mode is the two composed: ``PrunerConfig("saint_llm", ..., vision=PrunerConfig("saint", ...))``.
A pruner has one position rule, the decoder method's in a composition: the hybrid keeps original positions
(``saint_llm``'s), where the reference numbers the fewer features its tower hands LLaVA from 0 and then keeps
those positions at its LLM stage; ``positions="renumbered"`` renumbers at both stages instead.
"""

from __future__ import annotations

import torch

from ..context import Merged, SelectionContext
from ..kernels import gather_tokens
from ..registry import register_method
from ._select import cosine_similarity_matrix


@register_method(
    "saint",
    stage="vision",
    needs=("keys",),
    per_layer=True,
    ranges={"drop_layer": (0, None), "divisor": (1, None)},
    positions="renumbered",
)
def saint(ctx: SelectionContext, keep: int, *, drop_layer: int | None = None, divisor: int = 16) -> Merged:
    """Drop the patches most similar to the rest inside the image encoder, by iterated graph degree (SAINT).

    One call drops, in rounds, the patches whose keys (the layer's, averaged over heads) have the largest
    summed cosine similarity to the patches still standing, the self-similarity included, until ``keep``
    remain; the CLS token always stays. The first round drops ``N // divisor`` of the ``N`` patches, every
    later one ``N_t // r_{t-1}`` of the ``N_t`` left, ``r_{t-1}`` being the previous round's count, as the
    reference's loop reuses its ``r`` (16, then 36, 15, 35, 14... of 576), each at most what is left to
    drop. The adapter calls it once, inside encoder layer ``drop_layer`` between its attention and its
    MLP, with that attention's keys, as the reference drops; that MLP and the later layers run on the kept
    tokens. ``drop_layer=None`` is three layers
    before the output layer (19 of the 23 layers LLaVA-1.5 runs of CLIP-L, the reference's setting).
    The kept tokens are the input tokens as they are (``sizes`` unchanged), in patch order. In a VLM the
    language model sees them at consecutive positions by default, as the reference's tower hands LLaVA
    fewer features, which its ``prepare_inputs_labels_for_multimodal`` numbers from 0
    (``positions="original"`` keeps their places).

    Deviations:
    - The reference takes one image (its batch's first) and a fixed ``keep_num = 376`` (the CLS token and
      375 patches); here every image of a batch, and ``keep_ratio``/``budget`` patches.
    - Chosen here: ``drop_layer`` for encoders other than LLaVA-1.5's, as three before the output layer.
    """
    protected = ctx.protected
    features, keys = ctx.features, ctx.require("keys")
    num_images, num_tokens = features.shape[:2]
    drop = _iterated_degree_drop(keys[:, protected:], keep - protected, divisor)
    patches = torch.arange(num_tokens - protected, device=features.device).expand_as(drop)
    # the kept patches in order: the dropped ones sort last (no read of the device, unlike nonzero)
    kept = patches.masked_fill(drop, num_tokens).sort(dim=1).values[:, : keep - protected] + protected
    head = torch.arange(protected, device=features.device).expand(num_images, protected)
    index = torch.cat([head, kept], dim=1)
    sizes = ctx.sizes if ctx.sizes is not None else features.new_ones(num_images, num_tokens)
    return Merged(index, gather_tokens(features, index), torch.gather(sizes, 1, index))


def _iterated_degree_drop(keys: torch.Tensor, keep: int, divisor: int) -> torch.Tensor:
    """Which of the ``N`` tokens of ``keys [I, N, d]`` SAINT's full-graph rule drops ``[I, N]`` (bool).

    In each round, every standing token's degree is its summed cosine similarity to the standing tokens;
    the ``r`` of largest degree fall (``r`` as in :func:`saint`). The rounds and their counts depend on
    ``N``, ``keep`` and ``divisor`` only: a fixed number of batched steps, no read of the device.
    """
    num_tokens = keys.shape[1]
    similarity = cosine_similarity_matrix(keys, keys)  # [I, N, N]
    dropped = torch.zeros(keys.shape[:2], dtype=torch.bool, device=keys.device)
    standing, step = num_tokens, divisor
    while standing > keep:
        step = min(standing - keep, standing // step)
        degree = (similarity @ dropped.logical_not()[..., None].to(similarity.dtype)).squeeze(-1)
        degree = degree.masked_fill(dropped, float("-inf"))
        dropped = dropped.scatter(1, degree.topk(step, dim=1).indices, True)
        standing -= step
    return dropped


@register_method("saint_llm", default_layer=2, needs=("keys",), ranges={"threshold": (-1, 1)})
def saint_llm(
    ctx: SelectionContext, keep: int, *, threshold: float = 0.83, gamma: float = 10.0
) -> torch.Tensor:
    """Drop the visual tokens with the most near-duplicates inside the language model, by similarity (SAINT).

    The visual tokens' keys at layer K-1 (heads averaged) are split, in sequence order, into the even
    ones (candidates) and the odd ones; a candidate's neighbours are the odd tokens whose keys are at least
    ``threshold`` cosine-similar to its own, and its redundancy is ``n * exp(gamma * (mean similarity to
    them - threshold))`` for ``n`` neighbours, or, with none, its mean similarity to every odd token.
    The most redundant candidates fall, up to all of them (half the tokens) in one round; while more must
    fall, the standing tokens are split again (rounds of the same rule on the same keys) until ``keep``
    remain.
    The reference acts at layers 8 to 17 (with the keys of 7 to 16) of LLaVA-1.5-7B: ``layer=8``, or
    ``schedule=`` for several of them.

    Deviations:
    - The reference drops as many candidates as have 5 neighbours or more (``K``; the count averaged over
      its batch), a variable count per layer; here ``keep_ratio``/``budget`` sets the count and the rule
      picks which, so ``K`` has no role and ``threshold`` only shapes the redundancy score.
    - Candidates beyond one round (more than half the tokens to drop): the reference drops at most half
      per layer; here the rounds repeat on the same keys.
    - The reference prunes once at each of layers 8 to 17 (keys of layers 7 to 16), each layer's rule on
      that layer's keys; a stage here runs its rounds on the keys of its own layer K-1, and several layers
      take ``schedule=``.
    - Keys are the layer's input through its key projection and RoPE, as the reference's cached keys.
    - Chosen here: the default layer 2, as the library's other decoder methods (the reference's 8 needs
      a deeper model than the 4-layer ones the tests run).

    The kept tokens keep their positions by default, as the reference's ``LlamaModel.forward`` gathers
    ``position_ids[batch_idx, keep_indexs]``.
    """
    keys = ctx.require("keys")
    num_images, num_tokens, width = keys.shape
    heads = ctx.key_heads
    metric = keys.view(num_images, num_tokens, heads, width // heads).mean(dim=2)  # [I, N, d]
    standing = torch.arange(num_tokens, device=keys.device).expand(num_images, num_tokens)
    while standing.shape[1] > keep:
        candidates = standing[:, 0::2]
        others = standing[:, 1::2]
        drop = min(standing.shape[1] - keep, candidates.shape[1])
        redundancy = _redundancy(
            gather_tokens(metric, candidates), gather_tokens(metric, others), threshold, gamma
        )
        order = redundancy.argsort(dim=1, descending=True)
        survivors = torch.gather(candidates, 1, order[:, drop:])
        standing = torch.cat([survivors, others], dim=1).sort(dim=1).values
    return standing


def _redundancy(
    candidates: torch.Tensor, others: torch.Tensor, threshold: float, gamma: float
) -> torch.Tensor:
    """SAINT's redundancy of each candidate ``[I, A]`` against the other tokens, by keys ``[I, A, d]``,
    ``[I, B, d]``: ``n * exp(gamma * (mean similarity of its n neighbours - threshold))``, or its mean
    similarity to every other token where it has no neighbour."""
    similarity = cosine_similarity_matrix(candidates, others)  # [I, A, B]
    close = similarity >= threshold
    count = close.sum(dim=-1)
    mean_close = (similarity * close).sum(dim=-1) / count.clamp(min=1)
    score = count * torch.exp(gamma * (mean_close - threshold))
    return torch.where(count > 0, score, similarity.mean(dim=-1))
