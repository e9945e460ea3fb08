"""The size guide of docs/architecture.md: every module of the package reads in one sitting."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted([*(ROOT / "tokenprune").rglob("*.py"), *(ROOT / "patches").rglob("*.py")])
#: Past these a module or class is split by job (docs/architecture.md, "Module size").
MODULE_LINES, CLASS_LINES = 450, 300


def test_modules_and_classes_stay_small():
    assert len(MODULES) > 50
    too_large = []
    for path in MODULES:
        source = path.read_text()
        name = path.relative_to(ROOT).as_posix()
        if len(source.splitlines()) > MODULE_LINES:
            too_large.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= CLASS_LINES:
                too_large.append(f"{name}: class {node.name}, {node.end_lineno - node.lineno + 1} lines")
    assert too_large == []
