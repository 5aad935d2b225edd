"""Debian's kernel packages as build inputs, downloaded through the machine's apt sources
and extracted into the cache (never installed on the host).

* ``linux-source-X.Y`` of the lab kernel's version: its tarball unpacked once into
  ``images/linux-source_<version>/`` and shared, read-only, by every build (they write
  their objects elsewhere with ``O=``).
* ``linux-headers-<release>`` of the same version: the ``.config`` Debian built the kernel
  with and its ``Module.symvers`` (the CRCs of every exported symbol), in
  ``images/linux-build-config_<release>_<version>/``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from harness.errors import ImageError, MissingToolError
from harness.images import cache_dir, cache_lock, require_tool, run_tool
from harness.progress import step

from .process import BuildLog

LOG = logging.getLogger(__name__)

#: free space the unpacked source needs (1.5 GB) plus a build's objects, in bytes
SOURCE_SPACE: Final = 3 * 2**30
#: seconds the source tarball may take to unpack (about 30 s on an idle machine)
UNPACK_TIMEOUT: Final = 900.0

#: programs a kernel build runs, and the Debian package of each
BUILD_TOOLS: Final = {
    "make": "make", "gcc": "gcc", "ld": "binutils", "bison": "bison", "flex": "flex",
    "bc": "bc", "perl": "perl-base", "tar": "tar", "xz": "xz-utils", "pahole": "dwarves",
    "strip": "binutils", "modinfo": "kmod", "depmod": "kmod",
}
#: headers a kernel build compiles host tools against (objtool, sign-file)
BUILD_HEADERS: Final = {"/usr/include/gelf.h": "libelf-dev",
                        "/usr/include/openssl/opensslv.h": "libssl-dev"}


def images_dir() -> Path:
    """The cache's image folder (created on demand)."""
    folder = cache_dir() / "images"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def require_build_tools(extra: dict[str, str] | None = None) -> None:
    """Fail before a build starts when something it needs is not installed.

    :param extra: more programs (name -> Debian package), e.g. Debian's compiler
    :raise MissingToolError: naming the program (or header) and its package
    """
    for tool, package in {**BUILD_TOOLS, **(extra or {})}.items():
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            raise MissingToolError(tool, package, "to build kernels")
    for header, package in BUILD_HEADERS.items():
        if not Path(header).exists():
            raise MissingToolError(header, package, "to build kernels")


def source_package(version: str) -> str:
    """The ``linux-source`` package of a kernel version (``6.1.192-3`` -> ``linux-source-6.1``).

    :raise ImageError: for a version that does not start with ``X.Y``
    """
    parts = version.split(".")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ImageError(f"cannot tell the linux-source package of kernel version {version!r}")
    return f"linux-source-{parts[0]}.{parts[1]}"


def fetch_package(package: str, version: str, dest: Path, *, work: Path) -> None:
    """Download ``package=version`` with apt into ``work`` and extract it into ``dest``.

    :raise ImageError: when apt cannot find or fetch it (the message says to run
        ``apt-get update``)
    """
    work.mkdir(parents=True, exist_ok=True)
    run_tool(["apt-get", "download", f"{package}={version}"], cwd=work,
             what=f"downloading {package} {version} (is apt's package list current? "
                  "'apt-get update')")
    debs = sorted(work.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise ImageError(f"expected one {package} package in {work}, found {debs}")
    run_tool(["dpkg-deb", "-x", str(debs[0]), str(dest)], what=f"extracting {package}")
    debs[0].unlink()


@dataclass(frozen=True)
class SourceTree:
    """Debian's kernel source, unpacked.

    :param package: e.g. ``linux-source-6.1``
    :param version: the Debian package version, e.g. ``6.1.192-3``
    :param root: the tree (its top ``Makefile`` is here)
    """

    package: str
    version: str
    root: Path


def source_tree(version: str, *, quiet: bool = False) -> SourceTree:
    """Debian's kernel source of ``version``, unpacked into the cache on first use.

    :raise ImageError: when the package cannot be fetched, the cache lacks space, or the
        package holds no source tarball
    """
    package = source_package(version)
    images = images_dir()
    folder = images / f"linux-source_{version}"
    tree = SourceTree(package, version, folder)
    with cache_lock(folder.name):
        if folder.is_dir():
            return tree
        free = shutil.disk_usage(images).free
        if free < SOURCE_SPACE:
            raise ImageError(
                f"{images} has {free / 2**30:.1f} GiB free; the kernel source and a build need "
                f"{SOURCE_SPACE / 2**30:.0f} GiB: free some space or point JHLAB_CACHE elsewhere")
        require_tool("tar", f"to unpack {package}")
        with step(f"Unpacking Debian's {package} {version}", quiet=quiet) as st, \
                tempfile.TemporaryDirectory(dir=images, prefix="tmp-linux-source-") as tmp:
            work = Path(tmp)
            st.note("apt-get download")
            fetch_package(package, version, work / "deb", work=work)
            tarballs = sorted((work / "deb" / "usr" / "src").glob("linux-source-*.tar.*"))
            if len(tarballs) != 1:
                raise ImageError(f"{package} {version} holds no single source tarball "
                                 f"under /usr/src (found {[t.name for t in tarballs]})")
            (work / "tree").mkdir()
            with BuildLog(work / "unpack.log", st, quiet=quiet) as log:
                log.run(["tar", "-xf", str(tarballs[0]), "-C", str(work / "tree")],
                        phase="unpacking", timeout=UNPACK_TIMEOUT)
            tops = [p for p in (work / "tree").iterdir() if (p / "Makefile").is_file()]
            if len(tops) != 1:
                raise ImageError(f"{tarballs[0].name} holds no single kernel tree")
            phases = {"downloading and unpacking": st.elapsed}
            unpack_record(version).write_text(json.dumps({"phases": phases}, indent=2) + "\n")
            tops[0].rename(folder)
            st.result = f"{folder}"
    return tree


def unpack_record(version: str) -> Path:
    """Where the unpacking of the source of ``version`` records how long it took."""
    return images_dir() / f"linux-source_{version}.unpack.json"


@dataclass(frozen=True)
class BuildConfig:
    """What Debian built a kernel with (from its ``linux-headers`` package).

    :param config: the ``.config``
    :param symvers: ``Module.symvers``: CRC, symbol, module, export type per exported symbol
    """

    config: Path
    symvers: Path


def debian_build_config(release: str, version: str, *, quiet: bool = False) -> BuildConfig:
    """The build config and ``Module.symvers`` of Debian's kernel ``release`` (e.g.
    ``6.1.0-57-amd64``) at package version ``version``.

    :raise ImageError: when ``linux-headers-<release>`` cannot be fetched or lacks them
    """
    package = f"linux-headers-{release}"
    images = images_dir()
    folder = images / f"linux-build-config_{release}_{version}"
    result = BuildConfig(folder / "config", folder / "Module.symvers")
    with cache_lock(folder.name):
        if folder.is_dir():
            return result
        with step(f"Fetching Debian's build config ({package} {version})", quiet=quiet), \
                tempfile.TemporaryDirectory(dir=images, prefix="tmp-headers-") as tmp:
            work = Path(tmp)
            fetch_package(package, version, work / "deb", work=work)
            headers = work / "deb" / "usr" / "src" / package
            staged = work / "out"
            staged.mkdir()
            for name, dest in ((".config", "config"), ("Module.symvers", "Module.symvers")):
                if not (headers / name).is_file():
                    raise ImageError(f"{package} {version} has no {name} in /usr/src/{package}")
                shutil.copy2(headers / name, staged / dest)
            staged.rename(folder)
    return result


def compiler_of(config: dict[str, str]) -> str:
    """The C compiler command a Debian kernel was built with: the first word of its
    ``CONFIG_CC_VERSION_TEXT`` (``"gcc-12 (Debian 12.2.0-14) 12.2.0"`` -> ``gcc-12``).

    :raise ImageError: when the config does not say
    :raise MissingToolError: when that compiler is not installed
    """
    text = config.get("CONFIG_CC_VERSION_TEXT", "").strip('"')
    if not text:
        raise ImageError("the kernel's config has no CONFIG_CC_VERSION_TEXT: cannot tell "
                         "which compiler built it")
    compiler = text.split()[0]
    if shutil.which(compiler) is None:
        raise MissingToolError(compiler, compiler, "to build modules for Debian's kernel "
                               f"(it was built with {text})")
    return compiler
