"""No module of the package imports (or reaches into) another module's private names: the layering of
tests/test_layers.py (import-linter) says which modules may import which; this says through which names. ruff's
PLC2701 leaves imports inside one's own package alone, so the package is read here with ``ast``."""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGE = ROOT / "tokalign"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_crosses_a_module_boundary():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        modules = {a.asname or a.name.split(".")[-1] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                   if a.name.startswith("tokalign")}
        modules |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("tokalign")
                    for a in n.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tokalign"):
                problems += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {node.module}.{a.name}"
                             for a in node.names if _private(a.name) or any(_private(p) for p in node.module.split("."))]
            elif isinstance(node, ast.ImportFrom) and node.module is None and node.level:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: relative import")
            elif isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name) and node.value.id in modules:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not problems, "\n".join(problems)
