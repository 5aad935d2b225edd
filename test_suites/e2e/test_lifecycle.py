"""Jailhouse's demo sequence in the lab, every step checked against the oracle.

enable qemu-x86, create the APIC timer demo, load, start, stats, shutdown twice (the demo
refuses the first request), destroy, disable: each step runs the real ``jailhouse``
command in the root cell and goes through :class:`~harness.checked.CheckedJailhouse`,
which compares exit status and message, ``cell list``, the sysfs tree, the root's CPUs,
PCI bindings, the loaded bytes (QMP) and the hypervisor console with the host-side
oracle. With KVM inside the lab the cell runs jhlab's apic-timer inmate on the executor
and its timer lines must arrive on serial 1; without, Jailhouse's own ``apic-demo.cell``
runs on the oracle Arch in the guest (everything compared exactly, statistics too).

The last test injects a fault into the guest's model (``JHLAB_FAULT``) and shows that
validation catches it with a diff naming the effect.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.checked import CheckedJailhouse, Locks, ValidationError
from harness.lab import Lab
from harness.recipes import CONFIGS, find_recipes

pytestmark = [pytest.mark.lab, pytest.mark.slow]

CELLS = find_recipes().cells
#: the counters of ``jailhouse cell stats`` on x86
COUNTERS = {f"vmexits_{name}" for name in (
    "total", "mmio", "management", "hypercall", "pio", "xapic", "cr", "cpuid", "xsetbv",
    "exception", "msr_other", "msr_x2apic_icr")}


@pytest.mark.kvm
def test_apic_timer_demo_on_kvm(jailhouse: CheckedJailhouse, inmates: Path, lab: Lab) -> None:
    """The demo sequence with jhlab's apic-timer inmate on the executor: the image lands
    at the cell's RAM (QMP), the cell locks itself, ``Timer fired`` lines arrive on serial 1
    (not on the hypervisor's serial 0), the first shutdown is refused (EPERM) and the
    second stops the demo; CPU 3 leaves the root's scheduling while the cell exists."""
    jh = jailhouse
    jh.enable(CONFIGS / "qemu-x86.toml")
    created = jh.cell_create(CELLS / "apic-timer.toml")
    assert created.view.cpus_allowed == "0-2"
    jh.cell_load("apic-timer", inmates / "apic-timer.bin")
    lab.cell_console.discard()
    mark = lab.console.mark()
    started = jh.cell_start("apic-timer", effects=[Locks("apic-timer")])
    assert re.search(r"\n1 +apic-timer +running/locked +3 ", started.view.cell_list)
    jh.expect_inmate(r"Timer fired, jitter: *\d+ ns", timeout=120)
    jh.expect_inmate(r"Timer fired, jitter: *\d+ ns", timeout=30)
    assert "Timer fired" not in lab.console.since(mark)

    assert set(jh.stats("apic-timer")) == COUNTERS
    refused = jh.cell_shutdown("apic-timer", expect="EPERM")
    assert refused.stderr == "JAILHOUSE_CELL_LOAD: Operation not permitted\n"
    jh.expect_inmate(r"Rejecting first shutdown request - try again!", timeout=60)
    jh.cell_shutdown("apic-timer")
    jh.expect_inmate(r"Stopped APIC demo", timeout=60)
    destroyed = jh.cell_destroy("apic-timer")
    assert destroyed.view.cpus_allowed == "0-3"
    disabled = jh.disable()
    assert disabled.view.daemon is None and disabled.view.cell_list == ""


@pytest.mark.parametrize("jailhouse_arch", ["oracle"])
def test_jailhouse_apic_demo_config(jailhouse: CheckedJailhouse, inmates: Path, lab: Lab) -> None:
    """Jailhouse's own ``apic-demo.cell`` (qemu-x86's demo) through the same sequence with
    the oracle Arch in the guest: nothing runs, so everything is compared exactly, the
    statistics and the console ring included; the scripted cell refuses its first
    shutdown as apic-demo does."""
    jh = jailhouse
    mark = lab.console.mark()
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(CONFIGS / "apic-demo.toml")
    jh.cell_load("apic-demo", inmates / "apic-timer.bin", strings=[("count=5", 0x1000)])
    jh.cell_start("apic-demo")
    assert set(jh.stats("apic-demo")) == COUNTERS
    jh.cell_shutdown("apic-demo", expect="EPERM")
    jh.cell_shutdown("apic-demo")
    jh.cell_destroy("apic-demo")
    jh.disable()
    console = lab.console.since(mark).replace("\r", "")
    assert re.search(r'Created cell "apic-demo"\n.*Started cell "apic-demo"\n.*'
                     r'Closing cell "apic-demo"\n.*Shutting down hypervisor\n', console, re.S)


@pytest.mark.dirty
def test_injected_fault_fails_validation(lab: Lab) -> None:
    """A fault injected into the guest's model (``JHLAB_FAULT=destroy-leaks-pages``: the
    destroyed cell's pages stay allocated) makes the destroy step fail validation, and
    the diff names the effect: ``mem_pool_used`` in sysfs and the console's page pool
    line. (Marked dirty: the lab is reset afterwards.)"""
    jh = CheckedJailhouse(lab, "oracle", env={"JHLAB_FAULT": "destroy-leaks-pages"})
    try:
        jh.enable(CONFIGS / "qemu-x86.toml")
        jh.cell_create(CONFIGS / "apic-demo.toml")
        with pytest.raises(ValidationError) as caught:
            jh.cell_destroy("apic-demo")
    finally:
        jh.cleanup()
    error = caught.value
    print(error)  # the report shows the diff
    assert error.step == "cell destroy apic-demo"
    assert [d.what for d in error.differences] == ["sysfs tree", "sysfs console", "hypervisor console"]
    text = str(error)
    assert "files differing: mem_pool_used" in text
    used = re.search(r"-mem_pool_used: (\d+)\n\+mem_pool_used: (\d+)\n", text)
    assert used and int(used.group(2)) > int(used.group(1))
    assert re.search(r"-Page pool usage after cell destruction: mem (\d+)/", text)
