"""Calling KVM: :func:`kvm_ioctl` and :class:`KvmError`, the error of every failing
ioctl, open or mmap of the KVM binding (and of the host memory and ports the executor
opens: :mod:`~harness.hvmodel.arch.hostmem`, :mod:`~harness.hvmodel.arch.portio`).

A :class:`KvmError` is an :class:`~harness.hvmodel.errors.HvError` that names the
operation and keeps the kernel's errno (:attr:`KvmError.os_errno`); its Jailhouse errno
is the same code when Jailhouse has it, else ``EIO``.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import TYPE_CHECKING

from ...errors import Errno, HvError
from ..uapi import INT_MAX, ioctl_ulong
from .structs import IOCTL_NAMES

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["KvmError", "kvm_ioctl"]


class KvmError(HvError):
    """A KVM ioctl, or opening/mapping a device for the executor, failed.

    :param op: the ioctl or operation, e.g. ``"KVM_SET_USER_MEMORY_REGION"``
    :param os_errno: the kernel's errno (0 when the failure was detected here)
    :param detail: what was asked, e.g. the slot and address
    """

    def __init__(self, op: str, os_errno: int, detail: str = "") -> None:
        self.op = op
        self.os_errno = os_errno
        self.detail = detail
        known = {int(e) for e in Errno}
        super().__init__(Errno(os_errno) if os_errno in known else Errno.EIO, detail)

    def __str__(self) -> str:
        if self.os_errno:
            name = errno.errorcode.get(self.os_errno, str(self.os_errno))
            text = f"{self.op} failed: {name} ({os.strerror(self.os_errno)})"
        else:
            text = f"{self.op} failed"
        return f"{text}: {self.detail}" if self.detail else text


def kvm_ioctl(fd: int, request: int, arg: int | WriteableBuffer = 0, detail: str = "") -> int:
    """``ioctl(2)`` that raises :class:`KvmError` naming the request.

    Integer arguments that do not fit a C ``int`` go through
    :func:`~harness.hvmodel.arch.uapi.ioctl_ulong`.
    """
    if fd < 0:
        name = IOCTL_NAMES.get(request, f"ioctl {request:#x}")
        raise KvmError(name, errno.EBADF, f"{detail} (already closed)".lstrip())
    try:
        if isinstance(arg, int) and not 0 <= arg <= INT_MAX:
            return ioctl_ulong(fd, request, arg)
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        name = IOCTL_NAMES.get(request, f"ioctl {request:#x}")
        raise KvmError(name, exc.errno or 0, detail) from exc
