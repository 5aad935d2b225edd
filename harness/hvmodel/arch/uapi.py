"""Linux's ioctl request encoding (``include/uapi/asm-generic/ioctl.h``; x86 uses the
generic layout), shared by the KVM and VFIO bindings.

A request number is ``dir << 30 | size << 16 | type << 8 | nr``: the direction bits say
whether the kernel reads (``_IOC_WRITE``) or writes (``_IOC_READ``) the argument, the
size is that of the argument struct. VFIO encodes every request with :func:`io` (no size,
no direction: the kernel reads ``argsz`` from the argument instead).
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

__all__ = [
    "INT_MAX",
    "IOC_NONE",
    "IOC_READ",
    "IOC_SIZEBITS",
    "IOC_TYPESHIFT",
    "IOC_WRITE",
    "io",
    "ioc",
    "ioctl_ulong",
    "ior",
    "iow",
    "iowr",
]

IOC_NRBITS: Final = 8
IOC_TYPEBITS: Final = 8
IOC_SIZEBITS: Final = 14
IOC_NRSHIFT: Final = 0
IOC_TYPESHIFT: Final = IOC_NRSHIFT + IOC_NRBITS
IOC_SIZESHIFT: Final = IOC_TYPESHIFT + IOC_TYPEBITS
IOC_DIRSHIFT: Final = IOC_SIZESHIFT + IOC_SIZEBITS
IOC_NONE: Final = 0
IOC_WRITE: Final = 1
IOC_READ: Final = 2

#: the largest argument :func:`fcntl.ioctl` passes as a C ``int``
INT_MAX: Final = 2**31 - 1


def ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)``: the 32-bit request number."""
    if size >= 1 << IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit {IOC_SIZEBITS} bits")
    return (
        (direction << IOC_DIRSHIFT)
        | (size << IOC_SIZESHIFT)
        | (kind << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
    )


def io(kind: int, nr: int) -> int:
    """``_IO(type, nr)``: no argument struct."""
    return ioc(IOC_NONE, kind, nr, 0)


def ior(kind: int, nr: int, size: int) -> int:
    """``_IOR(type, nr, size)``: the kernel writes the argument."""
    return ioc(IOC_READ, kind, nr, size)


def iow(kind: int, nr: int, size: int) -> int:
    """``_IOW(type, nr, size)``: the kernel reads the argument."""
    return ioc(IOC_WRITE, kind, nr, size)


def iowr(kind: int, nr: int, size: int) -> int:
    """``_IOWR(type, nr, size)``: both."""
    return ioc(IOC_READ | IOC_WRITE, kind, nr, size)


_libc: ctypes.CDLL | None = None


def ioctl_ulong(fd: int, request: int, arg: int) -> int:
    """``ioctl(fd, request, (unsigned long)arg)`` through libc.

    :func:`fcntl.ioctl` passes an integer argument as a C ``int``; KVM_SET_TSS_ADDR and
    friends take an ``unsigned long`` that may not fit (0xfffbd000).

    :raise OSError: with the kernel's errno
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    result = int(_libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(arg)))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result
