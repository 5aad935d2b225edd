"""The VM exit codes of Jailhouse's ``hypervisor/arch/x86/include/asm/svm.h``
(``VMEXIT_*``, AMD APM vol. 2 appendix C) and ``asm/vmx.h`` (``EXIT_REASON_*``, Intel
SDM vol. 3 appendix C) that jhlab names: the exits Jailhouse counts or reports, as KVM's
``kvm:kvm_exit`` tracepoint and ``KVM_EXIT_UNKNOWN`` give them too (the raw hardware
code).
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["VMX_EXIT_FAILED_VMENTRY", "SvmExit", "VmxExit"]


class SvmExit(enum.IntEnum):
    """``VMEXIT_*`` exit codes (the VMCB's EXITCODE)."""

    CR0_WRITE = 0x10
    #: exception intercepts: ``EXCEPTION_DE + vector``
    EXCEPTION_DE = 0x40
    EXCEPTION_DB = 0x41
    EXCEPTION_AC = 0x51
    CR0_SEL_WRITE = 0x65
    CPUID = 0x72
    IOIO = 0x7B
    MSR = 0x7C
    SHUTDOWN = 0x7F
    VMMCALL = 0x81
    XSETBV = 0x8D
    NPF = 0x400
    #: ``VMEXIT_INVALID`` (-1 as the 32-bit code KVM traces)
    INVALID = 0xFFFFFFFF


class VmxExit(enum.IntEnum):
    """``EXIT_REASON_*`` basic exit reasons (bits 15:0 of the exit reason)."""

    EXCEPTION_NMI = 0
    TRIPLE_FAULT = 2
    CPUID = 10
    VMCALL = 18
    CR_ACCESS = 28
    IO_INSTRUCTION = 30
    MSR_READ = 31
    MSR_WRITE = 32
    XSETBV = 55


#: exit reason bit 31: the VM entry failed (``EXIT_REASONS_FAILED_VMENTRY``)
VMX_EXIT_FAILED_VMENTRY: Final = 1 << 31
