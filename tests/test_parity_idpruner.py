"""IDPruner against a small re-implementation of its official selection code, written from reading that
code, on identical random inputs: the same tokens must be kept once the deviation of its docstring is
applied."""

import pytest
import torch

from tokenprune.context import SelectionContext
from tokenprune.registry import get_method


def idpruner_reference(tokens: torch.Tensor, scores: torch.Tensor, keep: int, lam: float) -> list[int]:
    """The tokens YF-T/IDPruner keeps of one image's visual tokens ``[N, D]`` given its importance
    ``scores [N]``, in the order it picks them.

    Re-implemented from commit 6aeb9dc, ``pruning/strategies/idpruner.py``: ``idpruner`` (one token per
    round, ``parallel_k=1``) with ``_default_importance_compute`` and ``_default_similarity_compute``. The
    importance is the scores rescaled to [0, 1] by their minimum and maximum; the similarity is the cosine
    of the tokens entering the language model. The first pick is the most important token; each next one
    maximises ``lam * importance - (1 - lam) * its largest similarity to a picked token``.
    """
    importance = (scores - scores.min()) / (scores.max() - scores.min() + 1e-6)
    unit = tokens / (tokens.norm(dim=-1, keepdim=True) + 1e-8)
    similarity = unit @ unit.T
    open_ = torch.ones(len(tokens), dtype=torch.bool)
    closest = torch.full((len(tokens),), -2.0)
    picked: list[int] = []
    while len(picked) < keep:
        score = lam * importance - (1 - lam) * closest if picked else importance.clone()
        score[~open_] = float("-inf")
        pick = int(score.topk(1).indices)
        picked.append(pick)
        open_[pick] = False
        closest = torch.maximum(closest, similarity[:, pick])
    return picked


@pytest.mark.parametrize("lam", [None, 0.2, 0.8])
@pytest.mark.parametrize("keep", [64, 144, 192])
@pytest.mark.parametrize("seed", [0, 1])
def test_idpruner_keeps_what_the_reference_keeps(lam, keep, seed):
    """Two images of 576 tokens (a 24x24 grid), each selected alone by the reference and together by ours,
    at the default ``lam`` (0.5, the reference's too) and at others.

    Deviation (tokenprune/methods/idpruner.py), applied below: the importance scores are the tokens' L2
    norms, not the trained selector's.
    """
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, 576, 128, generator=g) * (0.5 + torch.rand(2, 576, 1, generator=g))
    ctx = SelectionContext(features=tokens, grid=(24, 24), image_index=torch.zeros(2, dtype=torch.long))
    kept = get_method("idpruner").select(ctx, keep, {} if lam is None else {"lam": lam})
    scores = tokens.norm(dim=-1)  # the deviation: L2 norm for the selector's score
    for image in range(2):
        expected = idpruner_reference(tokens[image], scores[image], keep, 0.5 if lam is None else lam)
        assert len(set(expected)) == keep
        assert kept[image].tolist() == sorted(expected)
