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

**I/O bitmap loop.** On the native backend, :meth:`NativePorts.io_bitmap_loop` gives a
vCPU thread what the CPU's I/O bitmap check is in Jailhouse: a machine-code loop
(:data:`_IO_BITMAP_LOOP`) that enters the guest (``KVM_RUN``) and serves each IN/OUT
exit whose ports are all open in the cell's I/O bitmap (the model's, see
:meth:`~harness.hvmodel.control.Hypervisor.pio_bitmap`) with the same instruction on the
real port, without Python and without the GIL; every other exit, and an interrupted or
failed ``KVM_RUN``, returns to the caller. Whitelisted port I/O then costs what it costs
a C VMM (KVM still exits to user space for every access: it cannot pass ports through).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import platform
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from . import HOST_PAGE_SIZE
from .kvm import KvmError
from .kvm.structs import KVM_RUN

__all__ = [
    "DevPort",
    "DevPortPorts",
    "IoBitmapLoop",
    "NativePorts",
    "PortIo",
    "open_ports",
    "open_ranges",
    "stable_read",
]

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
#: x86-64 Linux system call number of ioctl(2)
_SYS_IOCTL: Final = 16
#: where :data:`_IO_BITMAP_LOOP` sits in the stub page (after the six access stubs)
_LOOP_OFFSET: Final = 128
#: The I/O bitmap loop, ``long loop(int fd, struct kvm_run *run, const u8 *bitmap,
#: u64 *served)`` (System V AMD64; only caller-saved registers; ``syscall`` keeps r8-r10).
#: Returns 0 with an exit for the caller in ``run``, or KVM_RUN's negative errno.
#: struct kvm_run offsets: exit_reason 8; io: direction 32 (OUT = 1), size 33, port 34,
#: count 36, data_offset 40. Assembled from (GNU as, Intel syntax)::
#:
#:        mov r8, rsi ; mov r9, rdx ; mov r10, rcx       ; run, bitmap, served
#:  enter: mov eax, 16 ; mov esi, KVM_RUN ; xor edx, edx ; syscall  ; ioctl(fd, KVM_RUN, 0)
#:        test rax, rax ; jnz done                       ; -errno
#:        cmp dword [r8+8], 2 ; jne done                 ; not KVM_EXIT_IO: the caller's
#:        cmp dword [r8+36], 1 ; jne done                ; string I/O: the caller's
#:        movzx ecx, byte [r8+33] ; movzx edx, word [r8+34]   ; size, port
#:        lea esi, [rdx+rcx] ; cmp esi, 0x10000 ; ja done
#:        mov r11d, edx
#:  check: cmp byte [r9+r11], 0 ; je done                ; a closed port: the caller's
#:        inc r11d ; cmp r11d, esi ; jb check
#:        mov rsi, [r8+40] ; add rsi, r8                 ; the data in the run page
#:        cmp byte [r8+32], 1 ; je out
#:        in al|ax|eax, dx ; mov [rsi], al|ax|eax ; jmp served   ; by size 1, 2, 4
#:  out:  mov al|ax|eax, [rsi] ; out dx, al|ax|eax              ; by size 1, 2, 4
#: served: inc qword [r10] ; jmp enter
#:  done: ret
_IO_BITMAP_LOOP: Final = b"".join((
    bytes.fromhex("4989f0 4989d1 4989ca"),
    b"\xb8", _SYS_IOCTL.to_bytes(4, "little"),  # mov eax, SYS_ioctl
    b"\xbe", KVM_RUN.to_bytes(4, "little"),  # mov esi, KVM_RUN
    bytes.fromhex(
        "31d2 0f05"
        " 4885c0 757f"
        " 4183780802 7578"
        " 4183782401 7571"
        " 410fb64821 410fb75022"
        " 8d340a 81fe00000100 775c"
        " 4189d3"
        " 43803c1900 7452"  # check:
        " 41ffc3 4139f3 72f1"
        " 498b7028 4c01c6"
        " 4180782001 741b"
        " 83f901 740a 83f902 740a ed 8906 eb25"  # in4
        " ec 8806 eb20"  # in1
        " 66ed 668906 eb19"  # in2
        " 83f901 740a 83f902 740a 8b06 ef eb0a"  # out: out4
        " 8a06 ee eb05"  # out1
        " 668b06 66ef"  # out2
        " 49ff02 e96effffff"  # served:
        " c3"  # done:
    ),
))  # fmt: skip
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


class DevPort:
    """Host I/O ports through ``/dev/port`` (whitelisted PIO pass-through).

    ``/dev/port`` moves one byte per port: a 2- or 4-byte access becomes that many byte
    accesses at consecutive ports, lowest first (``inb``/``outb``), not one ``inw``/``inl``.
    Devices that latch wide registers (the ACPI PM timer) can therefore be read torn.

    :param path: the port device
    """

    def __init__(self, path: str = "/dev/port") -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(f"open {path}", exc.errno or 0) from exc
        self.path = path

    def read(self, port: int, size: int) -> bytes:
        """Read ``size`` consecutive byte ports starting at ``port``."""
        try:
            return os.pread(self._fd, size, port)
        except OSError as exc:
            raise KvmError(f"read {self.path}", exc.errno or 0, f"port {port:#x}") from exc

    def write(self, port: int, data: bytes) -> None:
        """Write ``data`` to consecutive byte ports starting at ``port``."""
        try:
            os.pwrite(self._fd, data, port)
        except OSError as exc:
            raise KvmError(f"write {self.path}", exc.errno or 0, f"port {port:#x}") from exc

    def close(self) -> None:
        """Close the device; idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DevPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    :meth:`close` (after every thread stopped using the object), or later, when the last
    :class:`IoBitmapLoop` made from it is dropped (a loop may still be on its way out).

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
        address = libc.mmap(None, HOST_PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            code = ctypes.get_errno()
            raise OSError(code, f"mmap of the port stub page: {os.strerror(code)}")
        self._page: int | None = address
        self._page_owner: _StubPage | None = _StubPage(libc, address)
        for index, code_bytes in enumerate(_STUBS.values()):
            ctypes.memmove(address + index * _STUB_SLOT, code_bytes, len(code_bytes))
        ctypes.memmove(address + _LOOP_OFFSET, _IO_BITMAP_LOOP, len(_IO_BITMAP_LOOP))
        # W^X: the page is never writable and executable at the same time.
        if libc.mprotect(address, HOST_PAGE_SIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            code = ctypes.get_errno()
            self.close()
            raise OSError(code, f"mprotect of the port stub page: {os.strerror(code)}")
        slots = {name: address + index * _STUB_SLOT for index, name in enumerate(_STUBS)}
        in_type = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32)
        out_type = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32)
        self._in: dict[int, _InFn] = {size: in_type(slots[f"in{size}"]) for size in _SIZES}
        self._out: dict[int, _OutFn] = {size: out_type(slots[f"out{size}"]) for size in _SIZES}
        loop_type = ctypes.CFUNCTYPE(
            ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
        )
        # A CFUNCTYPE call releases the GIL for its duration: the loop runs beside Python.
        self._loop: _LoopFn | None = loop_type(address + _LOOP_OFFSET)
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

    def io_bitmap_loop(self, vcpu_fd: int, run_page: mmap.mmap, bitmap: bytes | bytearray) -> IoBitmapLoop:
        """The I/O bitmap loop (module docstring) for the calling thread's vCPU.

        Grants the calling thread every port ``bitmap`` opens (the loop executes IN/OUT on
        them), so call it in the thread that will run the loop.

        :param vcpu_fd: the vCPU (``KVM_RUN`` target)
        :param run_page: its ``kvm_run`` mapping; it must stay mapped while the loop runs
            (the vCPU's thread is the only user, and the VM closes after it ended)
        :param bitmap: 0x10000 bytes, non-zero for a port that passes through; copied, so
            later changes do not reach the loop (a non-root cell's bitmap is fixed from
            ``cell_init`` to ``cell_exit``)
        :raise OSError: when a port cannot be granted (see :meth:`grant`)
        :raise ValueError: when ``bitmap`` is not 0x10000 bytes, or after :meth:`close`
        """
        if len(bitmap) != 0x10000:
            raise ValueError(f"I/O bitmap of {len(bitmap)} bytes: must be 0x10000")
        loop, owner = self._loop, self._page_owner
        if loop is None or owner is None:
            raise ValueError("NativePorts closed")
        for port, length in open_ranges(bitmap):
            self.grant(port, length)
        return IoBitmapLoop(owner, loop, vcpu_fd, run_page, bitmap)

    def close(self) -> None:
        page, self._page = self._page, None
        if page is not None:
            self._in = {}
            self._out = {}
            self._loop = None
            self._page_owner = None  # unmaps the page, unless a loop still holds it


_LoopFn = Callable[[int, int, int, int], int]


class _StubPage:
    """Owns the stub page: unmapped when the last reference goes."""

    def __init__(self, libc: ctypes.CDLL, address: int) -> None:
        self.address = address
        self.unmap = weakref.finalize(self, libc.munmap, address, HOST_PAGE_SIZE)


class IoBitmapLoop:
    """One vCPU's I/O bitmap loop (:meth:`NativePorts.io_bitmap_loop`); a call enters the
    guest and returns 0 with an exit for the caller in the run page, or KVM_RUN's
    negative errno (``-EINTR`` after a kick): what
    :meth:`~harness.hvmodel.arch.kvm.Vcpu.run_native` expects.

    Lifecycle: made in the vCPU's thread, called only there, dropped with the run. It keeps
    its own copy of the bitmap, and the page with the machine code mapped even after
    :meth:`NativePorts.close`.
    """

    def __init__(self, page: _StubPage, loop: _LoopFn, vcpu_fd: int, run_page: mmap.mmap,
                 bitmap: bytes | bytearray) -> None:
        self._page = page  # the machine code stays mapped while this object exists
        self._loop = loop
        self._fd = vcpu_fd
        # The address only: holding the buffer would keep the mapping from being closed.
        self._run = ctypes.addressof(ctypes.c_char.from_buffer(run_page))
        self._bitmap = (ctypes.c_ubyte * 0x10000).from_buffer_copy(bitmap)
        self._bitmap_address = ctypes.addressof(self._bitmap)
        self._served = ctypes.c_uint64(0)
        self._served_address = ctypes.addressof(self._served)

    @property
    def served(self) -> int:
        """Port accesses the loop has performed so far."""
        return self._served.value

    def __call__(self) -> int:
        return self._loop(self._fd, self._run, self._bitmap_address, self._served_address)


def open_ranges(bitmap: bytes | bytearray) -> list[tuple[int, int]]:
    """The runs of non-zero bytes of an I/O bitmap as ``(first port, length)``."""
    ranges: list[tuple[int, int]] = []
    data = bytes(bitmap).translate(_ZERO_OR_ONE)
    start = data.find(1)
    while start != -1:
        end = data.find(0, start)
        end = len(data) if end == -1 else end
        ranges.append((start, end - start))
        start = data.find(1, end)
    return ranges


_ZERO_OR_ONE: Final = bytes([0] + [1] * 255)


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
