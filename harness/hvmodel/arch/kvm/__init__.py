"""KVM binding of the executor; stands where ``hypervisor/arch/x86/{vmx,svm}.c`` are.

Jailhouse programs VMX/SVM itself; jhlab's executor asks Linux KVM for the same things
through ``/dev/kvm``. This package is that binding, standard library only (``fcntl``,
``ctypes``, ``mmap``, ``struct``, ``os``, ``signal``, ``threading``) because it runs in the
lab root cell's Debian ``python3`` with nothing installed. One module per object:

=================  =====================================================================
module             holds
=================  =====================================================================
:mod:`.structs`    the ``struct kvm_*`` layouts of ``<linux/kvm.h>`` / ``<asm/kvm.h>``
                   (x86-64) as :mod:`ctypes` structures, ioctl numbers, capabilities,
                   exit reasons, run-page offsets
:mod:`.ioctl`      :func:`~.ioctl.kvm_ioctl` and :class:`KvmError`
:mod:`.system`     :class:`Kvm` (``/dev/kvm``: API version, capabilities, supported
                   CPUID, MSR list) and :class:`CpuidEntry`
:mod:`.vm`         :class:`Vm` (one per cell: memory slots, irqchip, GSI routing,
                   irqfds, MSI injection, Xen hypercall interception, its vCPUs)
:mod:`.vcpu`       :class:`Vcpu` (:meth:`Vcpu.run` returning a decoded exit, registers,
                   MSRs, CPUID, local APIC, MP state, events; :meth:`Vcpu.kick` from
                   another thread)
:mod:`.exits`      the decoded exits (:class:`IoExit`, :class:`MmioExit`, ...) and
                   :func:`describe_exit` for ``FATAL:`` reports
=================  =====================================================================

What a *Jailhouse* cell CPU is on top of a vCPU (CPUID view, start state, register
dump, timer frequencies) is :mod:`harness.hvmodel.arch.vcpu`; the host memory the
executor backs cells with is :mod:`harness.hvmodel.arch.hostmem`.

Facts measured with this binding (PVM host ``/dev/kvm``): real, protected and long mode
guests run; x2APIC MSRs, the APIC one-shot and TSC-deadline timers, INIT/SIPI between
vCPUs, MSIs (``KVM_SIGNAL_MSI``, irqfd) and user-space MSR exits work; HLT with the
in-kernel irqchip blocks inside KVM_RUN until an interrupt or a :meth:`Vcpu.kick`.

Errors: every failing ioctl, open or mmap raises :class:`KvmError`, an
:class:`~harness.hvmodel.errors.HvError` that names the operation and keeps the kernel's
errno (:attr:`KvmError.os_errno`); its Jailhouse errno is the same code when Jailhouse
has it, else ``EIO``.

The names below are re-exported here (``from harness.hvmodel.arch.kvm import Vm``); the
ctypes structures and request numbers are imported from :mod:`.structs`.
"""

from __future__ import annotations

from .exits import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    IntrExit,
    IoapicEoiExit,
    IoExit,
    MmioExit,
    MsrExit,
    OtherExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
    VcpuExit,
    XenExit,
    describe_exit,
)
from .ioctl import KvmError
from .structs import Cap, ExitReason, MpState, SystemEvent
from .system import CpuidEntry, Kvm
from .vcpu import KICK_SIGNAL, Vcpu, install_kick_handler, kick_handler_installed
from .vm import IrqchipRoute, MemorySlot, MsiRoute, Vm

__all__ = [
    "KICK_SIGNAL",
    "Cap",
    "CpuidEntry",
    "ExitReason",
    "FailEntryExit",
    "HltExit",
    "InternalErrorExit",
    "IntrExit",
    "IoExit",
    "IoapicEoiExit",
    "IrqchipRoute",
    "Kvm",
    "KvmError",
    "MemorySlot",
    "MmioExit",
    "MpState",
    "MsiRoute",
    "MsrExit",
    "OtherExit",
    "ShutdownExit",
    "SystemEvent",
    "SystemEventExit",
    "UnknownExit",
    "Vcpu",
    "VcpuExit",
    "Vm",
    "XenExit",
    "describe_exit",
    "install_kick_handler",
    "kick_handler_installed",
]
