"""VisionZip: dominant tokens by the image encoder's attention, the rest merged into a few contextual ones.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025).
Reference: github.com/dvlab-research/VisionZip, ``visionzip/clip_encoder.py``
(``CLIPVisionTower_VisionZip.forward``) and ``visionzip/main.py`` (``visionzip``).
"""

from __future__ import annotations

import torch

from ..context import Merged, SelectionContext
from ..kernels import gather_tokens
from ..registry import register_method
from ..sequence import flagged
from ._select import cosine_similarity_matrix, top_k


@register_method(
    "visionzip",
    stage="vision",
    needs=("encoder_attention", "keys", "class_token"),
    ranges={"contextual": (0, 1)},
    positions="renumbered",
)
def visionzip(ctx: SelectionContext, keep: int, *, contextual: float = 10 / 64) -> Merged:
    """Keep the CLS token and the patches it attends to most; merge the rest into a few contextual tokens.

    At the encoder layer whose output the model uses, with ``c = round(contextual * keep)`` contextual
    tokens (10 of 64, 20 of 128, 30 of 192: the paper's splits), the dominant tokens are the CLS token
    and the ``keep - c - 1`` patches with the most CLS attention (heads averaged; the reference sums them,
    which ranks them alike). Of the ``R`` remaining patches (in patch order), the first ``c`` of every
    ``max(1, R // c)``-th are contextual targets; every other remaining patch joins the target whose key
    (averaged over heads) is most cosine-similar, and a contextual token is its target plus the mean of
    the patches that joined it. The output is the reference's ``[CLS, dominant patches in patch order,
    contextual tokens in target order]``, and its tokens take, in this order, the places of the dominant
    patches, the targets and the first patches merged away, sorted, so that a language model reads them
    in this order. The CLS token stands for no patch (size 0); an AnyRes image has one per tile.

    An encoder without a CLS token (SigLIP), which the reference does not cover: the ``keep - c`` patches
    that receive the most attention averaged over all queries are the dominant tokens, and the output is
    ``[dominant patches, contextual tokens]``. Keeping every patch, nothing is merged: the patches as they
    are.

    In a VLM the language model sees the kept tokens at consecutive positions by default, as the
    reference hands LLaVA fewer image features (``positions="original"`` puts each at the place it
    takes).

    Deviations:
    - Keeping every patch leaves no place for the CLS token, which the reference would add.
    - LLaVA-NeXT/OneVision (the reference's LLaVA-NeXT code keeps fixed counts in every tile, packs
      without the unpadding and the newline tokens, and appends every tile's CLS and contextual tokens
      after the grid): one budget over the image's packed tokens, newline tokens kept, every tile's CLS
      token first and the contextual tokens last among the kept ones, in dropped tokens' places, forced by
      the exact budget and keep-all contract; OneVision's downsized large images blend the tower's
      features before the projector, where the model blends the projected ones (see
      :mod:`tokenprune.patches.anyres_vision`).
    """
    features = ctx.features
    num_images, num_patches, _ = features.shape
    if keep == num_patches:
        index = torch.arange(num_patches, device=features.device).expand(num_images, -1)
        return Merged(index, features, torch.ones_like(index, dtype=features.dtype))
    class_tokens = ctx.class_token if ctx.class_token is not None else features[:, :0]  # [I, C, D]
    num_class = min(class_tokens.shape[1], keep)
    class_tokens = class_tokens[:, :num_class]
    num_contextual = min(round(contextual * keep), keep - num_class)
    (attention,) = ctx.require("encoder_attention").values()
    dominant = top_k(attention, keep - num_contextual - num_class)
    targets, merged_away = _targets_and_merged_away(dominant, num_patches, num_contextual)
    contextual_tokens, counts = _contextual_tokens(features, ctx.require("keys"), targets, merged_away)

    places = [merged_away[:, :num_class], dominant, targets]
    tokens = [class_tokens.to(features.dtype), gather_tokens(features, dominant), contextual_tokens]
    sizes = [
        torch.zeros_like(places[0], dtype=features.dtype),
        torch.ones_like(dominant, dtype=features.dtype),
        1 + counts,
    ]
    index = torch.cat(places, dim=1).sort(dim=1).values
    return Merged(index, torch.cat(tokens, dim=1), torch.cat(sizes, dim=1))


def _targets_and_merged_away(
    dominant: torch.Tensor, num_patches: int, num_contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The contextual targets ``[I, c]`` and the patches merged into them ``[I, R - c]``, in patch order.

    Of the ``R`` patches that are not ``dominant [I, d]``, the targets are the first ``c`` of every
    ``max(1, R // c)``-th, from the first (none when ``c`` is 0); the others are merged away.
    """
    num_images, num_dominant = dominant.shape
    rest_mask = torch.ones(num_images, num_patches, dtype=torch.bool, device=dominant.device)
    rest_mask.scatter_(1, dominant, False)
    rest = flagged(rest_mask, num_patches - num_dominant)  # [I, R]
    num_rest = rest.shape[1]
    step = max(1, num_rest // num_contextual) if num_contextual else 1
    is_target = torch.zeros_like(rest, dtype=torch.bool)
    is_target[:, : step * num_contextual : step] = True
    targets = torch.gather(rest, 1, flagged(is_target, num_contextual))
    return targets, torch.gather(rest, 1, flagged(~is_target, num_rest - num_contextual))


def _contextual_tokens(
    features: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, merged_away: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The contextual tokens ``[I, c, D]`` and how many patches joined each target ``[I, c]``.

    Each merged-away patch joins the target whose key is most cosine-similar; a contextual token is its
    target's features plus the mean of the features that joined it (the target alone if none did).
    """
    num_contextual = targets.shape[1]
    if num_contextual == 0:
        return features[:, :0], features.new_zeros(features.shape[0], 0)
    similarity = cosine_similarity_matrix(gather_tokens(keys, merged_away), gather_tokens(keys, targets))
    # A scatter, not one_hot, which on a CPU reads the device to check the classes.
    joins = similarity.argmax(dim=-1, keepdim=True)  # [I, R - c, 1]
    one_hot = features.new_zeros(*joins.shape[:2], num_contextual).scatter_(2, joins, 1)
    counts = one_hot.sum(dim=1)  # [I, c]
    joined = one_hot.transpose(1, 2) @ gather_tokens(features, merged_away) / counts.clamp_min(1)[..., None]
    return gather_tokens(features, targets) + joined, counts
