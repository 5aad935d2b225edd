"""The shape of the ``harness.hvmodel`` package: what it may import, no import circles, one
home for every Jailhouse ABI fact, the executor's layers and module sizes.

The import rules are checked on the source (an AST walk of every module), counting every
import a module makes: at the top, inside functions, and under ``if TYPE_CHECKING:`` (a
type-only import is still a dependency a reader has to follow). A package's own
``__init__`` being run before its submodules is not counted as an import of it.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.hvmodel import abi

PACKAGE = "harness.hvmodel"
HVMODEL = Path(abi.__file__).resolve().parents[1]
HARNESS = HVMODEL.parent
ABI_DIR = Path(abi.__file__).resolve().parent

#: typeshed's stub-only module (buffer types): allowed under ``if TYPE_CHECKING:`` only,
#: since it does not exist at run time
TYPING_ONLY: frozenset[str] = frozenset({"_typeshed"})

ARCH = HVMODEL / "arch"
#: the style rules' limit for a module (~800 lines: past it, a module is usually two)
MAX_LINES = 800


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to an absolute module name."""

    source: str
    line: int
    target: str
    names: tuple[str, ...]
    type_checking: bool
    in_function: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(HARNESS.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(path: Path) -> str:
    name = _module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _nodes_under(tree: ast.Module, kind: tuple[type[ast.AST], ...], test: str = "") -> set[int]:
    """ids of the nodes in the bodies of ``kind`` statements (``if`` ones: whose test
    mentions ``test``)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, kind) and (not test or test in ast.unparse(getattr(node, "test", node))):
            for statement in getattr(node, "body", []):
                inside.update(id(child) for child in ast.walk(statement))
    return inside


def _imports(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    typing_only = _nodes_under(tree, (ast.If,), "TYPE_CHECKING")
    nested = _nodes_under(tree, (ast.FunctionDef, ast.AsyncFunctionDef))
    source = _module_name(path)
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                Import(source, node.lineno, alias.name, (), id(node) in typing_only, id(node) in nested)
                for alias in node.names
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path).split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = tuple(alias.name for alias in node.names)
            found.append(
                Import(source, node.lineno, target, names, id(node) in typing_only, id(node) in nested)
            )
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(HVMODEL.rglob("*.py"))}


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (``from . import x`` names x)."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for imp in _imports(path):
            if not imp.target.startswith(PACKAGE):
                continue
            submodules = [f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in modules]
            targets = submodules or [imp.target]
            if submodules and len(submodules) < len(imp.names):
                targets.append(imp.target)  # names of the package itself, too
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def _circles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _short(names: frozenset[str]) -> frozenset[str]:
    return frozenset(name.removeprefix(PACKAGE + ".") for name in names)


def test_hvmodel_imports_only_itself_and_the_standard_library() -> None:
    """hvmodel runs in the guest's Debian python3 with nothing installed, and on the host
    as the oracle: every module imports only ``harness.hvmodel`` and the standard library."""
    outside = []
    for path in _modules().values():
        for imp in _imports(path):
            top = imp.target.partition(".")[0]
            allowed = (
                imp.target == PACKAGE
                or imp.target.startswith(PACKAGE + ".")
                or top == "__future__"
                or top in sys.stdlib_module_names
                or (top in TYPING_ONLY and imp.type_checking)
            )
            if not allowed:
                outside.append(f"{path.relative_to(HARNESS.parent)}:{imp.line}: {imp.target}")
    assert outside == [], "hvmodel must not import these (standard library only):\n" + "\n".join(outside)


def test_import_walk_sees_every_kind_of_import() -> None:
    """The walk resolves relative imports and finds function-level and type-only ones."""
    found = {(imp.target, imp.type_checking, imp.in_function) for imp in _imports(HVMODEL / "core.py")}
    assert ("harness.hvmodel.abi", False, False) in found
    assert ("harness.hvmodel.arch", True, False) in found
    assert ("harness.hvmodel.config", False, True) in found  # parse_cell, where a cell is parsed
    edges = _edges(_modules())
    assert "harness.hvmodel.pci" in edges["harness.hvmodel.core"]
    assert "harness.hvmodel.iommu" in edges["harness.hvmodel.core"]  # from . import iommu


def test_no_import_circle_in_hvmodel() -> None:
    """No module of hvmodel imports, directly or through others, a module that imports it
    (units register with the control plane instead of importing it; a KVM VM is made
    with ``Vm(kvm)``, so the binding's objects import downward only)."""
    circles = sorted(sorted(_short(circle)) for circle in _circles(_edges(_modules())))
    assert circles == [], f"import circles in hvmodel: {circles}"


def test_the_bindings_sit_below_what_is_built_on_them() -> None:
    """The KVM and VFIO bindings import nothing of the executor, the runner, the Jailhouse
    cell CPU (``arch.vcpu``), passthrough, the oracle or the holder."""
    bindings = (f"{PACKAGE}.arch.kvm", f"{PACKAGE}.arch.vfio")
    above = tuple(
        f"{PACKAGE}.arch.{name}" for name in ("executor", "runner", "vcpu", "passthrough", "oracle", "holder")
    )
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in _edges(_modules()).items()
        if module.startswith(bindings)
        for target in targets
        if target.startswith(above)
    )
    assert upward == []


def test_arch_modules_stay_small() -> None:
    """Every module of ``harness.hvmodel.arch`` is within the style rules' ~800 lines."""
    long = {
        str(path.relative_to(HVMODEL)): count
        for path in sorted(ARCH.rglob("*.py"))
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [{"a", "b", "c"}]),
        ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [{"a", "b"}, {"c", "d"}]),
    ],
)
def test_circle_finder(edges: dict[str, set[str]], expected: list[set[str]]) -> None:
    """The circle finder reports every strongly connected group of modules."""
    assert sorted(sorted(circle) for circle in _circles(edges)) == sorted(sorted(c) for c in expected)


def _module_level_facts(tree: ast.Module) -> list[tuple[int, str]]:
    """What a module defines at its top level that could be an ABI fact: constants and
    functions, and classes that are enums or dataclasses (a protocol message class that
    happens to be called ``Reply`` is not a copy of :class:`~harness.hvmodel.abi.Reply`)."""
    found: list[tuple[int, str]] = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            found += [(node.lineno, t.id) for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found.append((node.lineno, node.target.id))
        elif isinstance(node, ast.FunctionDef):
            found.append((node.lineno, node.name))
        elif isinstance(node, ast.ClassDef):
            kinds = " ".join(ast.unparse(item) for item in (*node.bases, *node.decorator_list))
            if "Enum" in kinds or "Flag" in kinds or "dataclass" in kinds:
                found.append((node.lineno, node.name))
    return found


def test_abi_modules_define_each_name_once() -> None:
    """No name is exported by two ``abi`` modules (the package re-exports them flat)."""
    twice = [name for name, count in Counter(abi.__all__).items() if count > 1]
    assert twice == []


def test_no_module_redefines_an_abi_name() -> None:
    """Every module of ``harness`` imports the ABI facts; none defines one again under the
    ABI's name."""
    names = set(abi.__all__)
    redefined = []
    for path in sorted(HARNESS.rglob("*.py")):
        if ABI_DIR in path.parents:
            continue
        tree = ast.parse(path.read_text(), str(path))
        redefined += [
            f"{path.relative_to(HARNESS.parent)}:{line}: {name}"
            for line, name in _module_level_facts(tree)
            if name in names
        ]
    assert redefined == []
