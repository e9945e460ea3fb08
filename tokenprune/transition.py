"""Token transition variation: how much a layer changes each token's representation."""

from __future__ import annotations

import torch


def transition_variation(before: torch.Tensor, after: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Change of each token from ``before`` to ``after`` (``[B, L, D]`` each): ``[B, L]`` float32.

    The sum of the relative change of the L2 norm, ``|‖after‖ - ‖before‖| / ‖before‖``, and of the change
    of direction, ``1 - cos(before, after)`` (TransPrune's magnitude and direction terms).
    """
    before, after = before.float(), after.float()
    norm_before, norm_after = before.norm(dim=-1), after.norm(dim=-1)
    magnitude = (norm_after - norm_before).abs() / (norm_before + eps)
    direction = 1.0 - torch.nn.functional.cosine_similarity(before, after, dim=-1, eps=eps)
    return magnitude + direction
