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

With a :class:`CellPorts` (one per cell, shared by its CPUs' loops) the loop does two
more things without the caller:

* **PCI configuration ports** (bitmap bytes :data:`PORT_PCI_CONFIG` on 0xCF8-0xCFF):
  ``x86_pci_config_handler`` for devices the cell does not have. A 4-byte write of 0xCF8
  naming such a device is latched in the :class:`CellPorts`; while that latch is the
  cell's address, 4-byte reads of 0xCF8 return it and reads of 0xCFC-0xCFF (inside the
  dword) return all ones, as Jailhouse answers for a device outside the cell. Everything
  else (the cell's own devices, writes of data, other sizes) goes to the caller, which
  first hands the latch to the model (:meth:`CellPorts.take_latch`). A Jailhouse guest
  Linux probes every function of all 256 buses through these ports (some 130 000
  exits), which Python alone would serve at a few hundred per second.
* **Capture** (bitmap bytes :data:`PORT_CAPTURED`): bytes written to the port are also
  appended to the cell's ring (:meth:`CellPorts.captured`): what the cell prints on its
  UARTs, for diagnostics.
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
    "CAPTURE_SIZE",
    "CAPTURE_START",
    "PORT_CAPTURED",
    "PORT_OPEN",
    "PORT_PCI_CONFIG",
    "PORT_TRAPPED",
    "CellPorts",
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
#: struct loop_state *state)`` (System V AMD64; only caller-saved registers; ``syscall``
#: keeps r8-r10). Returns 0 with an exit for the caller in ``run``, or KVM_RUN's negative
#: errno. ``bitmap`` has one byte per port (:data:`PORT_OPEN` ...); ``state`` is
#: :class:`_LoopState`, whose ``cell`` points at the cell's :class:`_CellPortsData` (or is
#: NULL). struct kvm_run offsets: exit_reason 8; io: direction 32 (OUT = 1), size 33,
#: port 34, count 36, data_offset 40. Assembled from (GNU as, Intel syntax)::
#:
#:        mov r8, rsi ; mov r9, rdx ; mov r10, rcx       ; run, bitmap, state
#:  enter: mov eax, 16 ; mov esi, KVM_RUN ; xor edx, edx ; syscall  ; ioctl(fd, KVM_RUN, 0)
#:        test rax, rax ; jnz done                       ; -errno
#:        cmp dword [r8+8], 2 ; jne done                 ; not KVM_EXIT_IO: the caller's
#:        cmp dword [r8+36], 1 ; jne done                ; string I/O: the caller's
#:        movzx ecx, byte [r8+33] ; movzx edx, word [r8+34]   ; size, port
#:        lea esi, [rdx+rcx] ; cmp esi, 0x10000 ; ja done
#:        cmp byte [r9+rdx], 3 ; je pci                  ; a PCI configuration port
#:        mov r11d, edx
#:  check: movzx eax, byte [r9+r11] ; dec eax ; cmp eax, 1 ; ja pass   ; not open (1, 2)
#:        inc r11d ; cmp r11d, esi ; jb check
#:        mov rsi, [r8+40] ; add rsi, r8                 ; the data in the run page
#:        cmp byte [r8+32], 1 ; je out
#:        in al|ax|eax, dx ; mov [rsi], al|ax|eax ; jmp served   ; by size 1, 2, 4
#:  out:  mov ax|eax, [rsi] ; out dx, ax|eax ; jmp served       ; sizes 2, 4
#:  out1: mov al, [rsi] ; out dx, al
#:        cmp byte [r9+rdx], 2 ; jne served              ; captured: append to the ring
#:        mov r11, [r10+16] ; test r11, r11 ; jz served
#:        mov rsi, [r11+8] ; mov ecx, esi ; and ecx, CAPTURE_SIZE-1
#:        mov [r11+rcx+16], al ; inc rsi ; mov [r11+8], rsi
#: served: inc qword [r10] ; jmp enter
#:  pci:  mov r11, [r10+16] ; test r11, r11 ; jz pass   ; no cell state: the caller's
#:        mov rsi, [r8+40] ; add rsi, r8
#:        cmp edx, 0xcf8 ; jne pci_data
#:        cmp ecx, 4 ; jne pass                          ; CF8 takes 4-byte accesses only
#:        cmp byte [r8+32], 1 ; je pci_address
#:        cmp dword [r11+4], 0 ; je pass                 ; the model holds the address
#:        mov ecx, [r11] ; mov [rsi], ecx ; jmp pci_served      ; read back the latch
#:  pci_address: mov ecx, [rsi] ; mov edx, ecx ; shr edx, 8 ; and edx, 0xffff   ; BDF
#:        cmp byte [r11+rdx+4112], 0 ; jne pass          ; a device of the cell: the model's
#:        mov [r11], ecx ; mov dword [r11+4], 1 ; jmp pci_served   ; latch it here
#:  pci_data: cmp edx, 0xcfc ; jb pass ; add edx, ecx ; cmp edx, 0xd00 ; ja pass
#:        cmp dword [r11+4], 0 ; je pass                 ; not latched here
#:        cmp byte [r8+32], 1 ; je pass                  ; writes: the model's (FATAL)
#:        mov dword [rsi], 0xffffffff                    ; no such device: all ones
#: pci_served: inc qword [r10+8] ; jmp enter
#:  pass: xor eax, eax
#:  done: ret
_IO_BITMAP_LOOP: Final = b"".join((
    bytes.fromhex("4989f0 4989d1 4989ca"),
    b"\xb8", _SYS_IOCTL.to_bytes(4, "little"),  # mov eax, SYS_ioctl
    b"\xbe", KVM_RUN.to_bytes(4, "little"),  # mov esi, KVM_RUN
    bytes.fromhex(
        "31d2 0f05 4885c0 0f854f010000 4183780802 0f8544010000 4183782401 0f8539010000"
        " 410fb64821 410fb75022 8d340a 81fe00000100 0f8720010000 41803c1103 0f848d000000"
        " 4189d3"
        " 430fb60419 ffc8 83f801 0f8700010000 41ffc3 4139f3 72e8"  # check:
        " 498b7028 4c01c6 4180782001 741b 83f901 740a 83f902 740a ed 8906 eb4d"  # in4
        " ec 8806 eb48"  # in1
        " 66ed 668906 eb41"  # in2
        " 83f901 7411 83f902 7405 8b06 ef eb32"  # out: out4
        " 668b06 66ef eb2b"  # out2
        " 8a06 ee 41803c1102 7521 4d8b5a10 4d85db 7418 498b7308 89f1 81e1ff0f0000"  # out1
        " 4188440b10 48ffc6 49897308"
        " 49ff02 e922ffffff"  # served:
        " 4d8b5a10 4d85db 747d 498b7028 4c01c6 81faf80c0000 753f 83f904 7569"  # pci:
        " 4180782001 740e 41837b0400 745b 418b0b 890e eb4b"
        " 8b0e 89ca c1ea08 81e2ffff0000 4180bc131010000000 753c 41890b"  # pci_address:
        " 41c7430401000000 eb26"
        " 81fafc0c0000 7227 01ca 81fa000d0000 771d 41837b0400 7416 4180782001 740f"  # pci_data:
        " c706ffffffff"
        " 49ff4208 e99cfeffff"  # pci_served:
        " 31c0"  # pass:
        " c3"  # done:
    ),
))  # fmt: skip
#: the loop's bitmap bytes: the caller (Python, the model) handles an access to the port
PORT_TRAPPED: Final = 0
#: the loop performs the access on the real port (the cell's I/O bitmap lets it through)
PORT_OPEN: Final = 1
#: open, and the loop copies each byte written into the cell's capture ring (a console
#: UART's transmit register)
PORT_CAPTURED: Final = 2
#: 0xCF8-0xCFF: the loop answers what needs no model (:class:`CellPorts`), else the caller
PORT_PCI_CONFIG: Final = 3
#: bytes of a cell's capture ring (a power of two: the loop masks the position)
CAPTURE_SIZE: Final = 0x1000
#: bytes from the start of a cell's captured output kept apart (:meth:`CellPorts.keep_start`;
#: at most the ring's size, so that they are still in the ring when first copied)
CAPTURE_START: Final = CAPTURE_SIZE
#: BDFs a :class:`CellPorts` tells apart (bus, device, function: 16 bits)
PCI_BDF_COUNT: Final = 0x10000
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

    def io_bitmap_loop(self, vcpu_fd: int, run_page: mmap.mmap, bitmap: bytes | bytearray,
                       cell: CellPorts | None = None) -> IoBitmapLoop:
        """The I/O bitmap loop (module docstring) for the calling thread's vCPU.

        Grants the calling thread every port ``bitmap`` opens (the loop executes IN/OUT on
        them), so call it in the thread that will run the loop.

        :param vcpu_fd: the vCPU (``KVM_RUN`` target)
        :param run_page: its ``kvm_run`` mapping; it must stay mapped while the loop runs
            (the vCPU's thread is the only user, and the VM closes after it ended)
        :param bitmap: 0x10000 bytes, one per port: :data:`PORT_TRAPPED`,
            :data:`PORT_OPEN`, :data:`PORT_CAPTURED` or :data:`PORT_PCI_CONFIG`; copied, so
            later changes do not reach the loop (a non-root cell's bitmap is fixed from
            ``cell_init`` to ``cell_exit``)
        :param cell: the cell's shared port state (without it: no configuration-port
            answers, no capture)
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
        return IoBitmapLoop(owner, loop, vcpu_fd, run_page, bitmap, cell)

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


class _CellPortsData(ctypes.Structure):
    """What the loops of one cell share (offsets fixed by :data:`_IO_BITMAP_LOOP`)."""

    _fields_ = [
        ("latch", ctypes.c_uint32),  # 0: the 0xCF8 value latched by a loop
        ("latch_native", ctypes.c_uint32),  # 4: 1 while the model has not seen it
        ("capture_head", ctypes.c_uint64),  # 8: bytes captured so far
        ("capture", ctypes.c_ubyte * CAPTURE_SIZE),  # 16: the ring
        ("devices", ctypes.c_ubyte * PCI_BDF_COUNT),  # 4112: 1 = a BDF the model serves
    ]


class _LoopState(ctypes.Structure):
    """One loop's counters and its cell's shared state (``struct loop_state``)."""

    _fields_ = [
        ("served", ctypes.c_uint64),  # 0: accesses performed on real ports
        ("pci_served", ctypes.c_uint64),  # 8: configuration-port accesses answered
        ("cell", ctypes.c_void_p),  # 16: the _CellPortsData, or NULL
    ]


class CellPorts:
    """The port state the I/O bitmap loops of one cell share: the PCI address latch, the
    cell's devices, the capture ring (module docstring).

    Lifecycle: made with the cell, given to each of its CPUs' loops, dropped with the
    cell. The loops write it without locks; :meth:`take_latch` runs in the thread of the
    CPU whose exit needs the model, while the guest's own lock (Linux's
    ``pci_config_lock``) keeps the other CPUs off the configuration ports.

    :param devices: BDFs of the cell's PCI devices (their accesses go to the model)
    """

    def __init__(self, devices: Iterable[int] = ()) -> None:
        self._data = _CellPortsData()
        for bdf in devices:
            self._data.devices[bdf & 0xFFFF] = 1
        self.address = ctypes.addressof(self._data)
        #: the first :data:`CAPTURE_START` bytes captured (:meth:`keep_start`)
        self.start = bytearray()
        self._start_done = False
        self._start_lock = threading.Lock()

    def take_latch(self) -> int | None:
        """The 0xCF8 value a loop latched and the model has not seen, which the model
        must get before it handles a port access of the cell; None when there is none."""
        data = self._data
        if not data.latch_native:
            return None
        value = int(data.latch)
        data.latch_native = 0
        return value

    def keep_start(self) -> None:
        """Copy the first :data:`CAPTURE_START` captured bytes out of the ring into
        :attr:`start` as they arrive: a guest's first lines, which the burst that follows
        (Linux replaying its log when its console starts) pushes out of the ring before
        anyone reads it. Called before the model gets an exit of the cell; once
        :attr:`start` is full (or bytes were lost before a call) it only tests a flag."""
        if self._start_done or not self._start_lock.acquire(blocking=False):
            return
        try:
            have = len(self.start)
            head = int(self._data.capture_head)
            if head - CAPTURE_SIZE > have:  # overwritten before this call: keep what we have
                self._start_done = True
                return
            end = min(head, CAPTURE_START)
            if end > have:
                self.start += bytes(self._data.capture[have:end])
            self._start_done = end >= CAPTURE_START
        finally:
            self._start_lock.release()

    @property
    def capture_head(self) -> int:
        """Bytes captured since the cell was made."""
        return int(self._data.capture_head)

    def captured(self, since: int = 0) -> tuple[bytes, int]:
        """Bytes captured after position ``since`` (at most the ring's size: older ones
        are gone) and the position to ask from next time."""
        data = self._data
        head = int(data.capture_head)
        start = max(since, head - CAPTURE_SIZE, 0)
        ring = bytes(data.capture)
        out = bytearray()
        position = start
        while position < head:
            offset = position % CAPTURE_SIZE
            chunk = ring[offset : offset + min(head - position, CAPTURE_SIZE - offset)]
            out += chunk
            position += len(chunk)
        return bytes(out), head


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
                 bitmap: bytes | bytearray, cell: CellPorts | None = None) -> None:
        self._page = page  # the machine code stays mapped while this object exists
        self._loop = loop
        self._fd = vcpu_fd
        # The address only: holding the buffer would keep the mapping from being closed.
        self._run = ctypes.addressof(ctypes.c_char.from_buffer(run_page))
        self._bitmap = (ctypes.c_ubyte * 0x10000).from_buffer_copy(bitmap)
        self._bitmap_address = ctypes.addressof(self._bitmap)
        self.cell = cell  # kept alive while the loop may write it
        self._state = _LoopState(0, 0, cell.address if cell is not None else None)
        self._state_address = ctypes.addressof(self._state)

    @property
    def served(self) -> int:
        """Port accesses the loop has performed so far."""
        return int(self._state.served)

    @property
    def pci_served(self) -> int:
        """Configuration-port accesses the loop has answered so far (exits Jailhouse
        handles and counts as ``vmexits_pio``)."""
        return int(self._state.pci_served)

    def __call__(self) -> int:
        return self._loop(self._fd, self._run, self._bitmap_address, self._state_address)


def open_ranges(bitmap: bytes | bytearray) -> list[tuple[int, int]]:
    """The runs of open ports (:data:`PORT_OPEN`, :data:`PORT_CAPTURED`) of a loop's
    bitmap as ``(first port, length)``."""
    ranges: list[tuple[int, int]] = []
    data = bytes(bitmap).translate(_ZERO_OR_ONE)
    start = data.find(1)
    while start != -1:
        end = data.find(0, start)
        end = len(data) if end == -1 else end
        ranges.append((start, end - start))
        start = data.find(1, end)
    return ranges


_ZERO_OR_ONE: Final = bytes([1 if value in (PORT_OPEN, PORT_CAPTURED) else 0 for value in range(256)])


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
