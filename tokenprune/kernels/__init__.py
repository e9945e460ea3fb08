"""Kernels that move tokens: gathers that write pruned sequences and caches contiguously, merges, and
greedy selection loops run as one kernel.

Each kernel is a plain function with a torch reference; the Triton version runs where Triton can
(see :func:`use_triton`).
"""

from .dpp import greedy_dpp
from .gather import gather_kv, gather_sequence, gather_tokens, merge_tokens, use_triton
from .greedy import greedy_coverage, greedy_max_min, greedy_mmr

__all__ = [
    "gather_kv",
    "gather_sequence",
    "gather_tokens",
    "greedy_coverage",
    "greedy_dpp",
    "greedy_max_min",
    "greedy_mmr",
    "merge_tokens",
    "use_triton",
]
