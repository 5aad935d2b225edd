"""A Jailhouse cell CPU on a KVM vCPU; models ``hypervisor/arch/x86/vcpu.c``
(``vcpu_reset``, ``vcpu_handle_cpuid``) and the x86 register dump of a ``FATAL:`` report.

* the CPUID a cell sees (reference §3.1): :func:`jailhouse_cpuid`, set once by
  :func:`jailhouse_vcpu_setup`;
* the start state of a cell CPU (reference §5.1): real mode at ``cpu_reset_address``, the
  local APIC reset (keeping the root's timer divider) and in x2APIC mode:
  :func:`jailhouse_vcpu_reset`;
* the timer frequencies a cell's comm region announces, as KVM presents them to the
  vCPU: :func:`measure_tsc_khz`, :func:`apic_khz`;
* :func:`format_state`, the register dump after a ``FATAL:`` line.

Used by the executor and by the stand-alone runner alike.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Sequence
from typing import Final

from ..abi import (
    CPUID_1_ECX_HYPERVISOR,
    CPUID_1_ECX_TSC_DEADLINE,
    CPUID_1_ECX_VMX,
    CPUID_1_ECX_X2APIC,
    CPUID_80000001_ECX_SVM,
    JAILHOUSE_CPUID_FEATURES,
    JAILHOUSE_CPUID_SIGNATURE,
    JAILHOUSE_CPUID_SIGNATURE_REGS,
    XAPIC_BASE,
)
from .kvm import Cap, CpuidEntry, Kvm, KvmError, MpState, Vcpu
from .kvm.structs import (
    KVM_APIC_REG_SIZE,
    KVM_VCPUEVENT_VALID_NMI_PENDING,
    KvmDebugregs,
    KvmDtable,
    KvmRegs,
    KvmSegment,
    KvmSregs,
    KvmVcpuEvents,
)

__all__ = [
    "CELL_APIC_BASE",
    "ROOT_LINUX_TDCR",
    "Msr",
    "apic_khz",
    "format_state",
    "jailhouse_cpuid",
    "jailhouse_reset_regs",
    "jailhouse_reset_sregs",
    "jailhouse_vcpu_reset",
    "jailhouse_vcpu_setup",
    "lapic_reset_page",
    "measure_tsc_khz",
]

LOG = logging.getLogger(__name__)


class Msr(enum.IntEnum):
    """Model-specific registers the start state touches."""

    IA32_APIC_BASE = 0x1B
    IA32_DEBUGCTL = 0x1D9
    IA32_PAT = 0x277
    IA32_MTRR_DEF_TYPE = 0x2FF
    IA32_TSC_DEADLINE = 0x6E0
    IA32_EFER = 0xC0000080


# IA32_APIC_BASE bits (SDM vol. 3, 10.4.4 and 10.12.1); the base itself is XAPIC_BASE
APIC_BASE_BSP: Final = 1 << 8
APIC_BASE_EXTD: Final = 1 << 10
APIC_BASE_ENABLE: Final = 1 << 11

#: ``vcpu_reset``: CR0 = NW | CD | ET.
RESET_CR0: Final = (1 << 29) | (1 << 30) | (1 << 4)
RESET_RFLAGS: Final = 0x2
RESET_DR7: Final = 0x400
#: Power-on value of IA32_PAT.
RESET_PAT: Final = 0x0007040600070406
#: A cell CPU's IA32_APIC_BASE: x2APIC enabled, no BSP flag (see :func:`jailhouse_vcpu_reset`).
CELL_APIC_BASE: Final = XAPIC_BASE | APIC_BASE_ENABLE | APIC_BASE_EXTD

_CS_AR: Final = 0x9B
_DATA_AR: Final = 0x93
_TR_AR: Final = 0x8B
_LDTR_AR: Final = 0x82


def jailhouse_cpuid(
    supported: Sequence[CpuidEntry], apic_id: int, *, tsc_deadline: bool | None = None
) -> list[CpuidEntry]:
    """The CPUID table a Jailhouse cell CPU with ``apic_id`` sees (``vcpu_handle_cpuid``).

    From KVM's supported table: every hypervisor leaf 0x40000000-0x4fffffff (KVM's
    paravirtual signature and features) is dropped and replaced by Jailhouse's
    0x40000000 ("Jailhouse", max leaf 0x40000001) and an all-zero 0x40000001; leaf 1
    loses VMX and gains HYPERVISOR (and x2APIC, which the in-kernel APIC emulates);
    0x80000001 loses SVM; the APIC ID goes into leaf 1 EBX[31:24], the x2APIC ID
    fields of leaves 0xb/0x1f and AMD's 0x8000001e EAX. OSXSAVE follows CR4 (KVM does it).

    :param tsc_deadline: force CPUID.1:ECX.TSC_DEADLINE on or off (None: KVM's value);
        Jailhouse passes the hardware bit, and KVM emulates the deadline timer.
    """
    table: list[CpuidEntry] = []
    for entry in supported:
        function = entry.function
        if 0x40000000 <= function <= 0x4FFFFFFF:
            continue
        if function == 1:
            ecx = (entry.ecx & ~CPUID_1_ECX_VMX) | CPUID_1_ECX_HYPERVISOR | CPUID_1_ECX_X2APIC
            if tsc_deadline is True:
                ecx |= CPUID_1_ECX_TSC_DEADLINE
            elif tsc_deadline is False:
                ecx &= ~CPUID_1_ECX_TSC_DEADLINE
            ebx = (entry.ebx & 0x00FFFFFF) | (apic_id & 0xFF) << 24
            entry = dataclasses.replace(entry, ebx=ebx, ecx=ecx)
        elif function in (0xB, 0x1F):
            entry = dataclasses.replace(entry, edx=apic_id)
        elif function == 0x80000001:
            entry = dataclasses.replace(entry, ecx=entry.ecx & ~CPUID_80000001_ECX_SVM)
        elif function == 0x8000001E:
            entry = dataclasses.replace(entry, eax=apic_id)
        table.append(entry)
    eax, ebx, ecx, edx = JAILHOUSE_CPUID_SIGNATURE_REGS
    table.append(CpuidEntry(JAILHOUSE_CPUID_SIGNATURE, eax=eax, ebx=ebx, ecx=ecx, edx=edx))
    table.append(CpuidEntry(JAILHOUSE_CPUID_FEATURES))
    return table


def jailhouse_reset_sregs(sregs: KvmSregs, reset_address: int) -> None:
    """Put the real-mode start state of reference §5.1 into ``sregs`` (in place).

    CS selector ``(reset_address >> 4) & 0xf000``, base ``reset_address & ~0xffff``;
    data segments, TR and LDTR with selector/base 0, limit 0xffff and Jailhouse's access
    rights; GDTR/IDTR base 0 limit 0xffff; CR0 = NW|CD|ET, CR2/3/4/8 = 0, EFER = 0;
    APIC base as :data:`CELL_APIC_BASE`; no pending interrupt.
    """
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        seg: KvmSegment = getattr(sregs, name)
        seg.selector = 0
        seg.base = 0
        seg.limit = 0xFFFF
        seg.padding = 0
        seg.set_access_rights({"cs": _CS_AR, "tr": _TR_AR, "ldt": _LDTR_AR}.get(name, _DATA_AR))
    sregs.cs.selector = (reset_address >> 4) & 0xF000
    sregs.cs.base = reset_address & ~0xFFFF
    for table_name in ("gdt", "idt"):
        table: KvmDtable = getattr(sregs, table_name)
        table.base = 0
        table.limit = 0xFFFF
    sregs.cr0 = RESET_CR0
    sregs.cr2 = sregs.cr3 = sregs.cr4 = sregs.cr8 = 0
    sregs.efer = 0
    sregs.apic_base = CELL_APIC_BASE
    for i in range(len(sregs.interrupt_bitmap)):
        sregs.interrupt_bitmap[i] = 0


def jailhouse_reset_regs(reset_address: int) -> KvmRegs:
    """All GPRs 0, RIP = ``reset_address & 0xffff``, RFLAGS = 2 (reference §5.1)."""
    regs = KvmRegs()
    regs.rip = reset_address & 0xFFFF
    regs.rflags = RESET_RFLAGS
    return regs


# Local APIC register offsets (SDM vol. 3 table 10-1)
APIC_ID: Final = 0x20
APIC_TPR: Final = 0x80
APIC_LDR: Final = 0xD0
APIC_DFR: Final = 0xE0
APIC_SVR: Final = 0xF0
APIC_LVT_CMCI: Final = 0x2F0
APIC_LVT_TIMER: Final = 0x320
APIC_LVT_LINT1: Final = 0x360
APIC_LVT_ERROR: Final = 0x370
APIC_TMICT: Final = 0x380
APIC_TDCR: Final = 0x3E0
APIC_LVT_MASKED: Final = 1 << 16
#: TDCR value "divide by 16" (SDM 10.5.4, figure 10-10)
APIC_TDCR_DIV_16: Final = 0x3
#: The timer divider a CPU's local APIC has when a cell gets the CPU: the root's Linux
#: programs divide-by-16 for its timer (``__setup_APIC_LVTT``: ``APIC_TDR_DIV_16``) and
#: Jailhouse never writes TDCR (``apic_clear`` masks the LVTs and clears ISR and TPR
#: only); Jailhouse's inmate library relies on it (``apic_khz / 16``, no TDCR write).
ROOT_LINUX_TDCR: Final = APIC_TDCR_DIV_16
# ID, version, LDR (x2APIC: derived from ID), and the timer divider (apic_clear keeps it)
_APIC_KEEP: Final = (0x20, 0x30, APIC_LDR, APIC_TDCR)


def lapic_reset_page(current: bytes | bytearray) -> bytearray:
    """The local APIC page of a cell CPU at (re)start: ID, version, LDR and the timer
    divider (TDCR) kept, LVTs masked, SVR 0xff, DFR all ones, timer stopped,
    ISR/TMR/IRR/TPR/ESR/ICR clear (SDM 10.4.7.1, except TDCR: Jailhouse does not reset
    the APIC, its ``apic_clear`` leaves the divider as the last owner programmed it)."""
    page = bytearray(KVM_APIC_REG_SIZE)
    for offset in _APIC_KEEP:
        page[offset : offset + 4] = current[offset : offset + 4]
    page[APIC_DFR : APIC_DFR + 4] = b"\xff\xff\xff\xff"
    page[APIC_SVR : APIC_SVR + 4] = (0xFF).to_bytes(4, "little")
    for offset in (APIC_LVT_CMCI, *range(APIC_LVT_TIMER, APIC_LVT_ERROR + 0x10, 0x10)):
        page[offset : offset + 4] = APIC_LVT_MASKED.to_bytes(4, "little")
    return page


def jailhouse_vcpu_setup(vcpu: Vcpu, supported: Sequence[CpuidEntry] | None = None) -> None:
    """One-time setup of a cell vCPU before its first run: Jailhouse's CPUID view, and the
    local APIC timer divider the CPU had in the root cell (:data:`ROOT_LINUX_TDCR`; KVM
    creates the APIC with TDCR 0, divide by 2). Resets keep it (:func:`lapic_reset_page`).

    :param supported: ``KVM_GET_SUPPORTED_CPUID`` (fetched when None)
    """
    if supported is None:
        supported = vcpu.kvm.supported_cpuid()
    vcpu.set_cpuid(jailhouse_cpuid(supported, vcpu.id))
    if vcpu.has_lapic:
        page = vcpu.get_lapic()
        page[APIC_TDCR : APIC_TDCR + 4] = ROOT_LINUX_TDCR.to_bytes(4, "little")
        vcpu.set_lapic(page)


def jailhouse_vcpu_reset(vcpu: Vcpu, reset_address: int = 0) -> None:
    """Put ``vcpu`` in the state of a Jailhouse cell CPU at cell start (reference §5.1).

    Real mode at ``reset_address`` (CS base ``reset_address & ~0xffff``, IP its low 16
    bits), GPRs 0, RFLAGS 2, CR0 NW|CD|ET, EFER 0, DR7 0x400, DEBUGCTL 0, PAT at its reset
    value, MTRRs disabled, no pending events, runnable. The local APIC is reset (its timer
    divider kept, :func:`lapic_reset_page`) and put in x2APIC mode (IA32_APIC_BASE =
    0xfee00000 | EN | EXTD), because inmates use x2APIC MSRs unconditionally (Jailhouse
    emulates them even on xAPIC hardware).

    The BSP flag stays clear on every cell CPU: cell CPUs are application processors of
    the machine, so they read BSP = 0 under Jailhouse too. It also gives the in-kernel
    APIC Jailhouse's INIT/SIPI behaviour: an INIT sends the target to wait-for-SIPI and
    a SIPI with vector V starts it in real mode at V << 12 (on a BSP, KVM would instead
    restart it at the 0xfffffff0 reset vector). All vCPUs are made runnable here, so all
    cell CPUs start at once.

    Call while no thread runs the vCPU (from its own thread, or before starting it).
    """
    vcpu.complete_pending()
    sregs = vcpu.get_sregs()
    jailhouse_reset_sregs(sregs, reset_address)
    vcpu.set_sregs(sregs)
    vcpu.set_regs(jailhouse_reset_regs(reset_address))
    kvm = vcpu.kvm
    if kvm.check_extension(Cap.DEBUGREGS):
        debug = KvmDebugregs()
        debug.dr6 = 0xFFFF0FF0
        debug.dr7 = RESET_DR7
        vcpu.set_debugregs(debug)
    msrs: dict[int, int] = {
        Msr.IA32_APIC_BASE: CELL_APIC_BASE,
        Msr.IA32_PAT: RESET_PAT,
        Msr.IA32_MTRR_DEF_TYPE: 0,
        Msr.IA32_EFER: 0,
    }
    if vcpu.has_lapic:
        msrs[Msr.IA32_TSC_DEADLINE] = 0
    vcpu.set_msrs(msrs)
    _set_msr_if_supported(vcpu, Msr.IA32_DEBUGCTL, 0)
    if vcpu.has_lapic:
        vcpu.set_lapic(lapic_reset_page(vcpu.get_lapic()))
    if kvm.check_extension(Cap.VCPU_EVENTS):
        events = KvmVcpuEvents()
        events.flags = KVM_VCPUEVENT_VALID_NMI_PENDING
        vcpu.set_vcpu_events(events)
    if kvm.check_extension(Cap.MP_STATE):
        vcpu.set_mp_state(MpState.RUNNABLE)


def _set_msr_if_supported(vcpu: Vcpu, index: int, value: int) -> None:
    """Set an MSR that KVM may not implement (DEBUGCTL on some hosts); log if refused."""
    try:
        vcpu.set_msrs({index: value})
    except KvmError as exc:
        LOG.debug("vCPU %d: %s", vcpu.id, exc)


def format_state(vcpu: Vcpu) -> str:
    """A register dump in the spirit of Jailhouse's ``dump_guest_regs``."""
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    lines = [
        f"RIP: 0x{regs.rip:016x} RSP: 0x{regs.rsp:016x} FLAGS: {regs.rflags:x}",
        f"RAX: 0x{regs.rax:016x} RBX: 0x{regs.rbx:016x} RCX: 0x{regs.rcx:016x}",
        f"RDX: 0x{regs.rdx:016x} RSI: 0x{regs.rsi:016x} RDI: 0x{regs.rdi:016x}",
        f"CS: {sregs.cs.selector:x} BASE: 0x{sregs.cs.base:016x} AR-BYTES: "
        f"{sregs.cs.access_rights():x} EFER.LMA {(sregs.efer >> 10) & 1}",
        f"CR0: 0x{sregs.cr0:016x} CR3: 0x{sregs.cr3:016x} CR4: 0x{sregs.cr4:016x}",
        f"EFER: 0x{sregs.efer:016x}",
    ]
    return "\n".join(lines)

# ---------------------------------------------------------------------------------------
# Timer frequencies, as KVM presents them to a cell CPU (the comm region's tsc_khz, apic_khz)
# ---------------------------------------------------------------------------------------

#: KVM's local APIC timer runs at one bus cycle per nanosecond unless configured.
KVM_APIC_BUS_CYCLE_NS: Final = 1


def measure_tsc_khz(vcpu: Vcpu) -> int:
    """The guest TSC frequency: ``KVM_GET_TSC_KHZ``, else ``cpu MHz`` of /proc/cpuinfo."""
    if vcpu.kvm.check_extension(Cap.GET_TSC_KHZ):
        return vcpu.tsc_khz()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except OSError:
        pass
    return 0


def apic_khz(kvm: Kvm) -> int:
    """Frequency of the in-kernel local APIC timer (KVM: 1 GHz unless reconfigured)."""
    cycle_ns = kvm.check_extension(Cap.X86_APIC_BUS_CYCLES_NS) or KVM_APIC_BUS_CYCLE_NS
    return 1_000_000 // cycle_ns
