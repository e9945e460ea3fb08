"""Greedy subset selection in one kernel: max-min diversity (DivPrune), maximal marginal relevance
(IDPruner) and saliency-weighted coverage (SCOPE), torch references and the dispatch to the Triton kernels.

A greedy pick depends on the one before it, so a torch loop dispatches a few small ops per kept token:
``keep`` rounds of launches on a GPU. The Triton kernel runs the whole loop in one program per image, the
image's running score in registers and one row of the pairwise matrix read per pick; it equals the
reference exactly (the same float32 arithmetic, ties to the lowest index as ``argmax``). The pairwise
matrix is one batched matmul before it, the same on both paths.

SCOPE's coverage gain of a token is a sum over every token: a float sum's value depends on its order, which
differs between torch's CPU and GPU reductions and a kernel's. It is summed exactly instead, in integers:
the similarities are rounded once to multiples of :data:`COVERAGE_UNIT` (:func:`coverage_units`, the same on
both paths), so that the kernel picks exactly the reference's tokens on any device.
"""

from __future__ import annotations

import torch

from .gather import _triton, use_triton


def _greedy_running_min(rows: torch.Tensor, first: torch.Tensor, keep: int) -> torch.Tensor:
    """From ``first [I]``, each next pick is the token of largest running minimum of the picks' rows of
    ``rows [I, N, N]``. Returns the ``keep`` picks ``[I, keep]``, sorted.

    A picked token's running value is set to ``-inf``, where the minimum keeps it, so that no mask is
    needed: five small ops per pick, none of them advanced indexing (each pick's row is an ``index_select``
    of the flattened rows)."""
    num_images, num_tokens = rows.shape[:2]
    flat = rows.flatten(0, 1)  # [I * N, N]
    offsets = torch.arange(num_images, device=rows.device) * num_tokens
    running = flat.index_select(0, offsets + first).clone()
    running.scatter_(1, first.unsqueeze(1), float("-inf"))
    picks = [first]
    for _ in range(keep - 1):
        pick = running.argmax(dim=1)
        torch.minimum(running, flat.index_select(0, offsets + pick), out=running)
        running.scatter_(1, pick.unsqueeze(1), float("-inf"))
        picks.append(pick)
    return torch.stack(picks, dim=1).sort(dim=1).values


def greedy_max_min_reference(distance: torch.Tensor, first: torch.Tensor, keep: int) -> torch.Tensor:
    """Torch reference of :func:`greedy_max_min`: the running minimum is each token's distance to its
    nearest selected token."""
    return _greedy_running_min(distance, first, keep)


def greedy_max_min(distance: torch.Tensor, first: torch.Tensor, keep: int) -> torch.Tensor:
    """Max-min diversity: from ``first [I]``, each next token is the one farthest from its nearest selected
    token, by ``distance [I, N, N]`` (float32). Returns the ``keep`` selected indices ``[I, keep]``,
    sorted."""
    if use_triton(distance):
        return _triton().greedy_select(distance, None, first, keep, 0.0)
    return greedy_max_min_reference(distance, first, keep)


def greedy_mmr_reference(
    similarity: torch.Tensor, relevance: torch.Tensor, penalty: float, first: torch.Tensor, keep: int
) -> torch.Tensor:
    """Torch reference of :func:`greedy_mmr`: the running minimum of ``relevance - penalty * similarity``
    rows is the marginal relevance itself, in float32 exactly as the kernel's ``relevance - penalty *
    (largest similarity)``, since rounding keeps the order of a non-negative ``penalty``'s products."""
    return _greedy_running_min(relevance.unsqueeze(1) - penalty * similarity, first, keep)


def greedy_mmr(
    similarity: torch.Tensor, relevance: torch.Tensor, penalty: float, first: torch.Tensor, keep: int
) -> torch.Tensor:
    """Maximal marginal relevance: from ``first [I]``, each next token maximises ``relevance [I, N]`` less
    ``penalty`` (>= 0) times its largest ``similarity [I, N, N]`` (float32) to a selected token. Returns the
    ``keep`` selected indices ``[I, keep]``, sorted."""
    if use_triton(similarity):
        return _triton().greedy_select(similarity, relevance, first, keep, penalty)
    return greedy_mmr_reference(similarity, relevance, penalty, first, keep)


#: The unit to which SCOPE's similarities (in [-1, 1]) are rounded, as int32: ``2**-24``, float32's spacing
#: just below 1, so that a similarity loses no more than float32 arithmetic on it would.
COVERAGE_UNIT = 2.0**-24
#: Terms (each in [0, 2**24] units) a chunk sums in int32 before the chunks' sums are added in int64.
_CHUNK = 64


def coverage_units(similarity: torch.Tensor) -> torch.Tensor:
    """``similarity`` rounded to int32 multiples of :data:`COVERAGE_UNIT`, the integers both paths sum."""
    return torch.mul(similarity.float(), 1.0 / COVERAGE_UNIT).round_().to(torch.int32)


def _chunk(num_tokens: int) -> int:
    """The most terms, up to :data:`_CHUNK`, in which ``num_tokens`` divide evenly."""
    return max(size for size in range(1, _CHUNK + 1) if num_tokens % size == 0)


def greedy_coverage_reference(similarity: torch.Tensor, saliency: torch.Tensor, keep: int) -> torch.Tensor:
    """Torch reference of :func:`greedy_coverage`.

    A coverage never falls below 0, so a candidate's gain ``sum_i max(0, s[i, j] - covered[i])`` is
    ``sum_i max(s[i, j], covered[i]) - sum_i covered[i]``: per pick one pass that takes the maxima into a
    buffer and one that sums its rows (in int32 chunks of up to :data:`_CHUNK` rows, then int64), a dozen
    ops in all. A picked token's score is pushed to ``-inf`` by a penalty, so that no mask is indexed.
    Besides the units, the buffer is the one ``[I, N, N]`` tensor made (on a CPU each new tensor of that
    size costs as much as a pass over it)."""
    num_images, num_tokens = saliency.shape
    chunk = _chunk(num_tokens)
    units = coverage_units(similarity)  # [I, covering i, candidate j]
    maxima = torch.empty_like(units)
    covered = units.new_zeros(num_images, num_tokens, 1)
    penalty = torch.zeros_like(saliency)
    rows = units.flatten(0, 1)  # each pick's row of similarities
    offsets = torch.arange(num_images, device=units.device)[:, None] * num_tokens
    picks = []
    for _ in range(keep):
        torch.maximum(units, covered, out=maxima)
        chunks = maxima.view(num_images, num_tokens // chunk, chunk, num_tokens).sum(dim=2, dtype=torch.int32)
        gain = chunks.sum(dim=1, dtype=torch.int64) - covered.sum(dim=1, dtype=torch.int64)
        pick = torch.addcmul(penalty, gain, saliency).argmax(dim=1, keepdim=True)  # exactly gain * saliency
        penalty.scatter_(1, pick, float("-inf"))
        row = rows.index_select(0, (offsets + pick).view(-1))
        torch.maximum(covered, row.view(num_images, num_tokens, 1), out=covered)
        picks.append(pick)
    return torch.cat(picks, dim=1).sort(dim=1).values


def greedy_coverage(similarity: torch.Tensor, saliency: torch.Tensor, keep: int) -> torch.Tensor:
    """Saliency-weighted coverage: with ``covered[i]`` the largest ``similarity [I, N, N]`` (float32) of token
    ``i`` to a selected token (0 before any), each next token ``j`` maximises ``saliency[j]`` (``[I, N]``)
    times its gain ``sum_i max(0, similarity[i, j] - covered[i])``, summed exactly in units of
    :data:`COVERAGE_UNIT`. Returns the ``keep`` selected indices ``[I, keep]``, sorted."""
    if use_triton(similarity):
        return _triton().greedy_coverage(similarity, saliency, keep)
    return greedy_coverage_reference(similarity, saliency.float(), keep)
