"""Host I/O ports for the executor; stands where Jailhouse's I/O-bitmap pass-through is
(``vcpu_cell_init`` in ``hypervisor/arch/x86/vcpu.c`` opens a cell's whitelisted ports).

Jailhouse lets a cell's whitelisted ports (and the PM timer) through to the hardware
without an exit. KVM cannot pass ports through to a guest, so every port access of a cell
exits to the executor, and the accesses the model allows are performed here, on the real
port, by the root cell's Linux process. Two ways, chosen by :func:`open_ports`:

* **native** (preferred): ``ioperm(2)`` for the accessed ports in the calling thread, then
  the real ``in``/``out`` instruction of the access's width, from a tiny machine-code stub
  in an executable page (x86-64 only; needs ``CAP_SYS_RAWIO`` and a kernel with
  ``CONFIG_X86_IOPL_IOPERM``, as Debian's). A 4-byte PM-timer read is one ``inl``, exactly
  what the inmate executed: it cannot tear, and costs a ctypes call instead of a syscall.
* **/dev/port** (fallback): the kernel moves one byte per port (``inb``/``outb``, lowest
  port first), so a 2- or 4-byte access becomes that many byte accesses. A counter that
  ticks between the byte reads (the ACPI PM timer, 3.58 MHz) would then read torn; reads
  of the *counter* ports given to :func:`open_ports` go through :func:`stable_read`, which
  reads twice until the bytes above the lowest agree. Other ports are read once: a second
  read of a data register (a UART's receive buffer) would have side effects.

``ioperm`` permissions belong to a thread (Linux keeps the I/O bitmap per task), so the
native backend grants each port to each thread on its first access there.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import platform
import threading
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from .kvm import DevPort, KvmError

__all__ = ["DevPortPorts", "NativePorts", "PortIo", "open_ports", "stable_read"]

LOG = logging.getLogger(__name__)

#: The machine code of the native stubs (System V AMD64 ABI: port in EDI, value in ESI,
#: result in EAX). Each is placed at a 16-byte slot of one page: in8/16/32, out8/16/32.
_STUBS: Final[dict[str, bytes]] = {
    # mov edx, edi ; in al, dx ; movzx eax, al ; ret
    "in1": bytes.fromhex("89fa" "ec" "0fb6c0" "c3"),
    # mov edx, edi ; in ax, dx ; movzx eax, ax ; ret
    "in2": bytes.fromhex("89fa" "66ed" "0fb7c0" "c3"),
    # mov edx, edi ; in eax, dx ; ret
    "in4": bytes.fromhex("89fa" "ed" "c3"),
    # mov edx, edi ; mov eax, esi ; out dx, al ; ret
    "out1": bytes.fromhex("89fa" "89f0" "ee" "c3"),
    # mov edx, edi ; mov eax, esi ; out dx, ax ; ret
    "out2": bytes.fromhex("89fa" "89f0" "66ef" "c3"),
    # mov edx, edi ; mov eax, esi ; out dx, eax ; ret
    "out4": bytes.fromhex("89fa" "89f0" "ef" "c3"),
}
_STUB_SLOT: Final = 16
_SIZES: Final = (1, 2, 4)
#: attempts of :func:`stable_read` before it gives the last reading
STABLE_READ_ATTEMPTS: Final = 16


class PortIo(Protocol):
    """Access to real I/O ports (what :class:`~harness.hvmodel.arch.executor.ExecutorArch`
    uses for :meth:`~harness.hvmodel.arch.Arch.pio_read` / ``pio_write``)."""

    #: ``native`` or ``/dev/port`` (or a test double's name)
    mode: str

    def read(self, port: int, size: int) -> int:
        """One ``size``-byte (1, 2, 4) read of ``port``."""
        ...

    def write(self, port: int, size: int, value: int) -> None:
        """One ``size``-byte (1, 2, 4) write of ``port``."""

    def close(self) -> None:
        """Release the backend; idempotent. No thread may use it any more."""


def _check(port: int, size: int) -> None:
    if size not in _SIZES:
        raise ValueError(f"port access size {size}: must be 1, 2 or 4")
    if port < 0 or port + size > 0x10000:
        raise ValueError(f"port {port:#x}+{size} outside 0..0xffff")


def stable_read(read_bytes: Callable[[int, int], bytes], port: int, size: int) -> int:
    """A tear-free multi-byte read of a running counter through byte-wise reads.

    ``read_bytes(port, size)`` reads the bytes lowest port first, so a carry out of a
    lower byte between two byte reads gives a torn value. Read twice: when the bytes
    above the lowest are the same in both readings, nothing carried into them between
    the first reading's upper bytes and the second's, a window that contains the second
    reading's lowest byte; the second reading is then consistent. The PM timer's upper
    bytes change every 256 ticks (72 us), far longer than two reads take.

    :return: the value (after :data:`STABLE_READ_ATTEMPTS` disagreeing pairs, the last
        reading, which a wrap of the lowest byte makes at most 256 ticks off)
    """
    first = read_bytes(port, size)
    if size == 1:
        return first[0]
    for _ in range(STABLE_READ_ATTEMPTS):
        second = read_bytes(port, size)
        if second[1:] == first[1:]:
            return int.from_bytes(second, "little")
        first = second
    return int.from_bytes(first, "little")


class DevPortPorts:
    """Ports through ``/dev/port`` (byte-wise; counters read with :func:`stable_read`).

    :param counters: ports whose multi-byte reads must not tear (the PM timer's)
    :param path: the port device
    :raise KvmError: when the device cannot be opened
    """

    mode = "/dev/port"

    def __init__(self, counters: Iterable[int] = (), path: str = "/dev/port") -> None:
        self._device = DevPort(path)
        self._counters = frozenset(counters)

    def read(self, port: int, size: int) -> int:
        _check(port, size)
        if port in self._counters:
            return stable_read(self._device.read, port, size)
        return int.from_bytes(self._device.read(port, size), "little")

    def write(self, port: int, size: int, value: int) -> None:
        _check(port, size)
        self._device.write(port, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def close(self) -> None:
        self._device.close()


_InFn = Callable[[int], int]
_OutFn = Callable[[int, int], None]


class NativePorts:
    """Ports with the ``in``/``out`` instructions (``ioperm`` per thread and port).

    Lifecycle: the stub page is mapped and made executable on construction, unmapped by
    :meth:`close` (after every thread stopped using the object).

    :raise OSError: when the platform is not x86-64, or the stub page cannot be mapped
    """

    mode = "native"

    def __init__(self) -> None:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise OSError(errno.ENOSYS, f"native port I/O needs x86-64, not {platform.machine()}")
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
        ]  # fmt: skip
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.ioperm.argtypes = [ctypes.c_ulong, ctypes.c_ulong, ctypes.c_int]
        self._libc = libc
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        address = libc.mmap(None, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            code = ctypes.get_errno()
            raise OSError(code, f"mmap of the port stub page: {os.strerror(code)}")
        self._page: int | None = address
        for index, code_bytes in enumerate(_STUBS.values()):
            ctypes.memmove(address + index * _STUB_SLOT, code_bytes, len(code_bytes))
        # W^X: the page is never writable and executable at the same time.
        if libc.mprotect(address, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            code = ctypes.get_errno()
            self.close()
            raise OSError(code, f"mprotect of the port stub page: {os.strerror(code)}")
        slots = {name: address + index * _STUB_SLOT for index, name in enumerate(_STUBS)}
        in_type = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32)
        out_type = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32)
        self._in: dict[int, _InFn] = {size: in_type(slots[f"in{size}"]) for size in _SIZES}
        self._out: dict[int, _OutFn] = {size: out_type(slots[f"out{size}"]) for size in _SIZES}
        self._granted = threading.local()

    def grant(self, port: int, size: int = 1) -> None:
        """``ioperm(port, size, 1)`` for the calling thread, once per port.

        :raise OSError: ``EPERM`` without ``CAP_SYS_RAWIO``, ``ENOSYS`` without
            ``CONFIG_X86_IOPL_IOPERM``
        """
        granted: bytearray | None = getattr(self._granted, "ports", None)
        if granted is None:
            granted = bytearray(0x10000)
            self._granted.ports = granted
        if all(granted[port : port + size]):
            return
        if self._libc.ioperm(port, size, 1) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"ioperm({port:#x}, {size}): {os.strerror(code)}")
        granted[port : port + size] = b"\1" * size

    def read(self, port: int, size: int) -> int:
        _check(port, size)
        self.grant(port, size)
        return self._in[size](port)

    def write(self, port: int, size: int, value: int) -> None:
        _check(port, size)
        self.grant(port, size)
        self._out[size](port, value & ((1 << (8 * size)) - 1))

    def close(self) -> None:
        page, self._page = self._page, None
        if page is not None:
            self._in = {}
            self._out = {}
            self._libc.munmap(page, mmap.PAGESIZE)


def open_ports(
    counters: Iterable[int] = (), *, mode: str = "auto", devport: str = "/dev/port"
) -> PortIo:
    """The best port backend this process may use.

    :param counters: ports read as counters on the ``/dev/port`` backend
    :param mode: ``auto`` (native when ``ioperm`` works, else ``/dev/port``), ``native``
        or ``devport``
    :param devport: the ``/dev/port`` path
    :raise KvmError: when no backend is usable (``ENODEV``-like errors keep the kernel's
        errno)
    """
    if mode not in ("auto", "native", "devport"):
        raise ValueError(f"port backend {mode!r}: expected auto, native or devport")
    if mode in ("auto", "native"):
        try:
            native = NativePorts()
            try:
                # A grant is harmless; it only proves the kernel lets this thread do I/O.
                native.grant(0x80)
            except OSError:
                native.close()
                raise
            return native
        except OSError as exc:
            if mode == "native":
                raise KvmError("ioperm", exc.errno or 0, "native port I/O") from exc
            LOG.info("native port I/O unavailable (%s); using %s", exc, devport)
    return DevPortPorts(counters, devport)
