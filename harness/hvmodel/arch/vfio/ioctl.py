"""Calling VFIO: :func:`vfio_ioctl`, :class:`VfioError` (the error of every failing VFIO
step, naming the device, group or container and keeping the kernel's errno) and
:func:`cap_chain`, the walk over an info buffer's capability chain.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ...errors import Errno, HvError
from .structs import VfioInfoCapHeader

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["VfioError", "cap_chain", "failed", "vfio_ioctl"]


class VfioError(HvError):
    """A VFIO step failed, for one device, group or container.

    ``str()`` reads ``"<who>: <message>"``, e.g. ``"01:01.0: VFIO_DEVICE_SET_IRQS failed:
    EINVAL (Invalid argument): enable MSI, 2 vectors"``.

    :param who: the device (``01:01.0``), ``group 5`` or ``container``
    :param message: the step and what went wrong
    :param os_errno: the kernel's errno (0 when the failure was detected here)
    :param code: the Jailhouse errno (default: ``os_errno`` when Jailhouse has it, else EIO)
    """

    def __init__(self, who: str, message: str, *, os_errno: int = 0, code: Errno | None = None) -> None:
        self.who = who
        self.text = message
        self.os_errno = os_errno
        if code is None:
            known = {int(e) for e in Errno}
            code = Errno(os_errno) if os_errno in known else Errno.EIO
        super().__init__(code, message)

    def __str__(self) -> str:
        return f"{self.who}: {self.text}" if self.who else self.text


def failed(op: str, os_errno: int, detail: str = "") -> str:
    """``"OP failed: ENAME (text): detail"``."""
    text = f"{op} failed"
    if os_errno:
        text += f": {errno.errorcode.get(os_errno, str(os_errno))} ({os.strerror(os_errno)})"
    return f"{text}: {detail}" if detail else text


def vfio_ioctl(
    fd: int, request: int, arg: int | WriteableBuffer, *, op: str, who: str, detail: str = ""
) -> int:
    """``ioctl(2)`` raising :class:`VfioError` that names ``who`` and ``op``.

    Buffers must be mutable (``bytearray``, ctypes objects): :func:`fcntl.ioctl` then
    returns the ioctl's result (a new fd for ``VFIO_GROUP_GET_DEVICE_FD``).
    """
    if fd < 0:
        raise VfioError(
            who, failed(op, errno.EBADF, f"{detail} (already closed)".strip()), os_errno=errno.EBADF
        )
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        code = exc.errno or 0
        raise VfioError(who, failed(op, code, detail), os_errno=code) from exc


def cap_chain(buf: bytes | bytearray, first: int) -> Iterator[tuple[int, int, int]]:
    """(id, version, offset) of every capability in a VFIO info buffer's chain."""
    seen: set[int] = set()
    offset = first
    while offset and offset not in seen and offset + ctypes.sizeof(VfioInfoCapHeader) <= len(buf):
        seen.add(offset)
        header = VfioInfoCapHeader.from_buffer_copy(buf, offset)
        yield int(header.id), int(header.version), offset
        offset = int(header.next)
