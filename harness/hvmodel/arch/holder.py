"""Keeps KVM in use for the lab's whole life: one idle VM with one never-run vCPU.

KVM's first VM enables virtualization on every CPU and patches live kernel text (global
static keys such as ``preempt_notifier_key``; a vCPU's software-disabled local APIC
holds ``apic_sw_disabled``), and its last one undoes it. Under the lab's TCG such a
transition right after nested guests ran has been seen to wedge the root cell's kernel
(a CPU looping on a text-patching int3 with interrupts off). The executor keeps a keeper
VM from ``enable`` to ``disable`` (see :meth:`~.executor.ExecutorArch._keeper`), so cells
never cause a transition; this process, started by the lab's init, removes the
remaining ones at every ``enable`` and ``disable``. With ``CONFIG_KVM_XEN`` its VM takes
the hypercall intercept too, which holds KVM's ``kvm_xen_enabled`` key on (see
:mod:`.xen`).

Its vCPU must never run: a lab snapshot stops every other process holding a vCPU so that
no lab CPU is inside a guest when QEMU saves it (``images/guest/bin/jhlab-snapshot``),
and leaves this one running, found by this module's name on its command line.

Usage: ``python3 -m harness.hvmodel.arch.holder`` (runs until killed; exit status 1 when
KVM cannot be opened).
"""

from __future__ import annotations

import signal
import sys

from . import xen
from .kvm import Cap, Kvm, KvmError

#: GSI routes reserved for a split irqchip (as the executor's VMs have)
SPLIT_IRQCHIP_ROUTES = 24


def main() -> int:
    """Hold the VM until a signal ends the process."""
    try:
        kvm = Kvm()
        vm = kvm.create_vm()
        if kvm.check_extension(Cap.SPLIT_IRQCHIP):
            vm.enable_cap(Cap.SPLIT_IRQCHIP, SPLIT_IRQCHIP_ROUTES)
            vm.has_irqchip = True
        else:
            vm.create_irqchip()
        vm.create_vcpu(0)  # its local APIC stays software-disabled: never run
        if xen.intercept_available(kvm):
            xen.intercept_hypercalls(vm)
    except KvmError as exc:
        print(f"jhlab-kvm-holder: {exc}", file=sys.stderr)
        return 1
    print("jhlab-kvm-holder: holding an idle KVM VM", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
