"""Token transition: how much one sub-layer (attention or MLP) changes each token (TransPrune's TTV)."""

from __future__ import annotations

import torch


def sublayer_transition(inputs: torch.Tensor, outputs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Transition of each token through one sub-layer: ``[B, L]`` float32, 0 where ``valid`` is False.

    Args:
        inputs: what the sub-layer received ``[B, L, D]`` (the normalised residual stream).
        outputs: what it returned ``[B, L, D]``, before it is added back to the residual stream.
        valid: ``[B, L]`` the rows that hold tokens (not padding).

    The magnitude ratio ``‖out‖ / ‖in‖`` times the share of the direction change ``1 - cos(in, out)`` in
    a softmax over the sample's tokens (every token of the prompt, text included): large for a token
    that the sub-layer both amplifies and turns more than the others.
    """
    inputs, outputs = inputs.float(), outputs.float()
    magnitude = outputs.norm(dim=-1) / inputs.norm(dim=-1)
    direction = 1.0 - torch.nn.functional.cosine_similarity(inputs, outputs, dim=-1)
    share = direction.masked_fill(~valid, float("-inf")).softmax(dim=-1)
    return torch.where(valid, magnitude * share, 0.0)
