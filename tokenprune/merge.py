"""Token merging (ToMe): bipartite soft matching and merge schedules.

Pure tensor functions: the vision adapter calls them inside encoder layers and merges with
:func:`tokenprune.kernels.merge_tokens` (size-weighted averages). Bolya et al., "Token
Merging: Your ViT But Faster" (ICLR 2023).
"""

from __future__ import annotations

import torch


def max_merges(num_tokens: int, protected: int) -> int:
    """How many tokens one bipartite step can merge away: every unprotected token of the first set."""
    return (num_tokens + 1) // 2 - protected


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, protected: int, penalty: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each token goes when ``r`` tokens are merged away, laid out as ToMe lays them out.

    Returns ``dest [B, n]``, each token's slot in ``[0, n - r)``, and ``kept [B, n - r]``, the token
    whose place each slot takes (the others were merged into it).

    Tokens alternate between a source set (even positions) and a destination set (odd positions); each
    source token finds its most similar destination by cosine similarity of ``metric [B, n, C]`` (ToMe
    uses the attention keys, averaged over heads), and the ``r`` sources with the most similar match
    are merged into it. The first ``protected`` tokens (a CLS token) are never merged. A ``penalty [B, n]``
    is subtracted from each source token's match before the ranking (Turbo's semantic value: an
    informative source is merged later); it never changes which destination a source matches.

    The slots are ToMe's layout (``merge`` of facebookresearch/ToMe's ``tome/merge.py``): first the
    unmerged sources, then every destination in its order. The unmerged sources are in their order where
    a token is protected (so a CLS token stays first), else in the order of their best match, most similar
    first. The next step's alternating split runs over this layout, so a schedule of steps pairs the
    tokens ToMe pairs.
    """
    batch, n, _ = metric.shape
    if r == 0:
        identity = torch.arange(n, device=metric.device).expand(batch, n)
        return identity, identity
    if not 0 < r <= max_merges(n, protected):
        raise ValueError(f"cannot merge {r} of {n} tokens in one step ({protected} protected)")
    metric = torch.nn.functional.normalize(metric.float(), dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # [B, n_src, n_dst]
    if penalty is not None:
        scores = scores - penalty[:, ::2, None].float()
    scores[:, :protected] = float("-inf")
    best, match = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged_src, unmerged_src = order[:, :r], order[:, r:]  # source rows merged away, and the others
    if protected:
        unmerged_src = unmerged_src.sort(dim=-1).values
    unmerged, n_dst = unmerged_src.shape[1], n // 2
    slots = torch.arange(max(unmerged, n_dst), device=metric.device).expand(batch, -1)
    src_slot = torch.empty_like(best, dtype=torch.long)
    src_slot.scatter_(1, unmerged_src, slots[:, :unmerged])
    src_slot.scatter_(1, merged_src, unmerged + torch.gather(match, 1, merged_src))
    dest = torch.stack([src_slot[:, :n_dst], unmerged + slots[:, :n_dst]], dim=2).flatten(1)
    if n % 2:
        dest = torch.cat([dest, src_slot[:, -1:]], dim=1)
    kept = torch.cat([2 * unmerged_src, 2 * slots[:, :n_dst] + 1], dim=1)
    return dest, kept


def _fewest_left(num_tokens: int, steps: int, protected: int) -> int:
    """Tokens left after ``steps`` merge steps that each merge as many tokens as one step can."""
    for _ in range(steps):
        num_tokens -= max_merges(num_tokens, protected)
    return num_tokens


def merge_schedule(num_tokens: int, keep: int, steps: int, protected: int) -> list[int]:
    """Tokens merged away at each of ``steps`` merge steps to go from ``num_tokens`` to ``keep`` tokens.

    Spread as evenly as possible, earlier steps taking the remainder (earlier merges save more compute),
    and more where a later step could not merge its share (one bipartite step merges at most half of the
    tokens). ``ValueError`` if ``keep`` cannot be reached.
    """
    if steps < 1:
        raise ValueError("token merging needs at least one encoder layer to merge in")
    if _fewest_left(num_tokens, steps, protected) > keep:
        raise ValueError(
            f"cannot merge {num_tokens} tokens down to {keep} in {steps} layers (at most half of the "
            f"tokens merge per layer); keep more tokens"
        )
    schedule, n = [], num_tokens
    for step in range(steps):
        left = steps - step
        r = -(-(n - keep) // left)
        while _fewest_left(n - r, left - 1, protected) > keep:
            r += 1
        schedule.append(r)
        n -= r
    return schedule


def constant_schedule(num_tokens: int, r: int, steps: int, protected: int) -> list[int]:
    """ToMe's schedule: ``r`` tokens merged away at every step, fewer once a step cannot merge ``r``."""
    schedule, n = [], num_tokens
    for _ in range(steps):
        step_r = min(r, max_merges(n, protected))
        schedule.append(step_r)
        n -= step_r
    return schedule
