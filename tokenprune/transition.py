"""Token transition: how much one sub-layer (attention or MLP) changes each token (TransPrune's TTV)."""

from __future__ import annotations

import torch


def sublayer_transition(inputs: torch.Tensor, outputs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Transition of each token through one sub-layer: ``[B, L]`` in the inputs' dtype, 0 where ``valid`` is
    False.

    Args:
        inputs: what the sub-layer received ``[B, L, D]`` (the normalised residual stream).
        outputs: what it returned ``[B, L, D]``, before it is added back to the residual stream.
        valid: ``[B, L]`` the rows that hold tokens (not padding).

    The magnitude ratio ``‖out‖ / ‖in‖`` times ``exp(1 - cos(in, out))`` over its sum across the sample's
    tokens (every token of the prompt, text included): large for a token that the sub-layer both
    amplifies and turns more than the others. Computed in the model's dtype, step by step as TransPrune's
    reference (``compute_transf_weight``) computes it, so that it rounds as the reference's does (which,
    in float16, lets the sum overflow past about 9,000 tokens there too).
    """
    magnitude = outputs.norm(dim=-1) / inputs.norm(dim=-1)
    turn = torch.exp(1 - torch.nn.functional.cosine_similarity(inputs, outputs, dim=-1))
    turn = turn.masked_fill(~valid, 0)
    return torch.where(valid, magnitude * (turn / turn.sum(dim=-1, keepdim=True)), 0)
