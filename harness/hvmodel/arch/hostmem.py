"""Host memory the executor backs cells with: :func:`anonymous_memory` and
:class:`PhysMapping`, a window of host-physical memory from ``/dev/mem`` (cell RAM in the
``memmap=`` reserve, device registers, the IOAPIC). No Jailhouse counterpart: Jailhouse
owns the machine's memory and maps it directly.

Errors are :class:`~harness.hvmodel.arch.kvm.KvmError` naming the device and the range.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from . import HOST_PAGE_SIZE
from .kvm import KvmError

__all__ = ["PhysMapping", "anonymous_memory"]

_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


def anonymous_memory(size: int) -> mmap.mmap:
    """Zeroed, page-aligned anonymous memory of ``size`` bytes (rounded up to pages)."""
    try:
        return mmap.mmap(-1, _page_round_up(max(size, 1)))
    except OSError as exc:
        raise KvmError("mmap", exc.errno or 0, f"anonymous {size:#x} bytes") from exc


def _page_round_up(value: int) -> int:
    return (value + HOST_PAGE_SIZE - 1) & ~(HOST_PAGE_SIZE - 1)


class PhysMapping:
    """A window of host-physical memory mapped from ``/dev/mem``.

    The mapping starts at the page containing ``phys``; :attr:`offset` is where ``phys``
    lies in it, so a 4K-misaligned ``phys`` works for data access. A KVM memory slot needs
    a page-aligned host address, so pass ``buffer=mapping.mmap, offset=mapping.offset`` to
    :meth:`Vm.add_memory <harness.hvmodel.arch.kvm.vm.Vm.add_memory>` only for aligned
    windows (it checks).

    Lifecycle: mapped on construction, unmapped by :meth:`close` (or the ``with`` block).
    :meth:`close` fails with :class:`BufferError` while a memory slot still uses the window.

    :param phys: host-physical start address
    :param size: bytes
    :param path: the memory device (``/dev/mem``)
    :param uncached: open with ``O_SYNC`` (uncached mapping; for device registers)
    """

    def __init__(self, phys: int, size: int, *, path: str = "/dev/mem", uncached: bool = False) -> None:
        if phys < 0 or size <= 0:
            raise ValueError(f"bad physical window {phys:#x}+{size:#x}")
        base = phys & ~(HOST_PAGE_SIZE - 1)
        self.phys = phys
        self.size = size
        self.offset = phys - base
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_SYNC if uncached else 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise KvmError(f"open {path}", exc.errno or 0, f"for {phys:#x}+{size:#x}") from exc
        try:
            self.mmap = mmap.mmap(
                fd,
                _page_round_up(self.offset + size),
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
                offset=base,
            )
        except OSError as exc:
            raise KvmError(f"mmap {path}", exc.errno or 0, f"at {phys:#x}+{size:#x}") from exc
        finally:
            os.close(fd)

    def read(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``phys + offset``."""
        self._check(offset, size)
        start = self.offset + offset
        return self.mmap[start : start + size]

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``phys + offset``."""
        self._check(offset, len(data))
        start = self.offset + offset
        self.mmap[start : start + len(data)] = data

    def read_value(self, offset: int, size: int) -> int:
        """One ``size``-byte (1, 2, 4, 8) load at ``phys + offset`` (device registers)."""
        cell = self._cell(offset, size)
        try:
            return int(cell.value)
        finally:
            del cell

    def write_value(self, offset: int, size: int, value: int) -> None:
        """One ``size``-byte (1, 2, 4, 8) store at ``phys + offset`` (device registers)."""
        cell = self._cell(offset, size)
        try:
            cell.value = value & ((1 << (8 * size)) - 1)
        finally:
            del cell

    def _cell(self, offset: int, size: int) -> ctypes._SimpleCData[int]:
        kinds: dict[int, type[ctypes._SimpleCData[int]]] = {1: _u8, 2: _u16, 4: _u32, 8: _u64}
        if size not in kinds:
            raise ValueError(f"access size {size}: must be 1, 2, 4 or 8")
        self._check(offset, size)
        return kinds[size].from_buffer(self.mmap, self.offset + offset)

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(f"access {offset:#x}+{size:#x} outside window {self.phys:#x}+{self.size:#x}")

    def close(self) -> None:
        """Unmap; idempotent."""
        self.mmap.close()

    def __enter__(self) -> PhysMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
