"""Finding the recipes (images/, kernel_configs/) for a checkout and for an installed
package, and the inmate build's errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import recipes
from harness.errors import ImageError, MissingToolError


def test_the_checkout_beside_the_package_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without JHLAB_RECIPES the tree the package was imported from is the root."""
    monkeypatch.delenv(recipes.RECIPES_ENV, raising=False)
    found = recipes.find_recipes()
    assert found.root == recipes.PACKAGE_DIR.parent
    assert (found.rootfs / "packages.txt").is_file()
    assert (found.cells / "hello.toml").is_file()
    assert "hello" in found.demos()


def test_jhlab_recipes_names_the_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """JHLAB_RECIPES wins over the tree beside the package."""
    tree = recipes.PACKAGE_DIR.parent
    monkeypatch.setenv(recipes.RECIPES_ENV, str(tree))
    assert recipes.find_recipes().root == tree.resolve()


def test_a_wrong_recipe_root_says_what_to_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A JHLAB_RECIPES without recipes is refused, naming the variable and the folder."""
    monkeypatch.setenv(recipes.RECIPES_ENV, str(tmp_path))
    with pytest.raises(ImageError, match=rf"JHLAB_RECIPES={tmp_path}: no jhlab recipes there"):
        recipes.find_recipes()


def test_an_installed_package_without_recipes_says_what_to_set(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A package installed away from a source tree (no images/ beside it) and no
    JHLAB_RECIPES: the error names the variable."""
    monkeypatch.delenv(recipes.RECIPES_ENV, raising=False)
    monkeypatch.setattr(recipes, "PACKAGE_DIR", tmp_path / "site-packages" / "harness")
    with pytest.raises(ImageError, match="set JHLAB_RECIPES to a jhlab source tree"):
        recipes.find_recipes()


def test_a_missing_build_tool_names_its_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """build_inmates without ld: MissingToolError naming binutils, nothing built."""
    monkeypatch.setattr("harness.recipes.shutil.which", lambda tool: None if tool == "ld" else "/bin/true")
    with pytest.raises(MissingToolError, match=r"ld not found.*apt-get install binutils"):
        recipes.build_inmates(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_build_shows_makes_output(tmp_path: Path) -> None:
    """An unknown make target fails with make's own message."""
    if recipes.missing_build_tools():
        pytest.skip("build tools missing")
    with pytest.raises(ImageError, match="No rule to make target 'no-such-demo'"):
        recipes.build_inmates(tmp_path / "out", "no-such-demo")


def test_guest_programs_use_the_standard_library_only() -> None:
    """harness.guest runs in the root cell's bare python3: besides the standard library
    it may import only harness.hvmodel (shipped beside it)."""
    import ast
    import sys

    for path in sorted((recipes.PACKAGE_DIR / "guest").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or name.startswith("harness.hvmodel"), \
                    f"{path.name} imports {name}"
