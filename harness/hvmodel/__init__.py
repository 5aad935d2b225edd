"""hvmodel: a Python reimplementation of the Jailhouse hypervisor (x86).

Standard library only: the same package runs inside the lab's root cell (Debian's
python3, nothing installed) as the hypervisor, and on the host as the oracle.
Nothing in here may import from the rest of :mod:`harness`, and no module imports one
that imports it back (``test_suites/hvmodel/test_structure.py`` checks both).

Every Jailhouse ABI fact (numbers, flags, states, signatures, sizes, layouts) is defined
once, in :mod:`harness.hvmodel.abi`. The units (:mod:`.unit`) define themselves and see
the hypervisor through :class:`~harness.hvmodel.unit.UnitHost` only.

Entry points: :class:`harness.hvmodel.control.Hypervisor` (hypercalls, exits; its state
is :class:`~harness.hvmodel.core.HypervisorCore`'s),
:class:`harness.hvmodel.driver.Driver` (the Linux driver's side),
:mod:`harness.hvmodel.sysfs` (``/sys/devices/jailhouse``, ``jailhouse cell list``),
:class:`harness.hvmodel.arch.Arch` (what a machine provides) and
:class:`harness.hvmodel.arch.oracle.OracleArch` (the bookkeeping machine).

Deliberate differences from Jailhouse (everything else follows the reference):

* The root cell is not virtualized in jhlab: suspending root CPUs is bookkeeping only
  (the Arch is not asked), and root exits reach the model only if the executor sends them.
* Page pool figures come from the model's cost model (:class:`~harness.hvmodel.params.
  HvParams`: core size, per-CPU pages, ``struct cell`` size; page tables counted as built
  from the current mappings, adjacent identical mappings merged). They are identical in
  oracle and guest but are not Jailhouse's numbers; a destroyed cell gives back exactly
  what it took (Jailhouse keeps huge pages it once split).
* ``msg_reply_timeout`` counts polling iterations in Jailhouse; the model waits
  ``msg_reply_timeout * HvParams.reply_poll_seconds`` seconds. An Arch that stops waiting
  without a timeout is treated like an expired timeout.
* A cell config the parser rejects fails CELL_CREATE with EINVAL (Jailhouse would use
  the bytes as they are).
* DISABLE's barrier is sequential: the last root CPU to call runs the common shutdown
  and prints every CPU's ``Releasing CPU`` line, in arrival order.
* No interrupt remapping: MSI, MSI-X and IOAPIC entries are written as the cell wrote
  them (Jailhouse's own path on QEMU without IR); lowest-priority delivery is not turned
  into fixed delivery; edge-triggered root IOAPIC pins are not re-injected at commit.
* Devices the root takes (at enable, and back at destroy) keep the MSI state Linux gave
  them (read into the shadows); devices given to cells are reset.
* The ivshmem MSI-X target check runs when a vector is programmed with an
  ``0xfeexxxxx`` address (the writing CPU is parked), not at delivery.
* An access given to ``handle_mmio`` that hits the cell's own mapped memory is served
  from memory without statistics (in Jailhouse it would not exit at all).
* Not modelled (left to the executor, which has ``count_exit``, ``handle_cpuid`` and
  ``panic_park`` for them, and counts the exits its KVM handles in the kernel through
  ``Arch.cpu_exit_counts``): xAPIC/x2APIC and ICR emulation, INIT/SIPI, MSR, CR and
  XSETBV exits, MMIO instruction decoding, the register dump after ``FATAL``, the root's
  VT-d register emulation, ``CONFIG_CRASH_CELL_ON_PANIC``, and the console device's
  ``<missed N bytes>`` marker.
* ``CONFIG_TEST_DEVICE`` (the :mod:`.testdev` unit) is chosen when the hypervisor is
  built as a model (``HvParams.test_device``, the daemon's ``--test-device``), not at
  compile time; off by default, as in Jailhouse.
* Driver: the ``claimed for use in non-root cell`` log line is approximate; the binary
  ``core`` sysfs file is not rendered.
"""

#: ``JAILHOUSE_VERSION`` of this hypervisor model: printed at enable and by ``jailhouse
#: --version``. Here, not in :mod:`.control`, so the command can print it without
#: importing the model.
JAILHOUSE_VERSION = "v0.12 (jhlab)"
