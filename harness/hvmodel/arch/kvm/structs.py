"""The ``/dev/kvm`` ABI (x86-64): the ``struct kvm_*`` layouts of ``<linux/kvm.h>`` and
``<asm/kvm.h>`` as :mod:`ctypes` structures, the ioctl request numbers and the constants
and enums the binding uses. Nothing here calls the kernel.

Sizes in the docstrings, every field offset and every number are checked against the
kernel's headers by ``test_suites/unit/test_kvm_abi.py``.
"""

from __future__ import annotations

import ctypes
import enum
import struct
from collections.abc import Mapping
from typing import Final

from ..uapi import IOC_TYPESHIFT, io, ior, iow, iowr

KVMIO: Final = 0xAE
KVM_API_VERSION: Final = 12

# ---------------------------------------------------------------------------------------
# Structures (x86-64 layouts; sizes in the comments are checked by the unit tests)
# ---------------------------------------------------------------------------------------


_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region`` (32 bytes)."""

    _fields_ = [
        ("slot", _u32),
        ("flags", _u32),
        ("guest_phys_addr", _u64),
        ("memory_size", _u64),
        ("userspace_addr", _u64),
    ]


class KvmRegs(ctypes.Structure):
    """``struct kvm_regs`` (144 bytes): the general-purpose registers, RIP and RFLAGS."""

    _fields_ = [
        (name, _u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class KvmSegment(ctypes.Structure):
    """``struct kvm_segment`` (24 bytes): a segment register with its hidden part."""

    _fields_ = [
        ("base", _u64),
        ("limit", _u32),
        ("selector", _u16),
        ("type", _u8),
        ("present", _u8),
        ("dpl", _u8),
        ("db", _u8),
        ("s", _u8),
        ("l", _u8),
        ("g", _u8),
        ("avl", _u8),
        ("unusable", _u8),
        ("padding", _u8),
    ]

    def set_access_rights(self, ar: int) -> None:
        """Set type/s/dpl/present/avl/l/db/g from a VMX-style access-rights word.

        Jailhouse (reference §5.1) writes segment state as these words (CS 0x9b,
        data 0x93, TR 0x8b, LDTR 0x82).
        """
        self.type = ar & 0xF
        self.s = (ar >> 4) & 1
        self.dpl = (ar >> 5) & 3
        self.present = (ar >> 7) & 1
        self.avl = (ar >> 12) & 1
        self.l = (ar >> 13) & 1
        self.db = (ar >> 14) & 1
        self.g = (ar >> 15) & 1
        self.unusable = 0

    def access_rights(self) -> int:
        """The VMX-style access-rights word of this segment (inverse of the setter)."""
        return int(
            self.type
            | self.s << 4
            | self.dpl << 5
            | self.present << 7
            | self.avl << 12
            | self.l << 13
            | self.db << 14
            | self.g << 15
        )


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable`` (16 bytes): GDTR or IDTR."""

    _fields_ = [("base", _u64), ("limit", _u16), ("padding", _u16 * 3)]


KVM_NR_INTERRUPTS: Final = 256


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs`` (312 bytes): segments, descriptor tables, CRs, EFER, APIC base."""

    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", _u64),
        ("cr2", _u64),
        ("cr3", _u64),
        ("cr4", _u64),
        ("cr8", _u64),
        ("efer", _u64),
        ("apic_base", _u64),
        ("interrupt_bitmap", _u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmMsrEntry(ctypes.Structure):
    """``struct kvm_msr_entry`` (16 bytes)."""

    _fields_ = [("index", _u32), ("reserved", _u32), ("data", _u64)]


class KvmMsrs(ctypes.Structure):
    """``struct kvm_msrs`` header (8 bytes); ``entries[]`` follow (see :mod:`.vcpu`)."""

    _fields_ = [("nmsrs", _u32), ("pad", _u32)]


class KvmMsrList(ctypes.Structure):
    """``struct kvm_msr_list`` header (4 bytes); ``indices[]`` follow."""

    _fields_ = [("nmsrs", _u32)]


class KvmCpuidEntry2(ctypes.Structure):
    """``struct kvm_cpuid_entry2`` (40 bytes)."""

    _fields_ = [
        ("function", _u32),
        ("index", _u32),
        ("flags", _u32),
        ("eax", _u32),
        ("ebx", _u32),
        ("ecx", _u32),
        ("edx", _u32),
        ("padding", _u32 * 3),
    ]


class KvmCpuid2(ctypes.Structure):
    """``struct kvm_cpuid2`` header (8 bytes); ``entries[]`` follow (see :func:`.system.cpuid_buffer`)."""

    _fields_ = [("nent", _u32), ("padding", _u32)]


KVM_APIC_REG_SIZE: Final = 0x400


class KvmLapicState(ctypes.Structure):
    """``struct kvm_lapic_state`` (1024 bytes): the local APIC register page."""

    _fields_ = [("regs", ctypes.c_char * KVM_APIC_REG_SIZE)]


class KvmMpState(ctypes.Structure):
    """``struct kvm_mp_state`` (4 bytes)."""

    _fields_ = [("mp_state", _u32)]


class KvmDebugregs(ctypes.Structure):
    """``struct kvm_debugregs`` (128 bytes): DR0-3, DR6, DR7."""

    _fields_ = [
        ("db", _u64 * 4),
        ("dr6", _u64),
        ("dr7", _u64),
        ("flags", _u64),
        ("reserved", _u64 * 9),
    ]


class _EventsException(ctypes.Structure):
    _fields_ = [
        ("injected", _u8),
        ("nr", _u8),
        ("has_error_code", _u8),
        ("pending", _u8),
        ("error_code", _u32),
    ]


class _EventsInterrupt(ctypes.Structure):
    _fields_ = [("injected", _u8), ("nr", _u8), ("soft", _u8), ("shadow", _u8)]


class _EventsNmi(ctypes.Structure):
    _fields_ = [("injected", _u8), ("pending", _u8), ("masked", _u8), ("pad", _u8)]


class _EventsSmi(ctypes.Structure):
    _fields_ = [("smm", _u8), ("pending", _u8), ("smm_inside_nmi", _u8), ("latched_init", _u8)]


class KvmVcpuEvents(ctypes.Structure):
    """``struct kvm_vcpu_events`` (64 bytes): pending/injected exception, IRQ, NMI, SIPI."""

    _fields_ = [
        ("exception", _EventsException),
        ("interrupt", _EventsInterrupt),
        ("nmi", _EventsNmi),
        ("sipi_vector", _u32),
        ("flags", _u32),
        ("smi", _EventsSmi),
        ("triple_fault_pending", _u8),
        ("reserved", _u8 * 26),
        ("exception_has_payload", _u8),
        ("exception_payload", _u64),
    ]


KVM_VCPUEVENT_VALID_NMI_PENDING: Final = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR: Final = 0x2


class KvmEnableCap(ctypes.Structure):
    """``struct kvm_enable_cap`` (104 bytes)."""

    _fields_ = [("cap", _u32), ("flags", _u32), ("args", _u64 * 4), ("pad", _u8 * 64)]


class KvmIrqRoutingIrqchip(ctypes.Structure):
    """``struct kvm_irq_routing_irqchip`` (8 bytes)."""

    _fields_ = [("irqchip", _u32), ("pin", _u32)]


class KvmIrqRoutingMsi(ctypes.Structure):
    """``struct kvm_irq_routing_msi`` (16 bytes; ``devid`` overlays ``pad``)."""

    _fields_ = [("address_lo", _u32), ("address_hi", _u32), ("data", _u32), ("devid", _u32)]


class _KvmIrqRoutingUnion(ctypes.Union):
    _fields_ = [("irqchip", KvmIrqRoutingIrqchip), ("msi", KvmIrqRoutingMsi), ("pad", _u32 * 8)]


class KvmIrqRoutingEntry(ctypes.Structure):
    """``struct kvm_irq_routing_entry`` (48 bytes)."""

    _fields_ = [
        ("gsi", _u32),
        ("type", _u32),
        ("flags", _u32),
        ("pad", _u32),
        ("u", _KvmIrqRoutingUnion),
    ]


class KvmIrqRouting(ctypes.Structure):
    """``struct kvm_irq_routing`` header (8 bytes); ``entries[]`` follow."""

    _fields_ = [("nr", _u32), ("flags", _u32)]


KVM_IRQ_ROUTING_IRQCHIP: Final = 1
KVM_IRQ_ROUTING_MSI: Final = 2
KVM_MSI_VALID_DEVID: Final = 1 << 0


class KvmIrqfd(ctypes.Structure):
    """``struct kvm_irqfd`` (32 bytes)."""

    _fields_ = [
        ("fd", _u32),
        ("gsi", _u32),
        ("flags", _u32),
        ("resamplefd", _u32),
        ("pad", _u8 * 16),
    ]


KVM_IRQFD_FLAG_DEASSIGN: Final = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE: Final = 1 << 1


class KvmMsi(ctypes.Structure):
    """``struct kvm_msi`` (32 bytes), for ``KVM_SIGNAL_MSI``."""

    _fields_ = [
        ("address_lo", _u32),
        ("address_hi", _u32),
        ("data", _u32),
        ("flags", _u32),
        ("devid", _u32),
        ("pad", _u8 * 12),
    ]


class KvmIrqLevel(ctypes.Structure):
    """``struct kvm_irq_level`` (8 bytes; ``irq`` overlays ``status``)."""

    _fields_ = [("irq", _u32), ("level", _u32)]


# --- struct kvm_run and the exit-info union ----------------------------------------------


class KvmRunHw(ctypes.Structure):
    """``kvm_run.hw`` (KVM_EXIT_UNKNOWN)."""

    _fields_ = [("hardware_exit_reason", _u64)]


class KvmRunFailEntry(ctypes.Structure):
    """``kvm_run.fail_entry`` (KVM_EXIT_FAIL_ENTRY)."""

    _fields_ = [("hardware_entry_failure_reason", _u64), ("cpu", _u32)]


class KvmRunEx(ctypes.Structure):
    """``kvm_run.ex`` (KVM_EXIT_EXCEPTION)."""

    _fields_ = [("exception", _u32), ("error_code", _u32)]


class KvmRunIo(ctypes.Structure):
    """``kvm_run.io`` (KVM_EXIT_IO); the data is at ``data_offset`` from the run page."""

    _fields_ = [
        ("direction", _u8),
        ("size", _u8),
        ("port", _u16),
        ("count", _u32),
        ("data_offset", _u64),
    ]


class KvmRunMmio(ctypes.Structure):
    """``kvm_run.mmio`` (KVM_EXIT_MMIO)."""

    _fields_ = [("phys_addr", _u64), ("data", _u8 * 8), ("len", _u32), ("is_write", _u8)]


class KvmRunHypercall(ctypes.Structure):
    """``kvm_run.hypercall`` (KVM_EXIT_HYPERCALL)."""

    _fields_ = [
        ("nr", _u64),
        ("args", _u64 * 6),
        ("ret", _u64),
        ("longmode", _u32),
        ("pad", _u32),
    ]


class KvmRunInternal(ctypes.Structure):
    """``kvm_run.internal`` (KVM_EXIT_INTERNAL_ERROR)."""

    _fields_ = [("suberror", _u32), ("ndata", _u32), ("data", _u64 * 16)]


class KvmRunSystemEvent(ctypes.Structure):
    """``kvm_run.system_event`` (KVM_EXIT_SYSTEM_EVENT; ``flags`` is ``data[0]``)."""

    _fields_ = [("type", _u32), ("ndata", _u32), ("data", _u64 * 16)]


class KvmRunMsr(ctypes.Structure):
    """``kvm_run.msr`` (KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR)."""

    _fields_ = [
        ("error", _u8),
        ("pad", _u8 * 7),
        ("reason", _u32),
        ("index", _u32),
        ("data", _u64),
    ]


class KvmRunEoi(ctypes.Structure):
    """``kvm_run.eoi`` (KVM_EXIT_IOAPIC_EOI): the vector a level-triggered EOI ended
    (split irqchip)."""

    _fields_ = [("vector", _u8)]


class KvmRunXenHcall(ctypes.Structure):
    """``kvm_run.xen.u.hcall`` (KVM_EXIT_XEN, type KVM_EXIT_XEN_HCALL): a VMCALL/VMMCALL."""

    _fields_ = [
        ("longmode", _u32),
        ("cpl", _u32),
        ("input", _u64),
        ("result", _u64),
        ("params", _u64 * 6),
    ]


class _KvmRunXenUnion(ctypes.Union):
    _fields_ = [("hcall", KvmRunXenHcall)]


class KvmRunXen(ctypes.Structure):
    """``kvm_run.xen``, ``struct kvm_xen_exit`` (KVM_EXIT_XEN; only with Xen hypercall
    interception, ``CONFIG_KVM_XEN``)."""

    _fields_ = [("type", _u32), ("u", _KvmRunXenUnion)]


KVM_EXIT_XEN_HCALL: Final = 1


class KvmRunExitInfo(ctypes.Union):
    """The exit-information union of ``struct kvm_run`` (256 bytes)."""

    _fields_ = [
        ("hw", KvmRunHw),
        ("fail_entry", KvmRunFailEntry),
        ("ex", KvmRunEx),
        ("io", KvmRunIo),
        ("mmio", KvmRunMmio),
        ("hypercall", KvmRunHypercall),
        ("internal", KvmRunInternal),
        ("system_event", KvmRunSystemEvent),
        ("msr", KvmRunMsr),
        ("eoi", KvmRunEoi),
        ("xen", KvmRunXen),
        ("padding", ctypes.c_char * 256),
    ]


SYNC_REGS_SIZE_BYTES: Final = 2048


class KvmRun(ctypes.Structure):
    """``struct kvm_run`` (2352 bytes on x86-64), the mmap'd page of a vCPU fd."""

    _fields_ = [
        ("request_interrupt_window", _u8),
        ("immediate_exit", _u8),
        ("padding1", _u8 * 6),
        ("exit_reason", _u32),
        ("ready_for_interrupt_injection", _u8),
        ("if_flag", _u8),
        ("flags", _u16),
        ("cr8", _u64),
        ("apic_base", _u64),
        ("u", KvmRunExitInfo),
        ("kvm_valid_regs", _u64),
        ("kvm_dirty_regs", _u64),
        ("s", ctypes.c_char * SYNC_REGS_SIZE_BYTES),
    ]




class KvmXenHvmConfig(ctypes.Structure):
    """``struct kvm_xen_hvm_config`` (56 bytes), for ``KVM_XEN_HVM_CONFIG``."""

    _fields_ = [
        ("flags", _u32),
        ("msr", _u32),
        ("blob_addr_32", _u64),
        ("blob_addr_64", _u64),
        ("blob_size_32", _u8),
        ("blob_size_64", _u8),
        ("pad2", _u8 * 30),
    ]


#: ``KVM_XEN_HVM_CONFIG`` flag: VMCALL/VMMCALL exit to user space as KVM_EXIT_XEN
KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL: Final = 1 << 1


# ---------------------------------------------------------------------------------------
# ioctl request numbers; each comment names the argument struct of <linux/kvm.h>
# ---------------------------------------------------------------------------------------

_sz = ctypes.sizeof

# system ioctls (/dev/kvm)
KVM_GET_API_VERSION: Final = io(KVMIO, 0x00)
KVM_CREATE_VM: Final = io(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST: Final = iowr(KVMIO, 0x02, _sz(KvmMsrList))  # struct kvm_msr_list
KVM_CHECK_EXTENSION: Final = io(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = io(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID: Final = iowr(KVMIO, 0x05, _sz(KvmCpuid2))  # struct kvm_cpuid2
# VM ioctls
KVM_CREATE_VCPU: Final = io(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION: Final = iow(
    KVMIO, 0x46, _sz(KvmUserspaceMemoryRegion)
)  # struct kvm_userspace_memory_region
KVM_SET_TSS_ADDR: Final = io(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR: Final = iow(KVMIO, 0x48, _sz(_u64))  # __u64
KVM_CREATE_IRQCHIP: Final = io(KVMIO, 0x60)
KVM_IRQ_LINE: Final = iow(KVMIO, 0x61, _sz(KvmIrqLevel))  # struct kvm_irq_level
KVM_SET_GSI_ROUTING: Final = iow(KVMIO, 0x6A, _sz(KvmIrqRouting))  # struct kvm_irq_routing
KVM_IRQFD: Final = iow(KVMIO, 0x76, _sz(KvmIrqfd))  # struct kvm_irqfd
KVM_SET_BOOT_CPU_ID: Final = io(KVMIO, 0x78)
KVM_SIGNAL_MSI: Final = iow(KVMIO, 0xA5, _sz(KvmMsi))  # struct kvm_msi
KVM_ENABLE_CAP: Final = iow(KVMIO, 0xA3, _sz(KvmEnableCap))  # struct kvm_enable_cap
KVM_XEN_HVM_CONFIG: Final = iow(KVMIO, 0x7A, _sz(KvmXenHvmConfig))  # struct kvm_xen_hvm_config
# vCPU ioctls
KVM_RUN: Final = io(KVMIO, 0x80)
KVM_GET_REGS: Final = ior(KVMIO, 0x81, _sz(KvmRegs))  # struct kvm_regs
KVM_SET_REGS: Final = iow(KVMIO, 0x82, _sz(KvmRegs))  # struct kvm_regs
KVM_GET_SREGS: Final = ior(KVMIO, 0x83, _sz(KvmSregs))  # struct kvm_sregs
KVM_SET_SREGS: Final = iow(KVMIO, 0x84, _sz(KvmSregs))  # struct kvm_sregs
KVM_GET_MSRS: Final = iowr(KVMIO, 0x88, _sz(KvmMsrs))  # struct kvm_msrs
KVM_SET_MSRS: Final = iow(KVMIO, 0x89, _sz(KvmMsrs))  # struct kvm_msrs
KVM_GET_LAPIC: Final = ior(KVMIO, 0x8E, _sz(KvmLapicState))  # struct kvm_lapic_state
KVM_SET_LAPIC: Final = iow(KVMIO, 0x8F, _sz(KvmLapicState))  # struct kvm_lapic_state
KVM_SET_CPUID2: Final = iow(KVMIO, 0x90, _sz(KvmCpuid2))  # struct kvm_cpuid2
KVM_GET_CPUID2: Final = iowr(KVMIO, 0x91, _sz(KvmCpuid2))  # struct kvm_cpuid2
KVM_GET_MP_STATE: Final = ior(KVMIO, 0x98, _sz(KvmMpState))  # struct kvm_mp_state
KVM_SET_MP_STATE: Final = iow(KVMIO, 0x99, _sz(KvmMpState))  # struct kvm_mp_state
KVM_GET_VCPU_EVENTS: Final = ior(KVMIO, 0x9F, _sz(KvmVcpuEvents))  # struct kvm_vcpu_events
KVM_SET_VCPU_EVENTS: Final = iow(KVMIO, 0xA0, _sz(KvmVcpuEvents))  # struct kvm_vcpu_events
KVM_GET_DEBUGREGS: Final = ior(KVMIO, 0xA1, _sz(KvmDebugregs))  # struct kvm_debugregs
KVM_SET_DEBUGREGS: Final = iow(KVMIO, 0xA2, _sz(KvmDebugregs))  # struct kvm_debugregs
KVM_GET_TSC_KHZ: Final = io(KVMIO, 0xA3)

#: Name of every request number above, for error messages.
IOCTL_NAMES: Final[Mapping[int, str]] = {
    value: name
    for name, value in dict(globals()).items()
    if name.startswith("KVM_") and isinstance(value, int) and (value >> IOC_TYPESHIFT) & 0xFF == KVMIO
}

KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1


class Cap(enum.IntEnum):
    """``KVM_CAP_*`` numbers used by jhlab (``KVM_CHECK_EXTENSION``)."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    MP_STATE = 14
    IRQ_ROUTING = 25
    IRQFD = 32
    SET_IDENTITY_MAP_ADDR = 37
    XEN_HVM = 38
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    ENABLE_CAP = 54
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    TSC_DEADLINE_TIMER = 72
    SIGNAL_MSI = 77
    READONLY_MEM = 81
    SPLIT_IRQCHIP = 121
    MAX_VCPU_ID = 128
    X2APIC_API = 129
    MSI_DEVID = 131
    IMMEDIATE_EXIT = 136
    X86_DISABLE_EXITS = 143
    X86_USER_SPACE_MSR = 188
    X86_MSR_FILTER = 189
    EXIT_HYPERCALL = 201
    X86_TRIPLE_FAULT_EVENT = 218
    #: Linux 6.10+; older kernels answer 0 and the APIC bus runs at 1 GHz.
    X86_APIC_BUS_CYCLES_NS = 237


class ExitReason(enum.IntEnum):
    """``KVM_EXIT_*`` values of ``kvm_run.exit_reason``."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    NOTIFY = 37


#: ``KVM_CAP_X86_USER_SPACE_MSR`` argument bits: which failed MSR accesses exit to userspace.
KVM_MSR_EXIT_REASON_INVAL: Final = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN: Final = 1 << 1
KVM_MSR_EXIT_REASON_FILTER: Final = 1 << 2

KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1


class SystemEvent(enum.IntEnum):
    """``KVM_SYSTEM_EVENT_*`` values of ``kvm_run.system_event.type``."""

    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class MpState(enum.IntEnum):
    """``KVM_MP_STATE_*`` (x86 subset)."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
    AP_RESET_HOLD = 9


#: ``kvm_cpuid_entry2.flags``: the subleaf (``index``) matters for this leaf
KVM_CPUID_FLAG_SIGNIFCANT_INDEX: Final = 1 << 0


# ---------------------------------------------------------------------------------------
# Offsets into the run page, from the layout above (hot paths use struct on the mmap)
# ---------------------------------------------------------------------------------------

RUN_IMMEDIATE_EXIT: Final = KvmRun.immediate_exit.offset
RUN_EXIT_REASON: Final = KvmRun.exit_reason.offset
#: the exit-information union
RUN_EXIT_INFO: Final = KvmRun.u.offset
RUN_MMIO_DATA: Final = RUN_EXIT_INFO + KvmRunMmio.data.offset
RUN_MSR_ERROR: Final = RUN_EXIT_INFO + KvmRunMsr.error.offset
RUN_MSR_DATA: Final = RUN_EXIT_INFO + KvmRunMsr.data.offset
RUN_XEN_HCALL_RESULT: Final = RUN_EXIT_INFO + KvmRunXen.u.offset + KvmRunXenHcall.result.offset
RUN_U32: Final = struct.Struct("<I")
RUN_IO: Final = struct.Struct("<BBHIQ")  # kvm_run.io
RUN_MMIO: Final = struct.Struct("<Q8sIB")  # kvm_run.mmio
RUN_MSR: Final = struct.Struct("<B7xIIQ")  # kvm_run.msr
#: kvm_run.xen with the hcall member: type, longmode, cpl, input, result, params[6]
RUN_XEN_HCALL: Final = struct.Struct("<I4xIIQQ6Q")
