"""The shape of the ``harness.hvmodel`` package: one home for every Jailhouse ABI fact."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from harness.hvmodel import abi

HARNESS = Path(abi.__file__).resolve().parents[2]
ABI_DIR = Path(abi.__file__).resolve().parent


def _module_level_names(tree: ast.Module) -> list[tuple[int, str]]:
    """Names a module binds at its top level by assignment, ``def`` or ``class``."""
    found: list[tuple[int, str]] = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            found += [(node.lineno, t.id) for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found.append((node.lineno, node.target.id))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found.append((node.lineno, node.name))
    return found


def test_abi_modules_define_each_name_once() -> None:
    """No name is exported by two ``abi`` modules (the package re-exports them flat)."""
    twice = [name for name, count in Counter(abi.__all__).items() if count > 1]
    assert twice == []
    assert sorted(abi.__all__) == sorted(set(abi.__all__))


def test_no_module_redefines_an_abi_name() -> None:
    """Every module of ``harness`` imports the ABI facts; none binds an ABI name itself."""
    names = set(abi.__all__)
    redefined = []
    for path in sorted(HARNESS.rglob("*.py")):
        if ABI_DIR in path.parents:
            continue
        tree = ast.parse(path.read_text(), str(path))
        redefined += [
            f"{path.relative_to(HARNESS.parent)}:{line}: {name}"
            for line, name in _module_level_names(tree)
            if name in names
        ]
    assert redefined == []
