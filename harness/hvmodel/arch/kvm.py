"""KVM binding of the executor; stands where ``hypervisor/arch/x86/{vmx,svm,vcpu}.c`` are.

Jailhouse programs VMX/SVM itself; jhlab's executor asks Linux KVM for the same things
through ``/dev/kvm``. This module is that binding, standard library only (``fcntl``,
``ctypes``, ``mmap``, ``struct``, ``os``, ``signal``, ``threading``) because it runs in the
lab root cell's Debian ``python3`` with nothing installed:

* the ioctl numbers, computed with the kernel's ``_IO``/``_IOR``/``_IOW``/``_IOWR`` encoding,
  and the ``struct kvm_*`` layouts of ``<linux/kvm.h>`` / ``<asm/kvm.h>`` (x86-64) as
  :mod:`ctypes` structures;
* :class:`Kvm` (the ``/dev/kvm`` system fd), :class:`Vm` (one per cell: irqchip, memory
  slots, MSI routing) and :class:`Vcpu` (register state, :meth:`Vcpu.run` returning a
  decoded exit, :meth:`Vcpu.kick` from another thread);
* host memory and port access the executor backs cells with: :func:`anonymous_memory`,
  :class:`PhysMapping` (``/dev/mem`` at a physical address) and :class:`DevPort`
  (``/dev/port``);
* the x86 start state of a Jailhouse cell CPU (reference §5.1, ``vcpu_reset`` in
  ``hypervisor/arch/x86/vcpu.c``) and the CPUID a cell sees (§3.1, ``vcpu_handle_cpuid``):
  :func:`jailhouse_cpuid`, :func:`jailhouse_vcpu_setup`, :func:`jailhouse_vcpu_reset`;
* :func:`describe_exit` and :func:`format_state` for ``FATAL:`` reports.

Facts measured with this binding (PVM host ``/dev/kvm``): real, protected and long mode
guests run; x2APIC MSRs, the APIC one-shot and TSC-deadline timers, INIT/SIPI between
vCPUs, MSIs (``KVM_SIGNAL_MSI``, irqfd) and user-space MSR exits work; HLT with the
in-kernel irqchip blocks inside KVM_RUN until an interrupt or a :meth:`Vcpu.kick`.

Errors: every failing ioctl, open or mmap raises :class:`KvmError`, an
:class:`~harness.hvmodel.errors.HvError` that names the operation and keeps the kernel's
errno (:attr:`KvmError.os_errno`); its Jailhouse errno is the same code when Jailhouse
has it, else ``EIO``.

Threads: a :class:`Vcpu` is run by one thread at a time. :meth:`Vcpu.kick` is the only
method meant to be called from another thread; it needs :func:`install_kick_handler` to
have been called once from the main thread.

Running this module (``python3 -m harness.hvmodel.arch.kvm run IMAGE ...``) starts the
stand-alone inmate runner, :mod:`harness.hvmodel.arch.runner`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import errno
import fcntl
import logging
import mmap
import os
import signal
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Final

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
from ..errors import Errno, HvError
from . import HOST_PAGE_SIZE

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

LOG = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# ioctl encoding (include/uapi/asm-generic/ioctl.h; x86 uses the generic layout)
# ---------------------------------------------------------------------------------------

_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)``: the 32-bit request number."""
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (size << _IOC_SIZESHIFT)
        | (kind << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
    )


def _io(kind: int, nr: int) -> int:
    return _ioc(_IOC_NONE, kind, nr, 0)


def _ior(kind: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ, kind, nr, size)


def _iow(kind: int, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, kind, nr, size)


def _iowr(kind: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, kind, nr, size)


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
    """``struct kvm_msrs`` header (8 bytes); ``entries[]`` follow (see :func:`_msrs_buffer`)."""

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
    """``struct kvm_cpuid2`` header (8 bytes); ``entries[]`` follow (see :func:`_cpuid_buffer`)."""

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


# ---------------------------------------------------------------------------------------
# ioctl request numbers; each comment names the argument struct of <linux/kvm.h>
# ---------------------------------------------------------------------------------------

_sz = ctypes.sizeof

# system ioctls (/dev/kvm)
KVM_GET_API_VERSION: Final = _io(KVMIO, 0x00)
KVM_CREATE_VM: Final = _io(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST: Final = _iowr(KVMIO, 0x02, _sz(KvmMsrList))  # struct kvm_msr_list
KVM_CHECK_EXTENSION: Final = _io(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = _io(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID: Final = _iowr(KVMIO, 0x05, _sz(KvmCpuid2))  # struct kvm_cpuid2
# VM ioctls
KVM_CREATE_VCPU: Final = _io(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION: Final = _iow(
    KVMIO, 0x46, _sz(KvmUserspaceMemoryRegion)
)  # struct kvm_userspace_memory_region
KVM_SET_TSS_ADDR: Final = _io(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR: Final = _iow(KVMIO, 0x48, _sz(_u64))  # __u64
KVM_CREATE_IRQCHIP: Final = _io(KVMIO, 0x60)
KVM_IRQ_LINE: Final = _iow(KVMIO, 0x61, _sz(KvmIrqLevel))  # struct kvm_irq_level
KVM_SET_GSI_ROUTING: Final = _iow(KVMIO, 0x6A, _sz(KvmIrqRouting))  # struct kvm_irq_routing
KVM_IRQFD: Final = _iow(KVMIO, 0x76, _sz(KvmIrqfd))  # struct kvm_irqfd
KVM_SET_BOOT_CPU_ID: Final = _io(KVMIO, 0x78)
KVM_SIGNAL_MSI: Final = _iow(KVMIO, 0xA5, _sz(KvmMsi))  # struct kvm_msi
KVM_ENABLE_CAP: Final = _iow(KVMIO, 0xA3, _sz(KvmEnableCap))  # struct kvm_enable_cap
# vCPU ioctls
KVM_RUN: Final = _io(KVMIO, 0x80)
KVM_GET_REGS: Final = _ior(KVMIO, 0x81, _sz(KvmRegs))  # struct kvm_regs
KVM_SET_REGS: Final = _iow(KVMIO, 0x82, _sz(KvmRegs))  # struct kvm_regs
KVM_GET_SREGS: Final = _ior(KVMIO, 0x83, _sz(KvmSregs))  # struct kvm_sregs
KVM_SET_SREGS: Final = _iow(KVMIO, 0x84, _sz(KvmSregs))  # struct kvm_sregs
KVM_GET_MSRS: Final = _iowr(KVMIO, 0x88, _sz(KvmMsrs))  # struct kvm_msrs
KVM_SET_MSRS: Final = _iow(KVMIO, 0x89, _sz(KvmMsrs))  # struct kvm_msrs
KVM_GET_LAPIC: Final = _ior(KVMIO, 0x8E, _sz(KvmLapicState))  # struct kvm_lapic_state
KVM_SET_LAPIC: Final = _iow(KVMIO, 0x8F, _sz(KvmLapicState))  # struct kvm_lapic_state
KVM_SET_CPUID2: Final = _iow(KVMIO, 0x90, _sz(KvmCpuid2))  # struct kvm_cpuid2
KVM_GET_CPUID2: Final = _iowr(KVMIO, 0x91, _sz(KvmCpuid2))  # struct kvm_cpuid2
KVM_GET_MP_STATE: Final = _ior(KVMIO, 0x98, _sz(KvmMpState))  # struct kvm_mp_state
KVM_SET_MP_STATE: Final = _iow(KVMIO, 0x99, _sz(KvmMpState))  # struct kvm_mp_state
KVM_GET_VCPU_EVENTS: Final = _ior(KVMIO, 0x9F, _sz(KvmVcpuEvents))  # struct kvm_vcpu_events
KVM_SET_VCPU_EVENTS: Final = _iow(KVMIO, 0xA0, _sz(KvmVcpuEvents))  # struct kvm_vcpu_events
KVM_GET_DEBUGREGS: Final = _ior(KVMIO, 0xA1, _sz(KvmDebugregs))  # struct kvm_debugregs
KVM_SET_DEBUGREGS: Final = _iow(KVMIO, 0xA2, _sz(KvmDebugregs))  # struct kvm_debugregs
KVM_GET_TSC_KHZ: Final = _io(KVMIO, 0xA3)

#: Name of every request number above, for error messages.
IOCTL_NAMES: Final[Mapping[int, str]] = {
    value: name
    for name, value in dict(globals()).items()
    if name.startswith("KVM_") and isinstance(value, int) and (value >> _IOC_TYPESHIFT) & 0xFF == KVMIO
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

# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


class KvmError(HvError):
    """A KVM ioctl, or opening/mapping a device for the executor, failed.

    :param op: the ioctl or operation, e.g. ``"KVM_SET_USER_MEMORY_REGION"``
    :param os_errno: the kernel's errno (0 when the failure was detected here)
    :param detail: what was asked, e.g. the slot and address
    """

    def __init__(self, op: str, os_errno: int, detail: str = "") -> None:
        self.op = op
        self.os_errno = os_errno
        self.detail = detail
        known = {int(e) for e in Errno}
        super().__init__(Errno(os_errno) if os_errno in known else Errno.EIO, detail)

    def __str__(self) -> str:
        if self.os_errno:
            name = errno.errorcode.get(self.os_errno, str(self.os_errno))
            text = f"{self.op} failed: {name} ({os.strerror(self.os_errno)})"
        else:
            text = f"{self.op} failed"
        return f"{text}: {self.detail}" if self.detail else text


_INT_MAX: Final = 2**31 - 1
_libc: ctypes.CDLL | None = None


def _ioctl_ulong(fd: int, request: int, arg: int) -> int:
    """``ioctl(fd, request, (unsigned long)arg)`` through libc.

    :func:`fcntl.ioctl` passes an integer argument as a C ``int``; KVM_SET_TSS_ADDR and
    friends take an ``unsigned long`` that may not fit (0xfffbd000).
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    result = int(_libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(arg)))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _ioctl(fd: int, request: int, arg: int | WriteableBuffer = 0, detail: str = "") -> int:
    """``ioctl(2)`` that raises :class:`KvmError` naming the request."""
    if fd < 0:
        name = IOCTL_NAMES.get(request, f"ioctl {request:#x}")
        raise KvmError(name, errno.EBADF, f"{detail} (already closed)".lstrip())
    try:
        if isinstance(arg, int) and not 0 <= arg <= _INT_MAX:
            return _ioctl_ulong(fd, request, arg)
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        name = IOCTL_NAMES.get(request, f"ioctl {request:#x}")
        raise KvmError(name, exc.errno or 0, detail) from exc


# ---------------------------------------------------------------------------------------
# Host memory and ports
# ---------------------------------------------------------------------------------------


def anonymous_memory(size: int) -> mmap.mmap:
    """Zeroed, page-aligned anonymous memory of ``size`` bytes (rounded up to pages)."""
    try:
        return mmap.mmap(-1, _page_round_up(max(size, 1)))
    except OSError as exc:
        raise KvmError("mmap", exc.errno or 0, f"anonymous {size:#x} bytes") from exc


def _page_round_up(value: int) -> int:
    return (value + HOST_PAGE_SIZE - 1) & ~(HOST_PAGE_SIZE - 1)


class PhysMapping:
    """A window of host-physical memory mapped from ``/dev/mem``.

    The mapping starts at the page containing ``phys``; :attr:`offset` is where ``phys``
    lies in it, so a 4K-misaligned ``phys`` works for data access. A KVM memory slot needs
    a page-aligned host address, so pass ``buffer=mapping.mmap, offset=mapping.offset`` to
    :meth:`Vm.add_memory` only for aligned windows (it checks).

    Lifecycle: mapped on construction, unmapped by :meth:`close` (or the ``with`` block).
    :meth:`close` fails with :class:`BufferError` while a memory slot still uses the window.

    :param phys: host-physical start address
    :param size: bytes
    :param path: the memory device (``/dev/mem``)
    :param uncached: open with ``O_SYNC`` (uncached mapping; for device registers)
    """

    def __init__(self, phys: int, size: int, *, path: str = "/dev/mem", uncached: bool = False) -> None:
        if phys < 0 or size <= 0:
            raise ValueError(f"bad physical window {phys:#x}+{size:#x}")
        base = phys & ~(HOST_PAGE_SIZE - 1)
        self.phys = phys
        self.size = size
        self.offset = phys - base
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_SYNC if uncached else 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise KvmError(f"open {path}", exc.errno or 0, f"for {phys:#x}+{size:#x}") from exc
        try:
            self.mmap = mmap.mmap(
                fd,
                _page_round_up(self.offset + size),
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
                offset=base,
            )
        except OSError as exc:
            raise KvmError(f"mmap {path}", exc.errno or 0, f"at {phys:#x}+{size:#x}") from exc
        finally:
            os.close(fd)

    def read(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``phys + offset``."""
        self._check(offset, size)
        start = self.offset + offset
        return self.mmap[start : start + size]

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``phys + offset``."""
        self._check(offset, len(data))
        start = self.offset + offset
        self.mmap[start : start + len(data)] = data

    def read_value(self, offset: int, size: int) -> int:
        """One ``size``-byte (1, 2, 4, 8) load at ``phys + offset`` (device registers)."""
        cell = self._cell(offset, size)
        try:
            return int(cell.value)
        finally:
            del cell

    def write_value(self, offset: int, size: int, value: int) -> None:
        """One ``size``-byte (1, 2, 4, 8) store at ``phys + offset`` (device registers)."""
        cell = self._cell(offset, size)
        try:
            cell.value = value & ((1 << (8 * size)) - 1)
        finally:
            del cell

    def _cell(self, offset: int, size: int) -> ctypes._SimpleCData[int]:
        kinds: dict[int, type[ctypes._SimpleCData[int]]] = {1: _u8, 2: _u16, 4: _u32, 8: _u64}
        if size not in kinds:
            raise ValueError(f"access size {size}: must be 1, 2, 4 or 8")
        self._check(offset, size)
        return kinds[size].from_buffer(self.mmap, self.offset + offset)

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(f"access {offset:#x}+{size:#x} outside window {self.phys:#x}+{self.size:#x}")

    def close(self) -> None:
        """Unmap; idempotent."""
        self.mmap.close()

    def __enter__(self) -> PhysMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DevPort:
    """Host I/O ports through ``/dev/port`` (whitelisted PIO pass-through).

    ``/dev/port`` moves one byte per port: a 2- or 4-byte access becomes that many byte
    accesses at consecutive ports, lowest first (``inb``/``outb``), not one ``inw``/``inl``.
    Devices that latch wide registers (the ACPI PM timer) can therefore be read torn.

    :param path: the port device
    """

    def __init__(self, path: str = "/dev/port") -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(f"open {path}", exc.errno or 0) from exc
        self.path = path

    def read(self, port: int, size: int) -> bytes:
        """Read ``size`` consecutive byte ports starting at ``port``."""
        try:
            return os.pread(self._fd, size, port)
        except OSError as exc:
            raise KvmError(f"read {self.path}", exc.errno or 0, f"port {port:#x}") from exc

    def write(self, port: int, data: bytes) -> None:
        """Write ``data`` to consecutive byte ports starting at ``port``."""
        try:
            os.pwrite(self._fd, data, port)
        except OSError as exc:
            raise KvmError(f"write {self.path}", exc.errno or 0, f"port {port:#x}") from exc

    def close(self) -> None:
        """Close the device; idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DevPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------
# CPUID entries
# ---------------------------------------------------------------------------------------

KVM_CPUID_FLAG_SIGNIFCANT_INDEX: Final = 1 << 0


@dataclasses.dataclass(frozen=True, slots=True)
class CpuidEntry:
    """One ``kvm_cpuid_entry2``: the result of CPUID leaf ``function``, subleaf ``index``."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    @classmethod
    def from_struct(cls, raw: KvmCpuidEntry2) -> CpuidEntry:
        return cls(
            int(raw.function),
            int(raw.index),
            int(raw.flags),
            int(raw.eax),
            int(raw.ebx),
            int(raw.ecx),
            int(raw.edx),
        )

    def to_struct(self, raw: KvmCpuidEntry2) -> None:
        raw.function, raw.index, raw.flags = self.function, self.index, self.flags
        raw.eax, raw.ebx, raw.ecx, raw.edx = self.eax, self.ebx, self.ecx, self.edx


def _cpuid_buffer(count: int) -> tuple[bytearray, KvmCpuid2, ctypes.Array[KvmCpuidEntry2]]:
    """A ``kvm_cpuid2`` with room for ``count`` entries, plus views of header and entries."""
    buf = bytearray(_sz(KvmCpuid2) + count * _sz(KvmCpuidEntry2))
    header = KvmCpuid2.from_buffer(buf)
    header.nent = count
    entries = (KvmCpuidEntry2 * count).from_buffer(buf, _sz(KvmCpuid2))
    return buf, header, entries


def _msrs_buffer(items: Sequence[tuple[int, int]]) -> tuple[bytearray, ctypes.Array[KvmMsrEntry]]:
    buf = bytearray(_sz(KvmMsrs) + len(items) * _sz(KvmMsrEntry))
    KvmMsrs.from_buffer(buf).nmsrs = len(items)
    entries = (KvmMsrEntry * len(items)).from_buffer(buf, _sz(KvmMsrs))
    for entry, (index, data) in zip(entries, items, strict=True):
        entry.index, entry.data = index, data
    return buf, entries


# ---------------------------------------------------------------------------------------
# /dev/kvm
# ---------------------------------------------------------------------------------------


class Kvm:
    """The KVM system fd (``/dev/kvm``).

    Lifecycle: opened (and the API version checked) on construction; :meth:`close` or the
    ``with`` block closes it, after the VMs made by :meth:`create_vm` are closed (they use
    it for capabilities, CPUID and the vCPU mmap size).

    :param path: the KVM device
    :raise KvmError: when the device cannot be opened or speaks another API version
    """

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(f"open {path}", exc.errno or 0) from exc
        version = _ioctl(self.fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            self.close()
            raise KvmError("KVM_GET_API_VERSION", 0, f"API version {version}, expected {KVM_API_VERSION}")
        self._mmap_size: int | None = None

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 when ``cap`` is missing, else its (positive) value."""
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, int(cap), f"capability {cap}")

    def require(self, *caps: Cap) -> None:
        """Check that every capability in ``caps`` is present.

        :raise KvmError: naming the first missing one
        """
        for cap in caps:
            if not self.check_extension(cap):
                raise KvmError("KVM_CHECK_EXTENSION", errno.ENODEV, f"KVM_CAP_{cap.name} missing")

    @property
    def vcpu_mmap_size(self) -> int:
        """``KVM_GET_VCPU_MMAP_SIZE``: bytes to mmap from a vCPU fd (``kvm_run`` + PIO page)."""
        if self._mmap_size is None:
            self._mmap_size = _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)
        return self._mmap_size

    def supported_cpuid(self) -> list[CpuidEntry]:
        """``KVM_GET_SUPPORTED_CPUID``: every leaf KVM can present to a guest."""
        count = 64
        while True:
            buf, header, entries = _cpuid_buffer(count)
            try:
                _ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as exc:
                if exc.os_errno == errno.E2BIG and count < 4096:
                    count *= 2
                    continue
                raise
            return [CpuidEntry.from_struct(entries[i]) for i in range(header.nent)]

    def msr_index_list(self) -> list[int]:
        """``KVM_GET_MSR_INDEX_LIST``: MSRs that KVM_GET/SET_MSRS save and restore."""
        count = 256
        while True:
            buf = bytearray(_sz(KvmMsrList) + 4 * count)
            KvmMsrList.from_buffer(buf).nmsrs = count
            try:
                _ioctl(self.fd, KVM_GET_MSR_INDEX_LIST, buf)
            except KvmError as exc:
                if exc.os_errno == errno.E2BIG and count < 65536:
                    count *= 4
                    continue
                raise
            found = KvmMsrList.from_buffer(buf).nmsrs
            return list(struct.unpack_from(f"<{found}I", buf, _sz(KvmMsrList)))

    def create_vm(self) -> Vm:
        """``KVM_CREATE_VM`` (default machine type)."""
        return Vm(self, _ioctl(self.fd, KVM_CREATE_VM, 0))

    def close(self) -> None:
        """Close the system fd; idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Kvm({self.path!r}, fd={self.fd})"


# ---------------------------------------------------------------------------------------
# VM
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class MemorySlot:
    """A KVM memory slot: ``size`` bytes of host memory at guest-physical ``guest_phys``.

    ``anchor`` pins the host buffer (a ctypes view holding a buffer export) for as long
    as the slot exists, so the mmap behind it cannot be closed under the guest; removing
    the slot drops it.
    """

    slot: int
    guest_phys: int
    size: int
    userspace_addr: int
    flags: int
    anchor: ctypes.Array[ctypes.c_char] | None = dataclasses.field(repr=False)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)


@dataclasses.dataclass(frozen=True, slots=True)
class MsiRoute:
    """A ``KVM_IRQ_ROUTING_MSI`` entry of the GSI routing table."""

    gsi: int
    address: int
    data: int
    devid: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class IrqchipRoute:
    """A ``KVM_IRQ_ROUTING_IRQCHIP`` entry (chip 0/1 = PIC, 2 = IOAPIC)."""

    gsi: int
    irqchip: int
    pin: int


class Vm:
    """A KVM VM (one per Jailhouse cell).

    Lifecycle: made by :meth:`Kvm.create_vm`; :meth:`create_irqchip` (when wanted) before
    the first :meth:`create_vcpu`; memory slots added and removed at any time with
    :meth:`add_memory` / :meth:`remove_memory`; :meth:`close` closes the vCPUs, drops the
    slots (releasing the buffers) and closes the VM fd.
    """

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.slots: dict[int, MemorySlot] = {}
        self.vcpus: dict[int, Vcpu] = {}
        self.has_irqchip = False
        self._lock = threading.Lock()
        self._max_slots = kvm.check_extension(Cap.NR_MEMSLOTS) or 32

    # --- interrupt controllers -------------------------------------------------------

    def create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: in-kernel PIC, IOAPIC and a local APIC per vCPU.

        Must come before the first vCPU; Jailhouse inmates need the local APIC.
        """
        if self.vcpus:
            raise KvmError("KVM_CREATE_IRQCHIP", errno.EINVAL, "vCPUs already exist")
        _ioctl(self.fd, KVM_CREATE_IRQCHIP)
        self.has_irqchip = True

    def set_tss_addr(self, address: int) -> None:
        """``KVM_SET_TSS_ADDR``: three pages KVM needs for real mode on Intel without
        unrestricted guest; must not overlap guest memory."""
        _ioctl(self.fd, KVM_SET_TSS_ADDR, address, f"{address:#x}")

    def set_identity_map_addr(self, address: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR``: one page for Intel's real-mode EPT identity map."""
        value = _u64(address)
        _ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, bytearray(value), f"{address:#x}")

    def enable_cap(self, cap: Cap, *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM (e.g. ``X86_USER_SPACE_MSR``)."""
        raw = KvmEnableCap(cap=int(cap), flags=flags)
        for i, value in enumerate(args):
            raw.args[i] = value
        _ioctl(self.fd, KVM_ENABLE_CAP, raw, f"KVM_CAP_{cap.name}{list(args)}")

    def irq_line(self, irq: int, level: bool) -> None:
        """``KVM_IRQ_LINE``: drive a GSI of the in-kernel PIC/IOAPIC."""
        _ioctl(self.fd, KVM_IRQ_LINE, KvmIrqLevel(irq=irq, level=int(level)), f"irq {irq}")

    def set_gsi_routing(self, routes: Sequence[MsiRoute | IrqchipRoute]) -> None:
        """``KVM_SET_GSI_ROUTING``: replace the whole GSI routing table."""
        buf = bytearray(_sz(KvmIrqRouting) + len(routes) * _sz(KvmIrqRoutingEntry))
        KvmIrqRouting.from_buffer(buf).nr = len(routes)
        raw = (KvmIrqRoutingEntry * len(routes)).from_buffer(buf, _sz(KvmIrqRouting))
        for entry, route in zip(raw, routes, strict=True):
            entry.gsi = route.gsi
            if isinstance(route, MsiRoute):
                entry.type = KVM_IRQ_ROUTING_MSI
                entry.u.msi.address_lo = route.address & 0xFFFFFFFF
                entry.u.msi.address_hi = route.address >> 32
                entry.u.msi.data = route.data
                if route.devid is not None:
                    entry.flags = KVM_MSI_VALID_DEVID
                    entry.u.msi.devid = route.devid
            else:
                entry.type = KVM_IRQ_ROUTING_IRQCHIP
                entry.u.irqchip.irqchip = route.irqchip
                entry.u.irqchip.pin = route.pin
        del raw
        _ioctl(self.fd, KVM_SET_GSI_ROUTING, buf, f"{len(routes)} routes")

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False, resamplefd: int = -1) -> None:
        """``KVM_IRQFD``: a write to ``eventfd`` raises GSI ``gsi`` (VFIO interrupts)."""
        raw = KvmIrqfd(fd=eventfd, gsi=gsi)
        if deassign:
            raw.flags |= KVM_IRQFD_FLAG_DEASSIGN
        if resamplefd >= 0:
            raw.flags |= KVM_IRQFD_FLAG_RESAMPLE
            raw.resamplefd = resamplefd
        _ioctl(self.fd, KVM_IRQFD, raw, f"eventfd {eventfd} gsi {gsi}")

    def signal_msi(self, address: int, data: int) -> int:
        """``KVM_SIGNAL_MSI``: inject one MSI.

        :return: >0 delivered, 0 blocked by the guest (masked/no target)
        """
        raw = KvmMsi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return _ioctl(self.fd, KVM_SIGNAL_MSI, raw, f"address {address:#x} data {data:#x}")

    # --- memory --------------------------------------------------------------------------

    def add_memory(
        self,
        guest_phys: int,
        buffer: WriteableBuffer,
        *,
        offset: int = 0,
        size: int | None = None,
        readonly: bool = False,
    ) -> MemorySlot:
        """Map ``size`` bytes of ``buffer`` from ``offset`` at ``guest_phys``.

        ``buffer`` is anything writable and mmap-backed: :func:`anonymous_memory`, a
        :class:`PhysMapping`'s ``mmap`` (``offset=mapping.offset``), a VFIO BAR mmap.
        The buffer cannot be closed until :meth:`remove_memory`.

        :param size: bytes (default: the rest of the buffer); a multiple of the page size
        :param readonly: guest writes exit as MMIO (needs ``KVM_CAP_READONLY_MEM``)
        :raise KvmError: ``EINVAL`` for unaligned arguments, ``ENOSPC`` with no free slot,
            else the kernel's error (``EEXIST`` for an overlap)
        """
        view = memoryview(buffer)
        total = view.nbytes
        view.release()
        if size is None:
            size = total - offset
        where = f"guest {guest_phys:#x}+{size:#x}"
        if offset < 0 or size <= 0 or offset + size > total:
            raise KvmError("KVM_SET_USER_MEMORY_REGION", errno.EINVAL, f"{where}: outside buffer")
        anchor = (ctypes.c_char * size).from_buffer(buffer, offset)
        address = ctypes.addressof(anchor)
        checks = (("guest address", guest_phys), ("size", size), ("host address", address))
        misaligned = [name for name, value in checks if value % HOST_PAGE_SIZE]
        if misaligned:
            raise KvmError(
                "KVM_SET_USER_MEMORY_REGION",
                errno.EINVAL,
                f"{where}: {', '.join(misaligned)} not page-aligned",
            )
        flags = KVM_MEM_READONLY if readonly else 0
        with self._lock:
            slot = next((n for n in range(self._max_slots) if n not in self.slots), None)
            if slot is None:
                raise KvmError("KVM_SET_USER_MEMORY_REGION", errno.ENOSPC, f"{where}: no free slot")
            region = KvmUserspaceMemoryRegion(
                slot=slot,
                flags=flags,
                guest_phys_addr=guest_phys,
                memory_size=size,
                userspace_addr=address,
            )
            _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region, f"slot {slot}, {where}")
            entry = MemorySlot(slot, guest_phys, size, address, flags, anchor)
            self.slots[slot] = entry
        LOG.debug("memory slot %d: guest %#x+%#x at host %#x", slot, guest_phys, size, address)
        return entry

    def remove_memory(self, slot: MemorySlot | int) -> None:
        """Delete a memory slot (size 0) and release its buffer."""
        number = slot if isinstance(slot, int) else slot.slot
        with self._lock:
            entry = self.slots.get(number)
            if entry is None:
                raise KvmError("KVM_SET_USER_MEMORY_REGION", errno.ENOENT, f"no slot {number}")
            region = KvmUserspaceMemoryRegion(
                slot=number, flags=entry.flags, guest_phys_addr=entry.guest_phys
            )
            _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region, f"delete slot {number}")
            del self.slots[number]
            entry.anchor = None
        LOG.debug("memory slot %d removed", number)

    def slot_at(self, guest_phys: int) -> MemorySlot | None:
        """The slot that maps ``guest_phys``, if any."""
        for entry in self.slots.values():
            if entry.guest_phys <= guest_phys < entry.guest_phys + entry.size:
                return entry
        return None

    # --- vCPUs ---------------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """``KVM_CREATE_VCPU``; ``vcpu_id`` becomes the vCPU's (x2)APIC ID."""
        if vcpu_id in self.vcpus:
            raise KvmError("KVM_CREATE_VCPU", errno.EEXIST, f"vCPU {vcpu_id} exists")
        fd = _ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id, f"vCPU {vcpu_id}")
        try:
            vcpu = Vcpu(self, vcpu_id, fd)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus[vcpu_id] = vcpu
        return vcpu

    def close(self) -> None:
        """Close all vCPUs and the VM fd, then release the slots' buffers; idempotent.

        The vCPUs must not be running (kick and join their threads first).
        """
        for vcpu in list(self.vcpus.values()):
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        # The guest memory is unreachable once the VM fd is gone.
        for entry in self.slots.values():
            entry.anchor = None
        self.slots.clear()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Vm(fd={self.fd}, vcpus={sorted(self.vcpus)}, slots={len(self.slots)})"


# ---------------------------------------------------------------------------------------
# Exits
# ---------------------------------------------------------------------------------------

# Offsets into the run page, from the ctypes layout (hot path uses struct on the mmap).
_OFF_IMMEDIATE_EXIT: Final = KvmRun.immediate_exit.offset
_OFF_EXIT_REASON: Final = KvmRun.exit_reason.offset
_OFF_U: Final = KvmRun.u.offset
_OFF_MMIO_DATA: Final = _OFF_U + KvmRunMmio.data.offset
_OFF_MSR_ERROR: Final = _OFF_U + KvmRunMsr.error.offset
_OFF_MSR_DATA: Final = _OFF_U + KvmRunMsr.data.offset
_U32: Final = struct.Struct("<I")
_IO_STRUCT: Final = struct.Struct("<BBHIQ")  # kvm_run.io
_MMIO_STRUCT: Final = struct.Struct("<Q8sIB")  # kvm_run.mmio
_MSR_STRUCT: Final = struct.Struct("<B7xIIQ")  # kvm_run.msr


class VcpuExit:
    """Base of the decoded exits :meth:`Vcpu.run` returns.

    Exits that carry data (:class:`IoExit`, :class:`MmioExit`, :class:`MsrExit`) read and
    write it in the vCPU's run page: valid only until the next :meth:`Vcpu.run`.
    """

    __slots__ = ()

    @property
    def reason(self) -> int:
        """The ``KVM_EXIT_*`` code (an :class:`ExitReason` when known)."""
        raise NotImplementedError


@dataclasses.dataclass(slots=True)
class IoExit(VcpuExit):
    """``KVM_EXIT_IO``: an IN/OUT (or INS/OUTS, ``count`` > 1) to ``port``.

    For a read (IN), store the result with :meth:`set_value` / :meth:`set_data` before
    the next :meth:`Vcpu.run`; for a write (OUT), read :attr:`data` / :meth:`value`.
    """

    @property
    def reason(self) -> int:
        return ExitReason.IO

    port: int
    size: int
    is_write: bool
    count: int
    data_offset: int
    run_page: mmap.mmap = dataclasses.field(repr=False)

    @property
    def data(self) -> bytes:
        """The ``size * count`` data bytes in the run page."""
        return self.run_page[self.data_offset : self.data_offset + self.size * self.count]

    def value(self, index: int = 0) -> int:
        """Element ``index`` of the data, little-endian."""
        start = self.data_offset + index * self.size
        return int.from_bytes(self.run_page[start : start + self.size], "little")

    def set_data(self, data: bytes) -> None:
        """Store ``data`` (exactly ``size * count`` bytes) as the IN result."""
        if len(data) != self.size * self.count:
            raise ValueError(f"IN data is {self.size * self.count} bytes, got {len(data)}")
        self.run_page[self.data_offset : self.data_offset + len(data)] = data

    def set_value(self, value: int, index: int = 0) -> None:
        """Store element ``index`` of the IN result (truncated to ``size`` bytes)."""
        start = self.data_offset + index * self.size
        mask = (1 << (8 * self.size)) - 1
        self.run_page[start : start + self.size] = (value & mask).to_bytes(self.size, "little")


@dataclasses.dataclass(slots=True)
class MmioExit(VcpuExit):
    """``KVM_EXIT_MMIO``: a guest access of ``length`` bytes at ``addr`` outside RAM.

    For a write, :attr:`data` holds the ``length`` bytes written (empty for a read); for
    a read, store the result with :meth:`set_value` / :meth:`set_data`.
    """

    @property
    def reason(self) -> int:
        return ExitReason.MMIO

    addr: int
    length: int
    is_write: bool
    data: bytes
    run_page: mmap.mmap = dataclasses.field(repr=False)

    @property
    def value(self) -> int:
        """The written value (little-endian, ``length`` bytes)."""
        return int.from_bytes(self.data[: self.length], "little")

    def set_data(self, data: bytes) -> None:
        """Store ``data`` (``length`` bytes) as the read result."""
        if len(data) != self.length:
            raise ValueError(f"MMIO read is {self.length} bytes, got {len(data)}")
        self.run_page[_OFF_MMIO_DATA : _OFF_MMIO_DATA + self.length] = data

    def set_value(self, value: int) -> None:
        """Store the read result (truncated to ``length`` bytes)."""
        mask = (1 << (8 * self.length)) - 1
        self.set_data((value & mask).to_bytes(self.length, "little"))


@dataclasses.dataclass(slots=True)
class MsrExit(VcpuExit):
    """``KVM_EXIT_X86_RDMSR``/``WRMSR`` (only with ``KVM_CAP_X86_USER_SPACE_MSR`` enabled)."""

    index: int
    is_write: bool
    data: int
    exit_reason_bits: int
    run_page: mmap.mmap = dataclasses.field(repr=False)

    @property
    def reason(self) -> int:
        return ExitReason.X86_WRMSR if self.is_write else ExitReason.X86_RDMSR

    def set_value(self, value: int) -> None:
        """Result of a read."""
        data = (value & (2**64 - 1)).to_bytes(8, "little")
        self.run_page[_OFF_MSR_DATA : _OFF_MSR_DATA + 8] = data

    def set_error(self) -> None:
        """Make the guest's RDMSR/WRMSR raise #GP."""
        self.run_page[_OFF_MSR_ERROR] = 1


@dataclasses.dataclass(slots=True)
class HltExit(VcpuExit):
    """``KVM_EXIT_HLT`` (only without an in-kernel irqchip; with one, HLT blocks in KVM)."""

    @property
    def reason(self) -> int:
        return ExitReason.HLT


@dataclasses.dataclass(slots=True)
class ShutdownExit(VcpuExit):
    """``KVM_EXIT_SHUTDOWN``: the guest triple-faulted."""

    @property
    def reason(self) -> int:
        return ExitReason.SHUTDOWN


@dataclasses.dataclass(slots=True)
class IntrExit(VcpuExit):
    """``KVM_EXIT_INTR``: KVM_RUN returned ``EINTR`` (a :meth:`Vcpu.kick` or another signal)."""

    @property
    def reason(self) -> int:
        return ExitReason.INTR


@dataclasses.dataclass(slots=True)
class InternalErrorExit(VcpuExit):
    """``KVM_EXIT_INTERNAL_ERROR`` (suberror 1 = emulation failure, 3 = delivery event)."""

    @property
    def reason(self) -> int:
        return ExitReason.INTERNAL_ERROR

    suberror: int
    data: tuple[int, ...]


@dataclasses.dataclass(slots=True)
class FailEntryExit(VcpuExit):
    """``KVM_EXIT_FAIL_ENTRY``: the hardware refused the guest state."""

    @property
    def reason(self) -> int:
        return ExitReason.FAIL_ENTRY

    hardware_entry_failure_reason: int
    cpu: int


@dataclasses.dataclass(slots=True)
class SystemEventExit(VcpuExit):
    """``KVM_EXIT_SYSTEM_EVENT`` (``type`` is a :class:`SystemEvent` value)."""

    @property
    def reason(self) -> int:
        return ExitReason.SYSTEM_EVENT

    type: int
    data: tuple[int, ...]


@dataclasses.dataclass(slots=True)
class UnknownExit(VcpuExit):
    """``KVM_EXIT_UNKNOWN`` with the hardware exit code."""

    @property
    def reason(self) -> int:
        return ExitReason.UNKNOWN

    hardware_exit_reason: int


@dataclasses.dataclass(slots=True)
class OtherExit(VcpuExit):
    """Any exit reason not decoded above (``code`` is the raw ``exit_reason``)."""

    code: int

    @property
    def reason(self) -> int:
        try:
            return ExitReason(self.code)
        except ValueError:
            return self.code

    @property
    def name(self) -> str:
        try:
            return f"KVM_EXIT_{ExitReason(self.code).name}"
        except ValueError:
            return f"exit reason {self.code}"


_INTERNAL_ERRORS: Final = {
    1: "emulation failure",
    2: "simultaneous exceptions",
    3: "delivery event",
    4: "unexpected exit reason",
}


def describe_exit(exit_: VcpuExit) -> str:
    """One line for an exit nobody handled, worded like Jailhouse where it has a word.

    IO and MMIO give Jailhouse's ``Invalid PIO ...`` / ``Invalid MMIO/RAM ...`` texts
    (without the ``FATAL: `` prefix, which the caller adds).
    """
    if isinstance(exit_, IoExit):
        direction = "write" if exit_.is_write else "read"
        return f"Invalid PIO {direction}, port: {exit_.port:x} size: {exit_.size}"
    if isinstance(exit_, MmioExit):
        direction = "write" if exit_.is_write else "read"
        return f"Invalid MMIO/RAM {direction}, addr: 0x{exit_.addr:016x} size: {exit_.length}"
    if isinstance(exit_, ShutdownExit):
        return "Triple fault (KVM_EXIT_SHUTDOWN)"
    if isinstance(exit_, InternalErrorExit):
        what = _INTERNAL_ERRORS.get(exit_.suberror, "unknown")
        data = " ".join(f"{value:#x}" for value in exit_.data)
        return f"KVM internal error, suberror {exit_.suberror} ({what}), data: {data or '-'}"
    if isinstance(exit_, FailEntryExit):
        return (
            f"VM-Entry failure, hardware reason {exit_.hardware_entry_failure_reason:#x} "
            f"(host CPU {exit_.cpu})"
        )
    if isinstance(exit_, SystemEventExit):
        try:
            name = SystemEvent(exit_.type).name
        except ValueError:
            name = str(exit_.type)
        return f"System event {name}, data: {' '.join(f'{v:#x}' for v in exit_.data) or '-'}"
    if isinstance(exit_, UnknownExit):
        return f"Unknown exit, hardware reason {exit_.hardware_exit_reason:#x}"
    if isinstance(exit_, MsrExit):
        access = "write" if exit_.is_write else "read"
        return f"Unhandled MSR {access}: {exit_.index:x}"
    reason = exit_.reason
    name = f"KVM_EXIT_{reason.name}" if isinstance(reason, ExitReason) else f"exit {reason}"
    return f"Unhandled exit {name}"


# ---------------------------------------------------------------------------------------
# vCPU
# ---------------------------------------------------------------------------------------

#: Signal :meth:`Vcpu.kick` sends to interrupt KVM_RUN (QEMU uses SIGUSR1 the same way).
KICK_SIGNAL: Final = signal.SIGUSR1


def _kick_handler(signum: int, frame: object) -> None:
    """Nothing to do: the signal's only job is to make KVM_RUN return EINTR."""


def install_kick_handler() -> None:
    """Install the no-op :data:`KICK_SIGNAL` handler :meth:`Vcpu.kick` needs.

    Must run in the main thread (Python installs signal handlers only there); idempotent.
    A handler someone else installed is kept (it only has to exist, not to do anything).
    """
    current = signal.getsignal(KICK_SIGNAL)
    if current in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(KICK_SIGNAL, _kick_handler)


class Vcpu:
    """A KVM vCPU of a :class:`Vm` (one per cell CPU); its id is its APIC ID.

    Lifecycle: made by :meth:`Vm.create_vcpu`; set up (CPUID before the first run, then
    registers, e.g. :func:`jailhouse_vcpu_setup` and :func:`jailhouse_vcpu_reset`); then
    one thread calls :meth:`run` in a loop, while any thread may :meth:`kick` it out;
    :meth:`close` after that thread stopped (the VM closes its vCPUs).

    Kicking: :meth:`kick` sets ``immediate_exit`` and signals the running thread, so the
    current or the next :meth:`run` returns :class:`IntrExit`. The kicker sets its own
    request flag *before* kicking; the run loop checks its flags after every
    :class:`IntrExit` (and :meth:`run` clears ``immediate_exit`` before returning, so no
    request is lost).
    """

    def __init__(self, vm: Vm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        try:
            self.run_page = mmap.mmap(
                fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError as exc:
            raise KvmError("mmap vCPU", exc.errno or 0, f"vCPU {vcpu_id}") from exc
        self._thread: int | None = None
        self._thread_lock = threading.Lock()

    # --- running ---------------------------------------------------------------------------

    def run(self) -> VcpuExit:
        """``KVM_RUN`` until the next exit to userspace; decode it.

        :raise KvmError: when KVM_RUN fails other than by ``EINTR``
        """
        page = self.run_page
        with self._thread_lock:
            self._thread = threading.get_ident()
        try:
            fcntl.ioctl(self.fd, KVM_RUN, 0)
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise KvmError("KVM_RUN", exc.errno or 0, f"vCPU {self.id}") from exc
            page[_OFF_IMMEDIATE_EXIT] = 0
            return IntrExit()
        finally:
            with self._thread_lock:
                self._thread = None
        return self._decode()

    def run_native(self, enter: Callable[[], int]) -> VcpuExit:
        """:meth:`run` with ``enter`` in place of the KVM_RUN ioctl: native code that runs
        the vCPU and may serve some exits itself (the executor's I/O bitmap loop,
        :class:`~.portio.IoBitmapLoop`). It returns 0 once an exit it leaves to the caller
        is in the run page, or KVM_RUN's negative errno. Kicks work as with :meth:`run`.

        :raise KvmError: when KVM_RUN fails other than by ``EINTR``
        """
        with self._thread_lock:
            self._thread = threading.get_ident()
        try:
            result = enter()
            if result == -errno.EINTR:
                self.run_page[_OFF_IMMEDIATE_EXIT] = 0
                return IntrExit()
        finally:
            with self._thread_lock:
                self._thread = None
        if result < 0:
            raise KvmError("KVM_RUN", -result, f"vCPU {self.id}")
        return self._decode()

    def _decode(self) -> VcpuExit:
        """The exit KVM_RUN left in the run page."""
        page = self.run_page
        (reason,) = _U32.unpack_from(page, _OFF_EXIT_REASON)
        if reason == ExitReason.IO:
            direction, size, port, count, data_offset = _IO_STRUCT.unpack_from(page, _OFF_U)
            return IoExit(port, size, direction == KVM_EXIT_IO_OUT, count, data_offset, page)
        if reason == ExitReason.MMIO:
            addr, data, length, is_write = _MMIO_STRUCT.unpack_from(page, _OFF_U)
            return MmioExit(addr, length, bool(is_write), data[:length] if is_write else b"", page)
        return self._decode_rare(reason)

    def _decode_rare(self, reason: int) -> VcpuExit:
        info = KvmRunExitInfo.from_buffer_copy(self.run_page, _OFF_U)
        if reason == ExitReason.HLT:
            return HltExit()
        if reason == ExitReason.SHUTDOWN:
            return ShutdownExit()
        if reason == ExitReason.INTR:
            return IntrExit()
        if reason == ExitReason.INTERNAL_ERROR:
            count = min(int(info.internal.ndata), 16)
            return InternalErrorExit(int(info.internal.suberror), tuple(info.internal.data[:count]))
        if reason == ExitReason.FAIL_ENTRY:
            return FailEntryExit(int(info.fail_entry.hardware_entry_failure_reason), int(info.fail_entry.cpu))
        if reason == ExitReason.SYSTEM_EVENT:
            count = min(int(info.system_event.ndata), 16)
            event = info.system_event
            return SystemEventExit(int(event.type), tuple(event.data[:count]))
        if reason in (ExitReason.X86_RDMSR, ExitReason.X86_WRMSR):
            _, bits, index, data = _MSR_STRUCT.unpack_from(self.run_page, _OFF_U)
            return MsrExit(index, reason == ExitReason.X86_WRMSR, data, bits, self.run_page)
        if reason == ExitReason.UNKNOWN:
            return UnknownExit(int(info.hw.hardware_exit_reason))
        return OtherExit(reason)

    def kick(self) -> None:
        """Make the current or next :meth:`run` return :class:`IntrExit`; any thread.

        :raise KvmError: when :func:`install_kick_handler` was not called
        """
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise KvmError("kick", 0, f"no {KICK_SIGNAL.name} handler: call install_kick_handler()")
        with self._thread_lock:
            self.run_page[_OFF_IMMEDIATE_EXIT] = 1
            # The running thread cannot leave run() (and exit) while we hold the lock.
            if self._thread is not None and self._thread != threading.get_ident():
                signal.pthread_kill(self._thread, KICK_SIGNAL)

    def complete_pending(self) -> None:
        """Let KVM finish an interrupted PIO/MMIO instruction without entering the guest.

        After an IN or MMIO-read exit, KVM completes the instruction (writes the result,
        advances RIP) at the *next* KVM_RUN. Before overwriting registers (a reset) the
        pending completion must be flushed, or it would land on the new state. This runs
        KVM_RUN with ``immediate_exit`` set. Call it only while no thread runs the vCPU;
        a kick made before the call stays pending, one made during the call is absorbed.
        """
        pending = self.run_page[_OFF_IMMEDIATE_EXIT]
        self.run_page[_OFF_IMMEDIATE_EXIT] = 1
        try:
            fcntl.ioctl(self.fd, KVM_RUN, 0)
        except OSError as exc:
            if exc.errno != errno.EINTR:
                detail = f"vCPU {self.id} (immediate exit)"
                raise KvmError("KVM_RUN", exc.errno or 0, detail) from exc
        finally:
            self.run_page[_OFF_IMMEDIATE_EXIT] = pending

    # --- register state -------------------------------------------------------------------

    def get_regs(self) -> KvmRegs:
        regs = KvmRegs()
        _ioctl(self.fd, KVM_GET_REGS, regs, f"vCPU {self.id}")
        return regs

    def set_regs(self, regs: KvmRegs) -> None:
        _ioctl(self.fd, KVM_SET_REGS, regs, f"vCPU {self.id}")

    def get_sregs(self) -> KvmSregs:
        sregs = KvmSregs()
        _ioctl(self.fd, KVM_GET_SREGS, sregs, f"vCPU {self.id}")
        return sregs

    def set_sregs(self, sregs: KvmSregs) -> None:
        _ioctl(self.fd, KVM_SET_SREGS, sregs, f"vCPU {self.id}")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """``KVM_GET_MSRS``.

        :raise KvmError: naming the first MSR KVM could not read
        """
        wanted = list(indices)
        buf, entries = _msrs_buffer([(index, 0) for index in wanted])
        done = _ioctl(self.fd, KVM_GET_MSRS, buf, f"vCPU {self.id}")
        if done != len(wanted):
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, f"vCPU {self.id}: MSR {wanted[done]:#x}")
        return {int(entry.index): int(entry.data) for entry in entries}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """``KVM_SET_MSRS`` (in the mapping's order).

        :raise KvmError: naming the first MSR KVM refused
        """
        items = list(values.items())
        buf, entries = _msrs_buffer(items)
        del entries
        done = _ioctl(self.fd, KVM_SET_MSRS, buf, f"vCPU {self.id}")
        if done != len(items):
            index, data = items[done]
            raise KvmError(
                "KVM_SET_MSRS", errno.EINVAL, f"vCPU {self.id}: MSR {index:#x} = {data:#x} refused"
            )

    def get_cpuid(self) -> list[CpuidEntry]:
        """``KVM_GET_CPUID2``: the CPUID table set for this vCPU."""
        count = 64
        while True:
            buf, header, entries = _cpuid_buffer(count)
            try:
                _ioctl(self.fd, KVM_GET_CPUID2, buf, f"vCPU {self.id}")
            except KvmError as exc:
                if exc.os_errno == errno.E2BIG and count < 4096:
                    count *= 2
                    continue
                raise
            return [CpuidEntry.from_struct(entries[i]) for i in range(header.nent)]

    def set_cpuid(self, table: Sequence[CpuidEntry]) -> None:
        """``KVM_SET_CPUID2``; before the first :meth:`run` (KVM freezes CPUID then)."""
        buf, _, entries = _cpuid_buffer(len(table))
        for raw, entry in zip(entries, table, strict=True):
            entry.to_struct(raw)
        del entries
        _ioctl(self.fd, KVM_SET_CPUID2, buf, f"vCPU {self.id}, {len(table)} entries")

    def get_lapic(self) -> bytearray:
        """``KVM_GET_LAPIC``: the 1 KiB local APIC register page."""
        state = KvmLapicState()
        _ioctl(self.fd, KVM_GET_LAPIC, state, f"vCPU {self.id}")
        return bytearray(bytes(state))

    def set_lapic(self, regs: bytes | bytearray) -> None:
        """``KVM_SET_LAPIC`` from a 1 KiB register page."""
        if len(regs) != KVM_APIC_REG_SIZE:
            raise ValueError(f"APIC page is {KVM_APIC_REG_SIZE} bytes, got {len(regs)}")
        state = KvmLapicState.from_buffer_copy(bytes(regs))
        _ioctl(self.fd, KVM_SET_LAPIC, state, f"vCPU {self.id}")

    def get_mp_state(self) -> MpState:
        state = KvmMpState()
        _ioctl(self.fd, KVM_GET_MP_STATE, state, f"vCPU {self.id}")
        return MpState(state.mp_state)

    def set_mp_state(self, value: MpState) -> None:
        _ioctl(self.fd, KVM_SET_MP_STATE, KvmMpState(int(value)), f"vCPU {self.id} {value.name}")

    def get_debugregs(self) -> KvmDebugregs:
        regs = KvmDebugregs()
        _ioctl(self.fd, KVM_GET_DEBUGREGS, regs, f"vCPU {self.id}")
        return regs

    def set_debugregs(self, regs: KvmDebugregs) -> None:
        _ioctl(self.fd, KVM_SET_DEBUGREGS, regs, f"vCPU {self.id}")

    def get_vcpu_events(self) -> KvmVcpuEvents:
        events = KvmVcpuEvents()
        _ioctl(self.fd, KVM_GET_VCPU_EVENTS, events, f"vCPU {self.id}")
        return events

    def set_vcpu_events(self, events: KvmVcpuEvents) -> None:
        _ioctl(self.fd, KVM_SET_VCPU_EVENTS, events, f"vCPU {self.id}")

    def tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ``: the guest TSC frequency."""
        return _ioctl(self.fd, KVM_GET_TSC_KHZ, 0, f"vCPU {self.id}")

    def close(self) -> None:
        """Unmap the run page and close the fd; idempotent. The vCPU must not be running."""
        if not self.run_page.closed:
            self.run_page.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"Vcpu(id={self.id}, fd={self.fd})"


# ---------------------------------------------------------------------------------------
# Jailhouse's view of a cell CPU: CPUID (§3.1) and start state (§5.1)
# ---------------------------------------------------------------------------------------

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
_APIC_KEEP: Final = (0x20, 0x30, APIC_LDR)  # ID, version, LDR (x2APIC: derived from ID)


def lapic_reset_page(current: bytes | bytearray) -> bytearray:
    """The local APIC page after a reset: ID, version and LDR kept, LVTs masked, SVR 0xff,
    DFR all ones, timer stopped, ISR/TMR/IRR/TPR/ESR/ICR clear (SDM 10.4.7.1)."""
    page = bytearray(KVM_APIC_REG_SIZE)
    for offset in _APIC_KEEP:
        page[offset : offset + 4] = current[offset : offset + 4]
    page[APIC_DFR : APIC_DFR + 4] = b"\xff\xff\xff\xff"
    page[APIC_SVR : APIC_SVR + 4] = (0xFF).to_bytes(4, "little")
    for offset in (APIC_LVT_CMCI, *range(APIC_LVT_TIMER, APIC_LVT_ERROR + 0x10, 0x10)):
        page[offset : offset + 4] = APIC_LVT_MASKED.to_bytes(4, "little")
    return page


def jailhouse_vcpu_setup(vcpu: Vcpu, supported: Sequence[CpuidEntry] | None = None) -> None:
    """One-time setup of a cell vCPU before its first run: Jailhouse's CPUID view.

    :param supported: ``KVM_GET_SUPPORTED_CPUID`` (fetched when None)
    """
    if supported is None:
        supported = vcpu.vm.kvm.supported_cpuid()
    vcpu.set_cpuid(jailhouse_cpuid(supported, vcpu.id))


def jailhouse_vcpu_reset(vcpu: Vcpu, reset_address: int = 0) -> None:
    """Put ``vcpu`` in the state of a Jailhouse cell CPU at cell start (reference §5.1).

    Real mode at ``reset_address`` (CS base ``reset_address & ~0xffff``, IP its low 16
    bits), GPRs 0, RFLAGS 2, CR0 NW|CD|ET, EFER 0, DR7 0x400, DEBUGCTL 0, PAT at its reset
    value, MTRRs disabled, no pending events, runnable. The local APIC is reset and put in
    x2APIC mode (IA32_APIC_BASE = 0xfee00000 | EN | EXTD), because inmates use x2APIC
    MSRs unconditionally (Jailhouse emulates them even on xAPIC hardware).

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
    kvm = vcpu.vm.kvm
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
    if vcpu.vm.has_irqchip:
        msrs[Msr.IA32_TSC_DEADLINE] = 0
    vcpu.set_msrs(msrs)
    _set_msr_if_supported(vcpu, Msr.IA32_DEBUGCTL, 0)
    if vcpu.vm.has_irqchip:
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


if __name__ == "__main__":
    import sys

    from .runner import main

    sys.exit(main())
