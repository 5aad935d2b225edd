"""The executor: the model's cells as KVM VMs in the lab's root cell; stands where
``hypervisor/arch/x86`` is (``control.c``, ``vcpu.c``, ``apic.c``, ``ioapic.c``,
``pci.c``, ``svm.c``/``vmx.c``).

:class:`ExecutorArch` implements :class:`~harness.hvmodel.arch.Arch` on a real machine
(KVM vCPUs, ``/dev/mem``, ``/dev/port``, VFIO). Its parts, one module each:

======================  ================================================================
module                  holds
======================  ================================================================
:mod:`.control`         :class:`ExecutorArch`: the ``arch_*`` hooks, lifecycle, keeper
                        VM, cell create/destroy, CPU isolation, messages
:mod:`.cells`           the cells and their CPUs (:class:`~.cells.CellTable`), the
                        lifecycle error
:mod:`.vcpu_loop`       the vCPU threads: run, park, reset, suspend, resume, quiesce
:mod:`.exits`           the exit handlers: PIO (and the I/O bitmap loop), MMIO,
                        hypercalls, FATAL wording and register dumps, exit statistics
:mod:`.cellports`       what the I/O bitmap loop answers for a cell without the model:
                        PCI configuration ports of devices outside it, its UART output
:mod:`.interrupts`      MSIs into cells, the cells' IOAPIC pins and their lines, the
                        IOAPIC's registers (physical or detached)
:mod:`.pins`            one cell's IOAPIC pins: redirection entries as KVM routes, the
                        lines behind them, EOIs
:mod:`.memory`          memory regions as KVM slots, comm pages, ``/dev/mem`` access
:mod:`.devices`         MMIO and PCI config space under the root hardware policy,
                        device owners, passthrough attach
:mod:`.console`         the hypervisor's debug UART
:mod:`.host`            the lab's Linux for the driver (:func:`host_info`)
======================  ================================================================

The executor's other pieces are modules of :mod:`harness.hvmodel.arch`: the KVM binding
(:mod:`~harness.hvmodel.arch.kvm`), a Jailhouse cell CPU on it
(:mod:`~harness.hvmodel.arch.vcpu`), host memory (:mod:`~harness.hvmodel.arch.hostmem`)
and ports (:mod:`~harness.hvmodel.arch.portio`), root-cell CPU confinement
(:mod:`~harness.hvmodel.arch.cpuset`) and PCI passthrough
(:mod:`~harness.hvmodel.arch.passthrough` on :mod:`~harness.hvmodel.arch.vfio`).

Where a change goes:

* a new kind of exit, an exit statistic, a FATAL line: :mod:`.exits` (the register dump
  itself: :func:`~harness.hvmodel.arch.vcpu.format_state`);
* what a cell CPU sees at start or in CPUID (XCR0, hypervisor leaves, INIT/SIPI start
  state), the TSC and APIC timer frequencies: :mod:`harness.hvmodel.arch.vcpu`, with new
  vCPU ioctls (XSAVE, XCRs, TSC) in :mod:`harness.hvmodel.arch.kvm.vcpu`;
* delivering interrupts (MSI, IOAPIC pins, IPIs, the SCI): :mod:`.interrupts` and
  :mod:`.pins`; the root's lines a cell takes: :mod:`harness.hvmodel.arch.gsi` (and the
  ``jhlab_gsi`` kernel module in ``images/kmod``); those of passed-through devices (INTx,
  MSI-X): :mod:`harness.hvmodel.arch.passthrough` on :mod:`harness.hvmodel.arch.vfio.irq`;
* MMIO regions the executor serves (MMCONFIG), the root hardware policy: :mod:`.devices`;
* how a CPU is parked, reset or held: :mod:`.vcpu_loop`; cell memory: :mod:`.memory`.

Hypercalls need ``CONFIG_KVM_XEN`` in the root cell's kernel (:mod:`.exits`).
"""

from __future__ import annotations

from .cells import CpuState, ExecutorStateError
from .control import ExecutorArch
from .exits import ExitHandler
from .host import host_info

__all__ = ["CpuState", "ExecutorArch", "ExecutorStateError", "ExitHandler", "host_info"]
