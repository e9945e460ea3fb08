"""tokenprune: training-free visual token pruning for vision-language models in transformers."""

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .api import apply_pruner, pruned, remove_pruner
from .config import PrunerConfig
from .context import SelectionContext
from .pruner import Pruner, PruneStats
from .registry import list_methods, register_method

__version__ = "0.1.0"

__all__ = [
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
