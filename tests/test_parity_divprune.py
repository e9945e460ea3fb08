"""DivPrune against a small re-implementation of its official selection code, written from reading that
code, on identical random inputs: the same tokens must be kept."""

import pytest
import torch

from tokenprune.context import SelectionContext
from tokenprune.registry import get_method


def divprune_reference(tokens: torch.Tensor, keep: int) -> list[int]:
    """The tokens vbdi/divprune keeps of one image's visual tokens ``[N, D]``, in the order it picks them.

    Re-implemented from commit 799e2d9, ``LLaVA/llava/model/llava_arch.py``:
    ``LlavaMetaForCausalLM.DivPrune`` with ``pairwise_cosine_similarity``. The distance is one minus the
    cosine similarity of the tokens entering the language model. The first pick is the token whose
    second-smallest distance in its column (the smallest being its distance to itself) is largest; each
    next pick is the token whose smallest distance to the picked rows is largest.
    """
    unit = tokens / tokens.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    picked: list[int] = []
    for _ in range(keep):
        if picked:
            score = distance[picked].min(dim=0).values
        else:
            score = distance.topk(2, dim=0, largest=False).values[1]
        picked.append(int(score.argmax()))
    return picked


@pytest.mark.parametrize("keep", [64, 144, 192])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_divprune_keeps_what_the_reference_keeps(keep, seed):
    """Two images of 576 tokens (a 24x24 grid), each selected alone by the reference and together by ours.

    Deviations (tokenprune/methods/divprune.py), applied:
    the inputs are float32, so the reference scores in float32 too (in the model's dtype otherwise).
    """
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, 576, 128, generator=g) * (0.5 + torch.rand(2, 576, 1, generator=g))
    ctx = SelectionContext(features=tokens, grid=(24, 24), image_index=torch.zeros(2, dtype=torch.long))
    kept = get_method("divprune").select(ctx, keep, {})
    for image in range(2):
        expected = divprune_reference(tokens[image], keep)
        assert len(set(expected)) == keep
        assert kept[image].tolist() == sorted(expected)
