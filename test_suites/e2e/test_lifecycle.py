"""Jailhouse's demo sequence in the lab, every step held against what Jailhouse shows.

enable qemu-x86, create Jailhouse's own ``apic-demo.cell``, load the APIC timer inmate
with a command line, start, stats, shutdown twice (the inmate refuses the first request),
destroy, disable. Each step runs the real ``jailhouse`` command in the root cell through
:class:`~harness.checked.CheckedJailhouse` (the oracle's comparison of exit status,
messages, ``cell list``, sysfs, CPUs, PCI bindings and console), and the test holds the
guest against expectations that do not come from the model (``jailhouse_output``):
``cell list`` and sysfs as Jailhouse's tool and driver format them, the hypervisor's
console lines in control.c's words, the page pool back where it was after the destroy,
the inmate's own lines, the loaded bytes in physical memory (QMP) against the files, and
the root's CPUs (``Cpus_allowed_list``).

By default the cell runs on the executor (KVM in the lab): the inmate calibrates, locks
its cell, prints its timer lines on its config's UART (0x3f8, the root console, shared
with the hypervisor's as in Jailhouse's QEMU demo) and refuses the first shutdown itself.
The ``oracle`` variant runs the same commands with the bookkeeping-only Arch in the
guest: fast, nothing executes (the guest daemon plays the inmate's refusal), so only the
command, driver and console plumbing are held against Jailhouse there.

The last test injects a fault into the guest's model (``JHLAB_FAULT``) and shows that
validation catches it with a diff naming the effect.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jailhouse_output import (
    COUNTERS,
    RUNNING,
    RUNNING_LOCKED,
    SHUT_DOWN,
    cell,
    cell_list,
    created_lines,
    destroyed_lines,
    disabled_lines,
    enabled_lines,
    expect_lines,
    lit,
    loadable_lines,
    pool_usage,
    releasing_lines,
    started_lines,
    sysfs_cell,
    sysfs_cells,
)

from harness.checked import CheckedJailhouse, Locks, ValidationError
from harness.lab import Lab
from harness.recipes import CONFIGS

pytestmark = [pytest.mark.lab, pytest.mark.slow]

#: qemu-x86.c: the root cell's name, CPUs, physical PCI devices and ivshmem devices
ROOT = "QEMU-VM"
CPUS = 4
ROOT_DEVICES = ("00:01.0", "00:02.0", "00:03.0", "00:1b.0", "00:1f.0", "00:1f.2", "00:1f.3", "00:1f.7")
ROOT_IVSHMEM = ("01:0c.0", "01:0d.0", "01:0e.0", "01:0f.0")
#: apic-demo.c: its CPU and where its RAM (loaded at 0) lies
DEMO = "apic-demo"
DEMO_CPU = 3
DEMO_RAM = 0x3EF00000
#: the command line page of Jailhouse's inmates (``cell load ... -s STRING -a 0x1000``)
CMDLINE_ADDRESS = 0x1000
CMDLINE = "period-us=100000"


@pytest.mark.parametrize("jailhouse_arch", ["executor", "oracle"])
def test_demo_sequence(jailhouse: CheckedJailhouse, inmates: Path, lab: Lab, jailhouse_arch: str) -> None:
    """Jailhouse's demo sequence with ``apic-demo.cell``; after every step ``cell list``,
    the cells' sysfs files and the console lines are Jailhouse's, and on the executor the
    inmate's own lines, the loaded bytes and the root's CPUs show it really ran."""
    jh, console = jailhouse, lab.console
    executor = jailhouse_arch == "executor"
    all_cpus = set(range(CPUS))

    mark = console.mark()
    enabled = jh.enable(CONFIGS / "qemu-x86.toml")
    text = expect_lines(console, mark, enabled_lines(ROOT, ROOT_DEVICES, ROOT_IVSHMEM))
    root = cell(0, ROOT, RUNNING, all_cpus)
    assert enabled.view.cell_list == cell_list(root)
    assert sysfs_cells(enabled.view.sysfs) == sysfs_cell(root, CPUS)
    assert enabled.view.sysfs["enabled"] == "1\n"
    pool_after_enable = pool_usage(text, "after late setup")
    assert int(enabled.view.sysfs["mem_pool_used"]) == pool_after_enable[0]
    assert int(enabled.view.sysfs["mem_pool_size"]) == pool_after_enable[1]

    mark = console.mark()
    created = jh.cell_create(CONFIGS / "apic-demo.toml")
    expect_lines(console, mark, created_lines(DEMO))
    root = cell(0, ROOT, RUNNING, all_cpus - {DEMO_CPU})
    demo = cell(1, DEMO, SHUT_DOWN, [DEMO_CPU])
    assert created.view.cell_list == cell_list(root, demo)
    assert sysfs_cells(created.view.sysfs) == sysfs_cell(root, CPUS) | sysfs_cell(demo, CPUS)
    # The executor takes the cell's CPU from the root's scheduling; the oracle Arch takes none.
    assert created.view.cpus_allowed == ("0-2" if executor else "0-3")

    image = (inmates / "apic-timer.bin").read_bytes()
    mark = console.mark()
    loaded = jh.cell_load(DEMO, image, strings=[(CMDLINE, CMDLINE_ADDRESS)])
    expect_lines(console, mark, loadable_lines(DEMO))
    assert loaded.view.cell_list == cell_list(root, demo)
    if executor:
        # The image and its command line where apic-demo.c puts the cell's RAM.
        expected = bytearray(image)
        expected[CMDLINE_ADDRESS:CMDLINE_ADDRESS + len(CMDLINE) + 1] = CMDLINE.encode() + b"\0"
        assert lab.qmp.read_phys(DEMO_RAM, len(expected)) == bytes(expected)

    mark = console.mark()
    started = jh.cell_start(DEMO, effects=[Locks(DEMO)] if executor else [])
    expect_lines(console, mark, started_lines(DEMO))
    if executor:
        # The inmate's own lines, on its config's UART (0x3f8: the root console here).
        timer = lit("Timer fired, jitter: ") + r" *-?\d+" + lit(" ns")
        expect_lines(console, mark, [lit("Calibrated TSC frequency: ") + r"\d+\.\d+" + lit(" MHz"),
                                     timer, timer], timeout=120)
    demo = cell(1, DEMO, RUNNING_LOCKED if executor else RUNNING, [DEMO_CPU])
    assert started.view.cell_list == cell_list(root, demo)
    assert sysfs_cells(started.view.sysfs) == sysfs_cell(root, CPUS) | sysfs_cell(demo, CPUS)

    assert set(jh.stats(DEMO)) == COUNTERS

    mark = console.mark()
    refused = jh.cell_shutdown(DEMO, expect="EPERM")
    assert refused.stderr == "JAILHOUSE_CELL_LOAD: Operation not permitted\n"
    if executor:
        expect_lines(console, mark, [lit("Rejecting first shutdown request - try again!")])
    assert refused.view.cell_list == cell_list(root, demo)

    mark = console.mark()
    stopped = jh.cell_shutdown(DEMO)
    expect_lines(console, mark, ([lit("Stopped APIC demo")] if executor else []) + loadable_lines(DEMO))
    demo = cell(1, DEMO, SHUT_DOWN, [DEMO_CPU])
    assert stopped.view.cell_list == cell_list(root, demo)

    mark = console.mark()
    destroyed = jh.cell_destroy(DEMO)
    text = expect_lines(console, mark, destroyed_lines(DEMO))
    root = cell(0, ROOT, RUNNING, all_cpus)
    assert destroyed.view.cell_list == cell_list(root)
    assert sysfs_cells(destroyed.view.sysfs) == sysfs_cell(root, CPUS)
    assert destroyed.view.cpus_allowed == "0-3"
    assert pool_usage(text, "after cell destruction") == pool_after_enable  # no page kept

    mark = console.mark()
    disabled = jh.disable()
    for releasing in releasing_lines(all_cpus):  # each after the first, in any order
        expect_lines(console, mark, [*disabled_lines(), releasing])
    assert disabled.view.daemon is None and disabled.view.cell_list == ""
    assert disabled.view.sysfs["enabled"] == "0\n"


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
