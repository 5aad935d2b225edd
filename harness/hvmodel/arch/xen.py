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

import fcntl
import struct
from typing import Final

from .kvm import Cap, Kvm, KvmError, Vm

#: ``KVM_XEN_HVM_CONFIG``'s flag: hypercalls exit to user space
INTERCEPT_HCALL: Final = 1 << 1
#: ``struct kvm_xen_hvm_config``: flags, msr, blob_addr_32, blob_addr_64, blob_size_32,
#: blob_size_64, pad (56 bytes)
_HVM_CONFIG: Final = struct.Struct("<IIQQBB30x")
#: ``_IOW(KVMIO, 0x7a, struct kvm_xen_hvm_config)``
KVM_XEN_HVM_CONFIG: Final = (1 << 30) | (_HVM_CONFIG.size << 16) | (0xAE << 8) | 0x7A
#: Xen's hypercall-page MSR where Xen puts it next to Viridian's (0x40000000 + 0x200);
#: it only has to be non-zero for the intercept to work (see the module docstring)
HYPERCALL_MSR: Final = 0x40000200
#: ``struct kvm_xen_exit.type`` of a hypercall
KVM_EXIT_XEN_HCALL: Final = 1
#: ``struct kvm_xen_exit`` with the ``hcall`` member: type, (pad), longmode, cpl, input,
#: result, params[6]; the union is 8-byte aligned
XEN_EXIT: Final = struct.Struct("<I4xIIQQ6Q")
#: offset of ``hcall.result`` in ``struct kvm_xen_exit``
XEN_RESULT_OFFSET: Final = 24


def intercept_available(kvm: Kvm) -> bool:
    """Whether this kernel's KVM can deliver hypercalls to user space (``KVM_CAP_XEN_HVM``
    lists ``INTERCEPT_HCALL``; Debian's kernel, without ``CONFIG_KVM_XEN``, does not)."""
    return bool(kvm.check_extension(Cap.XEN_HVM) & INTERCEPT_HCALL)


def intercept_hypercalls(vm: Vm) -> None:
    """Make ``vm``'s VMCALL/VMMCALL exit to user space as ``KVM_EXIT_XEN``.

    :raise KvmError: when KVM refuses (no ``CONFIG_KVM_XEN``)
    """
    raw = bytearray(_HVM_CONFIG.pack(INTERCEPT_HCALL, HYPERCALL_MSR, 0, 0, 0, 0))
    try:
        fcntl.ioctl(vm.fd, KVM_XEN_HVM_CONFIG, raw)
    except OSError as exc:
        raise KvmError("KVM_XEN_HVM_CONFIG", exc.errno or 0, "hypercall interception") from exc
