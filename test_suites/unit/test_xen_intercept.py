"""KVM's Xen hypercall interception (harness.hvmodel.arch.xen): the ABI facts, checked
against <linux/kvm.h>'s values, and the error of a kernel that refuses it."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import cast

import pytest

from harness.hvmodel.arch import xen
from harness.hvmodel.arch.kvm import KvmError, Vm


def test_abi_matches_linux() -> None:
    """_IOW(KVMIO, 0x7a, struct kvm_xen_hvm_config) is 0x4038ae7a (a 56-byte struct);
    the intercept flag is bit 1; struct kvm_xen_exit's hcall.result is at offset 24."""
    assert xen.KVM_XEN_HVM_CONFIG == 0x4038AE7A
    assert xen.INTERCEPT_HCALL == 2
    assert xen.XEN_EXIT.size == 4 + 4 + 4 + 4 + 8 + 8 + 6 * 8
    assert xen.XEN_RESULT_OFFSET == 24  # type, pad, longmode, cpl, input
    # Linux 6.1 turns its kvm_xen_enabled key on only for a config with an MSR.
    assert 0x40000000 <= xen.HYPERCALL_MSR <= 0x4FFFFFFF


def test_refused_intercept_names_the_ioctl() -> None:
    """A file that is no KVM VM refuses KVM_XEN_HVM_CONFIG: a KvmError naming it."""
    fd = os.open(os.devnull, os.O_RDWR)
    try:
        with pytest.raises(KvmError, match="KVM_XEN_HVM_CONFIG"):
            xen.intercept_hypercalls(cast(Vm, SimpleNamespace(fd=fd)))
    finally:
        os.close(fd)
