"""Jailhouse's exit statistics for the exits KVM handles in the kernel, and the exit a
cell CPU failed at; stands where the ``stats[]`` increments of
``hypervisor/arch/x86/{svm,vmx,vcpu,apic}.c`` are.

On Jailhouse every intercepted instruction is an exit the hypervisor counts
(``vcpu_handle_exit``). Under the executor, KVM handles most of them inside the kernel
(CPUID, MSRs, CR writes, XSETBV, exceptions): they never reach user space, and only the
exits that do (port and MMIO accesses, hypercalls) reach the model. KVM's tracepoints
see the rest; per cell CPU a :class:`VcpuExitTrace` watches its vCPU thread through
:mod:`~harness.hvmodel.arch.perf`:

=========================  ===================  ======================================
statistic                  tracepoint           counted when (Jailhouse)
=========================  ===================  ======================================
``vmexits_cpuid``          ``kvm:kvm_exit``     every CPUID (both vendors intercept it)
``vmexits_msr_other``,     ``kvm:kvm_msr``      an access Jailhouse's MSR bitmap traps
``vmexits_msr_x2apic_icr``                      (:class:`MsrTraps`; ICR writes apart)
``vmexits_xsetbv``         ``kvm:kvm_exit``     every XSETBV on VMX; SVM does not
                                                intercept it (``vmcb_setup``)
``vmexits_exception``      ``kvm:kvm_exit``     #DB and #AC (Jailhouse's intercepts)
``vmexits_cr``             ``kvm:kvm_exit``     a CR0 write KVM intercepts (SVM), a CR
                                                access KVM intercepts (VMX)
=========================  ===================  ======================================

Counters are filtered in the kernel; ``vmexits_total`` is their sum (the model adds the
exits it counts itself). Limits: an access KVM does not intercept is not seen, so not
counted (an MSR it passes through; a CR0 write while the guest's CR0 has neither CD nor
NW set: KVM intercepts CR0 writes only then, Jailhouse's SVM intercept every write that
changes more than TS and MP); CR accesses are counted as KVM intercepts them (its
``kvm_cr`` tracepoint misses writes it emulates without decode assists, as under QEMU's
TCG); MANAGEMENT exits are the model's (:mod:`harness.hvmodel.core`, at each suspend),
XAPIC ones cannot happen (cells use x2APIC).

**The failing exit.** A sampler keeps the ``kvm_exit`` records of the exits that end a
cell CPU (shutdown, failed entry): on SVM, KVM resets the vCPU in its shutdown intercept
before it returns ``KVM_EXIT_SHUTDOWN``, so the record (exit code, RIP, exit information,
the event being delivered) is all that is left of the state at the failure
(:meth:`VcpuExitTrace.failing_exit`).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from typing import Final

from ..abi import MSR_X2APIC_ICR, VMX_EXIT_FAILED_VMENTRY, CpuStat, SvmExit, VmxExit
from .perf import Tracepoint, TracepointCounter, TracepointSampler, tracepoint

__all__ = [
    "ExitRules",
    "MsrTraps",
    "TraceEvents",
    "TracedExit",
    "VcpuExitTrace",
]

#: MSR ranges the intercept bitmaps cover; an MSR outside them always exits (and
#: Jailhouse reports it: ``Unhandled MSR read/write``)
_SVM_MSRPM_RANGES: Final = ((0, 0x1FFF), (0xC0000000, 0xC0001FFF), (0xC0010000, 0xC0011FFF))
_VMX_BITMAP_RANGES: Final = ((0, 0x1FFF), (0xC0000000, 0xC0001FFF))

#: ``svm.c`` ``msrpm``: (first MSR, last MSR, byte), two bits per MSR (read, write)
_SVM_MSRPM: Final = (
    (0x018, 0x01B, 0x80), (0x200, 0x273, 0xAA), (0x274, 0x277, 0xEA), (0x2FC, 0x2FF, 0x80),
    (0xC0000080, 0xC0000083, 0x02),
)  # fmt: skip
#: ``svm.c`` ``msrpm``, the x2APIC part (emulated when the host runs its APIC in xAPIC mode)
_SVM_MSRPM_X2APIC: Final = (
    (0x800, 0x803, 0x90), (0x808, 0x80B, 0x93), (0x80C, 0x80F, 0xC8), (0x810, 0x827, 0x55),
    (0x828, 0x82B, 0x03), (0x82C, 0x82F, 0xC0), (0x830, 0x833, 0xF3), (0x834, 0x837, 0xFF),
    (0x838, 0x83B, 0x07), (0x83C, 0x83F, 0x70),
)  # fmt: skip
#: ``vcpu_vendor_early_init`` with an x2APIC host: only ICR writes trap
_SVM_MSRPM_X2APIC_HOST: Final = ((0x830, 0x833, 0x02),)
#: ``vmx.c`` ``msr_bitmap``: (first MSR, last MSR, byte), one bit per MSR
_VMX_READ: Final = ((0x270, 0x277, 0x80), (0x2F8, 0x2FF, 0x80))
_VMX_READ_X2APIC: Final = (
    (0x800, 0x807, 0x0C), (0x808, 0x80F, 0xA5), (0x810, 0x827, 0xFF), (0x828, 0x82F, 0x81),
    (0x830, 0x837, 0xFD), (0x838, 0x83F, 0x43),
)  # fmt: skip
_VMX_WRITE: Final = (
    (0x018, 0x01F, 0x08), (0x200, 0x277, 0xFF), (0x2F8, 0x2FF, 0x80), (0x388, 0x38F, 0x80),
    (0x840, 0xD8F, 0xFF),
)  # fmt: skip
_VMX_WRITE_X2APIC: Final = (
    (0x808, 0x80F, 0x89), (0x828, 0x82F, 0x81), (0x830, 0x837, 0xFD), (0x838, 0x83F, 0xC1),
)  # fmt: skip
_VMX_WRITE_X2APIC_HOST: Final = ((0x830, 0x837, 0x01),)


def _svm_traps(table: Iterable[tuple[int, int, int]]) -> tuple[set[int], set[int]]:
    reads: set[int] = set()
    writes: set[int] = set()
    for first, last, byte in table:
        for msr in range(first, last + 1):
            bit = 2 * ((msr - first) % 4)
            if byte >> bit & 1:
                reads.add(msr)
            if byte >> (bit + 1) & 1:
                writes.add(msr)
    return reads, writes


def _vmx_traps(table: Iterable[tuple[int, int, int]]) -> set[int]:
    return {msr for first, last, byte in table for msr in range(first, last + 1)
            if byte >> ((msr - first) % 8) & 1}


def _ranges(msrs: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted MSR numbers as inclusive (first, last) runs."""
    runs: list[tuple[int, int]] = []
    for msr in sorted(msrs):
        if runs and runs[-1][1] == msr - 1:
            runs[-1] = (runs[-1][0], msr)
        else:
            runs.append((msr, msr))
    return runs


@dataclasses.dataclass(frozen=True)
class MsrTraps:
    """The MSR accesses Jailhouse intercepts on a machine: its MSR bitmap for the
    ``vendor`` (``amd``: ``svm.c``, ``intel``: ``vmx.c``), with the x2APIC part for a
    host whose local APIC is in xAPIC mode (Jailhouse then emulates x2APIC for cells) or
    only the ICR write for an x2APIC host; MSRs outside the bitmaps' ranges always exit.

    :param reads: MSRs whose reads exit (within the bitmap ranges)
    :param writes: MSRs whose writes exit (within the bitmap ranges)
    :param covered: the bitmap ranges (first, last)
    """

    reads: frozenset[int]
    writes: frozenset[int]
    covered: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, vendor: str, *, x2apic_host: bool) -> MsrTraps:
        if vendor == "amd":
            table = _SVM_MSRPM + (_SVM_MSRPM_X2APIC_HOST if x2apic_host else _SVM_MSRPM_X2APIC)
            reads, writes = _svm_traps(table)
            return cls(frozenset(reads), frozenset(writes), _SVM_MSRPM_RANGES)
        reads = _vmx_traps(_VMX_READ + (() if x2apic_host else _VMX_READ_X2APIC))
        writes = _vmx_traps(_VMX_WRITE + (_VMX_WRITE_X2APIC_HOST if x2apic_host else _VMX_WRITE_X2APIC))
        return cls(frozenset(reads), frozenset(writes), _VMX_BITMAP_RANGES)

    def exits(self, msr: int, write: bool) -> bool:
        """Whether Jailhouse intercepts this access."""
        if not any(first <= msr <= last for first, last in self.covered):
            return True
        return msr in (self.writes if write else self.reads)

    def stat(self, msr: int, write: bool) -> CpuStat | None:
        """The statistic the access counts in, None when it does not exit."""
        if not self.exits(msr, write):
            return None
        if write and msr == MSR_X2APIC_ICR:
            return CpuStat.VMEXITS_MSR_X2APIC_ICR
        return CpuStat.VMEXITS_MSR_OTHER

    def filter(self, stat: CpuStat) -> str:
        """The ``kvm:kvm_msr`` filter of the accesses counted in ``stat``."""
        if stat is CpuStat.VMEXITS_MSR_X2APIC_ICR:
            return f"write == 1 && ecx == {MSR_X2APIC_ICR:#x}" if MSR_X2APIC_ICR in self.writes else ""
        outside = " && ".join(f"(ecx < {first:#x} || ecx > {last:#x})" if first else f"ecx > {last:#x}"
                              for first, last in self.covered)
        reads = [_predicate(run) for run in _ranges(self.reads)]
        writes = [_predicate(run) for run in _ranges(self.writes - {MSR_X2APIC_ICR})]
        parts = [f"({outside})"]
        if reads:
            parts.append(f"(write == 0 && ({' || '.join(reads)}))")
        if writes:
            parts.append(f"(write == 1 && ({' || '.join(writes)}))")
        return " || ".join(parts)


def _predicate(run: tuple[int, int]) -> str:
    first, last = run
    return f"ecx == {first:#x}" if first == last else f"(ecx >= {first:#x} && ecx <= {last:#x})"


@dataclasses.dataclass(frozen=True)
class ExitRules:
    """What Jailhouse counts of the exits KVM handles, on this machine.

    :param vendor: ``amd`` (SVM) or ``intel`` (VMX)
    :param x2apic_host: the host's local APIC runs in x2APIC mode (Jailhouse's
        ``using_x2apic``)
    """

    vendor: str
    x2apic_host: bool

    @property
    def msr_traps(self) -> MsrTraps:
        return MsrTraps.of(self.vendor, x2apic_host=self.x2apic_host)

    def exit_counters(self) -> dict[CpuStat, str]:
        """``kvm:kvm_exit`` filters by statistic."""
        if self.vendor == "amd":
            return {
                CpuStat.VMEXITS_CPUID: f"exit_reason == {SvmExit.CPUID:#x}",
                CpuStat.VMEXITS_CR: (f"exit_reason == {SvmExit.CR0_WRITE:#x} || "
                                     f"exit_reason == {SvmExit.CR0_SEL_WRITE:#x}"),
                CpuStat.VMEXITS_EXCEPTION: (f"exit_reason == {SvmExit.EXCEPTION_DB:#x} || "
                                            f"exit_reason == {SvmExit.EXCEPTION_AC:#x}"),
            }
        # VMX exception exits: #DB (hardware exception, or ICEBP) and #AC (error code)
        events = " || ".join(f"intr_info == {info:#x}" for info in (0x80000301, 0x80000501, 0x80000B11))
        return {
            CpuStat.VMEXITS_CPUID: f"exit_reason == {VmxExit.CPUID}",
            CpuStat.VMEXITS_CR: f"exit_reason == {VmxExit.CR_ACCESS}",
            CpuStat.VMEXITS_XSETBV: f"exit_reason == {VmxExit.XSETBV}",
            CpuStat.VMEXITS_EXCEPTION: f"exit_reason == {VmxExit.EXCEPTION_NMI} && ({events})",
        }

    def fatal_filter(self) -> str:
        """``kvm:kvm_exit`` filter of the exits that end a cell CPU."""
        if self.vendor == "amd":
            return f"exit_reason == {SvmExit.SHUTDOWN:#x} || exit_reason == {SvmExit.INVALID:#x}"
        return f"exit_reason == {VmxExit.TRIPLE_FAULT} || exit_reason >= {VMX_EXIT_FAILED_VMENTRY:#x}"


@dataclasses.dataclass(frozen=True)
class TraceEvents:
    """The KVM tracepoints :class:`VcpuExitTrace` uses (looked up once).

    :raise PerfError: from :meth:`load` when tracefs or KVM's events are missing
    """

    exit: Tracepoint
    msr: Tracepoint

    @classmethod
    def load(cls, root: str | None = None) -> TraceEvents:
        return cls(tracepoint("kvm:kvm_exit", root), tracepoint("kvm:kvm_msr", root))


@dataclasses.dataclass(frozen=True)
class TracedExit:
    """A ``kvm_exit`` record: the hardware exit code (SVM EXITCODE, VMX exit reason), the
    guest RIP and KVM's exit information (SVM: EXITINFO1/2 and EXITINTINFO; VMX: the
    qualification, the IDT-vectoring and the exit interruption information)."""

    reason: int
    rip: int
    info1: int
    info2: int
    intr_info: int
    error_code: int

    @classmethod
    def decode(cls, point: Tracepoint, raw: bytes) -> TracedExit:
        return cls(*(point.field(raw, name) for name in (
            "exit_reason", "guest_rip", "info1", "info2", "intr_info", "error_code")))


class VcpuExitTrace:
    """The exits KVM handles for one cell CPU, counted as Jailhouse counts them, and its
    failing exit (module docstring). Opened in the vCPU thread (or for its ``pid``);
    lives as long as the CPU is the cell's; :meth:`counts` and :meth:`failing_exit` may
    be called from any thread.

    :param rules: what counts
    :param events: KVM's tracepoints
    :param pid: the vCPU thread (0: the calling one)
    :raise PerfError: when a counter cannot be opened (those opened are closed)
    """

    def __init__(self, rules: ExitRules, events: TraceEvents, *, pid: int = 0) -> None:
        self.rules = rules
        self.events = events
        self._lock = threading.Lock()
        self._counters: dict[CpuStat, TracepointCounter] = {}
        self._failing: TracedExit | None = None
        self._fatal: TracepointSampler | None = None
        try:
            for stat, text in rules.exit_counters().items():
                self._counters[stat] = TracepointCounter(events.exit, text, pid)
            traps = rules.msr_traps
            for stat in (CpuStat.VMEXITS_MSR_OTHER, CpuStat.VMEXITS_MSR_X2APIC_ICR):
                text = traps.filter(stat)
                if text:
                    self._counters[stat] = TracepointCounter(events.msr, text, pid)
            self._fatal = TracepointSampler(events.exit, rules.fatal_filter(), pid, pages=1)
        except BaseException:
            self.close()
            raise

    def counts(self) -> dict[CpuStat, int]:
        """Exits by statistic since the trace was opened, ``VMEXITS_TOTAL`` their sum."""
        with self._lock:
            counts = {stat: counter.read() for stat, counter in self._counters.items()}
        counts[CpuStat.VMEXITS_TOTAL] = sum(counts.values())
        return counts

    def failing_exit(self) -> TracedExit | None:
        """The newest exit that ended the CPU (shutdown, failed entry), if one was traced."""
        with self._lock:
            sampler = self._fatal
            if sampler is not None:
                for raw in sampler.drain():
                    self._failing = TracedExit.decode(self.events.exit, raw)
            return self._failing

    def close(self) -> None:
        """Close every counter and sampler; idempotent. Counts read 0 afterwards."""
        with self._lock:
            for counter in self._counters.values():
                counter.close()
            self._counters.clear()
            if self._fatal is not None:
                self._fatal.close()
                self._fatal = None
