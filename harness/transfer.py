"""``jhlab cp``: files between this host and a running lab's root cell, over SFTP on the
lab's ssh session (paramiko).

A location is ``LAB:PATH`` in a lab (``:PATH`` names the default lab; a relative
``PATH`` is under root's home) or a path on this host (write ``./a:b`` for a local name
with a colon before any slash).  One side of a copy is in a lab, the other here.  As
with ``cp``: a destination that is a directory (or ends with ``/``) receives the
source under its own name, ``-r`` copies directories, file modes are kept.  A copy that
fails removes what it had written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko

from harness.errors import JhlabError

__all__ = ["Location", "TransferError", "copy", "parse_location"]

#: reports bytes done so far and the total of the current file
Progress = Callable[[str, int, int], None]


class TransferError(JhlabError):
    """A copy between this host and a lab failed."""


@dataclass(frozen=True)
class Location:
    """One side of a copy: ``lab`` None means this host."""

    lab: str | None
    path: str

    def __str__(self) -> str:
        return self.path if self.lab is None else f"{self.lab}:{self.path}"


def parse_location(text: str, default_lab: str = "default") -> Location:
    """``LAB:PATH``, ``:PATH`` (the default lab) or a local path."""
    head, colon, tail = text.partition(":")
    if colon and "/" not in head:
        return Location(head or default_lab, tail or ".")
    return Location(None, text)


def copy(source: Location, dest: Location, sftp: paramiko.SFTPClient, *, recursive: bool = False,
         progress: Progress | None = None) -> list[str]:
    """Copy ``source`` to ``dest`` (exactly one of them in the lab ``sftp`` reaches);
    return the files written.

    :raise TransferError: naming the path and what to do
    """
    if (source.lab is None) == (dest.lab is None):
        raise TransferError(f"copy {source} to {dest}: one side must be in a lab (LAB:PATH), "
                            "the other on this host")
    written: list[str] = []
    try:
        if dest.lab is not None:
            _upload(Path(source.path), dest.path, sftp, recursive, progress, written)
        else:
            _download(source.path, Path(dest.path), sftp, recursive, progress, written, top=True)
    except TransferError:
        _undo(written[-1:], dest, sftp)
        raise
    except OSError as exc:
        _undo(written[-1:], dest, sftp)
        raise TransferError(f"copy {source} to {dest}: {_describe(exc)}") from exc
    return written


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ENOENT or isinstance(exc, FileNotFoundError):
        return f"no such file or directory{f': {exc.filename}' if exc.filename else ''}"
    if exc.errno == errno.EACCES or isinstance(exc, PermissionError):
        return f"permission denied{f': {exc.filename}' if exc.filename else ''}"
    return exc.strerror or str(exc) or type(exc).__name__


def _undo(partial: list[str], dest: Location, sftp: paramiko.SFTPClient) -> None:
    """Remove the file a failed copy was writing (the files before it are whole)."""
    for path in partial:
        with contextlib.suppress(OSError):
            if dest.lab is None:
                Path(path).unlink()
            else:
                sftp.remove(path)


# -- upload ---------------------------------------------------------------------------------


def _remote_is_dir(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        mode = sftp.stat(path).st_mode
    except FileNotFoundError:
        return False
    return mode is not None and stat.S_ISDIR(mode)


def _upload(source: Path, dest: str, sftp: paramiko.SFTPClient, recursive: bool,
            progress: Progress | None, written: list[str]) -> None:
    if not source.exists():
        raise TransferError(f"{source}: no such file or directory on this host")
    if dest.endswith("/") or _remote_is_dir(sftp, dest):
        dest = posixpath.join(dest, source.name)
    if source.is_dir():
        if not recursive:
            raise TransferError(f"{source} is a directory: copy it with -r")
        for local, remote in _tree_pairs(source, dest):
            if local.is_dir():
                if not _remote_is_dir(sftp, remote):
                    sftp.mkdir(remote, stat.S_IMODE(local.stat().st_mode))
            else:
                _put_file(local, remote, sftp, progress, written)
        return
    _put_file(source, dest, sftp, progress, written)


def _tree_pairs(root: Path, dest: str) -> Iterator[tuple[Path, str]]:
    """Every folder (before its contents) and file under ``root``, with its remote path."""
    yield root, dest
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        relative = Path(folder).relative_to(root)
        for name in sorted(dirs) + sorted(files):
            yield Path(folder) / name, posixpath.join(dest, *relative.parts, name)


def _put_file(local: Path, remote: str, sftp: paramiko.SFTPClient, progress: Progress | None,
              written: list[str]) -> None:
    written.append(remote)
    report = (lambda done, total: progress(remote, done, total)) if progress else None
    sftp.put(str(local), remote, callback=report)
    sftp.chmod(remote, stat.S_IMODE(local.stat().st_mode))


# -- download -------------------------------------------------------------------------------


def _download(source: str, dest: Path, sftp: paramiko.SFTPClient, recursive: bool,
              progress: Progress | None, written: list[str], *, top: bool = False) -> None:
    try:
        mode = sftp.stat(source).st_mode or 0
    except FileNotFoundError:
        raise TransferError(f"{source}: no such file or directory in the lab") from None
    if top and (str(dest).endswith("/") or dest.is_dir()):
        dest = dest / posixpath.basename(source.rstrip("/"))
    if stat.S_ISDIR(mode):
        if not recursive:
            raise TransferError(f"{source} is a directory in the lab: copy it with -r")
        dest.mkdir(mode=stat.S_IMODE(mode), exist_ok=True)
        for entry in sorted(sftp.listdir_attr(source), key=lambda e: e.filename):
            _download(posixpath.join(source, entry.filename), dest / entry.filename, sftp,
                      True, progress, written)
        return
    if not stat.S_ISREG(mode):
        raise TransferError(f"{source} in the lab is not a regular file or directory")
    written.append(str(dest))
    report = (lambda done, total: progress(source, done, total)) if progress else None
    sftp.get(source, str(dest), callback=report)
    os.chmod(dest, stat.S_IMODE(mode))
