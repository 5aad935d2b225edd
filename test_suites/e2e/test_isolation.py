"""Isolation in the lab: rogue inmates are stopped, alone.

Two rogue cells commit the violations of jhlab's ``rogue`` inmate (images/inmates) on the
KVM executor while apic-timer runs locked on CPU 3: ``mode=mem`` writes into apic-timer's
RAM (cross-cell memory, not mapped in the rogue's cell), ``mode=pio`` reads the
hypervisor's UART at 0x3f8 (not in its PIO whitelist). Each must get Jailhouse's ``FATAL``
line on the hypervisor console, its CPU parked and failed, its cell ``failed``; the root
cell and apic-timer must keep working. Every step goes through the checked driver: the
oracle takes the same exit on the rogue's CPU (:class:`~harness.checked.Violation`) and
predicts the FATAL line, the failed CPU list and the state; the guest must agree.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from harness.checked import CheckedJailhouse, Locks, Violation
from harness.hvmodel.config import CellConfig, MemoryRegion, load_source
from harness.lab import Lab
from harness.recipes import CONFIGS, find_recipes

pytestmark = [pytest.mark.lab, pytest.mark.kvm, pytest.mark.slow]

CELLS = find_recipes().cells
#: apic-timer's RAM (physical = its cell's ``phys_start``)
APIC_TIMER_RAM = 0x3EF00000
#: the second rogue's RAM and CPU (ivshmem-2's RAM window; not co-resident with it here)
ROGUE_PIO_RAM = 0x3ED00000
ROGUE_PIO_CPU = 1


def rogue_on(name: str, cpu: int, ram: int) -> CellConfig:
    """jhlab's rogue cell config, renamed and moved to ``cpu`` and ``ram``."""
    config = load_source(CELLS / "rogue.toml")
    assert isinstance(config, CellConfig)
    regions = tuple(dataclasses.replace(mem, phys_start=ram) if mem.virt_start == 0 and mem.size == 0x100000
                    else mem for mem in config.memory_regions)
    assert any(isinstance(mem, MemoryRegion) and mem.phys_start == ram for mem in regions)
    return dataclasses.replace(config, name=name, cpu_set=(1 << cpu).to_bytes(8, "little"),
                               memory_regions=regions)


def test_rogue_cells_fail_alone(jailhouse: CheckedJailhouse, inmates: Path, lab: Lab) -> None:
    """mem and pio violations: FATAL line, parked and failed CPU, failed cell; the root
    and the running apic-timer cell keep working; everything is given back at destroy."""
    jh = jailhouse
    rogue = inmates / "rogue.bin"
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(CELLS / "apic-timer.toml")
    jh.cell_create(CELLS / "rogue.toml")
    jh.cell_create(rogue_on("rogue-pio", ROGUE_PIO_CPU, ROGUE_PIO_RAM))
    jh.cell_load("apic-timer", inmates / "apic-timer.bin")
    jh.cell_load("rogue", rogue, strings=[(f"mode=mem addr={APIC_TIMER_RAM:#x}", 0x1000)])
    jh.cell_load("rogue-pio", rogue, strings=[("mode=pio", 0x1000)])
    lab.cell_console.discard()
    jh.cell_start("apic-timer", effects=[Locks("apic-timer")])
    jh.expect_inmate(r"Timer fired, jitter", timeout=120)

    # Cross-cell memory: the write into apic-timer's RAM exits and is fatal. (The step
    # waits for the FATAL line and the failed state; the rogue's own announcement on
    # serial 1 is not awaited: it interleaves character by character with apic-timer's
    # lines on the shared UART, as it would on Jailhouse.)
    failed = jh.cell_start("rogue", effects=[Violation("rogue", "mmio", APIC_TIMER_RAM, 4, True, 0xDEADBEEF)])
    rogue_id = next(k.split("/")[1] for k, v in failed.view.sysfs.items()
                    if k.endswith("/name") and v == "rogue\n")
    assert failed.view.sysfs[f"cells/{rogue_id}/state"] == "failed\n"
    assert failed.view.sysfs[f"cells/{rogue_id}/cpus_failed_list"] == "2\n"

    # A port the cell does not own: the hypervisor's own UART.
    failed = jh.cell_start("rogue-pio", effects=[Violation("rogue-pio", "pio", 0x3F8, 1, False)])
    assert re.search(r"\n3 +rogue-pio +failed +1 +1 ", failed.view.cell_list)

    # The neighbour and the root go on.
    jh.expect_inmate(r"Timer fired, jitter", timeout=60, fatal_ok=True)
    assert lab.run("echo root-alive", check=True).stdout.strip() == "root-alive"
    view = jh.look()
    assert re.search(r"\n1 +apic-timer +running/locked +3 ", view.cell_list)
    assert view.cpus_allowed == "0"

    jh.cell_destroy("rogue", expect="EPERM")   # apic-timer is locked
    jh.cell_shutdown("apic-timer", expect="EPERM")
    jh.cell_shutdown("apic-timer")
    jh.cell_destroy("rogue")
    jh.cell_destroy("rogue-pio")
    done = jh.cell_destroy("apic-timer")
    assert done.view.cpus_allowed == "0-3"
    jh.disable()
