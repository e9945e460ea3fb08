"""Kernels that move tokens: gathers that write pruned sequences and caches contiguously, and merges.

Each kernel is a plain function with a torch reference; the Triton version runs where Triton can
(see :func:`use_triton`).
"""

from .gather import gather_kv, gather_sequence, gather_tokens, merge_tokens, use_triton

__all__ = ["gather_kv", "gather_sequence", "gather_tokens", "merge_tokens", "use_triton"]
