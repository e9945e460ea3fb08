"""Token merging (ToMe): bipartite soft matching and merge schedules.

Pure tensor functions: the vision adapter calls them between encoder layers and merges with
:func:`tokenprune.kernels.merge_tokens` (size-weighted averages). Bolya et al., "Token
Merging: Your ViT But Faster" (ICLR 2023).
"""

from __future__ import annotations

import torch


def max_merges(num_tokens: int, protected: int) -> int:
    """How many tokens one bipartite step can merge away: every unprotected token of the first set."""
    return (num_tokens + 1) // 2 - protected


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, protected: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each token goes when ``r`` tokens are merged away.

    Returns ``dest [B, n]``, each token's slot in ``[0, n - r)``, and ``kept [B, n - r]``, the token
    that survives in each slot (the others were merged into it).

    Tokens alternate between a source set (even positions) and a destination set (odd positions); each
    source token finds its most similar destination by cosine similarity of ``metric [B, n, C]`` (ToMe
    uses the attention keys, averaged over heads), and the ``r`` sources with the most similar match
    are merged into it. The first ``protected`` tokens (a CLS token) are never merged.

    Survivors keep their relative order, so ``dest`` is non-decreasing over the survivors: the merged
    sequence stays in the original token order and a protected first token stays first.
    """
    batch, n, _ = metric.shape
    if r == 0:
        identity = torch.arange(n, device=metric.device).expand(batch, n)
        return identity, identity
    if not 0 < r <= max_merges(n, protected):
        raise ValueError(f"cannot merge {r} of {n} tokens in one step ({protected} protected)")
    metric = torch.nn.functional.normalize(metric.float(), dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # [B, n_src, n_dst]
    scores[:, :protected] = float("-inf")
    best, match = scores.max(dim=-1)
    merged_src = best.argsort(dim=-1, descending=True)[:, :r]  # source rows merged away
    src_pos = 2 * merged_src
    dst_pos = 2 * torch.gather(match, 1, merged_src) + 1
    survives = torch.ones(batch, n, dtype=torch.bool, device=metric.device)
    survives.scatter_(1, src_pos, False)
    rank = survives.cumsum(dim=1) - 1
    dest = rank.scatter(1, src_pos, torch.gather(rank, 1, dst_pos))
    # the survivors' positions in order, by a stable sort (boolean indexing would read the device)
    kept = torch.sort(survives.to(torch.int8), dim=1, descending=True, stable=True).indices[:, : n - r]
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
        raise ValueError("token merging needs at least one encoder layer after the first to merge at")
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
