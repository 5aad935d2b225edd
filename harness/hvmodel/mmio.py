"""MMIO dispatch; models ``hypervisor/mmio.c`` and ``include/jailhouse/mmio.h``.

Every cell has a table of intercepted guest-physical regions, each with a handler. The
table is sorted by start address and its capacity is fixed when the cell is created
(the units' ``mmio_count_regions`` plus one per sub-page memory region); registering
beyond it prints ``WARNING: Overflow during MMIO region registration!`` and the region
is silently not registered. An access matches a region only when it lies fully inside
it; the handler gets the offset from the region start.

Sub-page memory regions (start or size not page-aligned) are not mapped but served by
:func:`subpage_handler`: permission, access width and alignment checks, then the access
on the physical address through the :class:`~harness.hvmodel.arch.Arch`.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING

from .abi import MEM_IO_UNALIGNED, MEM_IO_WIDTH_SHIFT, MEM_READ, MEM_WRITE, PAGE_SIZE
from .printk import FATAL_SUBPAGE, MSG_MMIO_OVERFLOW, Console

if TYPE_CHECKING:
    from .arch import Arch
    from .config import MemoryRegion


class MmioResult(enum.IntEnum):
    """Handler results (``enum mmio_result``)."""

    ERROR = -1
    UNHANDLED = 0
    HANDLED = 1


@dataclasses.dataclass(slots=True)
class MmioAccess:
    """One access as a handler sees it (``struct mmio_access``).

    :param address: offset inside the region (handlers get region-relative addresses)
    :param is_write: write access
    :param size: 1, 2, 4 or 8 bytes
    :param value: the value written, or the value read (set by the handler)
    """

    address: int
    is_write: bool
    size: int
    value: int = 0


MmioHandler = Callable[[MmioAccess], MmioResult]


class MmioTable:
    """A cell's intercepted regions (``cell->mmio_locations`` / ``mmio_handlers``).

    :param capacity: the maximum number of regions (fixed at cell creation)
    :param console: where the overflow warning goes
    """

    __slots__ = ("_console", "_handlers", "_sizes", "_starts", "capacity")

    def __init__(self, capacity: int, console: Console) -> None:
        self.capacity = capacity
        self._console = console
        self._starts: list[int] = []
        self._sizes: list[int] = []
        self._handlers: list[MmioHandler] = []

    def __len__(self) -> int:
        return len(self._starts)

    def register(self, start: int, size: int, handler: MmioHandler) -> bool:
        """Add a region, keeping the table sorted (``mmio_region_register``).

        :return: False when the table was full (the warning is printed)
        :see: :meth:`unregister`
        """
        if len(self._starts) >= self.capacity:
            self._console.write(MSG_MMIO_OVERFLOW)
            return False
        index = bisect.bisect_right(self._starts, start)
        self._starts.insert(index, start)
        self._sizes.insert(index, size)
        self._handlers.insert(index, handler)
        return True

    def unregister(self, start: int) -> None:
        """Remove the region starting at ``start`` (``mmio_region_unregister``)."""
        index = bisect.bisect_left(self._starts, start)
        if index < len(self._starts) and self._starts[index] == start:
            del self._starts[index]
            del self._sizes[index]
            del self._handlers[index]

    def lookup(self, address: int, size: int) -> tuple[int, MmioHandler] | None:
        """The region fully containing ``[address, address+size)``: (start, handler)."""
        index = bisect.bisect_right(self._starts, address) - 1
        if index < 0:
            return None
        start = self._starts[index]
        if address + size <= start + self._sizes[index]:
            return start, self._handlers[index]
        return None

    def dispatch(self, address: int, size: int, is_write: bool, value: int) -> tuple[MmioResult, int] | None:
        """Run the handler for an access (``mmio_handle_access``).

        :return: the handler's result and the value (read result, or ``value``), or
            None when no region contains the access
        """
        found = self.lookup(address, size)
        if found is None:
            return None
        start, handler = found
        access = MmioAccess(address - start, is_write, size, value)
        result = handler(access)
        return result, access.value

    def regions(self) -> list[tuple[int, int]]:
        """``(start, size)`` of every registered region, sorted."""
        return list(zip(self._starts, self._sizes, strict=True))


def is_subpage(region: MemoryRegion) -> bool:
    """``JAILHOUSE_MEMORY_IS_SUBPAGE``: start or size not page-aligned."""
    return bool((region.virt_start | region.size) & (PAGE_SIZE - 1))


def subpage_handler(region: MemoryRegion, arch: Arch, console: Console) -> MmioHandler:
    """The handler for a sub-page region (``mmio_subpage_handler``).

    :param region: the cell's memory region (guest address = ``virt_start``)
    :param arch: performs the access on ``phys_start + offset``
    :param console: gets the FATAL line on a rejected access
    """
    flags = int(region.flags)
    phys = region.phys_start

    def handler(access: MmioAccess) -> MmioResult:
        allowed = flags & (MEM_WRITE if access.is_write else MEM_READ)
        width_ok = flags & (access.size << MEM_IO_WIDTH_SHIFT)
        aligned = flags & MEM_IO_UNALIGNED or access.address % access.size == 0
        if not (allowed and width_ok and aligned):
            console.printk(
                FATAL_SUBPAGE,
                "write" if access.is_write else "read",
                phys + access.address,
                access.size,
            )
            return MmioResult.ERROR
        if access.is_write:
            arch.mmio_write(phys + access.address, access.size, access.value)
        else:
            access.value = arch.mmio_read(phys + access.address, access.size)
        return MmioResult.HANDLED

    return handler
