"""Kernels that move tokens: gathers that write pruned sequences contiguously.

Each kernel is a plain function; the torch implementation here is the reference that faster kernels are
tested against.
"""

from .gather import gather_tokens

__all__ = ["gather_tokens"]
