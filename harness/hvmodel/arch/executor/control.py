"""The executor's :class:`~harness.hvmodel.arch.Arch`: the model's cells as KVM VMs in the
lab's root cell; stands where ``hypervisor/arch/x86/{control,setup}.c`` are
(``arch_init_*``, ``arch_cell_create``, ``arch_cell_destroy``, ``arch_config_commit``,
``arch_shutdown``).

:class:`ExecutorArch` ties the executor's parts together and keeps its lifecycle; each
hook is carried out by one part:

========================  ==============================================================
part                      hooks
========================  ==============================================================
:mod:`.vcpu_loop`         ``park_cpu``, ``reset_cpu``, ``suspend_cpu``, ``resume_cpu``;
                          the threads that run the vCPUs
:mod:`.exits`             what the threads do with each exit (to the model's entry points)
:mod:`.cellports`         PCI configuration ports of absent devices, UART capture
:mod:`.memory`            ``map_memory_region``, ``unmap_memory_region``, comm pages,
                          ``phys_read``, ``phys_write``
:mod:`.interrupts`        ``send_msi``, ``ioapic_read``, ``ioapic_write``, the IOAPIC EOI
                          register (``mmio_write``); the cells' pins (created with the
                          VM, connected at ``config_commit``, released at destroy)
:mod:`.devices`           ``mmio_read``, ``mmio_write``, ``pci_read_config``,
                          ``pci_write_config``, ``pci_add_device``, ``pci_remove_device``
:mod:`.console`           ``console_write``
here                      ``init``, ``shutdown``, ``cell_create``, ``cell_destroy``,
                          ``config_commit``, ``wait_for_reply``, ports, root buffers
========================  ==============================================================

**Cells**: one KVM VM per non-root cell, with a split irqchip or, where KVM lacks it, the
full in-kernel irqchip. Each cell CPU's thread is pinned to that CPU; the CPU is taken
from the root's scheduling with a cgroup v2 cpuset
(:class:`~harness.hvmodel.arch.cpuset.RootCpuset`) at create and given back at destroy
(the group stays, with every CPU, until :meth:`ExecutorArch.shutdown` removes it).
Destroy stops and joins the threads and closes the VM; nothing stays open. The root cell
is not virtualized: its hooks only keep books.

**Messages**: :meth:`ExecutorArch.wait_for_reply` polls the comm page with a monotonic
deadline (exponential back-off from 0.2 ms to 5 ms); when the cell approved a shutdown
request (or timed out) it quiesces the cell's CPUs (:meth:`.vcpu_loop.VcpuThreads.quiesce`).

**A keeper VM.** From :meth:`ExecutorArch.init` to :meth:`ExecutorArch.shutdown` an idle
VM with one never-run vCPU exists, so that creating and destroying cells never flips
KVM's global static keys (live kernel-text patching of the scheduler's hot path), which
under the lab's TCG wedged the root's kernel within a few dozen create/destroy cycles
(see :meth:`ExecutorArch._keeper`).

**Not done here**: CAT.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from ...abi import PAGE_SIZE, CellState, CommOffset, CpuStat, Message, Reply, comm_read_u32
from ...errors import Errno, HvError
from .. import RootBuffers, xen
from ..cpuset import RootCpuset
from ..gsi import GSI_DEVICE
from ..kvm import (
    Cap,
    CpuidEntry,
    Kvm,
    KvmError,
    Vm,
    install_kick_handler,
    kick_handler_installed,
)
from ..kvm.structs import (
    KVM_MSR_EXIT_REASON_INVAL,
    KVM_MSR_EXIT_REASON_UNKNOWN,
)
from ..passthrough import Passthrough
from ..portio import PortIo, open_ports
from ..vcpu import apic_khz, jailhouse_vcpu_setup, measure_tsc_khz
from ..vfio import MsiRouter
from ..xsave import limit_xsave, usable_xcr0
from .cellports import CellPortsSync, cell_ports, console_view
from .cells import CellCpu, CellTable, CellVm, ExecutorStateError
from .console import DebugUart
from .devices import DeviceAccess
from .exits import ExitDispatcher, ExitHandler, KernelExits
from .host import cpu_vendor, describe_host, online_cpus, x2apic_mode
from .interrupts import InterruptRouter
from .memory import CellMemory, MmioWindows
from .vcpu_loop import VcpuThreads

if TYPE_CHECKING:
    from ...config import CellConfig, MemoryRegion, PciDevice, SystemConfig
    from ...driver import HostInfo

__all__ = ["ExecutorArch"]

LOG = logging.getLogger(__name__)

#: where KVM may put the real-mode TSS on VMX without unrestricted guest (runner's choice)
TSS_ADDRESS: Final = 0xFFFBD000
#: GSI routes of the split irqchip (KVM_CAP_SPLIT_IRQCHIP's argument)
SPLIT_IRQCHIP_ROUTES: Final = 24
#: seconds a destroy waits for a cell's vCPU threads to stop
STOP_TIMEOUT: Final = 5.0
#: comm page polling: first and longest pause (seconds)
POLL_MIN: Final = 0.0002
POLL_MAX: Final = 0.005


class _State(enum.Enum):
    NEW = "new"
    READY = "ready"
    SHUT_DOWN = "shut down"


class ExecutorArch:
    """The :class:`~harness.hvmodel.arch.Arch` that runs cells on KVM (module docstring).

    Plugging in: build it (in the main thread: it installs the vCPU kick handler), pass
    it to the :class:`~harness.hvmodel.driver.Driver` (or the
    :class:`~harness.hvmodel.control.Hypervisor`), and :meth:`attach` where exits go:
    ``arch.attach(lambda: driver.hv)`` or ``arch.attach(hv)``. The model calls the hooks;
    the executor's vCPU threads call back into :meth:`Hypervisor.handle_pio`,
    :meth:`~Hypervisor.handle_mmio`, :meth:`~Hypervisor.panic_park`,
    :meth:`~Hypervisor.count_exit` and :meth:`~Hypervisor.hypercall` (the only way anything
    here reaches the model). :meth:`host_info` describes the lab's Linux for the driver
    (TSC and APIC timer frequencies as KVM presents them to cells).

    Lifecycle: built (main thread: installs the kick signal handler) -> :meth:`attach`
    -> :meth:`init` (at enable: opens KVM and the ports, puts this process in the root
    cgroup) -> cell hooks -> :meth:`shutdown` (at disable: stops what is left, releases
    the cpuset, closes everything). One instance serves one hypervisor.

    :param mem_device: the physical-memory device (a plain file in unit tests)
    :param ports: the port backend (default: :func:`~harness.hvmodel.arch.portio.open_ports`
        at :meth:`init`)
    :param port_mode: ``auto``, ``native`` or ``devport`` when ``ports`` is None
    :param cpuset: how the root's tasks are kept off cell CPUs (default: a
        :class:`~harness.hvmodel.arch.cpuset.RootCpuset` on ``/sys/fs/cgroup``; None when
        ``isolate`` is off)
    :param isolate: take cell CPUs from the root's scheduling at all
    :param pin_cpus: pin each vCPU thread to its CPU
    :param console_port: the debug UART (8250 on PIO) for hypervisor console text; None:
        the system config's debug console when it is an 8250 on PIO
    :param console: write the hypervisor console to a UART at all
    :param vendor: ``amd`` or ``intel`` for the FATAL wording (default: from
        ``/proc/cpuinfo``)
    :param reply_wait_limit: longest :meth:`wait_for_reply` wait in seconds even when the
        cell config has no ``msg_reply_timeout`` (Jailhouse then waits forever); None:
        as Jailhouse
    :param kvm_path: the KVM device
    :param pci_sysfs: where PCI devices' config files are (``/sys/bus/pci/devices``)
    :param stop_timeout: seconds :meth:`cell_destroy` waits for a cell's threads
    :param native_pio: serve the port I/O a cell's I/O bitmap opens in machine code
        (:class:`~harness.hvmodel.arch.portio.IoBitmapLoop`; native ports only); off:
        every exit in Python
    :param passthrough: the VFIO side for cells' physical PCI devices (default: a
        :class:`~harness.hvmodel.arch.passthrough.Passthrough`)
    :param rebind_released: give a device a cell released back to its original root
        driver (Jailhouse leaves it unbound; ignored with ``passthrough``)
    :param exit_trace: count the exits KVM handles in the kernel (CPUID, MSRs, CR
        writes ...) as Jailhouse counts them, and keep the exit a CPU failed at, through
        KVM's tracepoints (:mod:`~harness.hvmodel.arch.exitstats`); off: ``cell stats``
        shows only the exits that reach the model
    :param gsi_device: the ``jhlab_gsi`` module's device, through which cells take the
        root's interrupt lines of their IOAPIC pins (:mod:`~harness.hvmodel.arch.gsi`)
    """

    def __init__(
        self,
        *,
        mem_device: str = "/dev/mem",
        ports: PortIo | None = None,
        port_mode: str = "auto",
        cpuset: RootCpuset | None = None,
        isolate: bool = True,
        pin_cpus: bool = True,
        console_port: int | None = None,
        console: bool = True,
        vendor: str | None = None,
        reply_wait_limit: float | None = None,
        kvm_path: str = "/dev/kvm",
        pci_sysfs: str = "/sys/bus/pci/devices",
        stop_timeout: float = STOP_TIMEOUT,
        native_pio: bool = True,
        passthrough: Passthrough | None = None,
        rebind_released: bool = False,
        exit_trace: bool = True,
        gsi_device: str = GSI_DEVICE,
    ) -> None:
        if vendor not in (None, "amd", "intel"):
            raise ValueError(f"vendor {vendor!r}: expected 'amd' or 'intel'")
        # Direct configuration
        self.mem_device = mem_device
        self.port_mode = port_mode
        self.vendor = vendor or cpu_vendor() or "intel"
        self.reply_wait_limit = reply_wait_limit
        self.kvm_path = kvm_path
        self.stop_timeout = stop_timeout
        self.cpuset: RootCpuset | None = (cpuset or RootCpuset()) if isolate else None
        self.passthrough = passthrough or Passthrough(rebind=rebind_released)
        # Runtime state
        self._state = _State.NEW
        self._ports = ports
        self._own_ports = ports is None
        self._kvm: Kvm | None = None
        self._keeper_vm: Vm | None = None
        self._supported_cpuid: list[CpuidEntry] | None = None
        self._system: SystemConfig | None = None
        self._root_id = 0
        self._zombies: list[threading.Thread] = []
        self._buffers = RootBuffers()
        self._xen_hypercalls = False
        #: why the root's tasks are not kept off the cell CPUs (None: they are)
        self.isolation_problem: str | None = None
        self._kernel_exits = KernelExits(enabled=exit_trace)
        # The parts (see the module docstring)
        self._table = CellTable()
        self._exits = ExitDispatcher(vendor=self.vendor, ports=lambda: self._ports, native_pio=native_pio)
        self._threads = VcpuThreads(self._table, self._exits, pin=pin_cpus, trace=self._kernel_exits.open)
        self._windows = MmioWindows(mem_device)
        self._memory = CellMemory(self._table, mem_device, self.passthrough)
        self._interrupts = InterruptRouter(self._table, self._windows, self.passthrough,
                                           gsi_device=gsi_device)
        self._exits.on_ioapic_eoi = lambda cpu, vector: self._interrupts.eoi(cpu.cell.id, vector)
        self._devices = DeviceAccess(
            self._table, self._windows, self._memory, self.passthrough,
            pci_sysfs=pci_sysfs,
            pci_domain=lambda: self._system.pci_domain if self._system is not None else 0,
        )  # fmt: skip
        self._console = DebugUart(port=console_port, enabled=console, port_mode=port_mode)
        if threading.current_thread() is threading.main_thread():
            install_kick_handler()

    def __repr__(self) -> str:
        return f"ExecutorArch(state={self._state.value!r}, cells={sorted(self._table.cells)})"

    # ===================================================================================
    # plumbing
    # ===================================================================================

    def attach(self, target: ExitHandler | Callable[[], ExitHandler | None]) -> None:
        """Tell the executor where exits go.

        :param target: the hypervisor, or a callable returning the current one (e.g.
            ``lambda: driver.hv``; None while disabled)
        """
        self._exits.attach(target)

    @property
    def xen_hypercalls(self) -> bool:
        """Whether cells' hypercalls reach the model (``KVM_CAP_XEN_HVM``)."""
        return self._xen_hypercalls

    def _require(self, operation: str) -> None:
        if self._state is not _State.READY:
            raise ExecutorStateError(operation, self._state.value)

    def _is_root(self, cell_id: int) -> bool:
        return cell_id == self._root_id

    # ===================================================================================
    # bring-up and shutdown
    # ===================================================================================

    def init(self, system: SystemConfig) -> None:
        """Open KVM and the ports; keep this process in the root cgroup (``arch_init``).

        :raise HvError: ``ENODEV`` without KVM or an in-kernel local APIC, errors of the
            port backend
        :raise ExecutorStateError: when called twice
        """
        if self._state is not _State.NEW:
            raise ExecutorStateError("init", self._state.value)
        if not kick_handler_installed():
            if threading.current_thread() is not threading.main_thread():
                raise HvError(
                    Errno.EINVAL,
                    "no vCPU kick handler: build ExecutorArch (or call "
                    "kvm.install_kick_handler()) in the main thread",
                )
            install_kick_handler()
        with contextlib.ExitStack() as undo:
            undo.callback(self._close_kvm)
            kvm, _keeper = self._open_kvm()
            kvm.require(Cap.USER_MEMORY, Cap.MP_STATE)
            supported = kvm.supported_cpuid()
            # CPUID leaves 1, 7 and 0xD as the XCR0 a guest can really keep here
            xcr0 = usable_xcr0(kvm, supported)
            supported = limit_xsave(supported, xcr0)
            if self._ports is None:
                pm_timer = system.x86.pm_timer_address
                ports = open_ports(range(pm_timer, pm_timer + 4) if pm_timer else (), mode=self.port_mode)
                undo.callback(ports.close)
                self._ports = ports
            self.isolation_problem = self._prepare_isolation()
            if self.isolation_problem is not None:
                LOG.warning("cell CPUs stay in the root's scheduling: %s", self.isolation_problem)
            x2apic_host = x2apic_mode()
            self._kernel_exits.prepare(self.vendor, x2apic_host=x2apic_host)
            self._exits.x2apic_emulated = not x2apic_host
            undo.pop_all()
        self._supported_cpuid = supported
        self._system = system
        self._root_id = system.root_cell.id
        self._memory.readonly_slots = bool(kvm.check_extension(Cap.READONLY_MEM))
        self.passthrough.domain = system.pci_domain
        self._console.pick(system)
        self._state = _State.READY
        self._update_isolation()  # the root's tasks into their group, every CPU still theirs
        LOG.info(
            "executor ready: %s ports, vendor %s, XCR0 %#x, exits in KVM %s, hypercalls %s, "
            "debug UART %s",
            self._ports.mode if self._ports else "no",
            self.vendor,
            xcr0,
            self._kernel_exits.describe(),
            "via KVM_EXIT_XEN" if self._xen_hypercalls else "answered by KVM (no CONFIG_KVM_XEN)",
            f"{self._console.base:#x}" if self._console.base is not None else "none",
        )

    def _open_kvm(self) -> tuple[Kvm, Vm]:
        """``/dev/kvm`` and the keeper VM, opened once (by :meth:`host_info` or :meth:`init`).

        :raise KvmError: without KVM or an in-kernel local APIC (``ENODEV``)
        """
        if self._kvm is None or self._keeper_vm is None:
            kvm = Kvm(self.kvm_path)
            try:
                if not (kvm.check_extension(Cap.SPLIT_IRQCHIP) or kvm.check_extension(Cap.IRQCHIP)):
                    raise KvmError("KVM_CHECK_EXTENSION", errno.ENODEV, "no in-kernel local APIC")
                # Before the keeper: it takes the intercept too (see ..xen).
                self._xen_hypercalls = xen.intercept_available(kvm)
                keeper = self._keeper(kvm)
            except BaseException:
                kvm.close()
                raise
            self._kvm, self._keeper_vm = kvm, keeper
        return self._kvm, self._keeper_vm

    def _close_kvm(self) -> None:
        if self._keeper_vm is not None:
            self._keeper_vm.close()
            self._keeper_vm = None
        if self._kvm is not None:
            self._kvm.close()
            self._kvm = None

    def host_info(self) -> HostInfo:
        """The lab's Linux for the :class:`~harness.hvmodel.driver.Driver` (see
        :func:`~.host.host_info`), measured on this executor's keeper vCPU, so that no
        extra VM comes and goes: call it before :meth:`init`, in place of the module
        function.

        :raise KvmError: without KVM
        """
        if self._state is _State.SHUT_DOWN:
            raise ExecutorStateError("host_info", self._state.value)
        kvm, keeper = self._open_kvm()
        return describe_host(measure_tsc_khz(keeper.vcpus[0]), apic_khz(kvm))

    def _keeper(self, kvm: Kvm) -> Vm:
        """An idle VM with one never-run vCPU, alive as long as the executor.

        KVM's first VM enables virtualization on every CPU and its last one disables it
        again (IPIs to all CPUs), and the first and last VM (or software-disabled local
        APIC) flip global static keys (``preempt_notifier_key``, ``apic_sw_disabled``),
        i.e. patch live kernel text, the scheduler's hot path included. Under QEMU's TCG,
        the lab's accelerator, such a transition right after nested guests ran wedged the
        root's kernel now and then (a CPU looping on the text-patching int3 with
        interrupts off, the patcher waiting for it forever: RCU stalls, soft lockups),
        within a few dozen cell create/destroy cycles. The keeper keeps KVM above zero
        VMs for the executor's lifetime, so cells never cause a transition; the
        executor's own start and end still do (a lab that holds a VM open for its whole
        life has none at all).
        """
        keeper = Vm(kvm)
        try:
            self._setup_vm(kvm, keeper)
            keeper.create_vcpu(0)
        except BaseException:
            keeper.close()
            raise
        return keeper

    def _prepare_isolation(self) -> str | None:
        """Check the cpuset and keep this process in the root cgroup; the problem, if any."""
        if self.cpuset is None:
            return "isolation off"
        if not self.cpuset.available:
            return f"no cgroup2 cpuset controller at {self.cpuset.root}"
        try:
            self.cpuset.adopt()
        except OSError as exc:
            return f"cannot move the hypervisor to the root cgroup: {exc}"
        return None

    def shutdown(self) -> None:
        """Stop every cell left, release the cpuset, close all devices (``arch_shutdown``);
        idempotent, never raises."""
        if self._state is _State.SHUT_DOWN:
            return
        for cell_id in list(self._table.cells):
            self._interrupts.release(cell_id)
        self.passthrough.shutdown()
        for cell_id in list(self._table.cells):
            try:
                self.cell_destroy(cell_id)
            except Exception:  # teardown goes on
                LOG.exception("stopping cell %d at shutdown", cell_id)
        deadline = time.monotonic() + self.stop_timeout
        for zombie in self._zombies:
            zombie.join(max(deadline - time.monotonic(), 0.0))
        self._zombies = [z for z in self._zombies if z.is_alive()]
        if self._zombies:
            LOG.warning("%d vCPU threads still inside the model at shutdown", len(self._zombies))
        if self.cpuset is not None:
            self.cpuset.release()
        self._windows.close()
        self._devices.close()
        self._memory.comm_page_free_all()
        if self._ports is not None and self._own_ports:
            self._ports.close()
            self._ports = None
        self._close_kvm()
        self._state = _State.SHUT_DOWN

    # ===================================================================================
    # cells
    # ===================================================================================

    def cell_create(self, cell_id: int, config: CellConfig) -> None:
        """One VM with a vCPU and a parked thread per CPU; the CPUs leave the root's
        scheduling (``arch_cell_create``).

        :raise HvError: the KVM error (``ENOMEM``, ``ENOSPC`` ...) or ``ENODEV``
        """
        self._require("cell_create")
        if self._is_root(cell_id):
            return
        kvm = self._kvm
        assert kvm is not None  # READY
        vm = Vm(kvm)
        ports = cell_ports(config)
        try:
            split = self._setup_vm(kvm, vm)
            cell = CellVm(cell_id, config, vm, MsiRouter(vm, irqchip_defaults=not split), ports=ports)
            supported = self._supported_cpuid
            for cpu_id in sorted(config.cpus):
                vcpu = vm.create_vcpu(cpu_id)
                jailhouse_vcpu_setup(vcpu, supported)
                cell.cpus[cpu_id] = CellCpu(cpu_id, cell, vcpu, ports_sync=CellPortsSync(cpu_id, ports))
        except BaseException:
            vm.close()
            raise
        cell.subpage_ranges = tuple(
            (mem.phys_start, mem.phys_start + mem.size)
            for mem in config.memory_regions
            if mem.size and (mem.virt_start | mem.size) & (PAGE_SIZE - 1)
        )
        cell.ioapic_pins = frozenset(
            (chip.address, pin) for chip in config.irqchips for pin in chip.pins
        )
        self._interrupts.cell_created(cell, split_irqchip=split)
        self._threads.add(cell)
        self._update_isolation()
        LOG.info("cell %d (%s): VM with CPUs %s", cell_id, config.name, sorted(cell.cpus))

    def _setup_vm(self, kvm: Kvm, vm: Vm) -> bool:
        """Irqchip, TSS, user-space MSRs, hypercall interception; whether the irqchip is
        split."""
        split = bool(kvm.check_extension(Cap.SPLIT_IRQCHIP))
        if split:
            vm.create_split_irqchip(SPLIT_IRQCHIP_ROUTES)
        else:
            vm.create_irqchip()
        if self.vendor == "intel" and kvm.check_extension(Cap.SET_TSS_ADDR):
            vm.set_tss_addr(TSS_ADDRESS)
        if kvm.check_extension(Cap.X86_USER_SPACE_MSR):
            vm.enable_cap(
                Cap.X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL
            )
        if self._xen_hypercalls:
            xen.intercept_hypercalls(vm)
        return split

    def cell_destroy(self, cell_id: int) -> None:
        """Stop and join the cell's threads, close its VM and slots, give its CPUs back
        (``arch_cell_destroy``); cannot fail.

        A thread that is inside a call into the model cannot end while the caller holds
        the model's lock; it is left to a reaper thread, which closes the VM after it.
        """
        if self._is_root(cell_id):
            return
        removed = self._threads.remove(cell_id)
        if removed is None:
            return
        cell, busy = removed
        self._interrupts.release(cell_id)  # the root's lines go back before anything else
        for passed in self.passthrough.devices_of(cell_id):  # the model gave them back already
            self.passthrough.detach(passed.bdf)
        self.passthrough.release_detached()
        cell.router.close()
        busy = self._threads.join(cell, busy, self.stop_timeout)
        if busy:
            LOG.warning(
                "cell %d: CPUs %s still busy at destroy; closing the VM when they stop",
                cell_id,
                sorted(cpu.id for cpu in busy),
            )
            reaper = threading.Thread(
                target=self._reap, args=(cell, busy), name=f"cell{cell_id}-reaper", daemon=True
            )
            self._zombies.append(reaper)
            reaper.start()
        else:
            self._memory.release(cell)
        self._update_isolation()
        LOG.info("cell %d destroyed", cell_id)

    def _reap(self, cell: CellVm, busy: list[CellCpu]) -> None:
        for cpu in busy:
            if cpu.thread is not None:
                cpu.thread.join()
        self._memory.release(cell)

    def _update_isolation(self) -> None:
        """The root's tasks on the CPUs no cell holds (:mod:`~harness.hvmodel.arch.cpuset`).

        The group is made at :meth:`init`, with every CPU, and kept until
        :meth:`shutdown`: moving a task into a cpuset is the expensive part (the kernel
        waits for an RCU grace period per task), so it is done once at enable, and a
        create/destroy cycle costs one write of ``cpuset.cpus`` (plus moving new
        processes).
        """
        cpuset = self.cpuset
        if cpuset is None or self.isolation_problem is not None or self._system is None:
            return
        taken = {cpu for cell in self._table.snapshot() for cpu in cell.cpus}
        try:
            cpus = online_cpus() or frozenset(self._system.root_cell.cpus)
            cpuset.apply(cpus - taken)
        except (OSError, ValueError) as exc:
            LOG.warning("cannot keep the root's tasks off CPUs %s: %s", sorted(taken), exc)

    def cell_reset(self, cell_id: int) -> None:
        """Nothing to do: the model filled the comm region; each CPU resets itself."""

    def comm_page_alloc(self, cell_id: int) -> memoryview:
        """A zeroed anonymous page: the model's view, and the guest's at the COMM_REGION."""
        return self._memory.comm_page_alloc(cell_id)

    def comm_page_free(self, cell_id: int) -> None:
        """Drop the page (unmapped once the model's view of it is gone too)."""
        self._memory.comm_page_free(cell_id)

    def map_memory_region(self, cell_id: int, region: MemoryRegion) -> None:
        """A KVM memory slot at ``virt_start`` (``arch_map_memory_region``; :mod:`.memory`).

        :raise HvError: the mapping's or KVM's error (``EPERM`` for RAM outside the
            reserved window, ``EINVAL`` for unaligned regions ...)
        """
        self._require("map_memory_region")
        self._memory.map_region(cell_id, region)

    def unmap_memory_region(self, cell_id: int, region: MemoryRegion) -> None:
        """Delete the region's memory slot and its ``/dev/mem`` mapping."""
        self._memory.unmap_region(cell_id, region)

    def config_commit(self, cell_id: int | None) -> None:
        """Release the devices cells gave back (the operation is complete: see
        :mod:`~harness.hvmodel.arch.passthrough`); a cell just created gets the lines of
        its IOAPIC pins (``ioapic_config_commit``: from now on the root lacks them; see
        :mod:`.interrupts`). Nothing to flush, KVM keeps guest TLBs and NPT/EPT
        consistent with the slots."""
        self.passthrough.release_detached()
        if cell_id is not None:
            self._interrupts.connect(cell_id)

    # ===================================================================================
    # CPUs
    # ===================================================================================

    def park_cpu(self, cpu: int) -> None:
        """The CPU's thread stops entering the guest until :meth:`reset_cpu`."""
        self._threads.park(cpu)

    def reset_cpu(self, cpu: int, cell_id: int, reset_address: int) -> None:
        """The CPU's thread puts its vCPU in Jailhouse's start state and runs it."""
        self._threads.reset(cpu, reset_address)

    def suspend_cpu(self, cpu: int) -> None:
        """Hold the CPU: no guest code, no exit delivered, until :meth:`resume_cpu`."""
        self._threads.suspend(cpu)

    def resume_cpu(self, cpu: int) -> None:
        """Let a suspended CPU go on."""
        self._threads.resume(cpu)

    @property
    def exit_trace_problem(self) -> str | None:
        """Why the exits KVM handles are not counted (None: they are, after :meth:`init`)."""
        return self._kernel_exits.problem

    def cpu_exit_counts(self, cpu: int) -> Mapping[CpuStat, int]:
        """The exits of a cell CPU the model has not counted (:meth:`CellCpu.uncounted_exits`);
        none for a root CPU."""
        with self._table.cond:
            data = self._table.cpus.get(cpu)
        return data.uncounted_exits() if data is not None else {}

    # ===================================================================================
    # messages
    # ===================================================================================

    def wait_for_reply(self, cell_id: int, comm_page: memoryview, timeout: float | None) -> bool:
        """Poll the comm page until the cell answered, with a monotonic deadline.

        :param timeout: seconds, None = no limit (then :attr:`reply_wait_limit`, if set)
        :return: False when the deadline passed without an answer
        """
        limit = timeout
        if self.reply_wait_limit is not None:
            limit = self.reply_wait_limit if limit is None else min(limit, self.reply_wait_limit)
        deadline = None if limit is None else time.monotonic() + limit
        message = comm_read_u32(comm_page, CommOffset.MSG_TO_CELL)
        pause = POLL_MIN
        while True:
            state = comm_read_u32(comm_page, CommOffset.CELL_STATE)
            reply = comm_read_u32(comm_page, CommOffset.REPLY_FROM_CELL)
            if reply != Reply.NONE or state in (CellState.SHUT_DOWN, CellState.FAILED):
                answered = True
                break
            now = time.monotonic()
            if (deadline is not None and now >= deadline) or self._state is _State.SHUT_DOWN:
                answered = False
                break
            time.sleep(pause if deadline is None else min(pause, deadline - now))
            pause = min(pause * 2, POLL_MAX)
        shutting_down = reply == Reply.REQUEST_APPROVED or (
            message == Message.SHUTDOWN_REQUEST and state in (CellState.SHUT_DOWN, CellState.FAILED)
        )
        if shutting_down or not answered:
            # The model suspends the cell next (approved request, or timeout: FAILED).
            self._threads.quiesce(cell_id)
        return answered

    # ===================================================================================
    # hardware the cells reach through the hypervisor
    # ===================================================================================

    def _port_backend(self) -> PortIo:
        if self._ports is None:
            raise ExecutorStateError("port access", self._state.value)
        return self._ports

    def pio_read(self, port: int, size: int) -> int:
        """Read the real port (whitelisted for the cell, or the PM timer)."""
        return self._port_backend().read(port, size)

    def pio_write(self, port: int, size: int, value: int) -> None:
        """Write the real port."""
        self._port_backend().write(port, size, value)

    def mmio_read(self, address: int, size: int) -> int:
        """One uncached read of host-physical MMIO (:mod:`.devices`)."""
        return self._devices.mmio_read(address, size)

    def mmio_write(self, address: int, size: int, value: int) -> None:
        """One uncached write of host-physical MMIO, under the root hardware policy; the
        EOI register of an IOAPIC cells have pins of ends their pins' vector
        (:mod:`.interrupts`)."""
        if not self._interrupts.ioapic_eoi_write(address, size, value):
            self._devices.mmio_write(address, size, value)

    def pci_read_config(self, bdf: int, reg: int, size: int) -> int:
        """Read the device's config space; all ones for an absent device."""
        return self._devices.pci_read_config(bdf, reg, size)

    def pci_write_config(self, bdf: int, reg: int, size: int, value: int) -> None:
        """Write the config space of a device a non-root cell owns (root policy)."""
        self._devices.pci_write_config(bdf, reg, size, value)

    def pci_add_device(self, cell_id: int, device: PciDevice) -> None:
        """Record the owner; pass a non-root cell's physical endpoint through
        (``arch_pci_add_device``).

        :raise HvError: the VFIO step that failed, naming the device
        """
        self._devices.pci_add_device(cell_id, device, root=self._is_root(cell_id))

    def pci_remove_device(self, cell_id: int, device: PciDevice) -> None:
        """Forget the owner (``arch_pci_remove_device``); the device's INTx leaves the
        cell's pin first."""
        self._interrupts.device_removed(cell_id, device.bdf)
        self._devices.pci_remove_device(cell_id, device, root=self._is_root(cell_id))

    def send_msi(self, cell_id: int, address: int, data: int) -> None:
        """``KVM_SIGNAL_MSI`` into the cell's VM (the root cannot receive it)."""
        self._interrupts.send_msi(cell_id, address, data)

    def ioapic_read(self, address: int, index: int) -> int:
        """Register ``index`` of the physical IOAPIC (or of a detached model)."""
        return self._interrupts.ioapic_read(address, index)

    def ioapic_write(self, address: int, index: int, value: int) -> None:
        """A redirection entry half of a pin a non-root cell owns: its delivery
        (:mod:`.interrupts`); the physical IOAPIC stays the root's."""
        self._interrupts.ioapic_write(address, index, value)

    # ===================================================================================
    # memory
    # ===================================================================================

    def phys_read(self, address: int, size: int) -> bytes:
        """Read host-physical memory through ``/dev/mem``.

        :raise HvError: when the range cannot be mapped
        """
        return self._memory.phys_read(address, size)

    def phys_write(self, address: int, data: bytes) -> None:
        """Write host-physical memory through ``/dev/mem`` (cell images, ivshmem state).

        :raise HvError: when the range cannot be mapped (``EPERM`` for RAM Linux uses)
        """
        self._memory.phys_write(address, data)

    def root_memory_read(self, gphys: int, size: int) -> bytes:
        """Read a buffer staged by :meth:`root_buffer_alloc` (the driver's copy of a config)."""
        return self._buffers.read(gphys, size)

    def root_buffer_alloc(self, data: bytes) -> int:
        """Stage ``data`` (the root is not virtualized: nothing to place in its RAM)."""
        return self._buffers.alloc(data)

    def root_buffer_free(self, gphys: int) -> None:
        """Drop a staged buffer."""
        self._buffers.free(gphys)

    # ===================================================================================
    # console
    # ===================================================================================

    def console_write(self, text: str) -> None:
        """Send hypervisor console text to the debug UART (:mod:`.console`).

        Works after :meth:`shutdown` too (the model prints the ``Releasing CPU`` lines
        then, as Jailhouse's CPUs do on their way out), with ports opened for the call.
        """
        self._console.write(text, self._ports, after_shutdown=self._state is _State.SHUT_DOWN)

    # ===================================================================================
    # diagnostics
    # ===================================================================================

    def status(self) -> dict[str, object]:
        """JSON-friendly state of the executor: cells, CPUs, threads, isolation."""
        with self._table.cond:
            cpus = {
                cpu.id: {
                    "cell": cpu.cell.id,
                    "state": cpu.state.value,
                    "suspended": cpu.suspended,
                    "affinity": sorted(cpu.affinity) if cpu.affinity is not None else None,
                    "thread_alive": bool(cpu.thread and cpu.thread.is_alive()),
                    "exits": cpu.exit_counts(),
                    "native_pio": cpu.native_io_count(),
                    "dropped": cpu.dropped,
                }
                for cpu in self._table.cpus.values()
            }
            cells = {
                cell.id: {"name": cell.config.name, "cpus": sorted(cell.cpus), "slots": len(cell.slots),
                          **console_view(cell.ports)}
                for cell in self._table.cells.values()
            }
        return {
            "state": self._state.value,
            "vendor": self.vendor,
            "ports": self._ports.mode if self._ports is not None else None,
            "native_pio": self._exits.native_pio,
            "xen_hypercalls": self._xen_hypercalls,
            "isolation": self.isolation_problem or "cpuset",
            "cpuset": repr(self.cpuset) if self.cpuset is not None else None,
            "cells": cells,
            "cpus": cpus,
            "zombies": sum(1 for z in self._zombies if z.is_alive()),
            "passthrough": {
                d.address.short: {"cell": d.cell_id, "group": d.group, "msi": len(d.msi_routes),
                                  "msix": len(d.msix_routes), "intx_gsi": d.intx_gsi,
                                  "intx_on": d.intx_on}
                for cell_id in sorted(self._table.cells) for d in self.passthrough.devices_of(cell_id)
            },
            "ioapic_pins": self._interrupts.status(),
        }
