"""The executor's exit handlers; models ``vcpu_handle_exit`` and its cases in
``hypervisor/arch/x86/vcpu.c`` (``vcpu_handle_io``, ``vcpu_handle_mmio``,
``vcpu_handle_hypercall``) and the default cases of ``svm.c`` / ``vmx.c`` (the FATAL
wording of an exit nobody handles).

:class:`ExitDispatcher` takes each exit a vCPU thread delivers and passes it to the
model's exit entry points (:class:`ExitHandler`, the
:class:`~harness.hvmodel.control.Hypervisor`):

* **PIO** to :meth:`Hypervisor.handle_pio` (whitelist, PCI config, i8042, FATAL). With
  native ports the accesses the cell's I/O bitmap opens (:meth:`Hypervisor.pio_bitmap`)
  never come here: :meth:`ExitDispatcher.io_bitmap_loop` gives the vCPU thread a
  machine-code KVM_RUN loop (:class:`~harness.hvmodel.arch.portio.IoBitmapLoop`) that
  performs them itself (KVM still exits to user space for each), as the CPU's I/O bitmap
  lets them through in Jailhouse; it also answers the PCI configuration ports for devices
  outside the cell and keeps what the cell prints on its UARTs (:mod:`.cellports`);
  every other exit comes back.
* **MMIO** to :meth:`Hypervisor.handle_mmio`.
* **EOIs** of level-triggered vectors an IOAPIC pin delivered (``KVM_EXIT_IOAPIC_EOI``
  with the split irqchip) go to :attr:`ExitDispatcher.on_ioapic_eoi` (the executor's
  :mod:`.interrupts`), not to the model: Jailhouse sees no exit for them either.
* **Hypercalls**: with ``CONFIG_KVM_XEN`` (``KVM_CAP_XEN_HVM`` with
  ``KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL``) VMCALL/VMMCALL exit as ``KVM_EXIT_XEN`` and go to
  :meth:`Hypervisor.hypercall` (code in EAX, arguments in RDI and RSI, result in RAX,
  -EPERM above CPL 0). **Debian's kernel lacks CONFIG_KVM_XEN**: there KVM answers every
  VMCALL/VMMCALL itself with ``-KVM_ENOSYS`` (-1000) in RAX, and cells' hypercalls (the
  debug console ``con-virtual``, CPU_GET_INFO) are not seen by the model.
* **x2APIC writes with bits 63:32 set** (other than the ICR), which KVM refuses: with the
  host's APIC in xAPIC mode Jailhouse emulates x2APIC and takes EAX only, so the executor
  writes the low half (:meth:`ExitDispatcher._x2apic_write_emulated`); with an x2APIC
  host they are FATAL as below (the hardware would raise #GP).
* **Fatal**: triple fault, failed entry, KVM internal errors and MSRs KVM does not know go
  to :meth:`Hypervisor.panic_park` with Jailhouse's FATAL wording for the vendor (SVM:
  ``Unexpected #VMEXIT, exitcode 7f, ...``; VMX: ``Unhandled VM-Exit, reason 2`` and the
  exit details) and a register dump, from the state at the failing exit
  (:func:`fatal_report`): the exit code and information come from the CPU's trace of
  KVM's ``kvm_exit`` records; after a shutdown on SVM KVM has reset the vCPU, so only the
  traced RIP is shown.

**Statistics**: the model counts the exits it handles (``vmexits_pio``, ``vmexits_mmio``,
``vmexits_hypercall`` and ``vmexits_total``); fatal exits are counted in
``vmexits_total`` (MSR ones also in ``vmexits_msr_other``) through
:meth:`Hypervisor.count_exit`. Exits KVM handles in the kernel (CPUID, CR, MSRs, x2APIC,
XSETBV, #DB/#AC) are counted by each CPU's trace (:class:`KernelExits`,
:mod:`~harness.hvmodel.arch.exitstats`) where Jailhouse would count them, and added by the
model when it reads the statistics (``Arch.cpu_exit_counts``). Port accesses the I/O
bitmap lets through are not counted (no exit in Jailhouse), whether the I/O bitmap loop
or Python performs them.

**Not done here**: string port I/O with a count of 1 (KVM does not tell it from a plain
IN/OUT), the x86 instruction decoder's FATALs (KVM emulates the MMIO instruction).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, cast

from ...abi import (
    MSR_X2APIC_BASE,
    MSR_X2APIC_END,
    MSR_X2APIC_ICR,
    VMX_EXIT_FAILED_VMENTRY,
    CpuStat,
    SvmExit,
    VmxExit,
)
from ...errors import Errno, JhlabError
from ..exitstats import ExitRules, MsrTraps, TraceEvents, VcpuExitTrace
from ..kvm import (
    FailEntryExit,
    IoapicEoiExit,
    IoExit,
    KvmError,
    MmioExit,
    MsrExit,
    ShutdownExit,
    UnknownExit,
    VcpuExit,
    XenExit,
    describe_exit,
)
from ..perf import PerfError
from ..portio import IoBitmapLoop, NativePorts, PortIo
from ..vcpu import format_state
from .cellports import loop_bitmap
from .cells import CellCpu, ExecutorStateError

if TYPE_CHECKING:
    from ...percpu import ExitResult

__all__ = ["ExitDispatcher", "ExitHandler", "KernelExits", "fatal_report", "fatal_text"]

LOG = logging.getLogger(__name__)

#: SVM EXITINTINFO / VMX interruption information: the event is valid
EVENT_VALID: Final = 1 << 31


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

    def count_exit(self, cpu: int, stat: CpuStat, count: int = 1) -> None: ...

    def hypercall(self, cpu: int, code: int, arg1: int = 0, arg2: int = 0, *, rip: int = 0) -> int: ...

    def pio_bitmap(self, cpu: int) -> bytearray | None: ...


class ExitDispatcher:
    """Hands each exit of a cell CPU to the model (module docstring).

    :param vendor: ``amd`` or ``intel``, for the FATAL wording
    :param ports: gives the port backend (None before the executor's ``init``)
    :param native_pio: serve the port I/O a cell's I/O bitmap opens in machine code
    """

    def __init__(self, *, vendor: str, ports: Callable[[], PortIo | None], native_pio: bool) -> None:
        self.vendor = vendor
        self.native_pio = native_pio
        #: the host's APIC is in xAPIC mode: Jailhouse emulates x2APIC for cells (set at init)
        self.x2apic_emulated = False
        self._ports = ports
        self.handler: Callable[[], ExitHandler | None] = lambda: None
        #: where a cell CPU's EOI of a pin's vector goes (CPU, vector)
        self.on_ioapic_eoi: Callable[[CellCpu, int], None] = lambda cpu, vector: None

    def attach(self, target: ExitHandler | Callable[[], ExitHandler | None]) -> None:
        """Tell the dispatcher where exits go.

        :param target: the hypervisor, or a callable returning the current one (e.g.
            ``lambda: driver.hv``; None while disabled)
        """
        if hasattr(target, "handle_pio"):
            handler = cast("ExitHandler", target)
            self.handler = lambda: handler
        else:
            self.handler = target

    # --- delivery ------------------------------------------------------------------------

    def handle_exit(self, cpu: CellCpu, exit_: VcpuExit) -> str | None:
        """Deliver one exit (``vcpu_handle_exit``).

        :return: None, or why the CPU cannot go on and must be parked by the executor
            (no hypervisor attached, or the model refused the exit)
        """
        cpu.exits[type(exit_).__name__] += 1
        handler = self.handler()
        if handler is None:
            return f"no hypervisor attached for {describe_exit(exit_)}"
        try:
            if cpu.ports_sync is not None and cpu.io_loop is not None:
                cpu.ports_sync.before_exit(handler, cpu.io_loop.pci_served,
                                           port_exit=isinstance(exit_, IoExit))
            if isinstance(exit_, IoExit):
                self.handle_io(handler, cpu, exit_)
            elif isinstance(exit_, MmioExit):
                self.handle_mmio(handler, cpu, exit_)
            elif isinstance(exit_, XenExit):
                self.handle_hypercall(handler, cpu, exit_)
            elif isinstance(exit_, IoapicEoiExit):
                self.on_ioapic_eoi(cpu, exit_.vector)
            elif isinstance(exit_, MsrExit) and self._x2apic_write_emulated(cpu, exit_):
                handler.count_exit(cpu.id, CpuStat.VMEXITS_MSR_OTHER)
            elif isinstance(exit_, MsrExit):
                handler.count_exit(cpu.id, CpuStat.VMEXITS_MSR_OTHER)
                handler.panic_park(cpu.id, with_dump(cpu, describe_exit(exit_)))
            else:
                handler.count_exit(cpu.id, CpuStat.VMEXITS_TOTAL)
                handler.panic_park(cpu.id, fatal_report(cpu, exit_, self.vendor))
        except JhlabError as exc:
            # The model refused (e.g. disabled meanwhile): the CPU cannot go on.
            LOG.warning("CPU %d: exit not handled: %s", cpu.id, exc)
            return str(exc)
        return None

    def _x2apic_write_emulated(self, cpu: CellCpu, exit_: MsrExit) -> bool:
        """A write to an x2APIC register other than the ICR with bits 63:32 set, which KVM
        refuses: where the host's APIC is in xAPIC mode Jailhouse emulates x2APIC and its
        ``x2apic_handle_write`` takes EAX only, so the low half is written (through KVM,
        as the cell's own write would be) and the instruction completes.

        :return: whether the write was performed
        """
        if not (self.x2apic_emulated and exit_.is_write and exit_.data >> 32):
            return False
        msr = exit_.index
        if msr == MSR_X2APIC_ICR or not MSR_X2APIC_BASE <= msr <= MSR_X2APIC_END:
            return False
        if not MsrTraps.of(self.vendor, x2apic_host=False).exits(msr, True):
            return False  # a register Jailhouse does not trap: the hardware would refuse it
        try:
            cpu.vcpu.set_msrs({msr: exit_.data & 0xFFFFFFFF})
        except KvmError as exc:
            LOG.warning("CPU %d: x2APIC write %#x = %#x: %s", cpu.id, msr, exit_.data, exc)
            return False
        return True

    def report_fatal(self, cpu: CellCpu, text: str) -> None:
        """A failure of the CPU's own KVM calls: FATAL through the model (which parks the
        CPU); the executor parks it too, whether the model could be told or not."""
        handler = self.handler()
        try:
            if handler is None:
                raise ExecutorStateError("vCPU exit", "no hypervisor attached")
            handler.count_exit(cpu.id, CpuStat.VMEXITS_TOTAL)
            handler.panic_park(cpu.id, text)
        except JhlabError as exc:
            LOG.warning("CPU %d: %s", cpu.id, exc)

    # --- the cases ------------------------------------------------------------------------

    @staticmethod
    def handle_io(handler: ExitHandler, cpu: CellCpu, exit_: IoExit) -> None:
        """An IN/OUT the I/O bitmap loop did not serve (``vcpu_handle_io``)."""
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

    def io_bitmap_loop(self, cpu: CellCpu) -> IoBitmapLoop | None:
        """The I/O bitmap loop of the run that begins on ``cpu`` (its own thread, after a
        reset): the IN/OUT exits to ports the cell's I/O bitmap opens are served in machine
        code, as the CPU's bitmap check lets them through in Jailhouse; the rest come to
        :meth:`handle_exit`. None when it is off, the ports are not native, or the model
        gives no bitmap."""
        ports = self._ports()
        handler = self.handler()
        if not self.native_pio or not isinstance(ports, NativePorts) or handler is None:
            return None
        try:
            bitmap = handler.pio_bitmap(cpu.id)  # does not wait for the model's lock
            if bitmap is None:
                return None
            shared = cpu.cell.ports
            if shared is not None:
                bitmap = loop_bitmap(bitmap, cpu.cell.config)
            if cpu.ports_sync is not None:
                cpu.ports_sync.new_loop()
            return ports.io_bitmap_loop(cpu.vcpu.fd, cpu.vcpu.run_page, bitmap, shared)
        except (JhlabError, OSError, ValueError) as exc:
            LOG.warning("CPU %d: whitelisted port I/O goes through Python: %s", cpu.id, exc)
            return None

    @staticmethod
    def handle_mmio(handler: ExitHandler, cpu: CellCpu, exit_: MmioExit) -> None:
        """An access outside the cell's RAM slots (``vcpu_handle_mmio``)."""
        value = exit_.value if exit_.is_write else 0
        result = handler.handle_mmio(cpu.id, exit_.addr, exit_.length, exit_.is_write, value)
        if result.handled and not exit_.is_write:
            exit_.set_value(result.value or 0)

    @staticmethod
    def handle_hypercall(handler: ExitHandler, cpu: CellCpu, exit_: XenExit) -> None:
        """A VMCALL/VMMCALL as ``KVM_EXIT_XEN`` (``vcpu_handle_hypercall``; only with
        hypercall interception)."""
        if not exit_.is_hcall:
            handler.count_exit(cpu.id, CpuStat.VMEXITS_TOTAL)
            handler.panic_park(cpu.id, with_dump(cpu, f"Unexpected Xen exit type {exit_.type}"))
            return
        regs = cpu.vcpu.get_regs()
        if exit_.cpl:
            # vcpu_handle_hypercall: a caller above CPL 0 gets -EPERM (counted all the same).
            handler.count_exit(cpu.id, CpuStat.VMEXITS_HYPERCALL)
            result = -int(Errno.EPERM)
        else:
            longmode = exit_.longmode
            mask = 0xFFFFFFFFFFFFFFFF if longmode else 0xFFFFFFFF
            params = exit_.params
            arg1, arg2 = (params[0], params[1]) if longmode else (regs.rdi & mask, regs.rsi & mask)
            result = handler.hypercall(cpu.id, exit_.input & mask, arg1, arg2, rip=regs.rip)
        exit_.set_result(result)


class KernelExits:
    """The exits KVM handles in the kernel, per cell CPU (:mod:`~..exitstats`): KVM's
    tracepoints and Jailhouse's counting rules, found at :meth:`prepare` (executor init);
    one :class:`~..exitstats.VcpuExitTrace` per vCPU thread from :meth:`open`.

    :param enabled: trace at all (off: ``cell stats`` shows the model's counts only, and
        a FATAL dump after an SVM shutdown has no state)
    """

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._rules: ExitRules | None = None
        self._events: TraceEvents | None = None
        #: why nothing is traced (None: traced, once prepared)
        self.problem: str | None = None if enabled else "switched off"

    def prepare(self, vendor: str, *, x2apic_host: bool) -> None:
        """Find KVM's tracepoints (in a mounted tracefs); on failure cells run untraced
        (:attr:`problem` says why, logged)."""
        if not self.enabled:
            return
        try:
            self._events = TraceEvents.load()
        except PerfError as exc:
            self.problem = str(exc)
            LOG.warning("exits KVM handles are not counted, FATAL dumps after an SVM shutdown "
                        "show no state: %s", exc)
            return
        self._rules = ExitRules(vendor, x2apic_host=x2apic_host)
        self.problem = None

    def describe(self) -> str:
        return f"not counted ({self.problem})" if self.problem else "counted"

    def open(self) -> VcpuExitTrace | None:
        """The calling vCPU thread's trace (None when off, or when it cannot be opened:
        logged)."""
        rules, events = self._rules, self._events
        if rules is None or events is None:
            return None
        try:
            return VcpuExitTrace(rules, events)
        except PerfError as exc:
            LOG.warning("this cell CPU's exits in KVM are not counted: %s", exc)
            return None


def fatal_text(exit_: VcpuExit, vendor: str) -> str:
    """The text after ``FATAL: `` Jailhouse prints for an exit it cannot handle, on an
    ``amd`` (``svm.c``) or ``intel`` (``vmx.c``) machine."""
    if isinstance(exit_, ShutdownExit):
        if vendor == "amd":
            return _svm_unexpected(SvmExit.SHUTDOWN)
        return f"Unhandled VM-Exit, reason {VmxExit.TRIPLE_FAULT}"
    if isinstance(exit_, FailEntryExit):
        reason = exit_.hardware_entry_failure_reason
        if vendor == "amd":
            signed = reason - (1 << 64) if reason >= 1 << 63 else reason
            return f"VM-Entry failure, error {signed}"
        return f"VM-Entry failure, reason {reason & 0xFFFF}"
    if isinstance(exit_, UnknownExit):
        if vendor == "amd":
            return _svm_unexpected(exit_.hardware_exit_reason)
        return f"Unhandled VM-Exit, reason {exit_.hardware_exit_reason & 0xFFFF}"
    return describe_exit(exit_)


def fatal_report(cpu: CellCpu, exit_: VcpuExit, vendor: str) -> str:
    """What Jailhouse prints after ``FATAL: `` for an exit nobody handles, with the state
    at that exit: its ``svm.c``/``vmx.c`` line, the exit details (VMX:
    ``dump_vm_exit_details``) and ``dump_guest_regs``.

    A shutdown or failed entry takes the exit's own record from the CPU's trace (exit
    code, exit information). After a shutdown on SVM, KVM has reset the vCPU, so the
    record's RIP (and the event being delivered) is all that is left; the other registers
    are not printed rather than printed wrong.
    """
    traced = None
    if cpu.trace is not None and isinstance(exit_, (ShutdownExit, FailEntryExit)):
        traced = cpu.trace.failing_exit()
    lost = vendor == "amd" and isinstance(exit_, ShutdownExit)
    if traced is None:
        text = fatal_text(exit_, vendor)
        if lost:
            return f"{text}\n(no register dump: KVM reset the vCPU in its shutdown intercept)"
        return with_dump(cpu, text)
    if vendor == "amd":
        if traced.reason == SvmExit.INVALID:
            text = fatal_text(exit_, vendor)
        else:
            text = _svm_unexpected(traced.reason, traced.info1, traced.info2)
        if not lost:
            return with_dump(cpu, text)
        delivering = ""
        if traced.intr_info & EVENT_VALID:
            delivering = f"; it was delivering vector {traced.intr_info & 0xFF}"
        return (f"{text}\nRIP: 0x{traced.rip:016x} (the other registers are lost: KVM resets an "
                f"SVM vCPU in its shutdown intercept{delivering})")
    failed = traced.reason & VMX_EXIT_FAILED_VMENTRY
    text = (f"{'VM-Entry failure' if failed else 'Unhandled VM-Exit'}, reason {traced.reason & 0xFFFF}\n"
            f"qualification {traced.info1:x}\n"
            f"vectoring info: {traced.info2:x} interrupt info: {traced.intr_info:x}")
    return with_dump(cpu, text)


def with_dump(cpu: CellCpu, text: str) -> str:
    """``text`` plus the guest register dump Jailhouse prints after a FATAL line."""
    try:
        return f"{text}\n{format_state(cpu.vcpu)}"
    except KvmError as exc:
        return f"{text}\n(no register dump: {exc})"


def _svm_unexpected(exitcode: int, info1: int = 0, info2: int = 0) -> str:
    """``svm.c``'s default case (KVM's exit gives no exit information: 0 unless traced)."""
    return (f"Unexpected #VMEXIT, exitcode {exitcode:x}, exitinfo1 0x{info1:016x} "
            f"exitinfo2 0x{info2:016x}")
