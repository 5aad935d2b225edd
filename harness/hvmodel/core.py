"""The state of one hypervisor and the operations its entry points share; models the
half of ``hypervisor/control.c`` that is not a hypercall, with the hooks it calls.

:class:`HypervisorCore` holds cells, CPUs, page pools, units and console, and does what
both the enable sequence (:mod:`.bootstrap`, ``setup.c``) and the hypercalls
(:mod:`.control`) need: build and tear down a cell (``cell_init``, ``arch_cell_create``,
``cell_exit``, ``cell_destroy_internal``), map its memory and give memory back to the
root (``arch_map_memory_region``, ``mmio_subpage_register``, ``unmap_from_root_cell``,
``remap_to_root_cell``), suspend, resume and park CPUs (``cell_suspend``,
``cell_resume``, ``panic_park``), talk to a cell through its comm region
(``cell_exchange_message``, ``cell_reconfig_ok``, ``cell_reconfig_completed``), commit
(``config_commit``) and report the pools (``paging_dump_stats``). It is the units'
:class:`~harness.hvmodel.unit.UnitHost`.

Threading: :attr:`HypervisorCore._lock` serialises the entry points of
:class:`~harness.hvmodel.control.Hypervisor`; every method here runs with it held. The
only hook called without it is :meth:`Arch.wait_for_reply
<harness.hvmodel.arch.Arch.wait_for_reply>` (in :meth:`HypervisorCore._exchange_message`),
so the cell being asked can keep exiting (and, say, print) while the root waits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import threading
from typing import TYPE_CHECKING, Final

from . import faults, pio

# The units: importing a unit's module defines it (unit.define_unit); the registry builds
# them in unit.LINK_ORDER. IOMMU and test device are reached through the registry only.
from . import iommu as iommu_unit  # noqa: F401
from . import testdev as testdev_unit  # noqa: F401
from .abi import (
    CELL_PASSIVE_COMMREG,
    MEM_COMM_REGION,
    MEM_DMA,
    MEM_ROOTSHARED,
    MESSAGE_TYPE,
    PAGE_SIZE,
    CellState,
    CommOffset,
    CpuStat,
    Message,
    MessageType,
    Reply,
    comm_read_u32,
    comm_write_u32,
)
from .cat import CatUnit, cat_state
from .cell import Cell
from .errors import ConfigError, Errno, HvError, JhlabError
from .ioapic import IoapicUnit
from .mmio import MmioTable, is_subpage, subpage_handler
from .paging import NUM_REMAP_BITMAP_PAGES, AddressSpace, PagePool, pages
from .params import HvParams
from .pci import PciUnit
from .percpu import PerCpu
from .printk import MSG_PARKING, MSG_POOL_USAGE, MSG_REMAP_WARNING, MSG_TIMEOUT, Console
from .unit import UnitRegistry

if TYPE_CHECKING:
    from .arch import Arch
    from .config import CellConfig, MemoryRegion, SystemConfig

__all__ = ["COMM_PAGE_PHYS_BASE", "HvState", "HypervisorCore", "ModelStateError"]

LOG = logging.getLogger(__name__)

_SHUT_DOWN: Final = int(CellState.SHUT_DOWN)
_FAILED: Final = int(CellState.FAILED)
_REPLY_NONE: Final = int(Reply.NONE)
_EXPECTED_REPLY: Final = {
    int(message): int(Reply.REQUEST_APPROVED if kind is MessageType.REQUEST else Reply.RECEIVED)
    for message, kind in MESSAGE_TYPE.items()
}
#: bytes of one MMIO table entry (location 16 + handler 16)
MMIO_ENTRY_SIZE: Final = 32
#: where the model pretends comm pages live (beyond any physical address), so that the
#: cells' COMM_REGION mappings have distinct, non-RAM host addresses in the bookkeeping
COMM_PAGE_PHYS_BASE: Final = 1 << 52


class ModelStateError(JhlabError):
    """The model was used against its lifecycle (not an error Jailhouse would return).

    :param operation: what was attempted
    :param state: the hypervisor's state at that moment
    """

    def __init__(self, operation: str, state: str) -> None:
        self.operation = operation
        self.state = state
        super().__init__(f"Hypervisor.{operation}: not allowed in state {state}")


class HvState(enum.Enum):
    """Lifecycle of a :class:`~harness.hvmodel.control.Hypervisor`."""

    #: built, not enabled yet (or enable failed)
    DISABLED = "disabled"
    #: running: cells can be managed, CPUs exit into the model
    ENABLED = "enabled"
    #: disabled again by the DISABLE hypercall on every root CPU
    SHUT_DOWN = "shut down"
    #: enable failed; the instance is unusable (a new enable needs a new instance)
    FAILED = "failed"


#: a cell's memory regions as the control plane walks them: (region, sub-page?, taken
#: from the root?) for every non-empty region, in config order
_Regions = tuple[tuple["MemoryRegion", bool, bool], ...]


def _region_plan(config: CellConfig) -> _Regions:
    """Precompute how create and destroy treat each region (empty entries do nothing)."""
    return tuple(
        (mem, is_subpage(mem), not mem.flags & (MEM_COMM_REGION | MEM_ROOTSHARED))
        for mem in config.memory_regions
        if mem.size
    )


class HypervisorCore:
    """The state of one Jailhouse hypervisor (see the module docstring); the public
    entry points are :class:`~harness.hvmodel.control.Hypervisor`'s.

    :param system: the system configuration
    :param arch: the machine underneath (executor or oracle)
    :param params: machine and build facts
    """

    def __init__(self, system: SystemConfig, arch: Arch, *, params: HvParams | None = None) -> None:
        self.system = system
        self.arch = arch
        self.params = params or HvParams()
        self.console = Console(sink=arch.console_write, history=self.params.console_history)
        self.state = HvState.DISABLED
        root_cpus = system.root_cell.cpus
        #: ``hypervisor_header.max_cpus``: highest root CPU + 1
        self.max_cpus = max(root_cpus) + 1 if root_cpus else 0
        #: CPUs that took part in enable (``online_cpus``)
        self.online_cpus: tuple[int, ...] = ()
        self.mem_pool = PagePool("mem", 0)
        self.remap_pool = PagePool("remap", NUM_REMAP_BITMAP_PAGES * PAGE_SIZE * 8)
        self.cpus: dict[int, PerCpu] = {}
        self.cells: list[Cell] = []
        self.root: Cell = None  # type: ignore[assignment]  # set by enable
        #: the units, built for this hypervisor in link order (they see it as their host)
        self.units = UnitRegistry.link(self)
        #: the units the control plane calls beyond their hooks, as ``control.c`` does
        self.pci = self.units.require(PciUnit)
        self.ioapic = self.units.require(IoapicUnit)
        self.ivshmem = self.pci.ivshmem
        self.cat = self.units.find(CatUnit)
        #: cells get IOMMU page tables of their own (VT-d; the AMD IOMMU shares the NPT)
        self._iommu_tables = bool(system.active_iommu_units) and self.params.vendor == "intel"
        self._lock = threading.Lock()
        self._config_cache: dict[bytes, tuple[CellConfig, frozenset[int], _Regions]] = {}
        self._identity_cache: dict[MemoryRegion, MemoryRegion] = {}
        self._mmio_counts: dict[bytes, int] = {}
        self._overlap_cache: dict[MemoryRegion, list[MemoryRegion]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(state={self.state.value!r}, cells={[c.name for c in self.cells]!r})"

    # ===================================================================================
    # queries
    # ===================================================================================

    def cell_by_id(self, cell_id: int) -> Cell | None:
        """The cell whose config id is ``cell_id``."""
        for cell in self.cells:
            if cell.id == cell_id:
                return cell
        return None

    def cell_by_name(self, name: str) -> Cell | None:
        """The cell called ``name``."""
        for cell in self.cells:
            if cell.name == name:
                return cell
        return None

    def cell_of_cpu(self, cpu: int) -> Cell:
        """The cell owning ``cpu``.

        :raise KeyError: for a CPU the hypervisor does not run on
        """
        return self.cpus[cpu].cell

    @property
    def num_cells(self) -> int:
        """Cells including the root (``num_cells``)."""
        return len(self.cells)

    def pool_usage(self) -> tuple[int, int, int, int]:
        """``(mem used, mem size, remap used, remap size)``."""
        return (self.mem_pool.used, self.mem_pool.size, self.remap_pool.used, self.remap_pool.size)

    def to_dict(self) -> dict[str, object]:
        """The whole state, JSON-friendly, for comparing oracle and guest."""
        with self._lock:
            return {
                "state": self.state.value,
                "pools": {"mem": self.mem_pool.to_dict(), "remap": self.remap_pool.to_dict()},
                "cells": [cell.to_dict() for cell in self.cells],
                "cpus": [self.cpus[cpu].to_dict() for cpu in sorted(self.cpus)],
                "ivshmem": self.ivshmem.to_dict(),
                "ioapic": self.ioapic.to_dict(),
                "cat": cat_state(self.cat),
                "console": self.console.content,
            }

    # ===================================================================================
    # internals: CPUs and cells
    # ===================================================================================

    def _running_cpu(self, cpu: int, operation: str) -> PerCpu:
        if self.state is not HvState.ENABLED:
            raise ModelStateError(operation, self.state.value)
        cpu_data = self.cpus.get(cpu)
        if cpu_data is None:
            raise ModelStateError(f"{operation}(cpu={cpu})", "unknown CPU")
        return cpu_data

    def _cell_suspend(self, cell: Cell, caller: PerCpu | None) -> None:
        """``cell_suspend``: halt the cell's CPUs except the caller's.

        ``arch_suspend_cpu`` sends a CPU that is not suspended yet an NMI, which it takes
        as a management exit (counted). The root runs natively in jhlab: its CPUs are
        only marked (no exits to count), the Arch is not asked.
        """
        skip = -1 if caller is None else caller.cpu_id
        cpus = self.cpus
        is_root = cell is self.root
        for cpu in sorted(cell.cpus):
            if cpu != skip:
                cpu_data = cpus[cpu]
                if not is_root and not cpu_data.suspended:
                    cpu_data.count(CpuStat.VMEXITS_TOTAL)
                    cpu_data.count(CpuStat.VMEXITS_MANAGEMENT)
                cpu_data.suspended = True
                if not is_root:
                    self.arch.suspend_cpu(cpu)

    def _cell_resume(self, cell: Cell, caller: PerCpu | None) -> None:
        """``cell_resume``."""
        skip = -1 if caller is None else caller.cpu_id
        cpus = self.cpus
        is_root = cell is self.root
        for cpu in sorted(cell.cpus):
            cpu_data = cpus[cpu]
            if cpu != skip and cpu_data.suspended:
                cpu_data.suspended = False
                if not is_root:
                    self.arch.resume_cpu(cpu)

    def _park_cpu(self, cpu: int) -> None:
        cpu_data = self.cpus[cpu]
        cpu_data.parked = True
        cpu_data.suspended = False
        self.arch.park_cpu(cpu)

    def _panic_park(self, cpu_data: PerCpu) -> None:
        """``panic_park``: print, fail the CPU, fail the cell once all its CPUs failed."""
        cell = cpu_data.cell
        self.console.printk(MSG_PARKING, cpu_data.cpu_id, cell.name)
        cpu_data.failed = True
        if all(self.cpus[cpu].failed for cpu in cell.cpus):
            cell.state = CellState.FAILED
        cpu_data.parked = True
        self.arch.park_cpu(cpu_data.cpu_id)

    def _cpu_id_valid(self, cpu: int) -> bool:
        return 0 <= cpu < self.system.root_cell.cpu_set_size * 8 and cpu in self.system.root_cell.cpus

    # -- messages --------------------------------------------------------------------------

    def _exchange_message(self, cell: Cell, message: Message) -> bool:
        """``cell_exchange_message``: send, wait, judge the reply.

        :return: True when approved/received, or the cell is passive, shut down or
            failed, or timed out (then the cell is FAILED); False on denial or an
            invalid reply
        """
        if cell.config.flags & CELL_PASSIVE_COMMREG:
            return True
        page = cell.comm_page
        comm_write_u32(page, CommOffset.REPLY_FROM_CELL, _REPLY_NONE)
        comm_write_u32(page, CommOffset.MSG_TO_CELL, int(message))
        expected = _EXPECTED_REPLY[message]
        ticks = cell.config.msg_reply_timeout
        timeout = ticks * self.params.reply_poll_seconds if ticks else None
        waited = False
        while True:
            state = comm_read_u32(page, CommOffset.CELL_STATE)
            reply = comm_read_u32(page, CommOffset.REPLY_FROM_CELL)
            if state in (_SHUT_DOWN, _FAILED):
                return True
            if reply == expected:
                return True
            if reply != _REPLY_NONE:
                return faults.active("shutdown-ignores-denial")  # test-only switch (faults.py)
            if waited:
                self.console.write(MSG_TIMEOUT)
                self._cell_suspend(cell, None)
                cell.state = CellState.FAILED
                return True
            self._lock.release()
            try:
                answered = self.arch.wait_for_reply(cell.id, page, timeout)
            finally:
                self._lock.acquire()
            # An Arch that gives up without a timeout is treated like an expired timeout.
            waited = not answered

    def _reconfig_ok(self, excluded: Cell | None) -> bool:
        """``cell_reconfig_ok``: no other non-root cell is RUNNING_LOCKED."""
        return not any(cell is not excluded and cell.is_locked() for cell in self.cells[1:])

    def _reconfig_completed(self) -> None:
        """``cell_reconfig_completed``: tell every non-root cell (replies ignored)."""
        for cell in list(self.cells[1:]):
            self._exchange_message(cell, Message.RECONFIG_COMPLETED)

    def _dump_stats(self, when: str) -> None:
        """``paging_dump_stats``."""
        self.console.printk(
            MSG_POOL_USAGE,
            when,
            self.mem_pool.used,
            self.mem_pool.size,
            self.remap_pool.used,
            self.remap_pool.size,
        )

    def _config_commit(self, cell: Cell | None) -> None:
        """``config_commit``: flush, then arch and PCI commit."""
        self.arch.config_commit(None if cell is None else cell.id)
        self.pci.config_commit(cell)

    # -- memory --------------------------------------------------------------------------

    def _map_region(self, cell: Cell, mem: MemoryRegion) -> None:
        """``arch_map_memory_region``: EPT (+ IOMMU for DMA) bookkeeping, then the Arch."""
        if mem.size == 0:
            return
        flags = int(mem.flags)
        phys = COMM_PAGE_PHYS_BASE + cell.id * PAGE_SIZE if flags & MEM_COMM_REGION else (mem.phys_start)
        cell.ept.map(mem.virt_start, phys, mem.size, flags)
        try:
            if flags & MEM_DMA and cell.iommu is not None:
                cell.iommu.map(mem.virt_start, phys, mem.size, flags)
            self.arch.map_memory_region(cell.id, mem)
        except HvError:
            cell.ept.unmap(mem.virt_start, mem.size)
            if cell.iommu is not None:
                cell.iommu.unmap(mem.virt_start, mem.size)
            raise

    def _unmap_region(self, cell: Cell, mem: MemoryRegion) -> None:
        """``arch_unmap_memory_region``."""
        if mem.size == 0:
            return
        cell.ept.unmap(mem.virt_start, mem.size)
        if mem.flags & MEM_DMA and cell.iommu is not None:
            cell.iommu.unmap(mem.virt_start, mem.size)
        self.arch.unmap_memory_region(cell.id, mem)

    def _subpage_register(self, cell: Cell, mem: MemoryRegion) -> None:
        """``mmio_subpage_register``."""
        cell.mmio.register(mem.virt_start, mem.size, subpage_handler(mem, self.arch, self.console))

    def _unmap_from_root(self, mem: MemoryRegion) -> None:
        """``unmap_from_root_cell``: the root maps 1:1, so use ``phys_start`` as guest address."""
        identity = self._identity_cache.get(mem)
        if identity is None:
            identity = dataclasses.replace(mem, virt_start=mem.phys_start)
            self._identity_cache[mem] = identity
        if is_subpage(identity):
            self.root.mmio.unregister(identity.virt_start)
            return
        self._unmap_region(self.root, identity)

    def _remap_to_root(self, mem: MemoryRegion, abort_on_error: bool) -> None:
        """``remap_to_root_cell``: map the overlaps with the root's configured regions back,
        with the root region's flags and guest offset.

        :raise HvError: the first failure when ``abort_on_error``; otherwise warn and go on
        """
        overlaps = self._overlap_cache.get(mem)
        if overlaps is None:
            overlaps = self._root_overlaps(mem)
            self._overlap_cache[mem] = overlaps
        for overlap in overlaps:
            try:
                if is_subpage(overlap):
                    self._subpage_register(self.root, overlap)
                else:
                    self._map_region(self.root, overlap)
            except HvError:
                if abort_on_error:
                    raise
                self.console.write(MSG_REMAP_WARNING)

    def _root_overlaps(self, mem: MemoryRegion) -> list[MemoryRegion]:
        """The parts of ``mem`` the root's config maps, as root regions (same flags and
        guest offset as the root region each part lies in)."""
        start, end = mem.phys_start, mem.phys_start + mem.size
        overlaps = []
        for root_mem in self.root.config.memory_regions:
            root_start, root_end = root_mem.phys_start, root_mem.phys_start + root_mem.size
            if root_start <= start < root_end:
                ov_start, ov_size = start, min(root_end - start, mem.size)
            elif start <= root_start < end:
                ov_start, ov_size = root_start, min(end - root_start, root_mem.size)
            else:
                continue
            overlaps.append(
                dataclasses.replace(
                    root_mem,
                    phys_start=ov_start,
                    virt_start=root_mem.virt_start + (ov_start - root_start),
                    size=ov_size,
                )
            )
        return overlaps

    # -- cell construction and destruction ------------------------------------------------

    def _parse_config(self, raw: bytes) -> CellConfig:
        cached = self._config_cache.get(raw)
        if cached is not None:
            return cached[0]
        from .config import parse_cell

        try:
            config = parse_cell(raw, source="cell_create")
        except ConfigError as err:
            # Jailhouse would take the bytes as they are; the model cannot.
            raise HvError(Errno.EINVAL, f"unusable cell config: {err}") from err
        if len(self._config_cache) >= 256:
            self._config_cache.clear()
            self._mmio_counts.clear()
        self._config_cache[raw] = (config, config.cpus, _region_plan(config))
        return config

    def _new_cell(self, cell_id: int, config: CellConfig, raw: bytes, undo: contextlib.ExitStack) -> Cell:
        """``cell_init`` plus the comm page; registers its undo on ``undo``."""
        page = self.arch.comm_page_alloc(cell_id)
        ept = AddressSpace(self.mem_pool, self.params.gbpages)
        iommu = (
            AddressSpace(self.mem_pool, self.params.gbpages)
            if self._iommu_tables
            else None
        )
        cached = self._config_cache.get(raw)
        cpus = cached[1] if cached is not None else config.cpus
        cell = Cell(cell_id, config, raw, page, MmioTable(0, self.console), ept, iommu, cpus)
        cell.regions = cached[2] if cached is not None else _region_plan(config)
        undo.callback(self._cell_exit, cell)
        if config.cpu_set_size > 8:
            self.mem_pool.alloc(1)
            cell.cpu_set_pages = 1
        capacity = self._mmio_counts.get(raw)
        if capacity is None:
            capacity = self.units.mmio_count_regions(cell) + sum(
                1 for mem in config.memory_regions if is_subpage(mem)
            )
            self._mmio_counts[raw] = capacity
        cell.mmio.capacity = capacity
        mmio_pages = pages(capacity * MMIO_ENTRY_SIZE)
        self.mem_pool.alloc(mmio_pages)
        cell.mmio_pages = mmio_pages
        return cell

    def _arch_cell_create(self, cell: Cell, undo: contextlib.ExitStack) -> None:
        """``arch_cell_create``: I/O bitmap, EPT root (and IOMMU root), PIO moves."""
        count = self.params.io_bitmap_pages + 1 + (1 if cell.iommu is not None else 0)
        self.mem_pool.alloc(count)
        try:
            self.arch.cell_create(cell.id, cell.config)
        except HvError:
            self.mem_pool.free(count)
            raise
        pio.cell_init(self, cell)
        undo.callback(self._arch_cell_destroy, cell)

    def _arch_cell_destroy(self, cell: Cell) -> None:
        pio.cell_exit(self.root, cell)
        self.arch.cell_destroy(cell.id)
        cell.ept.clear()
        if cell.iommu is not None:
            cell.iommu.clear()
        self.mem_pool.free(self.params.io_bitmap_pages + 1 + (1 if cell.iommu is not None else 0))

    def _cell_exit(self, cell: Cell) -> None:
        """``cell_exit``: MMIO table, CPU set, comm page."""
        self.mem_pool.free(cell.mmio_pages + cell.cpu_set_pages)
        cell.mmio_pages = cell.cpu_set_pages = 0
        self.arch.comm_page_free(cell.id)

    def _destroy_internal(self, cell: Cell) -> None:
        """``cell_destroy_internal``: everything back to the root, nothing left."""
        root = self.root
        for cpu in sorted(cell.cpus):
            self._park_cpu(cpu)
            root.cpus.add(cpu)
            cpu_data = self.cpus[cpu]
            cpu_data.cell = root
            cpu_data.failed = False
            cpu_data.clear_stats()
        cell.cpus.clear()
        for mem, subpage, taken in cell.regions:
            if not subpage:
                # Cannot fail: the region was mapped as a whole before. The cell's own
                # bookkeeping (EPT, IOMMU) is dropped as a whole by _arch_cell_destroy.
                self.arch.unmap_memory_region(cell.id, mem)
            if taken:
                self._remap_to_root(mem, abort_on_error=False)
        self.units.cell_exit(cell)
        self._arch_cell_destroy(cell)
        self._config_commit(cell)
        self._cell_exit(cell)
