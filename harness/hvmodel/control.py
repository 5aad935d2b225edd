"""The hypervisor control plane; models ``hypervisor/control.c`` and
``include/jailhouse/control.h``.

:class:`Hypervisor` holds the whole state of one hypervisor instance (cells, CPUs, page
pools, units, console) and offers the three entry points a machine needs:

* :meth:`Hypervisor.hypercall` -- the nine hypercalls, each with Jailhouse's checks in
  Jailhouse's order; errors come back as negative errno values (only here);
* :meth:`Hypervisor.handle_pio` and :meth:`Hypervisor.handle_mmio` -- the exits of cell
  CPUs, dispatched as Jailhouse does and answered with an :class:`ExitResult`;
* :meth:`Hypervisor.panic_park` -- any other fatal guest action.

Enable (``setup.c``) is in :mod:`harness.hvmodel.bootstrap` and reached through
:meth:`Hypervisor.enable`. Everything that touches a machine goes through the
:class:`~harness.hvmodel.arch.Arch` the instance was built with; the model itself does no
I/O, so with :class:`~harness.hvmodel.arch.oracle.OracleArch` it is a pure,
deterministic oracle.

Threading: one lock serialises the entry points. The only hook called without it is
:meth:`Arch.wait_for_reply <harness.hvmodel.arch.Arch.wait_for_reply>`, so the cell being
asked can keep exiting (and, say, print) while the root waits for its answer. Management
hypercalls must come from one thread at a time (Jailhouse gets this by suspending the
root cell, which jhlab does not virtualize).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import struct
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from . import JAILHOUSE_VERSION, faults, pio
from .abi import (
    COMM_PAGE_SIZE,
    COMM_REGION_ABI_REVISION,
    COMM_REGION_SIGNATURE,
    CPU_INFO_STAT_BASE,
    CPU_INFO_STATE,
    CPU_STAT_MASK,
    MESSAGE_TYPE,
    NUM_CPU_STATS,
    CellFlag,
    CellState,
    CommFlag,
    CommOffset,
    CommRegion,
    CpuInfoState,
    CpuStat,
    Hypercall,
    InfoType,
    Message,
    MessageType,
    Reply,
    ShutdownState,
    comm_read_u32,
    comm_write,
    comm_write_u32,
)
from .cat import CatHardware, CatUnit
from .cell import Cell
from .errors import ConfigError, Errno, HvError, JhlabError
from .ioapic import IoapicUnit
from .iommu import IommuUnit
from .ivshmem import Ivshmem
from .mmio import MmioResult, MmioTable, is_subpage, subpage_handler
from .paging import (
    NUM_REMAP_BITMAP_PAGES,
    NUM_TEMPORARY_PAGES,
    PAGE_SIZE,
    AddressSpace,
    PagePool,
    pages,
)
from .pci import PciUnit
from .percpu import EXIT_DONE, EXIT_FAILED, ExitResult, PerCpu
from .printk import (
    FATAL_MMIO,
    MSG_CAN_BE_LOADED,
    MSG_CLOSING,
    MSG_CREATED,
    MSG_PARKING,
    MSG_POOL_USAGE,
    MSG_RELEASING,
    MSG_REMAP_WARNING,
    MSG_SHUTTING_DOWN,
    MSG_STARTED,
    MSG_TIMEOUT,
    MSG_UNKNOWN_HYPERCALL,
    Console,
)
from .testdev import TestDevice
from .unit import Unit, UnitRegistry

if TYPE_CHECKING:
    from .arch import Arch
    from .config import CellConfig, MemoryRegion, SystemConfig

__all__ = ["ExitResult", "HvParams", "HvState", "Hypervisor", "ModelStateError"]

LOG = logging.getLogger(__name__)

MEM_READ: Final = 0x0001
MEM_WRITE: Final = 0x0002
MEM_DMA: Final = 0x0008
MEM_COMM_REGION: Final = 0x0020
MEM_LOADABLE: Final = 0x0040
MEM_ROOTSHARED: Final = 0x0080
_STAT_TOTAL: Final = int(CpuStat.VMEXITS_TOTAL)
_STAT_HYPERCALL: Final = int(CpuStat.VMEXITS_HYPERCALL)
_SHUT_DOWN: Final = int(CellState.SHUT_DOWN)
_FAILED: Final = int(CellState.FAILED)
_REPLY_NONE: Final = int(Reply.NONE)
_EXPECTED_REPLY: Final = {
    int(message): int(Reply.REQUEST_APPROVED if kind is MessageType.REQUEST else Reply.RECEIVED)
    for message, kind in MESSAGE_TYPE.items()
}
CELL_PASSIVE_COMMREG: Final = int(CellFlag.PASSIVE_COMMREG)
CELL_VCON_PERMITTED: Final = int(CellFlag.VIRTUAL_CONSOLE_PERMITTED)
CELL_VCON_ACTIVE: Final = int(CellFlag.VIRTUAL_CONSOLE_ACTIVE)
CPUID_HYPERVISOR_BASE: Final = 0x40000000
#: leaf 0x40000000: max leaf 0x40000001 and "Jailhouse\0\0\0" in EBX, ECX, EDX
CPUID_HYPERVISOR_SIGNATURE: Final = (0x40000001, 0x6C69614A, 0x73756F68, 0x00000065)
CPUID_1_ECX_VMX: Final = 1 << 5
CPUID_1_ECX_OSXSAVE: Final = 1 << 27
CPUID_1_ECX_HYPERVISOR: Final = 1 << 31
CPUID_80000001_ECX_SVM: Final = 1 << 2
#: size of ``struct jailhouse_cell_desc``
CELL_DESC_SIZE: Final = 132
#: ``cpu_set_size`` limit of ``cell_init``
MAX_CPU_SET_SIZE: Final = PAGE_SIZE
#: bytes of one MMIO table entry (location 16 + handler 16)
MMIO_ENTRY_SIZE: Final = 32
#: where the model pretends comm pages live (beyond any physical address), so that the
#: cells' COMM_REGION mappings have distinct, non-RAM host addresses in the bookkeeping
COMM_PAGE_PHYS_BASE: Final = 1 << 52
_DESC: Final = struct.Struct("<5sBH32s11IQQ32x")
_ELEMENT_SIZES: Final = (32, 12, 32, 4, 56, 8, 4)


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
    """Lifecycle of a :class:`Hypervisor`."""

    #: built, not enabled yet (or enable failed)
    DISABLED = "disabled"
    #: running: cells can be managed, CPUs exit into the model
    ENABLED = "enabled"
    #: disabled again by the DISABLE hypercall on every root CPU
    SHUT_DOWN = "shut down"
    #: enable failed; the instance is unusable (a new enable needs a new instance)
    FAILED = "failed"


@dataclasses.dataclass(frozen=True, kw_only=True)
class HvParams:
    """Build-time and machine facts the model cannot read from the configs.

    :param vendor: ``intel`` (VMX, VT-d, CAT unit) or ``amd`` (SVM, AMD IOMMU)
    :param version: ``JAILHOUSE_VERSION`` as printed at enable
    :param code_location: printed as ``Code location``
    :param core_size: bytes of the hypervisor image before the page pool (model figure)
    :param percpu_pages: pages of one ``struct per_cpu`` (model figure)
    :param cell_struct_size: bytes of ``struct cell`` including its comm page (model figure)
    :param gbpages: 1 GiB pages available for guest mappings
    :param x2apic: the APIC runs in x2APIC mode (``Using x2APIC``)
    :param cat: CAT hardware, or None when absent (QEMU)
    :param reply_poll_seconds: duration of one ``msg_reply_timeout`` count (Jailhouse
        counts polling-loop iterations; the model waits this long per count)
    :param console_history: complete console lines kept in :attr:`Console.lines`
    :param test_device: built with ``CONFIG_TEST_DEVICE``: the test device unit
        (:mod:`.testdev`) serves cells with the ``TEST_DEVICE`` flag
    """

    vendor: str = "intel"
    version: str = JAILHOUSE_VERSION
    code_location: int = 0xFFFFFFFFF0000050
    core_size: int = 0x40000
    percpu_pages: int = 6
    cell_struct_size: int = 0x1100
    gbpages: bool = True
    x2apic: bool = True
    cat: CatHardware | None = None
    reply_poll_seconds: float = 1e-6
    console_history: int = 4096
    test_device: bool = False

    def __post_init__(self) -> None:
        if self.vendor not in ("intel", "amd"):
            raise ValueError(f"HvParams.vendor: expected 'intel' or 'amd', got {self.vendor!r}")

    @property
    def io_bitmap_pages(self) -> int:
        """I/O permission bitmap pages per cell (VMX 2, SVM 3)."""
        return 3 if self.vendor == "amd" else 2


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


def config_size(header: bytes) -> int:
    """Total size of a cell config from its 132-byte descriptor
    (``jailhouse_cell_config_size``)."""
    fields = _DESC.unpack_from(header)
    cpu_set_size: int = fields[6]
    counts: tuple[int, ...] = fields[7:14]
    arrays = sum(n * s for n, s in zip(counts, _ELEMENT_SIZES, strict=True))
    return CELL_DESC_SIZE + cpu_set_size + arrays


class Hypervisor:
    """One Jailhouse hypervisor instance.

    Lifecycle: built DISABLED; :meth:`enable` builds the root cell and makes it ENABLED;
    the DISABLE hypercall on every root CPU makes it SHUT_DOWN. A new enable needs a new
    instance (as a new ``jailhouse enable`` loads a fresh hypervisor image).

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
        self.iommu = IommuUnit(system, self.console, self.params.vendor)
        self.ioapic = IoapicUnit(self)
        self.cat = CatUnit(self, self.params.cat if self.params.vendor == "intel" else None)
        self.pci = PciUnit(self)
        self.ivshmem = Ivshmem(self)
        units: list[Unit] = [self.iommu, self.ioapic]
        if self.params.test_device:
            units.append(TestDevice(self.console))
        if self.params.vendor == "intel":
            units.append(self.cat)
        units.append(self.pci)
        self.units = UnitRegistry(units)
        self._lock = threading.Lock()
        self._shutdown_arrivals: list[int] = []
        self._config_cache: dict[bytes, tuple[CellConfig, frozenset[int], _Regions]] = {}
        self._identity_cache: dict[MemoryRegion, MemoryRegion] = {}
        self._mmio_counts: dict[bytes, int] = {}
        self._overlap_cache: dict[MemoryRegion, list[MemoryRegion]] = {}
        self._dispatch: dict[int, Callable[[PerCpu, int, int], int]] = {
            Hypercall.DISABLE: self._hc_disable,
            Hypercall.CELL_CREATE: self._hc_cell_create,
            Hypercall.CELL_START: self._hc_cell_start,
            Hypercall.CELL_SET_LOADABLE: self._hc_cell_set_loadable,
            Hypercall.CELL_DESTROY: self._hc_cell_destroy,
            Hypercall.HYPERVISOR_GET_INFO: self._hc_get_info,
            Hypercall.CELL_GET_STATE: self._hc_cell_get_state,
            Hypercall.CPU_GET_INFO: self._hc_cpu_get_info,
            Hypercall.DEBUG_CONSOLE_PUTC: self._hc_putc,
        }

    def __repr__(self) -> str:
        return f"Hypervisor(state={self.state.value!r}, cells={[c.name for c in self.cells]!r})"

    # ===================================================================================
    # entry points
    # ===================================================================================

    def enable(self, online_cpus: Iterable[int], master_cpu: int | None = None) -> None:
        """Start the hypervisor on ``online_cpus`` (``entry`` on every CPU, ``setup.c``).

        :param online_cpus: the CPUs Linux has online (each calls the entry)
        :param master_cpu: the CPU that arrives first and prints the banner
            (default: the lowest)
        :raise HvError: ``EINVAL`` when the online CPUs are not the root's CPU set,
            ``ENOMEM``, or what the Arch or a unit raised
        :raise ModelStateError: when not DISABLED
        """
        from . import bootstrap

        with self._lock:
            if self.state is not HvState.DISABLED:
                raise ModelStateError("enable", self.state.value)
            try:
                bootstrap.enable(self, sorted(set(online_cpus)), master_cpu)
            except BaseException:
                self.state = HvState.FAILED
                raise

    def hypercall(self, cpu: int, code: int, arg1: int = 0, arg2: int = 0, *, rip: int = 0) -> int:
        """Execute a hypercall issued on ``cpu`` (``hypercall()``).

        :param cpu: the calling CPU
        :param code: the hypercall code (:class:`~harness.hvmodel.abi.Hypercall`)
        :param rip: the caller's instruction pointer (only printed for unknown codes)
        :return: the result; negative errno on failure
        :raise ModelStateError: when the hypervisor is not ENABLED
        """
        with self._lock:
            cpu_data = self._running_cpu(cpu, "hypercall")
            stats = cpu_data.stats
            stats[_STAT_TOTAL] = (stats[_STAT_TOTAL] + 1) & 0xFFFFFFFF
            stats[_STAT_HYPERCALL] = (stats[_STAT_HYPERCALL] + 1) & 0xFFFFFFFF
            handler = self._dispatch.get(code)
            if handler is None:
                self.console.printk(MSG_UNKNOWN_HYPERCALL, cpu, code, rip)
                return -int(Errno.ENOSYS)
            try:
                return handler(cpu_data, arg1, arg2)
            except HvError as err:
                LOG.debug("hypercall %s on CPU %d: %s", code, cpu, err)
                return err.code

    def handle_pio(
        self, cpu: int, port: int, size: int, is_write: bool, value: int = 0, *, rep: bool = False
    ) -> ExitResult:
        """A port access of ``cpu`` (I/O instruction exit, ``vcpu_handle_io_access``).

        Ports the cell may use pass through to the hardware (no exit in Jailhouse, so no
        statistics); the rest are handled as Jailhouse does (see :mod:`.pio`).

        :param size: 1, 2 or 4
        :param value: the value written
        :param rep: string or REP I/O
        :return: the result; ``handled=False`` after ``FATAL`` and parking
        """
        with self._lock:
            cpu_data = self._running_cpu(cpu, "handle_pio")
            cell = cpu_data.cell
            if pio.is_open(cell, port, size):
                if is_write:
                    self.arch.pio_write(port, size, value)
                    return EXIT_DONE
                return ExitResult(True, self.arch.pio_read(port, size))
            cpu_data.count(CpuStat.VMEXITS_TOTAL)
            cpu_data.count(CpuStat.VMEXITS_PIO)
            result = pio.handle(self, cell, port, size, is_write, value, rep)
            if not result.handled:
                self._panic_park(cpu_data)
            return result

    def pio_bitmap(self, cpu: int) -> bytearray | None:
        """The I/O bitmap of the non-root cell ``cpu`` belongs to (1: the port passes
        through, as in :meth:`handle_pio`), for an Arch that performs those accesses
        without calling :meth:`handle_pio`, as the CPU's own bitmap check does in
        Jailhouse (the executor's I/O bitmap loop). None for a root CPU.

        Only ``cell_init`` of that cell writes it (:func:`.pio.cell_init`, before its CPUs
        run): it stays the same until the cell is destroyed. The caller must not write it,
        and must stop using it before the CPU changes hands (the executor stops the CPU's
        thread first). So this reads without the lock: a vCPU thread calls it as its run
        begins, when a management operation may hold the lock and wait for that thread.
        """
        if self.state is not HvState.ENABLED:
            return None
        cpu_data = self.cpus.get(cpu)
        cell = None if cpu_data is None else cpu_data.cell
        return None if cell is None or cell is self.root else cell.pio_open

    def handle_mmio(self, cpu: int, addr: int, size: int, is_write: bool, value: int = 0) -> ExitResult:
        """A guest-physical access of ``cpu`` outside its RAM (EPT violation / NPF).

        The cell's MMIO table decides; an access no region fully contains is
        ``FATAL: Invalid MMIO/RAM read|write``. An access to memory the cell has mapped
        would not exit in Jailhouse; it is served from memory without statistics.

        :return: the result; ``handled=False`` after ``FATAL`` and parking
        """
        with self._lock:
            cpu_data = self._running_cpu(cpu, "handle_mmio")
            cell = cpu_data.cell
            mapping = cell.ept.lookup(addr)
            if (
                mapping is not None
                and addr + size <= mapping.end
                and mapping.flags & (MEM_WRITE if is_write else MEM_READ)
            ):
                phys = mapping.phys + (addr - mapping.virt)
                return self._ram_access(cell, phys, size, is_write, value)
            cpu_data.count(CpuStat.VMEXITS_TOTAL)
            cpu_data.count(CpuStat.VMEXITS_MMIO)
            found = cell.mmio.dispatch(addr, size, is_write, value)
            if found is None or found[0] is MmioResult.UNHANDLED:
                self.console.printk(FATAL_MMIO, "write" if is_write else "read", addr, size)
                self._panic_park(cpu_data)
                return EXIT_FAILED
            if found[0] is MmioResult.ERROR:
                self._panic_park(cpu_data)
                return EXIT_FAILED
            return EXIT_DONE if is_write else ExitResult(True, found[1])

    def handle_cpuid(
        self, cpu: int, leaf: int, regs: tuple[int, int, int, int], *, osxsave: bool = False
    ) -> tuple[int, int, int, int]:
        """A CPUID exit of ``cpu`` (``vcpu_handle_cpuid``): Jailhouse's view of the CPU.

        :param leaf: EAX at the exit
        :param regs: what the real CPU answers for the leaf (EAX, EBX, ECX, EDX)
        :param osxsave: the guest's CR4.OSXSAVE (mirrored into leaf 1 ECX bit 27)
        :return: the registers the guest gets (upper halves are the caller's to clear)
        """
        with self._lock:
            cpu_data = self._running_cpu(cpu, "handle_cpuid")
            cpu_data.count(CpuStat.VMEXITS_TOTAL)
            cpu_data.count(CpuStat.VMEXITS_CPUID)
            non_root = cpu_data.cell is not self.root
        eax, ebx, ecx, edx = (value & 0xFFFFFFFF for value in regs)
        if leaf == CPUID_HYPERVISOR_BASE:
            return CPUID_HYPERVISOR_SIGNATURE
        if leaf == CPUID_HYPERVISOR_BASE + 1:
            return (0, 0, 0, 0)
        if leaf == 1:
            ecx = (ecx & ~CPUID_1_ECX_OSXSAVE) | (CPUID_1_ECX_OSXSAVE if osxsave else 0)
            if non_root:
                ecx = (ecx & ~CPUID_1_ECX_VMX) | CPUID_1_ECX_HYPERVISOR
        elif leaf == 0x80000001 and non_root:
            ecx &= ~CPUID_80000001_ECX_SVM
        return (eax, ebx, ecx, edx)

    def panic_park(self, cpu: int, fatal: str | None = None) -> None:
        """Fail ``cpu`` for any other fatal guest action (``panic_park``).

        :param fatal: text after ``FATAL: `` (e.g. ``Unhandled MSR read: 1234``), printed
            first when given
        """
        with self._lock:
            cpu_data = self._running_cpu(cpu, "panic_park")
            if fatal is not None:
                self.console.write(f"FATAL: {fatal}\n")
            self._panic_park(cpu_data)

    def count_exit(self, cpu: int, stat: CpuStat) -> None:
        """Count an exit the executor handled itself (CPUID, MSR, CR, XSETBV ...).

        Increments ``stat`` and ``VMEXITS_TOTAL`` (``stat`` = TOTAL counts once).
        """
        with self._lock:
            cpu_data = self._running_cpu(cpu, "count_exit")
            cpu_data.count(CpuStat.VMEXITS_TOTAL)
            if stat is not CpuStat.VMEXITS_TOTAL:
                cpu_data.count(stat)

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
                "cat": self.cat.to_dict(),
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

        The root runs natively in jhlab: its CPUs are only marked, the Arch is not asked.
        """
        skip = -1 if caller is None else caller.cpu_id
        cpus = self.cpus
        is_root = cell is self.root
        for cpu in sorted(cell.cpus):
            if cpu != skip:
                cpus[cpu].suspended = True
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
            if self.iommu.units and self.params.vendor == "intel"
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
        pio.cell_exit(self, cell)
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

    # ===================================================================================
    # hypercalls
    # ===================================================================================

    def _hc_cell_create(self, cpu_data: PerCpu, config_address: int, _arg2: int) -> int:
        """``cell_create``: see reference §3.5 for the order of checks."""
        root = self.root
        if cpu_data.cell is not root:
            raise HvError(Errno.EPERM, "cell_create from a non-root cell")
        self._cell_suspend(root, cpu_data)
        try:
            self._cell_create(cpu_data, config_address)
        finally:
            self._cell_resume(root, cpu_data)
        return 0

    def _cell_create(self, cpu_data: PerCpu, config_address: int) -> None:
        root = self.root
        if not self._reconfig_ok(None):
            raise HvError(Errno.EPERM, "a cell is RUNNING_LOCKED")
        offset = config_address & (PAGE_SIZE - 1)
        header = self.arch.root_memory_read(config_address, CELL_DESC_SIZE)
        fields = _DESC.unpack_from(header)
        name_raw = fields[3].split(b"\0", 1)[0]
        config_id = fields[4]
        for cell in self.cells:
            if cell.name.encode() == name_raw or cell.config.id == config_id:
                raise HvError(Errno.EEXIST, f"cell {name_raw!r} / id {config_id} exists")
        total = config_size(header)
        if pages(offset + total) > NUM_TEMPORARY_PAGES:
            raise HvError(Errno.E2BIG, f"config of {total} bytes")
        raw = self.arch.root_memory_read(config_address, total)
        # Every step registers its undo; a failure unwinds them in reverse order. On
        # success the stack is simply dropped (the cell keeps what it took).
        undo = contextlib.ExitStack()
        try:
            data_pages = pages(self.params.cell_struct_size + total)
            self.mem_pool.alloc(data_pages)
            undo.callback(self.mem_pool.free, data_pages)
            if fields[6] > MAX_CPU_SET_SIZE:
                raise HvError(Errno.EINVAL, f"cpu_set_size {fields[6]}")
            config = self._parse_config(raw)
            cell = self._new_cell(config_id, config, raw, undo)
            cell.data_pages = data_pages
            if cpu_data.cpu_id in cell.cpus:
                raise HvError(Errno.EBUSY, f"cell contains the calling CPU {cpu_data.cpu_id}")
            for cpu in cell.cpus:
                if cpu not in root.cpus:
                    raise HvError(Errno.EBUSY, f"CPU {cpu} not owned by the root")
            self._arch_cell_create(cell, undo)
            self.units.cell_init(cell)
        except BaseException:
            undo.close()
            raise

        # From here on, failures unwind through cell_destroy_internal.
        for cpu in sorted(cell.cpus):
            self._park_cpu(cpu)
            root.cpus.discard(cpu)
            self.cpus[cpu].cell = cell
            self.cpus[cpu].clear_stats()
        try:
            for mem, subpage, taken in cell.regions:
                if taken:
                    self._unmap_from_root(mem)
                if subpage:
                    self._subpage_register(cell, mem)
                else:
                    self._map_region(cell, mem)
        except HvError:
            self._destroy_internal(cell)
            self.mem_pool.free(cell.data_pages)
            raise
        self._config_commit(cell)
        cell.state = CellState.SHUT_DOWN
        self.cells.append(cell)
        self._reconfig_completed()
        self.console.printk(MSG_CREATED, cell.name)
        self._dump_stats("after cell creation")

    def _management_prologue(self, cpu_data: PerCpu, cell_id: int, destroy: bool) -> Cell:
        """``cell_management_prologue``; on success the root is suspended (caller resumes)."""
        root = self.root
        if cpu_data.cell is not root:
            raise HvError(Errno.EPERM, "management from a non-root cell")
        self._cell_suspend(root, cpu_data)
        try:
            cell = self.cell_by_id(cell_id)
            if cell is None:
                raise HvError(Errno.ENOENT, f"no cell with id {cell_id}")
            if cell is root:
                raise HvError(Errno.EINVAL, "the root cell cannot be managed")
            if destroy and not self._reconfig_ok(cell):
                raise HvError(Errno.EPERM, "another cell is RUNNING_LOCKED")
            if not self._exchange_message(cell, Message.SHUTDOWN_REQUEST):
                raise HvError(Errno.EPERM, f"cell {cell.name!r} refused to shut down")
        except HvError:
            self._cell_resume(root, cpu_data)
            raise
        self._cell_suspend(cell, cpu_data)
        return cell

    def _hc_cell_start(self, cpu_data: PerCpu, cell_id: int, _arg2: int) -> int:
        """``cell_start``."""
        cell = self._management_prologue(cpu_data, cell_id, destroy=False)
        try:
            if cell.loadable:
                for mem in cell.config.memory_regions:
                    if mem.flags & MEM_LOADABLE:
                        self._unmap_from_root(mem)
                self._config_commit(None)
                cell.loadable = False
            page = cell.comm_page
            page[0:COMM_PAGE_SIZE] = bytes(COMM_PAGE_SIZE)
            flags = 0
            if cell.config.flags & CELL_VCON_PERMITTED:
                flags |= CommFlag.DBG_PUTC_PERMITTED
            if cell.config.flags & CELL_VCON_ACTIVE:
                flags |= CommFlag.DBG_PUTC_ACTIVE
            x86 = self.system.x86
            comm_write(
                page,
                CommRegion(
                    signature=COMM_REGION_SIGNATURE,
                    revision=COMM_REGION_ABI_REVISION,
                    cell_state=CellState.RUNNING,
                    flags=flags,
                    console=cell.config.console.to_bytes(),
                    pci_mmconfig_base=self.system.pci_mmconfig_base,
                    pm_timer_address=x86.pm_timer_address,
                    num_cpus=len(cell.cpus),
                    tsc_khz=x86.tsc_khz,
                    apic_khz=x86.apic_khz,
                ),
            )
            self.pci.cell_reset(cell)
            self.ioapic.cell_reset(cell)
            self.arch.cell_reset(cell.id)
            for cpu in sorted(cell.cpus):
                target = self.cpus[cpu]
                target.failed = False
                target.parked = False
                target.suspended = False
                self.arch.reset_cpu(cpu, cell.id, cell.config.cpu_reset_address)
            self.console.printk(MSG_STARTED, cell.name)
        finally:
            self._cell_resume(self.root, cpu_data)
        return 0

    def _hc_cell_set_loadable(self, cpu_data: PerCpu, cell_id: int, _arg2: int) -> int:
        """``cell_set_loadable``."""
        cell = self._management_prologue(cpu_data, cell_id, destroy=False)
        try:
            for cpu in sorted(cell.cpus):
                self.cpus[cpu].failed = False
                self._park_cpu(cpu)
            if cell.loadable:
                return 0
            cell.state = CellState.SHUT_DOWN
            cell.loadable = True
            self.pci.cell_reset(cell)
            for mem in cell.config.memory_regions:
                if mem.flags & MEM_LOADABLE:
                    self._remap_to_root(mem, abort_on_error=True)
            self._config_commit(None)
            self.console.printk(MSG_CAN_BE_LOADED, cell.name)
        finally:
            self._cell_resume(self.root, cpu_data)
        return 0

    def _hc_cell_destroy(self, cpu_data: PerCpu, cell_id: int, _arg2: int) -> int:
        """``cell_destroy``."""
        cell = self._management_prologue(cpu_data, cell_id, destroy=True)
        try:
            self.console.printk(MSG_CLOSING, cell.name)
            self._destroy_internal(cell)
            self.cells.remove(cell)
            self.mem_pool.free(0 if faults.active("destroy-leaks-pages") else cell.data_pages)
            self._dump_stats("after cell destruction")
            self._reconfig_completed()
        finally:
            self._cell_resume(self.root, cpu_data)
        return 0

    def _hc_cell_get_state(self, cpu_data: PerCpu, cell_id: int, _arg2: int) -> int:
        """``cell_get_state``."""
        if cpu_data.cell is not self.root:
            raise HvError(Errno.EPERM, "get_state from a non-root cell")
        cell = self.cell_by_id(cell_id)
        if cell is None:
            raise HvError(Errno.ENOENT, f"no cell with id {cell_id}")
        state = cell.state
        if state not in CellState._value2member_map_:
            raise HvError(Errno.EINVAL, f"cell state {state}")
        return state

    def _hc_get_info(self, _cpu_data: PerCpu, info_type: int, _arg2: int) -> int:
        """``hypervisor_get_info`` (any cell may ask)."""
        if info_type == InfoType.MEM_POOL_SIZE:
            return self.mem_pool.size
        if info_type == InfoType.MEM_POOL_USED:
            return self.mem_pool.used
        if info_type == InfoType.REMAP_POOL_SIZE:
            return self.remap_pool.size
        if info_type == InfoType.REMAP_POOL_USED:
            return self.remap_pool.used
        if info_type == InfoType.NUM_CELLS:
            return len(self.cells)
        raise HvError(Errno.EINVAL, f"info type {info_type}")

    def _hc_cpu_get_info(self, cpu_data: PerCpu, cpu_id: int, info_type: int) -> int:
        """``cpu_get_info``."""
        if not self._cpu_id_valid(cpu_id):
            raise HvError(Errno.EINVAL, f"CPU {cpu_id}")
        if cpu_data.cell is not self.root and cpu_id not in cpu_data.cell.cpus:
            raise HvError(Errno.EPERM, f"CPU {cpu_id} is not the caller's")
        target = self.cpus[cpu_id]
        if info_type == CPU_INFO_STATE:
            return CpuInfoState.FAILED if target.failed else CpuInfoState.RUNNING
        if CPU_INFO_STAT_BASE <= info_type < CPU_INFO_STAT_BASE + NUM_CPU_STATS:
            return target.stats[info_type - CPU_INFO_STAT_BASE] & CPU_STAT_MASK
        raise HvError(Errno.EINVAL, f"CPU info type {info_type}")

    def _hc_putc(self, cpu_data: PerCpu, char: int, _arg2: int) -> int:
        """``DEBUG_CONSOLE_PUTC``."""
        if not cpu_data.cell.config.flags & CELL_VCON_PERMITTED:
            raise HvError(Errno.EPERM, "virtual console not permitted")
        self.console.write(chr(char & 0xFF))
        return 0

    def _hc_disable(self, cpu_data: PerCpu, _arg1: int, _arg2: int) -> int:
        """``hypervisor_disable``: every root CPU calls it; the last one shuts down.

        The barrier of Jailhouse (all online CPUs arrive before any leaves) becomes: calls
        before the last return 0 at once; the last arrival runs the common shutdown and
        prints every CPU's release line, in arrival order.
        """
        root = self.root
        if cpu_data.cell is not root:
            raise HvError(Errno.EPERM, "disable from a non-root cell")
        if cpu_data.shutdown_state == ShutdownState.NONE:
            state = int(ShutdownState.STARTED) if len(self.cells) == 1 else -int(Errno.EBUSY)
            for cpu in root.cpus:
                self.cpus[cpu].shutdown_state = state
        if cpu_data.shutdown_state != ShutdownState.STARTED:
            result = cpu_data.shutdown_state
            cpu_data.shutdown_state = int(ShutdownState.NONE)
            return result
        if cpu_data.cpu_id not in self._shutdown_arrivals:
            self._shutdown_arrivals.append(cpu_data.cpu_id)
        if len(self._shutdown_arrivals) < len(self.online_cpus):
            return 0
        self.console.write(MSG_SHUTTING_DOWN)
        self.units.shutdown()
        self.arch.shutdown()
        for cpu in self._shutdown_arrivals:
            self.console.printk(MSG_RELEASING, cpu)
            self.cpus[cpu].shutdown_state = int(ShutdownState.NONE)
        self._shutdown_arrivals = []
        self.state = HvState.SHUT_DOWN
        return 0

    # -- RAM accesses that would not exit --------------------------------------------------

    def _ram_access(self, cell: Cell, phys: int, size: int, is_write: bool, value: int) -> ExitResult:
        if phys >= COMM_PAGE_PHYS_BASE:
            offset = phys - COMM_PAGE_PHYS_BASE - cell.id * PAGE_SIZE
            page = cell.comm_page
            if is_write:
                page[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                return EXIT_DONE
            return ExitResult(True, int.from_bytes(page[offset : offset + size], "little"))
        if is_write:
            self.arch.phys_write(phys, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            return EXIT_DONE
        return ExitResult(True, int.from_bytes(self.arch.phys_read(phys, size), "little"))
