"""KVM's Xen hypercall interception (harness.hvmodel.arch.xen): the ABI facts, checked
against <linux/kvm.h>'s values, and the error of a kernel that refuses it."""

from __future__ import annotations

import os
from types import MethodType, SimpleNamespace
from typing import cast

import pytest

from harness.hvmodel.arch import xen
from harness.hvmodel.arch.kvm import KvmError, Vm, structs


def test_abi_matches_linux() -> None:
    """_IOW(KVMIO, 0x7a, struct kvm_xen_hvm_config) is 0x4038ae7a (a 56-byte struct);
    the intercept flag is bit 1; struct kvm_xen_exit's hcall.result is at offset 24."""
    assert structs.KVM_XEN_HVM_CONFIG == 0x4038AE7A
    assert structs.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL == 2
    assert structs.RUN_XEN_HCALL.size == 4 + 4 + 4 + 4 + 8 + 8 + 6 * 8
    # type, pad, longmode, cpl, input
    assert structs.RUN_XEN_HCALL_RESULT - structs.RUN_EXIT_INFO == 24
    # Linux 6.1 turns its kvm_xen_enabled key on only for a config with an MSR.
    assert 0x40000000 <= xen.HYPERCALL_MSR <= 0x4FFFFFFF


def test_refused_intercept_names_the_ioctl() -> None:
    """A file that is no KVM VM refuses KVM_XEN_HVM_CONFIG: a KvmError naming it."""
    fd = os.open(os.devnull, os.O_RDWR)
    try:
        with pytest.raises(KvmError, match="KVM_XEN_HVM_CONFIG"):
            not_a_vm = SimpleNamespace(fd=fd)
            not_a_vm.set_xen_hvm_config = MethodType(Vm.set_xen_hvm_config, not_a_vm)
            xen.intercept_hypercalls(cast(Vm, not_a_vm))
    finally:
        os.close(fd)
