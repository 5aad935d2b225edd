"""jhlab's own kernel modules for the root cell (``images/kmod/<name>/``, each with a
``Kbuild``), built against Debian's ``linux-headers`` of the lab kernel.

Debian ships its headers packages for exactly this, external modules: the flavour's
tree (``linux-headers-<release>``: ``.config``, ``Module.symvers``, generated headers),
the common tree it includes and ``linux-kbuild-X.Y`` (``modpost`` and the other build
programs). The three are extracted into the cache once (never installed), with the one
absolute path in them, the flavour Makefile's ``include`` of the common tree, pointed at
the extracted copy. A build then takes seconds and needs no prepared source tree:
modpost records Debian's CRC of every kernel symbol a module uses, so the running kernel
checks each one at load time, and the result must carry the lab kernel's ``vermagic``
(checked). Unsigned and out of tree, a module taints Debian's kernel (``O``, ``E``), as
the rebuilt KVM modules do already.

The modules go into the per-boot guest payload (``/opt/jhlab/modules``), where
``jhlab-guest-setup`` loads them at boot; a change to their sources rebuilds them, not
the root file system. Cached as ``images/root-modules-<key>/<name>.ko``, keyed by the
kernel package and version, the sources and :data:`RECIPE`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Final

from harness.errors import ImageError
from harness.images import Kernel, cache_lock, run_tool
from harness.progress import step
from harness.recipes import find_recipes

from .debian import compiler_of, fetch_package, images_dir, require_build_tools
from .kconfig import parse_config
from .process import BuildLog
from .root_kvm import check_vermagic
from .tree import BUILD_ENV, artefact_key, jobs, log_path

LOG = logging.getLogger(__name__)

#: Bump when the procedure changes in a way the hashed inputs do not show.
RECIPE: Final = "root-modules 1"
#: seconds one module may take to compile
MODULE_TIMEOUT: Final = 600.0
#: a module of the lab kernel whose vermagic ours must have
VERMAGIC_REFERENCE: Final = Path("kernel") / "arch" / "x86" / "kvm" / "kvm.ko"


def module_sources(kmod: Path | None = None) -> list[Path]:
    """The module folders of ``images/kmod`` (those with a ``Kbuild``), sorted."""
    folder = kmod or find_recipes().kmod
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (p / "Kbuild").is_file())


def root_modules(kernel: Kernel, *, quiet: bool = False, kmod: Path | None = None) -> Path:
    """The folder with jhlab's root-cell modules (``<name>.ko``) for ``kernel``, built on
    first use.

    :raise ImageError: when Debian's headers cannot be fetched or a module does not fit
        the kernel
    :raise KernelBuildError: when a build fails (with the log's tail and path)
    """
    sources = module_sources(kmod)
    files = sorted(f for src in sources for f in src.rglob("*") if f.is_file())
    key = artefact_key(RECIPE, kernel.package, kernel.version,
                       *(f"{f.relative_to(f.parents[1])}\0".encode() + f.read_bytes() for f in files))
    folder = images_dir() / f"root-modules-{key}"
    with cache_lock(folder.name):
        if folder.is_dir():
            return folder
        names = ", ".join(src.name for src in sources) or "none"
        with step(f"Building jhlab's root-cell modules ({names}) for {kernel.release}", quiet=quiet) as st, \
                BuildLog(log_path(folder.name), st, quiet=quiet) as log, \
                tempfile.TemporaryDirectory(dir=folder.parent, prefix="tmp-kmod-") as tmp:
            work = Path(tmp)
            staged = work / "out"
            staged.mkdir()
            built: dict[str, str] = {}
            if sources:
                with log.phase("fetching Debian's headers"):
                    headers = debian_headers(kernel.release, kernel.version, quiet=quiet)
                    compiler = compiler_of(parse_config((headers / ".config").read_text()))
                    require_build_tools({compiler: compiler})
                for src in sources:
                    built.update(_build_module(src, work, staged, headers, compiler, kernel, log))
            (staged / "build.json").write_text(json.dumps(
                {"recipe": RECIPE, "kernel": f"{kernel.package} {kernel.version}", "modules": built,
                 "phases": log.phase_times}, indent=2) + "\n")
            staged.rename(folder)
            st.result = f"{len(built)} module(s)"
    return folder


def _build_module(src: Path, work: Path, staged: Path, headers: Path, compiler: str,
                  kernel: Kernel, log: BuildLog) -> dict[str, str]:
    """Build one module folder (a copy: ``M=`` builds write beside the sources) into
    ``staged``; returns module file -> folder name."""
    copy = work / src.name
    shutil.copytree(src, copy)
    log.run(["make", "-C", str(headers), f"M={copy}", f"-j{jobs()}", f"CC={compiler}", "modules"],
            phase=f"compiling {src.name}", timeout=MODULE_TIMEOUT, env=BUILD_ENV)
    built: dict[str, str] = {}
    for module in sorted(copy.glob("*.ko")):
        run_tool(["strip", "--strip-debug", str(module)], what=f"stripping {module.name}")
        check_vermagic(module, kernel.modules / VERMAGIC_REFERENCE)
        shutil.copy2(module, staged / module.name)
        built[module.name] = src.name
    if not built:
        raise ImageError(f"{src}: the build made no module (is its Kbuild's obj-m right?)")
    return built


def debian_headers(release: str, version: str, *, quiet: bool = False) -> Path:
    """Debian's headers of kernel ``release`` at package ``version``, extracted into the
    cache on first use; returns the tree to build external modules against
    (``make -C TREE M=...``).

    :raise ImageError: when the packages cannot be fetched or are not laid out as Debian's
    """
    package = f"linux-headers-{release}"
    folder = images_dir() / f"linux-headers_{release}_{version}"
    tree = folder / "usr" / "src" / package
    with cache_lock(folder.name):
        if folder.is_dir():
            return tree
        with step(f"Fetching Debian's {package} {version} and what it includes", quiet=quiet), \
                tempfile.TemporaryDirectory(dir=folder.parent, prefix="tmp-headers-") as tmp:
            work = Path(tmp)
            root = work / "root"
            fetch_package(package, version, root, work=work / "deb")
            staged_tree = root / "usr" / "src" / package
            common, kbuild = _included_packages(staged_tree)
            for other in (common, kbuild):
                fetch_package(other, version, root, work=work / "deb")
            # The flavour tree includes the common one by its installed path.
            (staged_tree / "Makefile").write_text(
                f"include {folder / 'usr' / 'src' / common / 'Makefile'}\n")
            root.rename(folder)
    return tree


def _included_packages(tree: Path) -> tuple[str, str]:
    """The packages a flavour headers tree needs: the common tree its Makefile includes
    and the kbuild package its ``scripts`` link points into."""
    makefile = (tree / "Makefile").read_text().split()
    included = [word for word in makefile if word.startswith("/usr/src/") and word.endswith("/Makefile")]
    try:
        scripts = os.readlink(tree / "scripts")
    except OSError as exc:
        raise ImageError(f"{tree}: no scripts link to the kbuild package ({exc})") from exc
    kbuild = next((part for part in Path(scripts).parts if part.startswith("linux-kbuild-")), None)
    if len(included) != 1 or kbuild is None:
        raise ImageError(f"{tree}: not laid out as Debian's headers (Makefile includes {included}, "
                         f"scripts -> {scripts})")
    return Path(included[0]).parent.name, kbuild
