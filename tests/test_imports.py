"""What importing tokenprune loads: no torch for ``import tokenprune`` and ``--help``, no family adapter, no
``torch._dynamo`` and no transformers for the public API, a family's adapter only when one of its models is
pruned. Each check runs in a fresh interpreter, whose ``sys.modules`` it reads (not a timing)."""

import json
import subprocess
import sys

import pytest

import tokenprune
from tokenprune.patches import ADAPTERS, adapter_class

#: Modules whose import takes seconds, and that only some commands need.
HEAVY = ("torch", "transformers", "PIL", "fastapi", "uvicorn", "matplotlib")
#: Modules that only pruning a model of some family needs: its adapter, transformers' internals, dynamo.
FAMILY = (
    "torch._dynamo",
    "transformers",
    "tokenprune.patches._internals",
    *sorted({f"tokenprune.patches.{path.split(':')[0]}" for path in ADAPTERS.values()}),
)


def loaded_after(code: str) -> list[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def among(modules: list[str], packages: tuple[str, ...]) -> list[str]:
    """The ``modules`` that are one of ``packages`` or inside one."""
    return [m for m in modules if m in packages or m.startswith(tuple(f"{p}." for p in packages))]


def test_import_tokenprune_loads_neither_torch_nor_transformers():
    assert among(loaded_after("import tokenprune"), HEAVY) == []


def test_the_public_api_loads_no_family_adapter_nor_dynamo():
    code = (
        "import tokenprune as tp\n"
        "from tokenprune import apply_pruner, pruned, remove_pruner, Pruner, PruneStats, SelectionContext\n"
        "tp.list_methods()\n"
        "tp.PrunerConfig('dart', keep_ratio=0.25, options={'pivots': 4})\n"
    )
    modules = loaded_after(code)
    assert "tokenprune.methods.dart" in modules  # the built-in methods registered themselves
    assert among(modules, FAMILY) == []


@pytest.mark.parametrize(
    "command", ["", "methods", "run", "bench", "eval", "lmms-task", "bench-encoder", "serve", "bench-serve"]
)
def test_help_loads_no_heavy_module(command):
    args = [command, "--help"] if command else ["--help"]
    code = (
        "from tokenprune.cli import app\n"
        f"try:\n    app({args!r}, prog_name='tokenprune')\nexcept SystemExit:\n    pass\n"
    )
    assert among(loaded_after(code), HEAVY) == []


def test_pruning_a_model_imports_its_family_adapter_only():
    code = (
        "import tokenprune as tp\n"
        "from tokenprune.testing import tiny_model\n"
        "tp.apply_pruner(tiny_model(), 'fastv', keep_ratio=0.5)\n"
    )
    adapters = set(loaded_after(code))
    assert "tokenprune.patches.llava" in adapters  # with the CLIP tower's hooks (patches.vit) it uses
    other_families = ("qwen_vl", "qwen_vision", "llava_next", "anyres_vision")
    assert not {f"tokenprune.patches.{name}" for name in other_families} & adapters


def test_the_adapter_table_agrees_with_each_adapter():
    for model_type in ADAPTERS:
        assert model_type in adapter_class(model_type).model_types
    classes = {adapter_class(model_type) for model_type in ADAPTERS}
    assert {t for cls in classes for t in cls.model_types} == set(ADAPTERS)


def test_every_public_name_resolves():
    assert sorted(tokenprune.__all__) == sorted(tokenprune._EXPORTS)
    for name in tokenprune.__all__:
        assert getattr(tokenprune, name).__name__ == name
    assert set(tokenprune.__all__) <= set(dir(tokenprune))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = tokenprune.nope
