"""Jailhouse's sysfs tree as real files; stands where ``driver/sysfs.c`` exposes
``/sys/devices/jailhouse``.

Linux's ``/sys`` cannot be extended from user space, so the driver daemon writes the
tree :func:`~harness.hvmodel.sysfs.sysfs_tree` renders as files under its run directory
(``sys/devices/jailhouse``), and ``jailhouse cell list`` / ``cell stats`` read them
there, as Jailhouse's tools read sysfs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

__all__ = ["SysfsWriter"]


class SysfsWriter:
    """Keeps a directory equal to a :func:`~harness.hvmodel.sysfs.sysfs_tree` rendering.

    Files are written atomically (temporary file, then rename), read-only (0444), and
    only when their content changed; files no longer in the tree are removed, then
    directories left empty (``cells/<id>`` after a destroy). The writer remembers what
    it wrote and which directories it made, so a refresh that changes nothing costs no
    system call (it runs after every operation and, while cells run, every second).

    :param root: the ``sys/devices/jailhouse`` directory
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._base = os.fspath(root)
        self._written: dict[str, bytes] = {}
        self._dirs: set[str] = set()

    def clear(self) -> None:
        """Remove the whole tree (stale files of an earlier daemon included)."""
        shutil.rmtree(self._base, ignore_errors=True)
        self._written = {}
        self._dirs = set()

    def _make_dirs(self, folder: str) -> None:
        if folder not in self._dirs:
            os.makedirs(os.path.join(self._base, folder), exist_ok=True)
            self._dirs.add(folder)

    def write(self, tree: dict[str, str]) -> None:
        """Make the directory show ``tree``."""
        written = self._written
        wanted = {path: _encode_file(path, text) for path, text in tree.items()}
        for path, data in wanted.items():
            if written.get(path) == data:
                continue
            folder, _, name = path.rpartition("/")
            self._make_dirs(folder)
            target = os.path.join(self._base, path)
            temp = os.path.join(self._base, folder, f".{name}.tmp")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o444)
            try:
                os.fchmod(fd, 0o444)  # whatever the umask
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(temp, target)
            written[path] = data
        stale = sorted(set(written) - set(wanted), reverse=True)
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._base, path))
            del written[path]
            folder = path.rpartition("/")[0]
            while folder:
                try:
                    os.rmdir(os.path.join(self._base, folder))
                except OSError:
                    break
                self._dirs.discard(folder)
                folder = folder.rpartition("/")[0]


def _encode_file(path: str, text: str) -> bytes:
    # The console ring holds bytes (the model keeps them as Latin-1 code points).
    if path == "console":
        return text.encode("latin-1", "replace")
    return text.encode("utf-8", "surrogateescape")

