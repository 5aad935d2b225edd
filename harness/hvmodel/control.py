"""The hypervisor control plane; models ``hypervisor/control.c`` (its hypercalls) and
``include/jailhouse/control.h``, plus the exit entry of ``hypervisor/arch/x86/vcpu.c``.

:class:`Hypervisor` is one hypervisor instance: the state and the shared operations of
:class:`~harness.hvmodel.core.HypervisorCore` (cells, CPUs, page pools, units, console),
and the entry points a machine needs:

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
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from . import bootstrap, faults, pio
from .abi import (
    CELL_DESC,
    CELL_DESC_SIZE,
    CELL_VIRTUAL_CONSOLE_ACTIVE,
    CELL_VIRTUAL_CONSOLE_PERMITTED,
    COMM_PAGE_SIZE,
    COMM_REGION_ABI_REVISION,
    COMM_REGION_SIGNATURE,
    CPU_INFO_STAT_BASE,
    CPU_INFO_STATE,
    CPU_STAT_MASK,
    CPUID_1_ECX_HYPERVISOR,
    CPUID_1_ECX_OSXSAVE,
    CPUID_1_ECX_VMX,
    CPUID_80000001_ECX_SVM,
    JAILHOUSE_CPUID_FEATURES,
    JAILHOUSE_CPUID_SIGNATURE,
    JAILHOUSE_CPUID_SIGNATURE_REGS,
    MAX_CPU_SET_SIZE,
    MEM_LOADABLE,
    MEM_READ,
    MEM_WRITE,
    NUM_CPU_STATS,
    PAGE_SIZE,
    CellState,
    CommFlag,
    CommRegion,
    CpuInfoState,
    CpuStat,
    Hypercall,
    InfoType,
    Message,
    comm_write,
    config_size,
)
from .cell import Cell
from .core import COMM_PAGE_PHYS_BASE, HvState, HypervisorCore, ModelStateError
from .errors import Errno, HvError
from .mmio import MmioResult
from .paging import NUM_TEMPORARY_PAGES, pages
from .params import HvParams
from .percpu import EXIT_DONE, EXIT_FAILED, ExitResult, PerCpu, ShutdownState
from .printk import (
    FATAL_MMIO,
    MSG_CAN_BE_LOADED,
    MSG_CLOSING,
    MSG_CREATED,
    MSG_RELEASING,
    MSG_SHUTTING_DOWN,
    MSG_STARTED,
    MSG_UNKNOWN_HYPERCALL,
)

if TYPE_CHECKING:
    from .arch import Arch
    from .config import SystemConfig

__all__ = ["ExitResult", "HvParams", "HvState", "Hypervisor", "ModelStateError"]

LOG = logging.getLogger(__name__)

_STAT_TOTAL: Final = int(CpuStat.VMEXITS_TOTAL)
_STAT_HYPERCALL: Final = int(CpuStat.VMEXITS_HYPERCALL)


class Hypervisor(HypervisorCore):
    """One Jailhouse hypervisor instance: its entry points.

    Lifecycle: built DISABLED; :meth:`enable` builds the root cell and makes it ENABLED;
    the DISABLE hypercall on every root CPU makes it SHUT_DOWN. A new enable needs a new
    instance (as a new ``jailhouse enable`` loads a fresh hypervisor image).

    :param system: the system configuration
    :param arch: the machine underneath (executor or oracle)
    :param params: machine and build facts
    """

    def __init__(self, system: SystemConfig, arch: Arch, *, params: HvParams | None = None) -> None:
        super().__init__(system, arch, params=params)
        self._shutdown_arrivals: list[int] = []
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
            result = pio.handle(self, self.pci, cell, port, size, is_write, value, rep)
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
        if leaf == JAILHOUSE_CPUID_SIGNATURE:
            return JAILHOUSE_CPUID_SIGNATURE_REGS
        if leaf == JAILHOUSE_CPUID_FEATURES:
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

    def count_exit(self, cpu: int, stat: CpuStat, count: int = 1) -> None:
        """Count exits the executor handled itself (CPUID, MSR, CR, XSETBV, PCI
        configuration ports of devices outside the cell ...).

        Increments ``stat`` and ``VMEXITS_TOTAL`` (``stat`` = TOTAL counts once) by
        ``count``.
        """
        with self._lock:
            cpu_data = self._running_cpu(cpu, "count_exit")
            cpu_data.count(CpuStat.VMEXITS_TOTAL, count)
            if stat is not CpuStat.VMEXITS_TOTAL:
                cpu_data.count(stat, count)

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
        fields = CELL_DESC.unpack_from(header)
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
            if cell.config.flags & CELL_VIRTUAL_CONSOLE_PERMITTED:
                flags |= CommFlag.DBG_PUTC_PERMITTED
            if cell.config.flags & CELL_VIRTUAL_CONSOLE_ACTIVE:
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
            stat = CpuStat(info_type - CPU_INFO_STAT_BASE)
            # plus the exits the machine handled below the model (u32 counters, as stats[])
            below = self.arch.cpu_exit_counts(cpu_id).get(stat, 0) if target.cell is not self.root else 0
            return (target.stats[stat] + below) & 0xFFFFFFFF & CPU_STAT_MASK
        raise HvError(Errno.EINVAL, f"CPU info type {info_type}")

    def _hc_putc(self, cpu_data: PerCpu, char: int, _arg2: int) -> int:
        """``DEBUG_CONSOLE_PUTC``."""
        if not cpu_data.cell.config.flags & CELL_VIRTUAL_CONSOLE_PERMITTED:
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
