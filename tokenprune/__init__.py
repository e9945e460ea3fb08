"""tokenprune: training-free visual token pruning for vision-language models in transformers.

The public names are imported on first use (PEP 562), so that ``import tokenprune`` and the command line's
``--help`` load neither torch nor transformers; a model family's adapter is imported when a model of that
family is pruned (:mod:`tokenprune.patches`), and the built-in methods when a method is first looked up
(:mod:`tokenprune.registry`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: The module of each public name, imported when the name is first used.
_EXPORTS = {
    "Pruner": ".pruner",
    "PruneStats": ".pruner",
    "PrunerConfig": ".config",
    "SelectionContext": ".context",
    "apply_pruner": ".api",
    "list_methods": ".registry",
    "pruned": ".api",
    "register_method": ".registry",
    "remove_pruner": ".api",
}

if TYPE_CHECKING:
    from .api import apply_pruner, pruned, remove_pruner
    from .config import PrunerConfig
    from .context import SelectionContext
    from .pruner import Pruner, PruneStats
    from .registry import list_methods, register_method


def __getattr__(name: str) -> object:
    """The public name ``name``, imported from its module on first use (then a plain attribute)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [  # the keys of _EXPORTS, written out for linters and type checkers
    "Pruner",
    "PruneStats",
    "PrunerConfig",
    "SelectionContext",
    "apply_pruner",
    "list_methods",
    "pruned",
    "register_method",
    "remove_pruner",
]
