"""The suites' layout holds up when pytest collects them all at once (``./scripts/test``,
one shard of CI): the suite folders are not packages, so pytest imports every test module
under its bare file name, and two modules of the same name end the whole collection."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

SUITES = Path(__file__).resolve().parents[1]


def test_test_module_names_are_unique_across_suites() -> None:
    """No two suites hold a test module (or helper module) of the same file name."""
    seen: dict[str, list[str]] = defaultdict(list)
    for module in SUITES.rglob("*.py"):
        if module.name != "conftest.py" and "data" not in module.relative_to(SUITES).parts:
            seen[module.name].append(str(module.relative_to(SUITES)))
    clashes = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not clashes, f"rename one of each: {clashes}"


def test_the_plugin_package_exports_every_hook() -> None:
    """pytest scans the entry point's module, the package: a hook defined in
    harness.pytest_plugin.hooks but not imported there is silently never called."""
    import harness.pytest_plugin as plugin
    from harness.pytest_plugin import hooks

    defined = {name for name in vars(hooks) if name.startswith("pytest_") and callable(vars(hooks)[name])}
    assert defined and defined <= set(vars(plugin)), sorted(defined - set(vars(plugin)))
