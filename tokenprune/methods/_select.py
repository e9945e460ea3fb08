"""Selection helpers shared by the methods."""

from __future__ import annotations

import torch

from ..registry import EncoderLayersFn


def top_k(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Sorted indices ``[I, keep]`` of the ``keep`` highest scores of each row of ``scores [I, N]``."""
    return torch.topk(scores, keep, dim=1).indices.sort(dim=1).values


def min_max(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each row of ``scores [I, N]`` rescaled to [0, 1], in float32."""
    scores = scores.float()
    low, high = scores.amin(dim=1, keepdim=True), scores.amax(dim=1, keepdim=True)
    return (scores - low) / (high - low + eps)


def cosine_similarity_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity ``[I, N, M]`` of ``x [I, N, D]`` and ``y [I, M, D]``, in float32 (``x``
    with itself normalised once)."""
    normalized = torch.nn.functional.normalize(x.float(), dim=-1)
    other = normalized if y is x else torch.nn.functional.normalize(y.float(), dim=-1)
    return normalized @ other.transpose(1, 2)


def shallow_and_output_layers(method: str, option: str, default: int) -> EncoderLayersFn:
    """A vision method's ``encoder_layers``: the shallow layer its ``option`` names (``default``, or the
    output layer if the encoder is shallower) and the output layer, whose attentions the method reads; a
    ``ValueError`` for a shallow layer past the output one."""

    def layers(options: dict[str, object], output_layer: int) -> tuple[int, ...]:
        layer = options.get(option)
        layer = min(default, output_layer) if layer is None else layer
        if layer > output_layer:  # its type and >= 0 are checked with the other options
            raise ValueError(
                f"{method} {option} must be an encoder layer in 0..{output_layer} (the layer whose output "
                f"the model uses), got {layer!r}"
            )
        return (layer, output_layer)

    return layers
