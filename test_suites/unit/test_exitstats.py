"""Jailhouse's counting of the exits KVM handles in the kernel, and the failing-exit
report, without tracepoints: the rules (``svm.c``/``vmx.c`` bitmaps and intercepts), the
perf record decoding, the FATAL text from a traced exit. The tracepoints themselves are
exercised in a lab (``test_suites/e2e/test_probes.py``: counters, and the dump of a
triple fault in ``test_executor.py``)."""

from __future__ import annotations

import struct

import pytest

from harness.hvmodel.abi import CpuStat
from harness.hvmodel.arch.executor.cells import CellCpu
from harness.hvmodel.arch.executor.exits import fatal_report
from harness.hvmodel.arch.exitstats import ExitRules, MsrTraps, TracedExit
from harness.hvmodel.arch.kvm import ShutdownExit
from harness.hvmodel.arch.kvm.structs import KvmRegs, KvmSregs
from harness.hvmodel.arch.perf import decode_records, parse_format

# The format file of kvm:kvm_exit as Linux 6.1 gives it (print fmt shortened).
KVM_EXIT_FORMAT = """name: kvm_exit
ID: 1591
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned int exit_reason;\toffset:8;\tsize:4;\tsigned:0;
\tfield:unsigned long guest_rip;\toffset:16;\tsize:8;\tsigned:0;
\tfield:u32 isa;\toffset:24;\tsize:4;\tsigned:0;
\tfield:u64 info1;\toffset:32;\tsize:8;\tsigned:0;
\tfield:u64 info2;\toffset:40;\tsize:8;\tsigned:0;
\tfield:u32 intr_info;\toffset:48;\tsize:4;\tsigned:0;
\tfield:u32 error_code;\toffset:52;\tsize:4;\tsigned:0;
\tfield:unsigned int vcpu_id;\toffset:56;\tsize:4;\tsigned:0;

print fmt: "vcpu %u reason %s%s%s rip 0x%lx", REC->vcpu_id
"""


def _exit_raw(reason: int, rip: int, info1: int = 0, info2: int = 0, intr_info: int = 0) -> bytes:
    raw = bytearray(60)
    struct.pack_into("<HBBi", raw, 0, 1591, 0, 0, 1234)
    struct.pack_into("<I", raw, 8, reason)
    struct.pack_into("<Q", raw, 16, rip)
    struct.pack_into("<QQII", raw, 32, info1, info2, intr_info, 0)
    return bytes(raw)


def _sample(raw: bytes) -> bytes:
    """A PERF_RECORD_SAMPLE with PERF_SAMPLE_RAW (u32 size, data, padded to 8 bytes)."""
    body = struct.pack("<I", len(raw)) + raw
    body += bytes(-(len(body) + 8) % 8)
    return struct.pack("<IHH", 9, 0, 8 + len(body)) + body


@pytest.mark.parametrize(("vendor", "x2apic", "msr", "write", "stat"), [
    ("amd", False, 0x2FF, True, CpuStat.VMEXITS_MSR_OTHER),   # MTRR_DEF_TYPE write
    ("amd", False, 0x2FF, False, None),                        # its read passes (msrpm 0x80)
    ("intel", False, 0x2FF, False, CpuStat.VMEXITS_MSR_OTHER),  # VMX traps the read too
    ("amd", False, 0x277, False, CpuStat.VMEXITS_MSR_OTHER),   # PAT read
    ("amd", False, 0xC0000080, True, CpuStat.VMEXITS_MSR_OTHER),  # EFER write (SVM only)
    ("intel", False, 0xC0000080, True, None),
    ("intel", False, 0x38F, True, CpuStat.VMEXITS_MSR_OTHER),  # PERF_GLOBAL_CTRL (VMX)
    ("amd", False, 0x830, True, CpuStat.VMEXITS_MSR_X2APIC_ICR),
    ("amd", False, 0x80B, True, CpuStat.VMEXITS_MSR_OTHER),    # EOI, emulated x2APIC
    ("amd", False, 0x803, True, CpuStat.VMEXITS_MSR_OTHER),    # msrpm 0x90: 0x803 write
    ("amd", False, 0x803, False, None),
    ("amd", True, 0x80B, True, None),                          # x2APIC host: direct
    ("amd", True, 0x830, True, CpuStat.VMEXITS_MSR_X2APIC_ICR),
    ("intel", True, 0x830, False, None),
    ("intel", False, 0x839, False, CpuStat.VMEXITS_MSR_OTHER),  # TMCCT read
    ("intel", False, 0xC80, True, CpuStat.VMEXITS_MSR_OTHER),  # 0x840-0xd8f writes
    ("amd", False, 0xC80, True, None),
    ("amd", True, 0x40000000, False, CpuStat.VMEXITS_MSR_OTHER),  # outside the bitmaps
    ("amd", True, 0xC0010015, True, None),                     # inside SVM's third range
    ("intel", True, 0xC0010015, True, CpuStat.VMEXITS_MSR_OTHER),
    ("intel", True, 0x10, False, None),                        # TSC: no intercept
])
def test_msr_accesses_count_where_jailhouse_traps_them(
        vendor: str, x2apic: bool, msr: int, write: bool, stat: CpuStat | None) -> None:
    """Jailhouse's MSR bitmaps (svm.c msrpm, vmx.c msr_bitmap) decide what is an exit:
    the x2APIC registers trap when the host APIC is in xAPIC mode (emulated), only ICR
    writes otherwise; MSRs outside the bitmaps always exit."""
    assert MsrTraps.of(vendor, x2apic_host=x2apic).stat(msr, write) is stat


def _evaluate(text: str, **fields: int) -> bool:
    """An ftrace filter of ==, <, <=, >, >=, &&, || and parentheses, evaluated in Python."""
    return bool(eval(text.replace("&&", " and ").replace("||", " or "), {}, fields))


@pytest.mark.parametrize("vendor", ["amd", "intel"])
@pytest.mark.parametrize("x2apic", [False, True])
def test_msr_filters_select_what_the_bitmaps_trap(vendor: str, x2apic: bool) -> None:
    """The kvm_msr filters the kernel applies agree with the bitmaps, access by access."""
    traps = MsrTraps.of(vendor, x2apic_host=x2apic)
    other = traps.filter(CpuStat.VMEXITS_MSR_OTHER)
    icr = traps.filter(CpuStat.VMEXITS_MSR_X2APIC_ICR)
    msrs = [*range(0, 0x900), *range(0xC80, 0xD90, 7), 0x1FFF, 0x2000, 0x40000000,
            *range(0xC0000080, 0xC0000084), 0xC0010015, 0xC0012000, 0xFFFFFFFF]
    for msr in msrs:
        for write in (0, 1):
            stat = traps.stat(msr, bool(write))
            got_other = _evaluate(other, ecx=msr, write=write)
            got_icr = bool(icr) and _evaluate(icr, ecx=msr, write=write)
            assert got_other == (stat is CpuStat.VMEXITS_MSR_OTHER), (hex(msr), write)
            assert got_icr == (stat is CpuStat.VMEXITS_MSR_X2APIC_ICR), (hex(msr), write)


def test_exit_counters_per_vendor() -> None:
    """CPUID, CR and #DB/#AC exits on both vendors (SVM: CR0 writes, Jailhouse's only CR
    intercept there); XSETBV only on VMX (Jailhouse's SVM does not intercept it); the
    failing exits: SVM shutdown or VMEXIT_INVALID, VMX triple
    fault or a failed entry."""
    svm, vmx = ExitRules("amd", False), ExitRules("intel", False)
    assert _evaluate(svm.exit_counters()[CpuStat.VMEXITS_CPUID], exit_reason=0x72)
    assert _evaluate(svm.exit_counters()[CpuStat.VMEXITS_CR], exit_reason=0x10)  # write_cr0
    assert not _evaluate(svm.exit_counters()[CpuStat.VMEXITS_CR], exit_reason=0x14)  # cr4
    assert _evaluate(vmx.exit_counters()[CpuStat.VMEXITS_CR], exit_reason=28)
    assert CpuStat.VMEXITS_XSETBV not in svm.exit_counters()
    assert _evaluate(vmx.exit_counters()[CpuStat.VMEXITS_XSETBV], exit_reason=55)
    exception = vmx.exit_counters()[CpuStat.VMEXITS_EXCEPTION]
    assert _evaluate(exception, exit_reason=0, intr_info=0x80000B11)  # #AC with error code
    assert not _evaluate(exception, exit_reason=0, intr_info=0x80000306)  # #UD
    assert _evaluate(svm.exit_counters()[CpuStat.VMEXITS_EXCEPTION], exit_reason=0x51)
    assert _evaluate(svm.fatal_filter(), exit_reason=0x7F)
    assert _evaluate(svm.fatal_filter(), exit_reason=0xFFFFFFFF)
    assert not _evaluate(svm.fatal_filter(), exit_reason=0x72)
    assert _evaluate(vmx.fatal_filter(), exit_reason=2)
    assert _evaluate(vmx.fatal_filter(), exit_reason=0x80000021)
    assert not _evaluate(vmx.fatal_filter(), exit_reason=10)


def test_raw_records_decode_by_the_format_file() -> None:
    """Field offsets come from the format file; samples and lost-record counts from the
    ring buffer's records (other record kinds are skipped)."""
    point = parse_format("kvm:kvm_exit", KVM_EXIT_FORMAT)
    assert point.id == 1591 and point.fields["guest_rip"] == (16, 8, False)
    assert point.fields["common_pid"] == (4, 4, True)
    raw = _exit_raw(0x7F, 0x129A, intr_info=0x80000306)
    other = struct.pack("<IHH", 3, 0, 16) + bytes(8)  # a PERF_RECORD_COMM-like record
    lost = struct.pack("<IHHQQ", 2, 0, 24, 1, 5)
    records, dropped = decode_records(other + _sample(raw) + lost + _sample(raw[:60]))
    assert dropped == 5 and records == [raw, raw]
    traced = TracedExit.decode(point, raw)
    assert (traced.reason, traced.rip, traced.intr_info) == (0x7F, 0x129A, 0x80000306)
    assert point.field(raw, "common_pid") == 1234


class _Trace:
    def __init__(self, traced: TracedExit | None) -> None:
        self.traced = traced

    def failing_exit(self) -> TracedExit | None:
        return self.traced


class _Vcpu:
    """Registers as KVM keeps them after a VMX triple fault."""

    id = 2

    def get_regs(self) -> KvmRegs:
        regs = KvmRegs()
        regs.rip, regs.rsp, regs.rflags, regs.rax = 0x129A, 0x7F000, 0x46, 0x1
        return regs

    def get_sregs(self) -> KvmSregs:
        sregs = KvmSregs()
        sregs.cr0, sregs.efer = 0x80010031, 0x500
        return sregs


def _cpu(traced: TracedExit | None) -> CellCpu:
    cpu = CellCpu(2, None, _Vcpu())  # type: ignore[arg-type]
    cpu.trace = _Trace(traced)  # type: ignore[assignment]
    return cpu


def test_svm_shutdown_report_has_the_traced_rip_not_the_reset_state() -> None:
    """After a shutdown on SVM (KVM reset the vCPU) the report is Jailhouse's FATAL line
    with the traced exit information and the RIP of the failing instruction; no
    register line from the reset state."""
    traced = TracedExit(0x7F, 0x129A, 0, 0, 0x80000306, 0)
    text = fatal_report(_cpu(traced), ShutdownExit(), "amd")
    lines = text.split("\n")
    assert lines[0] == ("Unexpected #VMEXIT, exitcode 7f, exitinfo1 0x0000000000000000 "
                        "exitinfo2 0x0000000000000000")
    assert lines[1].startswith("RIP: 0x000000000000129a (the other registers are lost")
    assert "delivering vector 6" in lines[1] and len(lines) == 2
    untraced = fatal_report(_cpu(None), ShutdownExit(), "amd").split("\n")
    assert untraced[0] == lines[0] and "RIP: 0x0" not in untraced[1]


def test_vmx_triple_fault_report_has_exit_details_and_registers() -> None:
    """VMX keeps the state: ``Unhandled VM-Exit, reason 2``, then dump_vm_exit_details'
    lines from the traced exit, then the registers."""
    traced = TracedExit(2, 0x129A, 0, 0x80000306, 0, 0)
    lines = fatal_report(_cpu(traced), ShutdownExit(), "intel").split("\n")
    assert lines[:3] == ["Unhandled VM-Exit, reason 2", "qualification 0",
                         "vectoring info: 80000306 interrupt info: 0"]
    assert lines[3].startswith("RIP: 0x000000000000129a RSP: 0x000000000007f000 FLAGS: 46")
