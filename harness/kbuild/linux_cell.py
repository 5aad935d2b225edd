"""The guest of Linux cells: a small x86-64 kernel for Jailhouse non-root cells and a
busybox initramfs, both carried by the root cell.

* Kernel: ``allnoconfig`` with ``kernel_configs/linux-cell.config`` (``CONFIG_JAILHOUSE_GUEST``,
  x2APIC, 8250 console, PCI with MMCONFIG, MSI/MSI-X, e1000e, initramfs, devtmpfs; every
  other option off),
  ``make bzImage`` from Debian's ``linux-source`` of the lab kernel's version; cached in
  ``images/linux-cell-kernel-<key>/`` (``bzImage``, ``config``, ``build.log``).
* Initramfs: uncompressed newc cpio with the host's static busybox (Debian's
  ``busybox-static``) and ``images/linux-cell/init``, which mounts what it needs, prints
  :data:`READY_LINE` on the console and runs a shell there; ``images/linux-cell-rootfs-<key>.cpio``.

In the root cell they are ``/usr/share/jailhouse/linux/bzImage`` and ``.../rootfs.cpio``
(:meth:`LinuxCellImages.root_cell_files`).
"""

from __future__ import annotations

import json
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from harness.errors import ImageError, MissingToolError
from harness.images import HOST_BUSYBOX, cache_lock
from harness.progress import step
from harness.recipes import find_recipes

from .debian import images_dir, require_build_tools, source_tree
from .kconfig import Fragment
from .process import BuildLog
from .tree import TreeBuild, artefact_key, log_path

#: Bump when the procedure changes in a way the hashed inputs do not show.
RECIPE: Final = "linux-cell 1"
#: the guest kernel's options (in ``kernel_configs/``); everything else is off (``allnoconfig``)
LINUX_CELL_FRAGMENT: Final = "linux-cell.config"
BASE_TARGET: Final = "allnoconfig"
#: the initramfs recipe (its ``init``), in ``images/``
INITRAMFS_RECIPE: Final = "linux-cell"
#: where the root cell carries the images
ROOT_CELL_DIR: Final = "usr/share/jailhouse/linux"
#: what the guest's init prints on the console once its shell is about to start
READY_LINE: Final = "jhlab-linux-cell ready"
#: seconds for compiling the kernel
COMPILE_TIMEOUT: Final = 3600.0


@dataclass(frozen=True)
class LinuxCellImages:
    """The guest kernel and initramfs of Linux cells.

    :param kernel: the ``bzImage``
    :param config: the kernel's ``.config``
    :param rootfs: the initramfs (uncompressed newc cpio)
    """

    kernel: Path
    config: Path
    rootfs: Path

    def root_cell_files(self) -> dict[str, Path]:
        """Where the root cell's file system carries each file (path without the leading
        slash) -> the file."""
        return {f"{ROOT_CELL_DIR}/bzImage": self.kernel, f"{ROOT_CELL_DIR}/rootfs.cpio": self.rootfs}


def linux_cell_images(source_version: str, *, quiet: bool = False) -> LinuxCellImages:
    """The Linux-cell kernel (from Debian's source of ``source_version``) and initramfs,
    built on first use.

    :raise KernelConfigError: when an option of the fragment does not survive
    :raise KernelBuildError: when a build step fails (with the log's tail and path)
    """
    folder = guest_kernel(source_version, quiet=quiet)
    return LinuxCellImages(kernel=folder / "bzImage", config=folder / "config",
                           rootfs=guest_rootfs(quiet=quiet))


def guest_kernel(source_version: str, *, fragment: Path | None = None,
                 quiet: bool = False) -> Path:
    """The folder with the guest's ``bzImage`` and ``config``, keyed by the source
    version, the fragment (default: :data:`LINUX_CELL_FRAGMENT`) and this recipe."""
    fragment = fragment or find_recipes().kernel_configs / LINUX_CELL_FRAGMENT
    loaded = Fragment.load(fragment)
    folder = kernel_folder(source_version, loaded)
    with cache_lock(folder.name):
        if (folder / "bzImage").is_file():
            return folder
        with step(f"Building the Linux-cell kernel ({BASE_TARGET} + {fragment.name})",
                  quiet=quiet) as st, \
                BuildLog(log_path(folder.name), st, quiet=quiet) as log, \
                tempfile.TemporaryDirectory(dir=folder.parent, prefix="tmp-kbuild-cell-") as tmp:
            with log.phase("fetching sources"):
                require_build_tools()
                source = source_tree(source_version, quiet=quiet)
            tree = TreeBuild(source, Path(tmp) / "obj", log)
            tree.configure([loaded], base_target=BASE_TARGET)
            tree.make("bzImage", phase="compiling the kernel", timeout=COMPILE_TIMEOUT)
            staged = Path(tmp) / "out"
            staged.mkdir()
            shutil.copy2(tree.obj / "arch" / "x86" / "boot" / "bzImage", staged / "bzImage")
            shutil.copy2(tree.config_path, staged / "config")
            provenance = {"recipe": RECIPE, "source": f"{source.package} {source.version}",
                          "base": BASE_TARGET, "fragment": loaded.options,
                          "phases": log.phase_times, "cpu": log.cpu_times}
            (staged / "kbuild.json").write_text(json.dumps(provenance, indent=2) + "\n")
            log.close()
            shutil.copyfile(log.path, staged / "build.log")
            staged.rename(folder)
            size = (folder / "bzImage").stat().st_size
            st.result = f"bzImage {size / 2**20:.1f} MiB"
    return folder


def kernel_folder(source_version: str, fragment: Fragment) -> Path:
    """Where the cache keeps the guest kernel of ``source_version`` and ``fragment`` (built
    or not): named by the hash of both and :data:`RECIPE`."""
    key = artefact_key(RECIPE, source_version, BASE_TARGET, fragment.path.name, fragment.text())
    return images_dir() / f"linux-cell-kernel-{key}"


def guest_rootfs(*, quiet: bool = False) -> Path:
    """The Linux cell's initramfs: busybox and :data:`INITRAMFS_RECIPE`'s ``init``."""
    init = find_recipes().images / INITRAMFS_RECIPE / "init"
    if not HOST_BUSYBOX.is_file():
        raise MissingToolError("busybox", "busybox-static", "for the Linux-cell initramfs")
    try:
        init_bytes = init.read_bytes()
    except OSError as exc:
        raise ImageError(f"Linux-cell initramfs recipe: {init}: {exc.strerror}") from exc
    busybox = HOST_BUSYBOX.read_bytes()
    image = images_dir() / f"linux-cell-rootfs-{artefact_key(RECIPE, init_bytes, busybox)}.cpio"
    with cache_lock(image.name):
        if image.is_file():
            return image
        with step("Building the Linux-cell initramfs", quiet=quiet) as st:
            archive = NewcArchive()
            for folder in ("bin", "dev", "etc", "proc", "root", "sys", "tmp"):
                archive.directory(folder)
            # The kernel opens /dev/console for init before anything is mounted.
            archive.char_device("dev/console", 0o600, 5, 1)
            archive.file("bin/busybox", busybox, 0o755)
            archive.file("init", init_bytes, 0o755)
            partial = image.with_suffix(".partial")
            partial.write_bytes(archive.finish())
            partial.rename(image)
            st.result = f"{image.stat().st_size // 1024} KiB"
    return image


class NewcArchive:
    """A cpio archive in the kernel's initramfs format (``newc``), written without the
    ``cpio`` tool so that it can hold device nodes without root rights: entries owned by
    root, mtime 0, inode numbers in order (reproducible)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._inode = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        self._inode += 1
        encoded = name.encode() + b"\0"
        fields = (self._inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._parts.append(_pad4(header + encoded))
        self._parts.append(_pad4(data))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def char_device(self, name: str, mode: int, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive with its trailer."""
        self._inode = -1  # the trailer's fields are all zero
        self._entry("TRAILER!!!", 0, nlink=1)
        return b"".join(self._parts)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)
