"""Imports run one way: ``common`` imports nothing of ours, ``client`` and ``server`` import only
``common`` (and themselves); ``simulations`` and ``tests`` may import anything."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = {"common", "client", "server", "simulations"}
ALLOWED = {"common": {"common"}, "client": {"client", "common"}, "server": {"server", "common"}}


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports are not used in this repo: name the file so it is noticed
                found.append((node.lineno, "." * node.level + (node.module or "")))
            else:
                found.append((node.lineno, node.module or ""))
    return sorted(found)


def layer_violations() -> list[str]:
    problems = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for line, module in _imported_modules(tree):
                if module.startswith("."):
                    problems.append(f"{path.relative_to(ROOT)}:{line}: relative import {module!r}")
                    continue
                top = module.split(".")[0]
                if top in OURS and top not in allowed:
                    problems.append(f"{path.relative_to(ROOT)}:{line}: imports {module} "
                                    f"({layer} may import only {', '.join(sorted(allowed))})")
    return problems


def test_layers_import_one_way():
    problems = layer_violations()
    assert not problems, "layer violations:\n" + "\n".join(problems)
