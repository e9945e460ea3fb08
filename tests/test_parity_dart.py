"""DART against a small re-implementation of its official selection code, written from reading that code,
on identical random inputs: the same tokens must be kept once the deviations of its docstring are applied."""

from collections.abc import Callable, Iterable

import pytest
import torch

from tokenprune.context import Instruction, SelectionContext
from tokenprune.registry import get_method

SYSTEM, IMAGE, TEXT = 35, 576, 20  # LLaVA-1.5: system prompt, 24x24 image tokens, then the question


def set_order(pivots: Iterable[int]) -> list[int]:
    """The order the reference visits its pivots in: that of a Python set of their indices."""
    return list(set(pivots))


def dart_reference(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    budget: int,
    image_pivots: int = 4,
    text_pivots: int = 4,
    visit: Callable[[Iterable[int]], list[int]] = set_order,
    shares: list[int] | None = None,
) -> set[int]:
    """The image tokens DART keeps of one prompt laid out as ``[SYSTEM, IMAGE, TEXT]`` (prompt positions).

    Re-implemented from ZichenWen1/DART (repository at commit 0c88867; LLaVA's ``get_retained_image_token``,
    called by ``DART_K_norm.forward`` at layer K), and from its port in ModelTC/llmc (commit a25e66f,
    ``llmc/compression/token_reduction/dart.py``: ``get_retained_image_token``), which selects the same way.
    ``hidden [L, D]`` is what the reference compares (layer K's input, after the model's final norm) and
    ``keys [H_kv, L, d]`` layer K-1's key states, RoPE applied. The pivots are the image tokens, and the
    text tokens after the image, whose keys (heads concatenated) have the largest L1 norm. Pivot by pivot,
    in ``visit`` order, the ``budget // pivots`` (or ``shares[turn]``) image tokens least cosine-similar to
    it, among those neither a pivot nor taken yet, are kept; the image pivots are kept too.
    """
    image = range(SYSTEM, SYSTEM + IMAGE)
    norms = keys.transpose(0, 1).flatten(1).abs().sum(dim=-1)  # [L]
    image_pivot = (norms[SYSTEM : SYSTEM + IMAGE].topk(image_pivots).indices + SYSTEM).tolist()
    text_pivot = (norms[SYSTEM + IMAGE :].topk(text_pivots).indices + SYSTEM + IMAGE).tolist()
    share = budget // (image_pivots + text_pivots)
    kept = set(image_pivot + text_pivot)
    candidates = set(image) - set(image_pivot)
    for turn, pivot in enumerate(visit(kept)):
        pool = list(candidates)
        similarity = torch.nn.functional.cosine_similarity(hidden[pivot], hidden[pool], dim=-1)
        count = share if shares is None else shares[turn]
        taken = [pool[i] for i in (-similarity).topk(count).indices.tolist()]
        kept.update(taken)
        candidates.difference_update(taken)
    return kept - set(text_pivot)


def test_the_reference_keeps_four_more_than_its_budget():
    """With its 4 image and 4 text pivots, each taking ``budget // 8``, the reference keeps the image pivots
    on top of the budget (132 for 128): why ours sizes the shares instead."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(SYSTEM + IMAGE + TEXT, 64, generator=g)
    keys = torch.randn(4, SYSTEM + IMAGE + TEXT, 16, generator=g)
    assert len(dart_reference(hidden, keys, 128)) == 132


@pytest.mark.parametrize("keep", [64, 100, 144, 192])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dart_keeps_what_the_reference_keeps(keep, seed):
    """Two prompts, each selected alone by the reference and together by ours; ``ctx.features`` and
    ``ctx.keys`` are the image rows of the same states, as the decoder adapter provides them.

    Deviations (tokenprune/methods/dart.py), applied one line each below, in their order there:
    (1) shares sum to ``keep``; (2) pivots visited by position; (3) float32 inputs, so the reference
    scores in float32 too; (4) one image per prompt here, as the reference.
    """
    g = torch.Generator().manual_seed(seed)
    length, width = SYSTEM + IMAGE + TEXT, 64
    hidden = torch.randn(2, length, width, generator=g) * (0.5 + torch.rand(2, length, 1, generator=g))
    keys = torch.randn(2, 4, length, 16, generator=g) * (0.5 + torch.rand(2, 1, length, 1, generator=g))
    image, text = slice(SYSTEM, SYSTEM + IMAGE), slice(SYSTEM + IMAGE, length)
    flat_keys = keys.transpose(1, 2).flatten(2)
    final_norm = torch.nn.RMSNorm(width, eps=1e-6)
    torch.nn.init.uniform_(final_norm.weight, 0.5, 1.5, generator=g)
    ctx = SelectionContext(
        features=hidden[:, image],
        grid=(24, 24),
        image_index=torch.zeros(2, dtype=torch.long),
        keys=flat_keys[:, image],
        instruction=Instruction(flat_keys[:, text], hidden[:, text], torch.ones(2, TEXT, dtype=torch.bool)),
        final_norm=final_norm,
    )
    with torch.no_grad():
        kept = get_method("dart").select(ctx, keep, {})
        normed = final_norm(hidden)
    shares = [(keep - 4) // 8 + (p < (keep - 4) % 8) for p in range(8)]  # (1)
    visit = sorted  # (2)
    for i in range(2):
        expected = dart_reference(normed[i], keys[i], keep, 4, 4, visit, shares)
        assert kept[i].tolist() == sorted(p - SYSTEM for p in expected)
