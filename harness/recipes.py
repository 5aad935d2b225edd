"""Where jhlab's recipes are: the build inputs that are not Python.

The Python package carries what it reads at run time (:data:`CONFIGS`, Jailhouse's QEMU
configs as TOML sources, and the lab files). The build recipes live in a jhlab source
tree beside the package and are not installed with it::

    images/rootfs/          package list, kernel modules, overlay of the root file system
    images/initramfs/       stage-1 init and its kernel modules
    images/guest/bin/       guest tools (the ``jailhouse`` command)
    images/guest/libexec/   Jailhouse's helper scripts (``jailhouse-config-check``)
    images/kmod/            jhlab's kernel modules for the root cell (``jhlab_gsi``)
    images/inmates/         inmate library, demos, cell configs (``cells/``), C tools
    kernel_configs/         kernel options a root cell needs
    test_suites/            the suites ``jhlab test`` runs

The recipe root is, in this order: ``$JHLAB_RECIPES`` (a jhlab source tree, for an
installed package), else the tree the package was imported from (an editable install or a
checkout on ``PYTHONPATH``). When neither holds the recipes, :func:`find_recipes` raises
:class:`~harness.errors.ImageError` saying to set ``JHLAB_RECIPES``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from harness.errors import ImageError, MissingToolError

#: names the recipe root (a jhlab source tree) for a package installed elsewhere
RECIPES_ENV: Final = "JHLAB_RECIPES"
#: the ``harness`` package folder
PACKAGE_DIR: Final = Path(__file__).resolve().parent
#: Jailhouse's x86 QEMU configs as TOML sources (package data, always installed)
CONFIGS: Final = PACKAGE_DIR / "configs"
#: seconds one inmate build may take
BUILD_TIMEOUT: Final = 300.0
#: programs the inmates Makefile runs, and the Debian package of each
BUILD_TOOLS: Final = {"make": "make", "gcc": "gcc", "ld": "binutils", "objcopy": "binutils",
                      "nm": "binutils"}
#: a file every recipe root has (how a candidate folder is recognised)
_MARKER: Final = Path("images") / "rootfs" / "packages.txt"


@dataclass(frozen=True)
class Recipes:
    """The recipe folders of one jhlab source tree.

    :param root: the tree (holds ``images/`` and ``kernel_configs/``)
    """

    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def rootfs(self) -> Path:
        """Root file system recipe: ``packages.txt``, ``modules.txt``, ``overlay/``."""
        return self.images / "rootfs"

    @property
    def initramfs(self) -> Path:
        """Stage-1 recipe: ``init``, ``modules.txt``."""
        return self.images / "initramfs"

    @property
    def guest_bin(self) -> Path:
        """Guest tools copied to ``/opt/jhlab/bin`` (the ``jailhouse`` command)."""
        return self.images / "guest" / "bin"

    @property
    def guest_src(self) -> Path:
        """C sources of the guest's compiled programs (the ``jailhouse`` launcher)."""
        return self.images / "guest" / "src"

    @property
    def guest_libexec(self) -> Path:
        """Jailhouse's helper scripts, copied to ``/opt/jhlab/libexec`` (seen as
        ``/usr/libexec/jailhouse``, where Jailhouse installs them)."""
        return self.images / "guest" / "libexec"

    @property
    def kmod(self) -> Path:
        """jhlab's root-cell kernel modules, one folder (with a ``Kbuild``) each."""
        return self.images / "kmod"

    @property
    def inmates(self) -> Path:
        """Inmate sources and their Makefile."""
        return self.images / "inmates"

    @property
    def cells(self) -> Path:
        """Cell configs (TOML) of jhlab's demo inmates."""
        return self.inmates / "cells"

    @property
    def kernel_configs(self) -> Path:
        return self.root / "kernel_configs"

    @property
    def test_suites(self) -> Path:
        return self.root / "test_suites"

    def demos(self) -> list[str]:
        """The demos the inmates Makefile builds (its ``DEMOS :=`` and ``DEMOS +=`` lines)."""
        makefile = self.inmates / "Makefile"
        lines = re.findall(r"^DEMOS [:+]= (.+)$", makefile.read_text(), re.MULTILINE)
        if not lines:
            raise ImageError(f"{makefile} has no 'DEMOS :=' line")
        return [demo for line in lines for demo in line.split()]


def find_recipes() -> Recipes:
    """The recipe root (see the module docstring).

    :raise ImageError: when ``$JHLAB_RECIPES`` is not a recipe root, or it is unset and
        the package does not sit in a jhlab source tree
    """
    named = os.environ.get(RECIPES_ENV)
    if named:
        root = Path(named).expanduser().resolve()
        if not (root / _MARKER).is_file():
            raise ImageError(f"{RECIPES_ENV}={named}: no jhlab recipes there (no {_MARKER}); "
                             "point it at a jhlab source tree")
        return Recipes(root)
    beside = PACKAGE_DIR.parent
    if (beside / _MARKER).is_file():
        return Recipes(beside)
    raise ImageError(f"jhlab's recipes (images/, kernel_configs/) are not beside the installed "
                     f"package ({PACKAGE_DIR}): set {RECIPES_ENV} to a jhlab source tree")


def missing_build_tools() -> list[str]:
    """The inmate build tools not on ``PATH``."""
    return [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]


def build_inmates(out: Path, *targets: str, recipes: Recipes | None = None,
                  timeout: float = BUILD_TIMEOUT) -> str:
    """Run the inmates Makefile into ``out`` (``make -C images/inmates O=OUT TARGETS``):
    every demo when no target is named, else ``hello``, ``kvmrun``, ``kvmloop``, ...

    :return: what make printed (``make sizes``, ``make host-test`` report there)
    :raise MissingToolError: when a build tool is missing, naming its package
    :raise ImageError: when the build fails (with its output) or takes over ``timeout``
    """
    missing = missing_build_tools()
    if missing:
        raise MissingToolError(missing[0], BUILD_TOOLS[missing[0]], "to build the inmates")
    source = (recipes or find_recipes()).inmates
    command = ["make", "-s", "-C", str(source), f"O={out}", *targets]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{' '.join(command)} took more than {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise ImageError(f"building the inmates failed (exit status {done.returncode}): "
                         f"{' '.join(command)}\n{done.stdout}{done.stderr}")
    return done.stdout
