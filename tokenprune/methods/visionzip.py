"""VisionZip: dominant tokens by the image encoder's attention, the rest merged into a few contextual ones.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025).
"""

from __future__ import annotations

import torch

from ..context import Merged, SelectionContext
from ..kernels import gather_tokens
from ..registry import register_method
from ._select import cosine_similarity_matrix, top_k


@register_method("visionzip", stage="vision", needs=("encoder_attention", "keys"))
def visionzip(ctx: SelectionContext, keep: int, *, contextual: float = 10 / 64) -> Merged:
    """Keep the tokens the encoder attends to most, and merge the others into a few contextual tokens.

    As in the reference: at the encoder layer whose output the model uses, the ``keep - c`` tokens with
    the most CLS attention (summed over heads; the mean over queries for encoders without CLS) are the
    dominant tokens. Of the rest, ``c = round(contextual * keep)`` (10 of 64, 30 of 192, the reference's
    split) evenly spaced tokens are contextual targets; every other remaining token joins the target
    whose key (averaged over heads) is most cosine-similar, and a contextual token is its target plus the
    mean of the tokens that joined it. Deviation: the output keeps the tokens' spatial order, each
    contextual token in its target's place, where the reference puts the contextual tokens last.
    """
    features = ctx.features
    num_images, num_tokens, dim = features.shape
    (attention,) = ctx.require("encoder_attention").values()
    num_contextual = min(round(contextual * keep), num_tokens - keep) if keep > 1 else 0
    dominant = top_k(attention, keep - num_contextual)
    if num_contextual == 0:
        sizes = torch.ones(num_images, keep, dtype=features.dtype, device=features.device)
        return Merged(dominant, gather_tokens(features, dominant), sizes)
    rest_mask = torch.ones(num_images, num_tokens, dtype=torch.bool, device=features.device)
    rest_mask.scatter_(1, dominant, False)
    rest = rest_mask.nonzero()[:, 1].view(num_images, -1)  # [I, R] in order
    num_rest = rest.shape[1]
    step = max(1, num_rest // num_contextual)
    is_target = torch.zeros(num_rest, dtype=torch.bool, device=features.device)
    is_target[torch.arange(0, num_rest, step, device=features.device)[:num_contextual]] = True
    targets, others = rest[:, is_target], rest[:, ~is_target]
    keys = ctx.require("keys")
    assignment = cosine_similarity_matrix(gather_tokens(keys, others), gather_tokens(keys, targets)).argmax(
        dim=-1
    )
    one_hot = torch.nn.functional.one_hot(assignment, num_contextual).to(features.dtype)  # [I, O, C]
    counts = one_hot.sum(dim=1)  # [I, C]
    joined = one_hot.transpose(1, 2) @ gather_tokens(features, others) / counts.clamp_min(1)[..., None]
    contextual_tokens = gather_tokens(features, targets) + joined

    index = torch.cat([dominant, targets], dim=1)
    merged = torch.cat([gather_tokens(features, dominant), contextual_tokens], dim=1)
    sizes = torch.cat([torch.ones_like(dominant, dtype=features.dtype), 1 + counts], dim=1)
    index, order = index.sort(dim=1)
    return Merged(index, gather_tokens(merged, order), torch.gather(sizes, 1, order))
