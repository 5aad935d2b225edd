"""Cells' hypercalls through KVM's Xen hypercall interception (``CONFIG_KVM_XEN``).

Jailhouse's cells call the hypervisor with VMCALL (Intel) or VMMCALL (AMD): code in EAX,
arguments in RDI and RSI, result in RAX. Stock KVM answers these itself. With
``KVM_XEN_HVM_CONFIG`` and ``KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL`` a VM's hypercalls exit
to user space as ``KVM_EXIT_XEN`` (``struct kvm_xen_exit``, type ``KVM_EXIT_XEN_HCALL``)
instead, except the handful of Xen hypercall numbers KVM accelerates (15, 17, 24, 29, 32:
none is a Jailhouse code).

Linux 6.1 honours the intercept only while its ``kvm_xen_enabled`` static key is on, and
turns that key on only for a VM whose config names a hypercall-page MSR
(``arch/x86/kvm/xen.c``: ``kvm_xen_hvm_config``, ``xen.h``: ``kvm_xen_hypercall_enabled``).
So every VM gets :data:`HYPERCALL_MSR`: a guest WRMSR to it would make KVM write a Xen
hypercall page into guest memory; no Jailhouse cell writes MSRs in the hypervisor range.
The key is global kernel text patching: whoever holds a VM for long (the executor's keeper
VM, the lab's KVM holder) configures it too, so cells coming and going never flip it.
"""

from __future__ import annotations

from typing import Final

from .kvm import Cap, Kvm, Vm
from .kvm.structs import KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL

#: Xen's hypercall-page MSR where Xen puts it next to Viridian's (0x40000000 + 0x200);
#: it only has to be non-zero for the intercept to work (see the module docstring)
HYPERCALL_MSR: Final = 0x40000200


def intercept_available(kvm: Kvm) -> bool:
    """Whether this kernel's KVM can deliver hypercalls to user space (``KVM_CAP_XEN_HVM``
    lists ``INTERCEPT_HCALL``; Debian's kernel, without ``CONFIG_KVM_XEN``, does not)."""
    return bool(kvm.check_extension(Cap.XEN_HVM) & KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL)


def intercept_hypercalls(vm: Vm) -> None:
    """Make ``vm``'s VMCALL/VMMCALL exit to user space as ``KVM_EXIT_XEN``.

    :raise KvmError: when KVM refuses (no ``CONFIG_KVM_XEN``)
    """
    vm.set_xen_hvm_config(KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL, msr=HYPERCALL_MSR)
