"""The executor's memory: cells' memory regions as KVM memory slots, comm pages, and
host-physical memory through ``/dev/mem``; models ``arch_map_memory_region`` /
``arch_unmap_memory_region`` (``hypervisor/arch/x86/control.c``, the EPT/NPT side of
``paging.c``).

Every mapped memory region of a non-root cell is a KVM memory slot backed by
``/dev/mem`` at its ``phys_start`` (RAM in the ``memmap=`` window, device MMIO uncached);
read-only regions become read-only slots (writes exit and are FATAL). A region over a BAR
of the cell's own passed-through device is a slot on VFIO's mapping of that BAR
(:meth:`~harness.hvmodel.arch.passthrough.Passthrough.bar_backing`); DMA-flagged regions
also go into the cell's IOMMU domain. Sub-page regions are not slots: the model
dispatches their accesses. The COMM_REGION region maps the cell's comm page, an
anonymous page the model writes through the :class:`memoryview`
:meth:`CellMemory.comm_page_alloc` returns. Loading (``phys_write``) writes the image
through ``/dev/mem``. The root cell is not virtualized: it has no slots.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ...abi import COMM_PAGE_SIZE, MEM_COMM_REGION, MEM_DMA, MEM_IO, MEM_WRITE
from ...errors import Errno, HvError
from .. import HOST_PAGE_SIZE
from ..hostmem import PhysMapping, anonymous_memory
from ..kvm import KvmError
from .cells import CellSlot, CellTable, CellVm

if TYPE_CHECKING:
    from ...config import MemoryRegion
    from ..passthrough import Passthrough

__all__ = ["CellMemory", "MmioWindows"]

LOG = logging.getLogger(__name__)


class CellMemory:
    """Cells' memory slots and comm pages, and host-physical reads and writes.

    :param table: the cells (their slots live in their :class:`~.cells.CellVm`)
    :param mem_device: the physical-memory device (a plain file in unit tests)
    :param passthrough: BAR mappings and IOMMU domains of passed-through devices
    """

    def __init__(self, table: CellTable, mem_device: str, passthrough: Passthrough) -> None:
        self.table = table
        self.mem_device = mem_device
        self.passthrough = passthrough
        #: KVM has read-only slots (``KVM_CAP_READONLY_MEM``); set when KVM is opened
        self.readonly_slots = False
        self._comm_pages: dict[int, mmap.mmap] = {}

    # --- comm pages ----------------------------------------------------------------------

    def comm_page_alloc(self, cell_id: int) -> memoryview:
        """A zeroed anonymous page: the model's view, and the guest's at the COMM_REGION."""
        page = anonymous_memory(COMM_PAGE_SIZE)
        self._comm_pages[cell_id] = page
        return memoryview(page)

    def comm_page_free(self, cell_id: int) -> None:
        """Drop the page (unmapped once the model's view of it is gone too)."""
        page = self._comm_pages.pop(cell_id, None)
        if page is not None:
            with contextlib.suppress(BufferError):
                page.close()

    def comm_page_free_all(self) -> None:
        """Drop every comm page (at shutdown)."""
        for cell_id in list(self._comm_pages):
            self.comm_page_free(cell_id)

    # --- memory regions as slots ------------------------------------------------------

    def map_region(self, cell_id: int, region: MemoryRegion) -> None:
        """A KVM memory slot at ``virt_start``: ``/dev/mem`` at ``phys_start``, VFIO's
        mapping of the cell's own BAR, or the comm page for the COMM_REGION.

        :raise HvError: the mapping's or KVM's error (``EPERM`` for RAM outside the
            reserved window, ``EINVAL`` for unaligned regions ...)
        """
        cell = self.table.cells.get(cell_id)
        if cell is None or region.size == 0:
            return  # the root (runs natively), or a cell this executor did not make
        key = (region.virt_start, region.size)
        if key in cell.slots:
            return
        flags = int(region.flags)
        readonly = not flags & MEM_WRITE and self.readonly_slots
        if flags & MEM_COMM_REGION:
            page = self._comm_pages.get(cell_id)
            if page is None:
                raise HvError(Errno.ENOMEM, f"cell {cell_id} has no comm page")
            slot = cell.vm.add_memory(region.virt_start, page, size=COMM_PAGE_SIZE, readonly=readonly)
            cell.slots[key] = CellSlot(slot.slot, None)
            return
        device_memory = self.passthrough.bar_backing(cell_id, region.phys_start, region.size)
        if device_memory is not None:  # a BAR of the cell's own device: VFIO's mapping
            buffer, offset = device_memory
            slot = cell.vm.add_memory(region.virt_start, buffer, offset=offset, size=region.size,
                                      readonly=readonly)
            cell.slots[key] = CellSlot(slot.slot, None, region)
            return
        mapping = PhysMapping(
            region.phys_start, region.size, path=self.mem_device, uncached=bool(flags & MEM_IO)
        )
        try:
            slot = cell.vm.add_memory(
                region.virt_start, mapping.mmap, offset=mapping.offset, size=region.size, readonly=readonly
            )
            if flags & MEM_DMA:
                try:
                    self.passthrough.dma_map(cell_id, region, mapping.mmap, mapping.offset)
                except BaseException:
                    cell.vm.remove_memory(slot.slot)
                    raise
        except BaseException:
            mapping.close()
            raise
        cell.slots[key] = CellSlot(slot.slot, mapping, region)

    def unmap_region(self, cell_id: int, region: MemoryRegion) -> None:
        """Delete the region's memory slot and its ``/dev/mem`` mapping."""
        cell = self.table.cells.get(cell_id)
        if cell is None:
            return
        entry = cell.slots.pop((region.virt_start, region.size), None)
        if entry is None:
            return
        self.passthrough.dma_unmap(cell_id, region)
        cell.vm.remove_memory(entry.slot)
        if entry.mapping is not None:
            entry.mapping.close()

    def dma_map_existing(self, cell_id: int, cell: CellVm) -> None:
        """Put the cell's DMA regions mapped before its first device came into the
        device's IOMMU domain (``arch_pci_add_device`` after ``arch_map_memory_region``)."""
        for entry in cell.slots.values():
            region = entry.region
            if region is not None and entry.mapping is not None and int(region.flags) & MEM_DMA:
                self.passthrough.dma_map(cell_id, region, entry.mapping.mmap, entry.mapping.offset)

    @staticmethod
    def release(cell: CellVm) -> None:
        """Close a destroyed cell's VM, then the ``/dev/mem`` windows of its slots."""
        mappings = [slot.mapping for slot in cell.slots.values()]
        cell.slots.clear()
        cell.vm.close()
        for mapping in mappings:
            if mapping is not None:
                mapping.close()

    # --- host-physical memory -----------------------------------------------------------

    @contextlib.contextmanager
    def _phys(self, address: int, size: int) -> Iterator[tuple[PhysMapping, int]]:
        """A mapping covering ``address``+``size``: a cell region's, or a temporary one."""
        for cell in self.table.snapshot():
            for entry in list(cell.slots.values()):
                mapping = entry.mapping
                if mapping is None:
                    continue
                if mapping.phys <= address and address + size <= mapping.phys + mapping.size:
                    yield mapping, address - mapping.phys
                    return
        mapping = PhysMapping(address, size, path=self.mem_device)
        try:
            yield mapping, 0
        finally:
            mapping.close()

    def phys_read(self, address: int, size: int) -> bytes:
        """Read host-physical memory through ``/dev/mem``.

        :raise HvError: when the range cannot be mapped
        """
        with self._phys(address, size) as (mapping, offset):
            return mapping.read(offset, size)

    def phys_write(self, address: int, data: bytes) -> None:
        """Write host-physical memory through ``/dev/mem`` (cell images, ivshmem state).

        :raise HvError: when the range cannot be mapped (``EPERM`` for RAM Linux uses)
        """
        if not data:
            return
        with self._phys(address, len(data)) as (mapping, offset):
            mapping.write(offset, bytes(data))


class MmioWindows:
    """Uncached one-page ``/dev/mem`` windows on device registers (sub-page regions,
    MSI-X tables, IOAPICs), mapped on first use and kept until :meth:`close`.

    :attr:`lock` guards the windows and makes a sequence of accesses atomic among the
    executor's threads (an IOAPIC's index/data pair).

    :param mem_device: the physical-memory device
    """

    def __init__(self, mem_device: str) -> None:
        self.mem_device = mem_device
        self.lock = threading.Lock()
        self._maps: dict[int, PhysMapping | None] = {}

    def window(self, address: int, size: int) -> tuple[PhysMapping | None, int]:
        """The window holding ``address``+``size`` and the offset in it; None when the page
        cannot be mapped (logged once).

        :raise ValueError: when the access crosses a page
        """
        page = address & ~(HOST_PAGE_SIZE - 1)
        if address + size > page + HOST_PAGE_SIZE:
            raise ValueError(f"MMIO access {address:#x}+{size} crosses a page")
        with self.lock:
            if page not in self._maps:
                try:
                    self._maps[page] = PhysMapping(page, HOST_PAGE_SIZE, path=self.mem_device, uncached=True)
                except (KvmError, ValueError) as exc:
                    LOG.warning("MMIO page %#x not accessible: %s", page, exc)
                    self._maps[page] = None
            return self._maps[page], address - page

    def close(self) -> None:
        """Unmap every window; idempotent."""
        for mapping in self._maps.values():
            if mapping is not None:
                mapping.close()
        self._maps.clear()
