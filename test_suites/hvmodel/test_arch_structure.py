"""The shape of ``harness.hvmodel.arch``: modules by concern, no import circle, bindings
below the executor.

Imports are read from the source (every ``import`` statement of a module, those under
``TYPE_CHECKING`` and inside functions included), not from a running interpreter, so a
circle that only type checking or a late import closes is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from harness.hvmodel import arch

ARCH = Path(arch.__file__).resolve().parent
HVMODEL = ARCH.parent
#: the ~800-line limit of the project's style rules
MAX_LINES = 800


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(HVMODEL.parent.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(HVMODEL.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports (anywhere in its source)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = ".".join(part for part in (base if node.level else "", node.module or "") if part)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in known else target)
    return found & known


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) - {name} for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_arch_modules_stay_small() -> None:
    """Every module of the arch package is under the style rules' ~800 lines."""
    long = {
        str(path.relative_to(ARCH)): count
        for path in sorted(ARCH.rglob("*.py"))
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_no_import_circle_through_arch() -> None:
    """No module of ``harness.hvmodel.arch`` is on an import circle."""
    circles = [sorted(c) for c in _circles(_import_graph()) if any(".arch" in m for m in c)]
    assert circles == []


def test_the_bindings_sit_below_the_executor() -> None:
    """The KVM and VFIO bindings import nothing of what is built on them (the executor,
    the runner, the Jailhouse cell CPU, passthrough)."""
    graph = _import_graph()
    above = ("executor", "runner", "vcpu", "passthrough", "oracle", "holder")
    upward = {
        (module, imported)
        for module, imports in graph.items()
        if module.startswith(("harness.hvmodel.arch.kvm", "harness.hvmodel.arch.vfio"))
        for imported in imports
        if imported.startswith(tuple(f"harness.hvmodel.arch.{name}" for name in above))
    }
    assert upward == set()


def test_the_graph_sees_relative_and_late_imports() -> None:
    """The reader resolves relative, TYPE_CHECKING and function-local imports (else the
    tests above could pass on an empty graph)."""
    graph = _import_graph()
    assert "harness.hvmodel.arch.kvm.structs" in graph["harness.hvmodel.arch.kvm.vcpu"]
    assert "harness.hvmodel.arch.kvm" in graph["harness.hvmodel.arch.runner"]
    # ``from ...driver import HostInfo`` inside a function and under TYPE_CHECKING
    assert "harness.hvmodel.driver" in graph["harness.hvmodel.arch.executor.host"]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
