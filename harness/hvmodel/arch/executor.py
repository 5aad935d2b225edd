"""The executor: the model's cells as KVM VMs in the lab's root cell; stands where
``hypervisor/arch/x86/{control,vcpu,svm,vmx}.c`` are (``arch_cell_create``,
``arch_map_memory_region``, ``arch_park_cpu``, ``arch_reset_cpu``, ``vcpu_handle_exit``).

:class:`ExecutorArch` implements :class:`~harness.hvmodel.arch.Arch` on a real machine:

* **Plugging in**: build it (in the main thread: it installs the vCPU kick handler), pass
  it to the :class:`~harness.hvmodel.driver.Driver` (or the
  :class:`~harness.hvmodel.control.Hypervisor`), and :meth:`ExecutorArch.attach` where
  exits go: ``arch.attach(lambda: driver.hv)`` or ``arch.attach(hv)``. The model calls the
  hooks; the executor's vCPU threads call back into :meth:`Hypervisor.handle_pio`,
  :meth:`~Hypervisor.handle_mmio`, :meth:`~Hypervisor.panic_park`,
  :meth:`~Hypervisor.count_exit` and :meth:`~Hypervisor.hypercall` (the only way anything
  here reaches the model). :meth:`ExecutorArch.host_info` describes the lab's Linux for
  the driver (TSC and APIC timer frequencies as KVM presents them to cells).
* **Cells**: one KVM VM per non-root cell, with a split irqchip (in-kernel local APICs;
  IOAPIC and PIC accesses exit to the model, as Jailhouse intercepts them) or, where KVM
  lacks it, the full in-kernel irqchip. Every mapped memory region is a KVM memory slot
  backed by ``/dev/mem`` at its ``phys_start`` (RAM in the ``memmap=`` window, device
  MMIO uncached); read-only regions become read-only slots (writes exit and are FATAL).
  Sub-page regions are not slots: the model dispatches their accesses. The COMM_REGION
  region maps the cell's comm page, an anonymous page the model writes through the
  :class:`memoryview` :meth:`comm_page_alloc` returns. Loading (``phys_write``) writes
  the image through ``/dev/mem``. The root cell is not virtualized: its hooks only keep
  books.
* **CPUs**: one thread per cell CPU, pinned to that CPU with ``sched_setaffinity``; the
  CPU is taken from the root's scheduling with a cgroup v2 cpuset
  (:class:`~harness.hvmodel.arch.cpuset.RootCpuset`) at create and given back at destroy
  (the group stays, with every CPU, until :meth:`ExecutorArch.shutdown` removes it).
  A CPU is *parked* when its thread does not enter KVM_RUN (Jailhouse: ``cli; hlt`` in the
  parking page), *suspended* while a management operation holds it, *running* after
  :meth:`reset_cpu`, which its own thread performs: Jailhouse's start state
  (:func:`~harness.hvmodel.arch.kvm.jailhouse_vcpu_reset`: real mode at
  ``cpu_reset_address``, x2APIC), every CPU of the cell released at once. Destroy stops
  and joins the threads and closes the VM; nothing stays open.
* **Exits**: PIO to :meth:`Hypervisor.handle_pio` (whitelist, PCI config, i8042, FATAL);
  what the model passes through reaches the real port (:mod:`.portio`: native ``in``/
  ``out`` with ``ioperm``, else ``/dev/port``), so a cell's UART at 0x2f8 is the lab's
  serial 1 and the PM timer at 0x608 reads real time. With native ports the accesses the
  cell's I/O bitmap opens (:meth:`Hypervisor.pio_bitmap`) never reach Python: the vCPU
  thread runs the guest in :class:`~.portio.IoBitmapLoop`, a machine-code KVM_RUN loop
  that performs them itself (KVM still exits to user space for each), as the CPU's I/O
  bitmap lets them through in Jailhouse; every other exit comes back to the thread. MMIO to
  :meth:`Hypervisor.handle_mmio`. Triple fault, failed entry, KVM internal errors and MSRs
  KVM does not know go to :meth:`Hypervisor.panic_park` with Jailhouse's FATAL wording
  for the vendor (SVM: ``Unexpected #VMEXIT, exitcode 7f, ...``; VMX: ``Unhandled
  VM-Exit, reason 2``) and a register dump (after a triple fault on SVM, KVM has already
  reset the vCPU: the dump shows the reset state, not the faulting one). HLT blocks in
  KVM (in-kernel local APIC).
* **Statistics**: the model counts the exits it handles (``vmexits_pio``, ``vmexits_mmio``,
  ``vmexits_hypercall`` and ``vmexits_total``); fatal exits are counted in
  ``vmexits_total`` (MSR ones also in ``vmexits_msr_other``) through
  :meth:`Hypervisor.count_exit`. Exits KVM handles in the kernel (CPUID, CR, most MSRs,
  x2APIC, XSETBV, HLT) never reach user space and are not counted; port accesses the
  model passes through are not counted either (Jailhouse's I/O bitmap lets them through
  without an exit).
* **Messages**: :meth:`wait_for_reply` polls the comm page with a monotonic deadline
  (exponential back-off from 0.2 ms to 5 ms). When the cell approved a shutdown request
  (or timed out), the model is about to suspend it: the executor first lets every exit of
  that cell already on its way into the model finish, then holds new ones until the CPUs
  are parked or reset, so no exit of the old run reaches the model after the CPUs changed
  hands. An exit taken before a park or reset is dropped (a reset completes its
  instruction first). Limit: for a PASSIVE_COMMREG cell there is no message, so an exit
  that is already waiting for the model's lock when a management operation takes the
  cell's CPU is delivered after it, and the model judges it against the CPU's new owner.
  Closing that needs the model: exit entry points that name the cell the exit came
  from, or that ignore exits of parked and suspended CPUs.
* **Hypercalls**: with ``CONFIG_KVM_XEN`` (``KVM_CAP_XEN_HVM`` with
  ``KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL``) VMCALL/VMMCALL exit as ``KVM_EXIT_XEN`` and go to
  :meth:`Hypervisor.hypercall` (code in EAX, arguments in RDI and RSI, result in RAX,
  -EPERM above CPL 0). **Debian's kernel lacks CONFIG_KVM_XEN**: there KVM answers every
  VMCALL/VMMCALL itself with ``-KVM_ENOSYS`` (-1000) in RAX, and cells' hypercalls (the
  debug console ``con-virtual``, CPU_GET_INFO) are not seen by the model.

**A keeper VM.** From :meth:`ExecutorArch.init` to :meth:`ExecutorArch.shutdown` an idle
VM with one never-run vCPU exists, so that creating and destroying cells never flips
KVM's global static keys (live kernel-text patching of the scheduler's hot path), which
under the lab's TCG wedged the root's kernel within a few dozen create/destroy cycles
(see :meth:`ExecutorArch._keeper`).

**Root hardware policy.** The root cell runs natively (Linux drives its devices and its
IOAPIC pins itself), so the executor does not let the model's shadow bookkeeping write
root-owned hardware: PCI config writes reach a device only while a non-root cell owns it
(and right after it was taken from one), MSI-X table and IOAPIC EOI writes only inside a
non-root cell's device or IOAPIC, IOAPIC redirection writes only for pins a non-root cell
owns. Reads always go to the hardware (failed reads return all ones). The IOAPIC's
index/data pair is not locked against Linux (Jailhouse owns the IOAPIC; here Linux still
does, and touches it rarely after boot). Debian's kernel has ``CONFIG_IO_STRICT_DEVMEM``:
``/dev/mem`` refuses MMIO ranges a driver claimed (the IOAPIC, bound devices' BARs) unless
the kernel is booted with ``iomem=relaxed``; an IOAPIC out of reach is replaced by a
detached model (24 pins, version 0x11, entries masked, writes kept), with a warning.

**PCI passthrough** (:mod:`.passthrough`): a physical endpoint of a non-root cell is
claimed for ``vfio-pci`` at ``pci_add_device`` and released at ``pci_remove_device``;
its BARs become KVM slots on VFIO's own mappings, the cell's DMA regions its IOMMU
domain, its MSI and MSI-X vectors VFIO eventfds routed into the cell's VM (config space
and MSI-X table accesses the model lets through go to VFIO or to the shadows there).

**Not done here**: INTx of passed-through devices, string port I/O with a count of 1 (KVM does
not tell it from a plain IN/OUT), the x86 instruction decoder's FATALs (KVM emulates the
MMIO instruction), INIT/SIPI emulation (KVM's local APIC does it, without Jailhouse's
``CPU %d received SIPI`` line), CAT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import fcntl
import logging
import os
import re
import signal
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final, Protocol, cast

from ..abi import CellState, CommOffset, CpuStat, Message, Reply, comm_read_u32
from ..errors import Errno, HvError, JhlabError
from . import PAGE_SIZE, RootBuffers
from .cpuset import RootCpuset, parse_cpu_list
from .kvm import (
    KICK_SIGNAL,
    KVM_MSR_EXIT_REASON_INVAL,
    KVM_MSR_EXIT_REASON_UNKNOWN,
    Cap,
    CpuidEntry,
    ExitReason,
    FailEntryExit,
    IntrExit,
    IoExit,
    Kvm,
    KvmError,
    KvmRun,
    MmioExit,
    MsrExit,
    OtherExit,
    PhysMapping,
    ShutdownExit,
    UnknownExit,
    Vcpu,
    VcpuExit,
    Vm,
    anonymous_memory,
    describe_exit,
    format_state,
    install_kick_handler,
    jailhouse_vcpu_reset,
    jailhouse_vcpu_setup,
)
from .passthrough import Passthrough
from .portio import IoBitmapLoop, NativePorts, PortIo, open_ports

if TYPE_CHECKING:
    import mmap

    from ..config import CellConfig, MemoryRegion, PciDevice, SystemConfig
    from ..driver import HostInfo
    from ..percpu import ExitResult

__all__ = ["CpuState", "ExecutorArch", "ExecutorStateError", "ExitHandler", "host_info"]

LOG = logging.getLogger(__name__)

MEM_WRITE: Final = 0x0002
MEM_DMA: Final = 0x0008
MEM_IO: Final = 0x0010
MEM_COMM_REGION: Final = 0x0020
#: where KVM may put the real-mode TSS on VMX without unrestricted guest (runner's choice)
TSS_ADDRESS: Final = 0xFFFBD000
#: GSI routes of the split irqchip (KVM_CAP_SPLIT_IRQCHIP's argument)
SPLIT_IRQCHIP_ROUTES: Final = 24
#: seconds a destroy waits for a cell's vCPU threads to stop
STOP_TIMEOUT: Final = 5.0
#: seconds a quiesce waits for exits already on their way into the model
DRAIN_TIMEOUT: Final = 2.0
#: seconds the debug console waits for the UART's transmitter per character
UART_TIMEOUT: Final = 0.01
#: comm page polling: first and longest pause (seconds)
POLL_MIN: Final = 0.0002
POLL_MAX: Final = 0.005
#: 8250 registers
UART_LSR: Final = 5
UART_LSR_THRE: Final = 0x20
CONSOLE_TYPE_8250: Final = 2
#: ``JAILHOUSE_PCI_TYPE_DEVICE``: a physical endpoint (passed through with VFIO)
PCI_TYPE_DEVICE: Final = 1
CONSOLE_ACCESS_MMIO: Final = 0x0001
#: IOAPIC registers
IOAPIC_DATA: Final = 0x10
IOAPIC_EOI: Final = 0x40
IOAPIC_REDIR_TBL_START: Final = 0x10
IOAPIC_REDIR_MASKED: Final = 1 << 16
#: pins of the IOAPIC model used when the physical one cannot be mapped (QEMU's count)
DETACHED_IOAPIC_PINS: Final = 24
#: SVM exit code of a shutdown (triple fault), VMX exit reason of a triple fault
SVM_EXIT_SHUTDOWN: Final = 0x7F
VMX_EXIT_TRIPLE_FAULT: Final = 2

# KVM's Xen hypercall interception (<linux/kvm.h>); only used when the kernel has it.
KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL: Final = 1 << 1
_XEN_HVM_CONFIG: Final = struct.Struct("<IIQQBB30x")  # struct kvm_xen_hvm_config, 56 bytes
KVM_XEN_HVM_CONFIG: Final = (1 << 30) | (_XEN_HVM_CONFIG.size << 16) | (0xAE << 8) | 0x7A
KVM_EXIT_XEN_HCALL: Final = 1
#: ``struct kvm_xen_exit`` with the ``hcall`` member: type, longmode, cpl, input, result,
#: params[6]; the union is 8-byte aligned
_XEN_EXIT: Final = struct.Struct("<I4xIIQQ6Q")
_XEN_RESULT_OFFSET: Final = 24
_KVM_RUN_U_OFFSET: Final = KvmRun.u.offset


class ExecutorStateError(JhlabError):
    """The executor was used against its lifecycle.

    :param operation: the method
    :param state: the executor's state then
    """

    def __init__(self, operation: str, state: str) -> None:
        self.operation = operation
        self.state = state
        super().__init__(f"ExecutorArch.{operation}: not allowed in state {state}")


class ExitHandler(Protocol):
    """Where the executor's vCPU threads send exits: the
    :class:`~harness.hvmodel.control.Hypervisor`'s exit entry points."""

    def handle_pio(
        self, cpu: int, port: int, size: int, is_write: bool, value: int = 0, *, rep: bool = False
    ) -> ExitResult: ...

    def handle_mmio(
        self, cpu: int, addr: int, size: int, is_write: bool, value: int = 0
    ) -> ExitResult: ...

    def panic_park(self, cpu: int, fatal: str | None = None) -> None: ...

    def count_exit(self, cpu: int, stat: CpuStat) -> None: ...

    def hypercall(self, cpu: int, code: int, arg1: int = 0, arg2: int = 0, *, rip: int = 0) -> int: ...

    def pio_bitmap(self, cpu: int) -> bytearray | None: ...


class _State(enum.Enum):
    NEW = "new"
    READY = "ready"
    SHUT_DOWN = "shut down"


class CpuState(enum.Enum):
    """What a cell CPU's thread does."""

    #: waits for a reset (Jailhouse: the parking page)
    PARKED = "parked"
    #: runs guest code (unless suspended)
    RUNNING = "running"
    #: the thread ends (cell destroyed)
    STOPPED = "stopped"


@dataclasses.dataclass(eq=False)
class _Slot:
    """One memory region of a cell as a KVM memory slot."""

    slot: int
    mapping: PhysMapping | None
    #: the region (DMA-flagged ones also sit in the cell's IOMMU domain)
    region: MemoryRegion | None = None


@dataclasses.dataclass(eq=False)
class _Cpu:
    """A cell CPU: its vCPU and thread, and what the thread is told to do.

    Every field below ``thread`` is guarded by the executor's condition.
    """

    id: int
    cell: _CellVm
    vcpu: Vcpu
    thread: threading.Thread | None = None
    state: CpuState = CpuState.PARKED
    #: held by a management operation
    suspended: bool = False
    #: reset address to apply before the next run
    pending_reset: int | None = None
    #: bumped by every park, reset and stop: an exit taken before is not delivered
    generation: int = 0
    #: the thread is inside a call into the model
    in_model: bool = False
    #: the thread has ended
    ended: bool = False
    #: CPUs the thread may run on after pinning (None: not pinned)
    affinity: frozenset[int] | None = None
    #: exits by kind (executor-side, for diagnostics; see :meth:`exit_counts`)
    exits: Counter[str] = dataclasses.field(default_factory=Counter)
    #: exits dropped because the CPU was parked or reset meanwhile
    dropped: int = 0
    #: the current run's I/O bitmap loop (its IN/OUT exits are not in :attr:`exits` yet)
    io_loop: IoBitmapLoop | None = None

    def exit_counts(self) -> dict[str, int]:
        """:attr:`exits` with what the I/O bitmap loop is serving (``IoExit``)."""
        counts = dict(self.exits)
        if self.io_loop is not None:
            counts["IoExit"] = counts.get("IoExit", 0) + self.io_loop.served
        return counts

    def held(self) -> bool:
        return self.suspended or self.cell.gate_closed

    def runnable(self) -> bool:
        return self.state is CpuState.RUNNING and not self.held()


@dataclasses.dataclass(eq=False)
class _CellVm:
    """A non-root cell: its VM, CPUs and memory slots."""

    id: int
    config: CellConfig
    vm: Vm
    cpus: dict[int, _Cpu] = dataclasses.field(default_factory=dict)
    #: (virt_start, size) -> slot
    slots: dict[tuple[int, int], _Slot] = dataclasses.field(default_factory=dict)
    #: new exits wait (a shutdown was approved; the model will suspend and park)
    gate_closed: bool = False
    #: physical (start, end) ranges of its sub-page regions (writes allowed there)
    subpage_ranges: tuple[tuple[int, int], ...] = ()
    #: (IOAPIC address, pin) pairs it owns
    ioapic_pins: frozenset[tuple[int, int]] = frozenset()


class ExecutorArch:
    """The :class:`~harness.hvmodel.arch.Arch` that runs cells on KVM (module docstring).

    Lifecycle: built (main thread: installs the kick signal handler) -> :meth:`attach`
    -> :meth:`init` (at enable: opens KVM and the ports, puts this process in the root
    cgroup) -> cell hooks -> :meth:`shutdown` (at disable: stops what is left, releases
    the cpuset, closes everything). One instance serves one hypervisor.

    :param mem_device: the physical-memory device (a plain file in unit tests)
    :param ports: the port backend (default: :func:`~.portio.open_ports` at :meth:`init`)
    :param port_mode: ``auto``, ``native`` or ``devport`` when ``ports`` is None
    :param cpuset: how the root's tasks are kept off cell CPUs (default: a
        :class:`~.cpuset.RootCpuset` on ``/sys/fs/cgroup``; None when ``isolate`` is off)
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
        (:class:`~.portio.IoBitmapLoop`; native ports only); off: every exit in Python
    :param passthrough: the VFIO side for cells' physical PCI devices (default: a
        :class:`~.passthrough.Passthrough`)
    :param rebind_released: give a device a cell released back to its original root
        driver (Jailhouse leaves it unbound; ignored with ``passthrough``)
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
    ) -> None:
        if vendor not in (None, "amd", "intel"):
            raise ValueError(f"vendor {vendor!r}: expected 'amd' or 'intel'")
        # Direct configuration
        self.mem_device = mem_device
        self.port_mode = port_mode
        self.pin_cpus = pin_cpus
        self.console_port = console_port
        self.console_enabled = console
        self.vendor = vendor or cpu_vendor() or "intel"
        self.reply_wait_limit = reply_wait_limit
        self.kvm_path = kvm_path
        self.pci_sysfs = pci_sysfs
        self.stop_timeout = stop_timeout
        self.native_pio = native_pio
        self.cpuset: RootCpuset | None = (cpuset or RootCpuset()) if isolate else None
        self.passthrough = passthrough or Passthrough(rebind=rebind_released)
        # Runtime state
        self._state = _State.NEW
        self._cond = threading.Condition()
        self._hw_lock = threading.Lock()
        self._handler: Callable[[], ExitHandler | None] = lambda: None
        self._ports = ports
        self._own_ports = ports is None
        self._kvm: Kvm | None = None
        self._keeper_vm: Vm | None = None
        self._supported_cpuid: list[CpuidEntry] | None = None
        self._system: SystemConfig | None = None
        self._root_id = 0
        self._cells: dict[int, _CellVm] = {}
        self._cpus: dict[int, _Cpu] = {}
        self._zombies: list[threading.Thread] = []
        self._comm_pages: dict[int, mmap.mmap] = {}
        self._buffers = RootBuffers()
        self._mmio_maps: dict[int, PhysMapping | None] = {}
        self._pci_fds: dict[int, int] = {}
        #: BDF -> owning non-root cell id; -1: just taken from a cell (writes still allowed)
        self._device_owner: dict[int, int] = {}
        self._msix_ranges: dict[int, tuple[int, int]] = {}
        #: IOAPICs out of reach of /dev/mem: address -> written registers
        self._detached_ioapics: dict[int, dict[int, int]] = {}
        self._console_base: int | None = None
        self._xen_hypercalls = False
        #: why the root's tasks are not kept off the cell CPUs (None: they are)
        self.isolation_problem: str | None = None
        if threading.current_thread() is threading.main_thread():
            install_kick_handler()

    def __repr__(self) -> str:
        return f"ExecutorArch(state={self._state.value!r}, cells={sorted(self._cells)})"

    # ===================================================================================
    # plumbing
    # ===================================================================================

    def attach(self, target: ExitHandler | Callable[[], ExitHandler | None]) -> None:
        """Tell the executor where exits go.

        :param target: the hypervisor, or a callable returning the current one (e.g.
            ``lambda: driver.hv``; None while disabled)
        """
        if hasattr(target, "handle_pio"):
            handler = cast("ExitHandler", target)
            self._handler = lambda: handler
        else:
            self._handler = target

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
            xen = kvm.check_extension(Cap.XEN_HVM)
            if self._ports is None:
                pm_timer = system.x86.pm_timer_address
                ports = open_ports(range(pm_timer, pm_timer + 4) if pm_timer else (), mode=self.port_mode)
                undo.callback(ports.close)
                self._ports = ports
            self.isolation_problem = self._prepare_isolation()
            if self.isolation_problem is not None:
                LOG.warning("cell CPUs stay in the root's scheduling: %s", self.isolation_problem)
            undo.pop_all()
        self._xen_hypercalls = bool(xen & KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL)
        self._supported_cpuid = supported
        self._system = system
        self._root_id = system.root_cell.id
        self.passthrough.domain = system.pci_domain
        self._console_base = self._pick_console(system)
        self._state = _State.READY
        self._update_isolation()  # the root's tasks into their group, every CPU still theirs
        LOG.info(
            "executor ready: %s ports, vendor %s, hypercalls %s, debug UART %s",
            self._ports.mode if self._ports else "no",
            self.vendor,
            "via KVM_EXIT_XEN" if self._xen_hypercalls else "answered by KVM (no CONFIG_KVM_XEN)",
            f"{self._console_base:#x}" if self._console_base is not None else "none",
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
        """The lab's Linux for the :class:`~harness.hvmodel.driver.Driver` (see the module
        function :func:`host_info`), measured on this executor's keeper vCPU, so that no
        extra VM comes and goes: call it before :meth:`init`, in place of the module
        function.

        :raise KvmError: without KVM
        """
        from .runner import apic_khz, measure_tsc_khz

        if self._state is _State.SHUT_DOWN:
            raise ExecutorStateError("host_info", self._state.value)
        kvm, keeper = self._open_kvm()
        return _describe_host(measure_tsc_khz(keeper.vcpus[0]), apic_khz(kvm))

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
        keeper = kvm.create_vm()
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

    def _pick_console(self, system: SystemConfig) -> int | None:
        if not self.console_enabled:
            return None
        if self.console_port is not None:
            return self.console_port
        con = system.debug_console
        if con.type == CONSOLE_TYPE_8250 and not con.flags & CONSOLE_ACCESS_MMIO and con.address:
            return int(con.address)
        return None

    def shutdown(self) -> None:
        """Stop every cell left, release the cpuset, close all devices (``arch_shutdown``);
        idempotent, never raises."""
        if self._state is _State.SHUT_DOWN:
            return
        self.passthrough.shutdown()
        for cell_id in list(self._cells):
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
        for mapping in self._mmio_maps.values():
            if mapping is not None:
                mapping.close()
        self._mmio_maps.clear()
        for fd in self._pci_fds.values():
            os.close(fd)
        self._pci_fds.clear()
        for cell_id in list(self._comm_pages):
            self.comm_page_free(cell_id)
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
        vm = kvm.create_vm()
        cell = _CellVm(cell_id, config, vm)
        try:
            self._setup_vm(kvm, vm)
            supported = self._supported_cpuid
            for cpu_id in sorted(config.cpus):
                vcpu = vm.create_vcpu(cpu_id)
                jailhouse_vcpu_setup(vcpu, supported)
                cell.cpus[cpu_id] = _Cpu(cpu_id, cell, vcpu)
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
        with self._cond:
            self._cells[cell_id] = cell
            self._cpus.update(cell.cpus)
        for cpu in cell.cpus.values():
            cpu.thread = threading.Thread(
                target=self._cpu_main, args=(cpu,), name=f"cell{cell_id}-cpu{cpu.id}", daemon=True
            )
            cpu.thread.start()
        self._update_isolation()
        LOG.info("cell %d (%s): VM with CPUs %s", cell_id, config.name, sorted(cell.cpus))

    def _setup_vm(self, kvm: Kvm, vm: Vm) -> None:
        if kvm.check_extension(Cap.SPLIT_IRQCHIP):
            vm.enable_cap(Cap.SPLIT_IRQCHIP, SPLIT_IRQCHIP_ROUTES)
            vm.has_irqchip = True
        else:
            vm.create_irqchip()
        if self.vendor == "intel" and kvm.check_extension(Cap.SET_TSS_ADDR):
            vm.set_tss_addr(TSS_ADDRESS)
        if kvm.check_extension(Cap.X86_USER_SPACE_MSR):
            vm.enable_cap(
                Cap.X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL
            )
        if self._xen_hypercalls:
            raw = bytearray(_XEN_HVM_CONFIG.pack(KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL, 0, 0, 0, 0, 0))
            try:
                fcntl.ioctl(vm.fd, KVM_XEN_HVM_CONFIG, raw)
            except OSError as exc:
                raise KvmError("KVM_XEN_HVM_CONFIG", exc.errno or 0, "hypercall interception") from exc

    def cell_destroy(self, cell_id: int) -> None:
        """Stop and join the cell's threads, close its VM and slots, give its CPUs back
        (``arch_cell_destroy``); cannot fail.

        A thread that is inside a call into the model cannot end while the caller holds
        the model's lock; it is left to a reaper thread, which closes the VM after it.
        """
        if self._is_root(cell_id):
            return
        with self._cond:
            cell = self._cells.pop(cell_id, None)
            if cell is None:
                return
            for cpu in cell.cpus.values():
                cpu.state = CpuState.STOPPED
                cpu.generation += 1
                self._cpus.pop(cpu.id, None)
            cell.gate_closed = False
            busy = [cpu for cpu in cell.cpus.values() if cpu.in_model]
            self._cond.notify_all()
        for passed in self.passthrough.devices_of(cell_id):  # the model gave them back already
            self.passthrough.detach(passed.bdf)
        self.passthrough.release_detached()
        for cpu in cell.cpus.values():
            with contextlib.suppress(KvmError):
                cpu.vcpu.kick()
        deadline = time.monotonic() + self.stop_timeout
        for cpu in cell.cpus.values():
            if cpu in busy or cpu.thread is None:
                continue
            cpu.thread.join(max(deadline - time.monotonic(), 0.0))
            if cpu.thread.is_alive():
                busy.append(cpu)
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
            self._release_vm(cell)
        self._update_isolation()
        LOG.info("cell %d destroyed", cell_id)

    def _reap(self, cell: _CellVm, busy: list[_Cpu]) -> None:
        for cpu in busy:
            if cpu.thread is not None:
                cpu.thread.join()
        self._release_vm(cell)

    @staticmethod
    def _release_vm(cell: _CellVm) -> None:
        mappings = [slot.mapping for slot in cell.slots.values()]
        cell.slots.clear()
        cell.vm.close()
        for mapping in mappings:
            if mapping is not None:
                mapping.close()

    def _update_isolation(self) -> None:
        """The root's tasks on the CPUs no cell holds (:mod:`.cpuset`).

        The group is made at :meth:`init`, with every CPU, and kept until
        :meth:`shutdown`: moving a task into a cpuset is the expensive part (the kernel
        waits for an RCU grace period per task), so it is done once at enable, and a
        create/destroy cycle costs one write of ``cpuset.cpus`` (plus moving new
        processes).
        """
        cpuset = self.cpuset
        if cpuset is None or self.isolation_problem is not None or self._system is None:
            return
        with self._cond:
            taken = {cpu for cell in self._cells.values() for cpu in cell.cpus}
        try:
            cpus = online_cpus() or frozenset(self._system.root_cell.cpus)
            cpuset.apply(cpus - taken)
        except (OSError, ValueError) as exc:
            LOG.warning("cannot keep the root's tasks off CPUs %s: %s", sorted(taken), exc)

    def cell_reset(self, cell_id: int) -> None:
        """Nothing to do: the model filled the comm region; each CPU resets itself."""

    def comm_page_alloc(self, cell_id: int) -> memoryview:
        """A zeroed anonymous page: the model's view, and the guest's at the COMM_REGION."""
        page = anonymous_memory(PAGE_SIZE)
        self._comm_pages[cell_id] = page
        return memoryview(page)

    def comm_page_free(self, cell_id: int) -> None:
        """Drop the page (unmapped once the model's view of it is gone too)."""
        page = self._comm_pages.pop(cell_id, None)
        if page is not None:
            with contextlib.suppress(BufferError):
                page.close()

    def map_memory_region(self, cell_id: int, region: MemoryRegion) -> None:
        """A KVM memory slot at ``virt_start``: ``/dev/mem`` at ``phys_start``, or the comm
        page for the COMM_REGION (``arch_map_memory_region``).

        :raise HvError: the mapping's or KVM's error (``EPERM`` for RAM outside the
            reserved window, ``EINVAL`` for unaligned regions ...)
        """
        self._require("map_memory_region")
        cell = self._cells.get(cell_id)
        if cell is None or region.size == 0:
            return  # the root (runs natively), or a cell this executor did not make
        key = (region.virt_start, region.size)
        if key in cell.slots:
            return
        flags = int(region.flags)
        readonly = not flags & MEM_WRITE and bool(self._kvm and self._kvm.check_extension(Cap.READONLY_MEM))
        if flags & MEM_COMM_REGION:
            page = self._comm_pages.get(cell_id)
            if page is None:
                raise HvError(Errno.ENOMEM, f"cell {cell_id} has no comm page")
            slot = cell.vm.add_memory(region.virt_start, page, size=PAGE_SIZE, readonly=readonly)
            cell.slots[key] = _Slot(slot.slot, None)
            return
        device_memory = self.passthrough.bar_backing(cell_id, region.phys_start, region.size)
        if device_memory is not None:  # a BAR of the cell's own device: VFIO's mapping
            buffer, offset = device_memory
            slot = cell.vm.add_memory(region.virt_start, buffer, offset=offset, size=region.size,
                                      readonly=readonly)
            cell.slots[key] = _Slot(slot.slot, None, region)
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
        cell.slots[key] = _Slot(slot.slot, mapping, region)

    def unmap_memory_region(self, cell_id: int, region: MemoryRegion) -> None:
        """Delete the region's memory slot and its ``/dev/mem`` mapping."""
        cell = self._cells.get(cell_id)
        if cell is None:
            return
        entry = cell.slots.pop((region.virt_start, region.size), None)
        if entry is None:
            return
        self.passthrough.dma_unmap(cell_id, region)
        cell.vm.remove_memory(entry.slot)
        if entry.mapping is not None:
            entry.mapping.close()

    def config_commit(self, cell_id: int | None) -> None:
        """Release the devices cells gave back (the operation is complete: see
        :mod:`.passthrough`); nothing to flush, KVM keeps guest TLBs and NPT/EPT
        consistent with the slots."""
        self.passthrough.release_detached()

    # ===================================================================================
    # CPUs
    # ===================================================================================

    def park_cpu(self, cpu: int) -> None:
        """The CPU's thread stops entering the guest until :meth:`reset_cpu`."""
        with self._cond:
            data = self._cpus.get(cpu)
            if data is None:
                return
            data.state = CpuState.PARKED
            data.pending_reset = None
            data.suspended = False
            data.generation += 1
            self._cond.notify_all()
        self._kick(data)

    def reset_cpu(self, cpu: int, cell_id: int, reset_address: int) -> None:
        """The CPU's thread puts its vCPU in Jailhouse's start state and runs it."""
        with self._cond:
            data = self._cpus.get(cpu)
            if data is None:
                return
            data.state = CpuState.RUNNING
            data.pending_reset = reset_address
            data.suspended = False
            data.generation += 1
            data.cell.gate_closed = False
            self._cond.notify_all()
        self._kick(data)

    def suspend_cpu(self, cpu: int) -> None:
        """Hold the CPU: no guest code, no exit delivered, until :meth:`resume_cpu`."""
        with self._cond:
            data = self._cpus.get(cpu)
            if data is None:
                return
            data.suspended = True
        self._kick(data)

    def resume_cpu(self, cpu: int) -> None:
        """Let a suspended CPU go on."""
        with self._cond:
            data = self._cpus.get(cpu)
            if data is None:
                return
            data.suspended = False
            data.cell.gate_closed = False
            self._cond.notify_all()

    @staticmethod
    def _kick(cpu: _Cpu) -> None:
        try:
            cpu.vcpu.kick()
        except KvmError as exc:
            LOG.warning("CPU %d: %s", cpu.id, exc)

    # -- the vCPU thread -------------------------------------------------------------------

    def _cpu_main(self, cpu: _Cpu) -> None:
        if self.pin_cpus:
            try:
                os.sched_setaffinity(0, {cpu.id})
                cpu.affinity = frozenset(os.sched_getaffinity(0))
            except OSError as exc:
                LOG.warning("CPU %d: cannot pin the vCPU thread: %s", cpu.id, exc)
        try:
            self._cpu_loop(cpu)
        except Exception as exc:  # the thread must not die silently
            LOG.exception("CPU %d: executor error", cpu.id)
            self._local_fatal(cpu, f"executor error: {exc}")
        finally:
            with self._cond:
                cpu.in_model = False
                cpu.ended = True
                self._cond.notify_all()

    def _cpu_loop(self, cpu: _Cpu) -> None:
        vcpu = cpu.vcpu
        cond = self._cond
        io_loop: IoBitmapLoop | None = None  # this run's (None: every exit comes here)
        while True:
            with cond:
                while cpu.state is not CpuState.STOPPED and not cpu.runnable():
                    cond.wait()
                if cpu.state is CpuState.STOPPED:
                    return
                reset, cpu.pending_reset = cpu.pending_reset, None
                generation = cpu.generation
            try:
                if reset is not None:
                    jailhouse_vcpu_reset(vcpu, reset)
                    io_loop = self._io_bitmap_loop(cpu)
                    with cond:
                        if cpu.io_loop is not None:
                            cpu.exits["IoExit"] += cpu.io_loop.served
                        cpu.io_loop = io_loop
                exit_ = vcpu.run() if io_loop is None else vcpu.run_native(io_loop)
            except KvmError as exc:
                self._report_fatal(cpu, f"executor: {exc}")
                continue
            if isinstance(exit_, IntrExit):
                continue
            with cond:
                while cpu.generation == generation and cpu.state is CpuState.RUNNING and cpu.held():
                    cond.wait()
                if cpu.generation != generation or cpu.state is not CpuState.RUNNING:
                    # Parked, reset or stopped meanwhile: the exit belongs to the old run.
                    # A reset flushes the half-done instruction (complete_pending).
                    cpu.dropped += 1
                    continue
                cpu.in_model = True
            try:
                self._dispatch(cpu, exit_)
            finally:
                with cond:
                    cpu.in_model = False
                    cond.notify_all()

    def _dispatch(self, cpu: _Cpu, exit_: VcpuExit) -> None:
        cpu.exits[type(exit_).__name__] += 1
        handler = self._handler()
        if handler is None:
            self._local_fatal(cpu, f"no hypervisor attached for {describe_exit(exit_)}")
            return
        try:
            if isinstance(exit_, IoExit):
                self._exit_pio(handler, cpu, exit_)
            elif isinstance(exit_, MmioExit):
                self._exit_mmio(handler, cpu, exit_)
            elif isinstance(exit_, OtherExit) and exit_.code == ExitReason.XEN:
                self._exit_hypercall(handler, cpu)
            elif isinstance(exit_, OtherExit) and exit_.code == ExitReason.IOAPIC_EOI:
                pass  # split irqchip: EOI of a level-triggered vector; no IOAPIC to tell
            elif isinstance(exit_, MsrExit):
                handler.count_exit(cpu.id, CpuStat.VMEXITS_MSR_OTHER)
                handler.panic_park(cpu.id, self._with_dump(cpu, describe_exit(exit_)))
            else:
                handler.count_exit(cpu.id, CpuStat.VMEXITS_TOTAL)
                handler.panic_park(cpu.id, self._with_dump(cpu, self.fatal_text(exit_)))
        except JhlabError as exc:
            # The model refused (e.g. disabled meanwhile): the CPU cannot go on.
            LOG.warning("CPU %d: exit not handled: %s", cpu.id, exc)
            self._local_fatal(cpu, str(exc))

    def _exit_pio(self, handler: ExitHandler, cpu: _Cpu, exit_: IoExit) -> None:
        value = exit_.value() if exit_.is_write else 0
        result = handler.handle_pio(
            cpu.id, exit_.port, exit_.size, exit_.is_write, value, rep=exit_.count != 1
        )
        if not result.handled or exit_.is_write:
            return
        if result.value is None:
            # Skipped instruction: the register keeps its value.
            exit_.set_value(cpu.vcpu.get_regs().rax)
        else:
            exit_.set_value(result.value)

    def _io_bitmap_loop(self, cpu: _Cpu) -> IoBitmapLoop | None:
        """The I/O bitmap loop of the run that begins on ``cpu`` (its own thread, after a
        reset): the IN/OUT exits to ports the cell's I/O bitmap opens are served in machine
        code, as the CPU's bitmap check lets them through in Jailhouse; the rest come to
        :meth:`_dispatch`. None when it is off, the ports are not native, or the model
        gives no bitmap."""
        ports = self._ports
        handler = self._handler()
        if not self.native_pio or not isinstance(ports, NativePorts) or handler is None:
            return None
        try:
            bitmap = handler.pio_bitmap(cpu.id)  # does not wait for the model's lock
            if bitmap is None:
                return None
            return ports.io_bitmap_loop(cpu.vcpu.fd, cpu.vcpu.run_page, bitmap)
        except (JhlabError, OSError, ValueError) as exc:
            LOG.warning("CPU %d: whitelisted port I/O goes through Python: %s", cpu.id, exc)
            return None

    def _exit_mmio(self, handler: ExitHandler, cpu: _Cpu, exit_: MmioExit) -> None:
        value = exit_.value if exit_.is_write else 0
        result = handler.handle_mmio(cpu.id, exit_.addr, exit_.length, exit_.is_write, value)
        if result.handled and not exit_.is_write:
            exit_.set_value(result.value or 0)

    def _exit_hypercall(self, handler: ExitHandler, cpu: _Cpu) -> None:
        """A VMCALL/VMMCALL as ``KVM_EXIT_XEN`` (only with hypercall interception)."""
        page = cpu.vcpu.run_page
        kind, longmode, cpl, code, _result, *params = _XEN_EXIT.unpack_from(page, _KVM_RUN_U_OFFSET)
        if kind != KVM_EXIT_XEN_HCALL:
            handler.count_exit(cpu.id, CpuStat.VMEXITS_TOTAL)
            handler.panic_park(cpu.id, self._with_dump(cpu, f"Unexpected Xen exit type {kind}"))
            return
        regs = cpu.vcpu.get_regs()
        if cpl:
            # vcpu_handle_hypercall: a caller above CPL 0 gets -EPERM (counted all the same).
            handler.count_exit(cpu.id, CpuStat.VMEXITS_HYPERCALL)
            result = -int(Errno.EPERM)
        else:
            mask = 0xFFFFFFFFFFFFFFFF if longmode else 0xFFFFFFFF
            arg1, arg2 = (params[0], params[1]) if longmode else (regs.rdi & mask, regs.rsi & mask)
            result = handler.hypercall(cpu.id, code & mask, arg1, arg2, rip=regs.rip)
        struct.pack_into(
            "<Q", page, _KVM_RUN_U_OFFSET + _XEN_RESULT_OFFSET, result & 0xFFFFFFFFFFFFFFFF
        )

    def fatal_text(self, exit_: VcpuExit) -> str:
        """The text after ``FATAL: `` Jailhouse prints for an exit it cannot handle."""
        if isinstance(exit_, ShutdownExit):
            if self.vendor == "amd":
                return _svm_unexpected(SVM_EXIT_SHUTDOWN)
            return f"Unhandled VM-Exit, reason {VMX_EXIT_TRIPLE_FAULT}"
        if isinstance(exit_, FailEntryExit):
            reason = exit_.hardware_entry_failure_reason
            if self.vendor == "amd":
                signed = reason - (1 << 64) if reason >= 1 << 63 else reason
                return f"VM-Entry failure, error {signed}"
            return f"VM-Entry failure, reason {reason & 0xFFFF}"
        if isinstance(exit_, UnknownExit):
            if self.vendor == "amd":
                return _svm_unexpected(exit_.hardware_exit_reason)
            return f"Unhandled VM-Exit, reason {exit_.hardware_exit_reason & 0xFFFF}"
        return describe_exit(exit_)

    @staticmethod
    def _with_dump(cpu: _Cpu, text: str) -> str:
        """``text`` plus the guest register dump Jailhouse prints after a FATAL line."""
        try:
            return f"{text}\n{format_state(cpu.vcpu)}"
        except KvmError as exc:
            return f"{text}\n(no register dump: {exc})"

    def _report_fatal(self, cpu: _Cpu, text: str) -> None:
        """A failure of the CPU's own KVM calls: FATAL through the model, else locally."""
        handler = self._handler()
        try:
            if handler is None:
                raise ExecutorStateError("vCPU exit", "no hypervisor attached")
            handler.count_exit(cpu.id, CpuStat.VMEXITS_TOTAL)
            handler.panic_park(cpu.id, text)
        except JhlabError as exc:
            LOG.warning("CPU %d: %s", cpu.id, exc)
        # The model parked it (or could not): either way the CPU does not run on.
        self._local_fatal(cpu, text)

    def _local_fatal(self, cpu: _Cpu, text: str) -> None:
        """Park a CPU the model could not be told about (executor-side failure)."""
        LOG.error("CPU %d: FATAL: %s", cpu.id, text)
        with self._cond:
            if cpu.state is CpuState.RUNNING:
                cpu.state = CpuState.PARKED
                cpu.generation += 1
                self._cond.notify_all()

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
            self._quiesce(cell_id)
        return answered

    def _quiesce(self, cell_id: int) -> None:
        """Hold new exits of the cell and wait for those already in the model to end.

        Called without the model's lock, so exits on their way in can finish; after this,
        none reaches the model until the CPUs are parked, reset or resumed.
        """
        deadline = time.monotonic() + DRAIN_TIMEOUT
        with self._cond:
            cell = self._cells.get(cell_id)
            if cell is None:
                return
            cell.gate_closed = True
            self._cond.notify_all()
            while any(cpu.in_model for cpu in cell.cpus.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    LOG.warning("cell %d: exits still in the model after %.1f s", cell_id, DRAIN_TIMEOUT)
                    break
                self._cond.wait(remaining)

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

    def _mmio_window(self, address: int, size: int) -> tuple[PhysMapping | None, int]:
        page = address & ~(PAGE_SIZE - 1)
        if address + size > page + PAGE_SIZE:
            raise ValueError(f"MMIO access {address:#x}+{size} crosses a page")
        with self._hw_lock:
            if page not in self._mmio_maps:
                try:
                    self._mmio_maps[page] = PhysMapping(page, PAGE_SIZE, path=self.mem_device, uncached=True)
                except (KvmError, ValueError) as exc:
                    LOG.warning("MMIO page %#x not accessible: %s", page, exc)
                    self._mmio_maps[page] = None
            return self._mmio_maps[page], address - page

    def mmio_read(self, address: int, size: int) -> int:
        """One uncached read of host-physical MMIO; all ones when it cannot be mapped. The
        MSI-X table of a passed-through device is its shadow (:mod:`.passthrough`)."""
        passed = self.passthrough.msix_device(address, size)
        if passed is not None:
            return self.passthrough.msix_read(passed, address, size)
        mapping, offset = self._mmio_window(address, size)
        if mapping is None:
            return (1 << (8 * size)) - 1
        return mapping.read_value(offset, size)

    def mmio_write(self, address: int, size: int, value: int) -> None:
        """One uncached write of host-physical MMIO inside a non-root cell's sub-page
        region, device MSI-X table or IOAPIC (root hardware policy); else dropped. The
        MSI-X table of a passed-through device is its shadow (:mod:`.passthrough`)."""
        passed = self.passthrough.msix_device(address, size)
        if passed is not None:
            self.passthrough.msix_write(passed, address, size, value)
            return
        if not self._cell_mmio(address, size):
            LOG.debug("MMIO write %#x+%d = %#x for the root: not performed", address, size, value)
            return
        mapping, offset = self._mmio_window(address, size)
        if mapping is not None:
            mapping.write_value(offset, size, value)

    def _cell_mmio(self, address: int, size: int) -> bool:
        end = address + size
        with self._cond:
            cells = list(self._cells.values())
        for cell in cells:
            if any(start <= address and end <= stop for start, stop in cell.subpage_ranges):
                return True
            for base, _pin in cell.ioapic_pins:
                if base + IOAPIC_EOI <= address and end <= base + IOAPIC_EOI + 4:
                    return True
        for bdf, (start, length) in self._msix_ranges.items():
            if bdf in self._device_owner and start <= address and end <= start + length:
                return True
        return False

    def _pci_fd(self, bdf: int) -> int | None:
        fd = self._pci_fds.get(bdf)
        if fd is not None:
            return fd
        domain = self._system.pci_domain if self._system is not None else 0
        name = f"{domain:04x}:{bdf >> 8:02x}:{(bdf >> 3) & 0x1F:02x}.{bdf & 7:x}"
        try:
            fd = os.open(os.path.join(self.pci_sysfs, name, "config"), os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            LOG.debug("PCI %s: no config space: %s", name, exc)
            return None
        self._pci_fds[bdf] = fd
        return fd

    def pci_read_config(self, bdf: int, reg: int, size: int) -> int:
        """Read the device's config space (sysfs, or VFIO for a passed-through device);
        all ones for an absent device."""
        passed = self.passthrough.device(bdf)
        if passed is not None:
            return self.passthrough.config_read(passed, reg, size)
        fd = self._pci_fd(bdf)
        if fd is None:
            return (1 << (8 * size)) - 1
        data = os.pread(fd, size, reg)
        if len(data) != size:
            return (1 << (8 * size)) - 1
        return int.from_bytes(data, "little")

    def pci_write_config(self, bdf: int, reg: int, size: int, value: int) -> None:
        """Write the config space of a device a non-root cell owns (root policy), through
        VFIO for a passed-through one."""
        passed = self.passthrough.device(bdf)
        if passed is not None:
            self.passthrough.config_write(passed, reg, size, value)
            return
        if bdf not in self._device_owner:
            LOG.debug("PCI %04x reg %#x = %#x for the root: not performed", bdf, reg, value)
            return
        fd = self._pci_fd(bdf)
        if fd is not None:
            os.pwrite(fd, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"), reg)

    def pci_add_device(self, cell_id: int, device: PciDevice) -> None:
        """Record the owner; a physical endpoint of a non-root cell is passed through
        (``arch_pci_add_device``: claimed for ``vfio-pci``, in the cell's IOMMU domain).

        :raise HvError: the VFIO step that failed, naming the device
        """
        if self._is_root(cell_id):
            self._device_owner.pop(device.bdf, None)
            return
        cell = self._cells.get(cell_id)
        if cell is not None and int(device.type) == PCI_TYPE_DEVICE:
            split = bool(self._kvm and self._kvm.check_extension(Cap.SPLIT_IRQCHIP))
            self.passthrough.attach(cell_id, cell.vm, device, split_irqchip=split)
            try:
                for entry in cell.slots.values():  # DMA regions mapped before the device came
                    region = entry.region
                    if region is not None and entry.mapping is not None and int(region.flags) & MEM_DMA:
                        self.passthrough.dma_map(cell_id, region, entry.mapping.mmap, entry.mapping.offset)
            except BaseException:
                self.passthrough.detach(device.bdf)
                raise
        self._device_owner[device.bdf] = cell_id
        if device.msix_address:
            self._msix_ranges[device.bdf] = (device.msix_address, device.msix_region_size)

    def pci_remove_device(self, cell_id: int, device: PciDevice) -> None:
        """Forget the owner; writes stay allowed until the root gets the device back. A
        passed-through device is closed (``vfio-pci`` lets it go at the operation's end)."""
        self.passthrough.detach(device.bdf)
        if not self._is_root(cell_id) and device.bdf in self._device_owner:
            self._device_owner[device.bdf] = -1

    def send_msi(self, cell_id: int, address: int, data: int) -> None:
        """``KVM_SIGNAL_MSI`` into the cell's VM (the root cannot receive it)."""
        cell = self._cells.get(cell_id)
        if cell is None:
            LOG.debug("MSI %#x/%#x for cell %d not delivered (no VM)", address, data, cell_id)
            return
        cell.vm.signal_msi(address, data)

    def _ioapic(self, address: int) -> PhysMapping | None:
        mapping, _ = self._mmio_window(address, IOAPIC_DATA + 4)
        if mapping is None and address not in self._detached_ioapics:
            LOG.warning(
                "IOAPIC %#x not reachable through %s (CONFIG_IO_STRICT_DEVMEM: boot with "
                "iomem=relaxed); cells see a detached IOAPIC with %d pins",
                address,
                self.mem_device,
                DETACHED_IOAPIC_PINS,
            )
            self._detached_ioapics[address] = {}
        return mapping

    def ioapic_read(self, address: int, index: int) -> int:
        """Register ``index`` of the physical IOAPIC (index/data pair); of a detached
        IOAPIC model when the hardware is out of reach."""
        mapping = self._ioapic(address)
        if mapping is None:
            return self._detached_ioapics[address].get(index, _detached_ioapic_reset(index))
        base = address & (PAGE_SIZE - 1)
        with self._hw_lock:
            mapping.write_value(base, 4, index)
            return mapping.read_value(base + IOAPIC_DATA, 4)

    def ioapic_write(self, address: int, index: int, value: int) -> None:
        """Write register ``index``, for redirection entries of pins a non-root cell owns."""
        pin = (index - IOAPIC_REDIR_TBL_START) // 2
        with self._cond:
            owned = index >= IOAPIC_REDIR_TBL_START and any(
                (address, pin) in cell.ioapic_pins for cell in self._cells.values()
            )
        if not owned:
            LOG.debug("IOAPIC %#x index %#x = %#x for the root: not performed", address, index, value)
            return
        mapping = self._ioapic(address)
        if mapping is None:
            self._detached_ioapics[address][index] = value & 0xFFFFFFFF
            return
        base = address & (PAGE_SIZE - 1)
        with self._hw_lock:
            mapping.write_value(base, 4, index)
            mapping.write_value(base + IOAPIC_DATA, 4, value)

    # ===================================================================================
    # memory
    # ===================================================================================

    @contextlib.contextmanager
    def _phys(self, address: int, size: int) -> Iterator[tuple[PhysMapping, int]]:
        """A mapping covering ``address``+``size``: a cell region's, or a temporary one."""
        with self._cond:
            cells = list(self._cells.values())
        for cell in cells:
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
        """Send hypervisor console text to the debug UART (8250: wait for THRE, ``\\n`` as
        ``\\r\\n``, as Jailhouse's ``uart_write``).

        Works after :meth:`shutdown` too (the model prints the ``Releasing CPU`` lines
        then, as Jailhouse's CPUs do on their way out), with ports opened for the call.
        """
        base = self._console_base
        if base is None:
            return
        ports = self._ports
        temporary: PortIo | None = None
        if ports is None:
            if self._state is not _State.SHUT_DOWN:
                return
            try:
                ports = temporary = open_ports(mode=self.port_mode)
            except HvError as exc:
                LOG.debug("no ports for the console after shutdown: %s", exc)
                return
        try:
            for byte in text.encode("latin-1", "replace"):
                if byte == 0x0A:
                    self._uart_put(ports, base, 0x0D)
                self._uart_put(ports, base, byte)
        except (OSError, HvError, ValueError) as exc:
            LOG.warning("debug UART %#x failed (%s); console output stays in the model", base, exc)
            self._console_base = None
        finally:
            if temporary is not None:
                temporary.close()

    @staticmethod
    def _uart_put(ports: PortIo, base: int, byte: int) -> None:
        deadline = time.monotonic() + UART_TIMEOUT
        while not ports.read(base + UART_LSR, 1) & UART_LSR_THRE and time.monotonic() < deadline:
            pass
        ports.write(base, 1, byte)

    # ===================================================================================
    # diagnostics
    # ===================================================================================

    def status(self) -> dict[str, object]:
        """JSON-friendly state of the executor: cells, CPUs, threads, isolation."""
        with self._cond:
            cpus = {
                cpu.id: {
                    "cell": cpu.cell.id,
                    "state": cpu.state.value,
                    "suspended": cpu.suspended,
                    "affinity": sorted(cpu.affinity) if cpu.affinity is not None else None,
                    "thread_alive": bool(cpu.thread and cpu.thread.is_alive()),
                    "exits": cpu.exit_counts(),
                    "dropped": cpu.dropped,
                }
                for cpu in self._cpus.values()
            }
            cells = {
                cell.id: {"name": cell.config.name, "cpus": sorted(cell.cpus), "slots": len(cell.slots)}
                for cell in self._cells.values()
            }
        return {
            "state": self._state.value,
            "vendor": self.vendor,
            "ports": self._ports.mode if self._ports is not None else None,
            "xen_hypercalls": self._xen_hypercalls,
            "isolation": self.isolation_problem or "cpuset",
            "cpuset": repr(self.cpuset) if self.cpuset is not None else None,
            "cells": cells,
            "cpus": cpus,
            "zombies": sum(1 for z in self._zombies if z.is_alive()),
            "passthrough": {
                d.address.short: {"cell": d.cell_id, "group": d.group, "msi": len(d.msi_routes),
                                  "msix": len(d.msix_routes)}
                for cell_id in sorted(self._cells) for d in self.passthrough.devices_of(cell_id)
            },
        }


def kick_handler_installed() -> bool:
    """Whether :meth:`Vcpu.kick` can interrupt KVM_RUN (a :data:`KICK_SIGNAL` handler)."""
    return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None)


def _detached_ioapic_reset(index: int) -> int:
    """Registers of an IOAPIC after reset: version 0x11 with :data:`DETACHED_IOAPIC_PINS`
    entries (QEMU's), every redirection entry masked."""
    if index == 0x01:
        return ((DETACHED_IOAPIC_PINS - 1) << 16) | 0x11
    if index >= IOAPIC_REDIR_TBL_START and (index - IOAPIC_REDIR_TBL_START) % 2 == 0:
        return IOAPIC_REDIR_MASKED
    return 0


def _svm_unexpected(exitcode: int) -> str:
    """``svm.c``'s default case (exit information 1 and 2 are not reported by KVM)."""
    return f"Unexpected #VMEXIT, exitcode {exitcode:x}, exitinfo1 0x{0:016x} exitinfo2 0x{0:016x}"


# ---------------------------------------------------------------------------------------
# the lab's Linux, as the driver needs it
# ---------------------------------------------------------------------------------------


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """``amd`` (SVM), ``intel`` (VMX) or ``""`` from the CPU flags."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "amd" if "svm" in flags else "intel" if "vmx" in flags else ""
    except OSError:
        pass
    return ""


def online_cpus(path: str = "/sys/devices/system/cpu/online") -> frozenset[int]:
    """The CPUs Linux has online (empty when unknown)."""
    try:
        with open(path, encoding="ascii") as handle:
            return parse_cpu_list(handle.read())
    except (OSError, ValueError):
        return frozenset()


_IOMEM_LINE: Final = re.compile(r"^([0-9a-fA-F]+)-([0-9a-fA-F]+) : (.*)$")


def reserved_ranges(iomem: str = "/proc/iomem") -> tuple[tuple[int, int], ...]:
    """Top-level ``Reserved`` ranges of ``/proc/iomem`` (``memmap=`` windows) as
    ``(start, size)``."""
    found: list[tuple[int, int]] = []
    try:
        with open(iomem, encoding="ascii", errors="replace") as handle:
            for line in handle:
                match = _IOMEM_LINE.match(line.rstrip("\n"))
                if match and match.group(3).strip().lower() == "reserved":
                    start, end = int(match.group(1), 16), int(match.group(2), 16)
                    found.append((start, end - start + 1))
    except OSError:
        pass
    return tuple(found)


def host_info(kvm_path: str = "/dev/kvm") -> HostInfo:
    """The lab's Linux for :class:`~harness.hvmodel.driver.Driver`: online CPUs, vendor,
    ``memmap=`` reservations, and the TSC and local-APIC timer frequencies *as KVM gives
    them to cells* (``KVM_GET_TSC_KHZ`` of a scratch vCPU; KVM's APIC bus: 1 GHz unless
    reconfigured), which the driver writes into the system config when it has zeros.

    The scratch VM comes and goes; with an executor at hand, prefer
    :meth:`ExecutorArch.host_info`, which measures on its keeper VM.
    """
    from .runner import apic_khz, measure_tsc_khz

    with Kvm(kvm_path) as kvm:
        vm = kvm.create_vm()
        try:
            tsc = measure_tsc_khz(vm.create_vcpu(0))
        finally:
            vm.close()
        apic = apic_khz(kvm)
    return _describe_host(tsc, apic)


def _describe_host(tsc_khz: int, apic_khz: int) -> HostInfo:
    from ..driver import HostInfo

    online = online_cpus()
    possible = online_cpus("/sys/devices/system/cpu/possible")
    return HostInfo(
        online_cpus=online or frozenset({0}),
        possible_cpus=(max(possible) + 1) if possible else max(online, default=0) + 1,
        cpu_vendor=cpu_vendor(),
        reserved=reserved_ranges() or None,
        tsc_khz=tsc_khz,
        apic_khz=apic_khz,
    )
