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
    directories left empty (``cells/<id>`` after a destroy).

    :param root: the ``sys/devices/jailhouse`` directory
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._written: dict[str, bytes] = {}

    def clear(self) -> None:
        """Remove the whole tree (stale files of an earlier daemon included)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self._written = {}

    def write(self, tree: dict[str, str]) -> None:
        """Make the directory show ``tree``."""
        wanted = {path: _encode_file(path, text) for path, text in tree.items()}
        for path, data in wanted.items():
            if self._written.get(path) == data:
                continue
            target = self.root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = target.with_name(f".{target.name}.tmp")
            with open(temp, "wb") as out:
                out.write(data)
            os.chmod(temp, 0o444)
            os.replace(temp, target)
            self._written[path] = data
        stale = sorted(set(self._written) - set(wanted), reverse=True)
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                (self.root / path).unlink()
            del self._written[path]
            parent = (self.root / path).parent
            while parent != self.root and self.root in parent.parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent


def _encode_file(path: str, text: str) -> bytes:
    # The console ring holds bytes (the model keeps them as Latin-1 code points).
    if path == "console":
        return text.encode("latin-1", "replace")
    return text.encode("utf-8", "surrogateescape")

