"""The checked driver: every ``jailhouse`` command in the lab, checked against the oracle.

:class:`CheckedJailhouse` runs the real ``jailhouse`` command in the lab's root cell (the
guest's driver daemon and model, on the KVM executor or on the bookkeeping oracle Arch),
applies the same operation to a host-side oracle (:class:`Oracle`: a
:class:`~harness.hvmodel.driver.Driver` on an :class:`~harness.hvmodel.arch.oracle.OracleArch`
with the :class:`~harness.hvmodel.driver.HostInfo` the guest's daemon reports), and then
compares what the guests show with what the oracle predicts::

    jh = CheckedJailhouse(lab, arch="executor", responders={"apic-timer": "deny-first-shutdown"})
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(INMATES / "cells" / "apic-timer.toml")
    jh.cell_load("apic-timer", build / "apic-timer.bin")
    jh.cell_start("apic-timer", effects=[Locks("apic-timer")])
    jh.expect_inmate(r"Timer fired, jitter")
    jh.cell_shutdown("apic-timer", expect="EPERM")     # apic-timer refuses the first one
    ...

What is compared after every step (one round trip to the guest gathers it all):

* the command's **exit status, stdout and stderr** (``JAILHOUSE_CELL_CREATE: File exists``)
  with what the C tool prints for the ioctl result the oracle's driver returns;
* **``jailhouse cell list``** (run in the guest, which also refreshes the sysfs files);
* the **sysfs tree**: every file under ``/sys/devices/jailhouse`` of the guest's driver
  (``$JAILHOUSE_RUN_DIR/sys/devices/jailhouse``), except the figures that depend on real
  time or timing (see :data:`EXECUTOR_EXCLUSIONS`; none with the oracle Arch in the guest);
* the **root's CPU scheduling**: ``Cpus_allowed_list`` of a process started in the root
  cell after the step, and ``cpuset.cpus`` of the executor's cgroup when it exists: with
  the executor, no CPU of a non-root cell may be there; with the oracle Arch nothing
  changes;
* **PCI driver bindings** (``/sys/bus/pci/devices/*/driver``): with the executor, devices
  of non-root cells are bound to ``vfio-pci`` (or unbound), devices back in the root are
  not bound to ``vfio-pci``; with the oracle Arch every binding stays as it was;
* **loaded bytes** (executor only: the oracle Arch keeps cell memory in the daemon's
  process): after ``cell load``, QMP reads physical memory at each image's address in its
  region (``phys_start`` + offset) and it must hold what the oracle wrote there (the
  images and ``-s`` strings, later ones over earlier ones);
* the **hypervisor console**: every line the oracle printed during the step must appear,
  in order, in the guest's console (serial 0, the system config's debug UART). That UART
  is also the root kernel's console, whose messages would interleave with the
  hypervisor's characters: the kernel's console log level is lowered to 1 while the
  checked driver runs (restored at cleanup), and whole ``[ time]`` lines are ignored.

A mismatch raises :class:`ValidationError`, whose text has one unified diff per thing
that differed, ``--- oracle: WHAT`` against ``+++ guest: WHAT``.

Inmates do things on their own (lock their cell, commit violations). A step declares
those as *effects* (:class:`Locks`, :class:`SetsState`, :class:`Violation`): they are
applied to the oracle right after the operation, and the guest is polled until it agrees
(bounded by ``settle_timeout``). :meth:`CheckedJailhouse.settle` does the same between
steps.

A step costs one round trip to the guest: a request line to the guest program, which
the driver keeps running between steps (:mod:`~harness.checked.channel`; ~0.3 s a step
under nested TCG, against ~1.0 s when every step started a Python: ``jhlab bench
checked``). Loops of many steps go into a :class:`Batch`: one round trip, the tool run
in-process in the guest program, every result still compared.

Lifecycle: construct (one look at the guest: no daemon may run; the PCI bindings and CPUs
seen now are the baseline) → steps → :meth:`CheckedJailhouse.cleanup` (destroy what is
left, disable, remove the uploaded files, restore the console level; reports whether the
lab is clean).

Modules: :mod:`~harness.checked.driver` (:class:`CheckedJailhouse`, :class:`Batch`),
:mod:`~harness.checked.channel` (the guest program kept running),
:mod:`~harness.checked.oracle` (:class:`Oracle`, the tool's predicted output),
:mod:`~harness.checked.compare` (exclusions, the console matcher, :class:`ViewComparer`),
:mod:`~harness.checked.report` (results and errors), :mod:`~harness.checked.effects`;
the guest half is :mod:`harness.guest.checked` (shipped in the guest payload, run with
``python3 -m`` in the root cell: one JSON line per request on stdin, one per reply).
"""

from harness.checked.compare import EXECUTOR_EXCLUSIONS, Exclusion, ViewComparer
from harness.checked.driver import DEFAULT_RESPONDERS, Batch, CheckedJailhouse, ConfigSource, ImageSource
from harness.checked.effects import Effect, Locks, SetsState, Violation
from harness.checked.oracle import Oracle
from harness.checked.report import Difference, ExpectationError, GuestView, StepResult, ValidationError

__all__ = [
    "DEFAULT_RESPONDERS",
    "EXECUTOR_EXCLUSIONS",
    "Batch",
    "CheckedJailhouse",
    "ConfigSource",
    "Difference",
    "Effect",
    "Exclusion",
    "ExpectationError",
    "GuestView",
    "ImageSource",
    "Locks",
    "Oracle",
    "SetsState",
    "StepResult",
    "ValidationError",
    "ViewComparer",
    "Violation",
]
