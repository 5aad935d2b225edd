"""jhlab's demo inmates in cells of the default lab, on the KVM executor.

Each test runs one demo (or, for ivshmem, the pair of peers) through Jailhouse's demo
sequence with the real ``jailhouse`` command in the root cell, every step checked
against the oracle by :class:`~harness.checked.CheckedJailhouse` (enable qemu-x86,
create, load with ``-s`` command lines, start, wait for the demo's documented lines on
serial 1, shutdown, destroy, disable). The expected lines are those of each demo's
header comment (``images/inmates/demos/*.c``, also in ``images/inmates/README.md``); a
``FAILED`` line on serial 1 or a new ``FATAL`` line of the hypervisor ends a wait at
once. Values that depend on the lab (BARs, APIC IDs, shared-memory layout) come from the
lab (QMP ``query-pci``) or from the cell configs, not from this file.

The demos with passed-through devices (edu, e1000e) are in ``test_passthrough.py``; hello,
apic-timer and rogue in ``test_lifecycle.py``, ``test_isolation.py`` and
``test_stress.py``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from harness.checked import CheckedJailhouse, Violation
from harness.hvmodel.config import CellConfig, MemoryRegion, load_source
from harness.lab import Lab
from harness.recipes import CONFIGS, find_recipes

pytestmark = [pytest.mark.lab, pytest.mark.kvm, pytest.mark.slow]

INMATES_SRC = find_recipes().inmates
CELLS = INMATES_SRC / "cells"
#: the command line's address in the cell (reference 5.3)
CMDLINE = 0x1000
#: seconds until a demo's first line (cell start to output, nested KVM under TCG)
FIRST_LINE = 120.0
#: seconds between two lines of a demo
NEXT_LINE = 60.0
#: x86 inmates' comm region and the test device page after it (reference 3.3)
COMM_REGION = 0x100000
TEST_REGISTER = COMM_REGION + 0x1000 + 0xFF8


def cell_config(name: str) -> CellConfig:
    config = load_source(CELLS / f"{name}.toml")
    assert isinstance(config, CellConfig)
    return config


def serial1_since(lab: Lab, mark: int) -> list[str]:
    """The cell console's lines (serial 1) since ``mark``."""
    return [line for line in lab.cell_console.since(mark).split("\n") if line]


def in_order(lines: list[str], patterns: list[str]) -> list[re.Match[str]]:
    """Match ``patterns`` (full lines) against ``lines`` as an ordered subsequence."""
    found: list[re.Match[str]] = []
    rest = iter(lines)
    for pattern in patterns:
        for line in rest:
            match = re.fullmatch(pattern, line)
            if match:
                found.append(match)
                break
        else:
            raise AssertionError(f"line {pattern!r} not found (in order) in:\n" + "\n".join(lines))
    return found


def pci_function(lab: Lab, bdf: str) -> dict[str, Any]:
    """QEMU's view of the function at ``bdf`` (``bb:dd.f``)."""
    for dev in lab.qmp.pci_devices():
        if dev["bdf"] == bdf:
            return dev
    raise AssertionError(f"the lab has no PCI function {bdf}")


# -----------------------------------------------------------------------------------------
# pci-probe
# -----------------------------------------------------------------------------------------


def test_pci_probe(jailhouse: CheckedJailhouse, inmates: Path, lab: Lab) -> None:
    """pci-probe sees exactly its two devices through 0xcf8/0xcfc: the HDA controller
    00:1b.0 with the IDs, class and BAR0 (address and size) QEMU reports, and the virtual
    ivshmem device 01:0e.0 (110a:4106) with its two 4 KiB BARs unplaced and its vendor
    and MSI-X capabilities; every other function reads as absent. The cell's HDA window
    is set to the BAR0 QEMU reports before the cell is created."""
    jh = jailhouse
    hda = pci_function(lab, "00:1b.0")
    bar0 = next(r for r in hda["regions"] if r["bar"] == 0)
    config = cell_config("pci-probe")
    device = next(d for d in config.pci_devices if d.bdf == 0x1B << 3)
    window = -(device.bar_mask[0] | ~0xFFFFFFFF)        # the BAR size the config names
    assert bar0["type"] == "memory" and bar0["size"] == window, bar0
    regions = tuple(dataclasses.replace(mem, phys_start=bar0["address"], virt_start=bar0["address"])
                    if isinstance(mem, MemoryRegion) and mem.virt_start == mem.phys_start
                    and mem.size == window else mem for mem in config.memory_regions)
    assert sum(mem.phys_start == bar0["address"] for mem in regions) == 1
    config = dataclasses.replace(config, memory_regions=regions)

    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(config)
    jh.cell_load("pci-probe", inmates / "pci-probe.bin", strings=[("expect=2", CMDLINE)])
    lab.cell_console.discard()
    jh.cell_start("pci-probe")

    jh.expect_inmate(r"pci-probe: scanning buses 0-1 through 0xcf8/0xcfc", FIRST_LINE)
    ids = hda["id"]
    cls = hda["class_info"]["class"]
    jh.expect_inmate(rf"00:1b\.0 {ids['vendor']:04x}:{ids['device']:04x} class "
                     rf"{cls >> 8:02x}:{cls & 0xFF:02x}\.[0-9a-f]{{2}} rev [0-9a-f]{{2}} type 00",
                     NEXT_LINE)
    msi = config.pci_caps[device.caps_start]             # the config's one capability
    jh.expect_inmate(rf"BAR0: mem32 0x{bar0['address']:016x} size 0x{bar0['size']:x}\r?\n"
                     rf" +caps: {msi.id:02x}@0x{msi.start:02x}\r?\n", NEXT_LINE)
    jh.expect_inmate(r"01:0e\.0 110a:4106 class ff:00\.00 rev 00 type 00", NEXT_LINE)
    jh.expect_inmate(r"BAR0: mem32 0x0{16} size 0x1000\r?\n +BAR1: mem32 0x0{16} size 0x1000"
                     r"\r?\n +caps: 09@0x40 11@0x60\r?\n", NEXT_LINE)
    jh.expect_inmate(r"pci-probe: 2 device\(s\), 3 BAR\(s\): PASSED", NEXT_LINE)

    jh.cell_shutdown("pci-probe")
    jh.cell_destroy("pci-probe")
    jh.disable()


# -----------------------------------------------------------------------------------------
# smp
# -----------------------------------------------------------------------------------------


def test_smp(jailhouse: CheckedJailhouse, inmates: Path, lab: Lab) -> None:
    """smp on CPUs 1-3: all three CPUs register (their APIC IDs are the cell's CPUs), the
    first restarts the other two through INIT/SIPI/SIPI, each says hello and takes a fixed
    IPI from the first; only CPU 0 stays with the root meanwhile."""
    jh = jailhouse
    config = cell_config("smp")
    cpus = sorted(config.cpus)
    jh.enable(CONFIGS / "qemu-x86.toml")
    created = jh.cell_create(config)
    assert created.view.cpus_allowed == "0"
    jh.cell_load("smp", inmates / "smp.bin")
    lab.cell_console.discard()
    jh.cell_start("smp")

    n = len(cpus)
    jh.expect_inmate(rf"SMP demo: {n}/{n} CPUs registered", FIRST_LINE)
    apic_ids = []
    for i in range(n):
        line = jh.expect_inmate(rf"CPU {i}: APIC ID (\d+)( \(this CPU\))?\r?\n", NEXT_LINE)
        assert bool(line.group(2)) == (i == 0), line.group(0)
        apic_ids.append(int(line.group(1)))
    # APIC ID = CPU number in the lab (the hypervisor's "CPU n... (APIC ID n)" lines)
    assert sorted(apic_ids) == cpus
    for i in range(1, n):
        hello = jh.expect_inmate(rf"Hello from CPU {i} \(APIC ID (\d+), x2APIC ID (\d+)\)", NEXT_LINE)
        assert int(hello.group(1)) == int(hello.group(2)) == apic_ids[i], hello.group(0)
        jh.expect_inmate(rf"CPU {i}: IPI received", NEXT_LINE)
    jh.expect_inmate(rf"smp: {n} CPUs reported in, {n - 1} IPIs delivered: PASSED", NEXT_LINE)

    jh.cell_shutdown("smp")
    destroyed = jh.cell_destroy("smp")
    assert destroyed.view.cpus_allowed == "0-3"
    jh.disable()


# -----------------------------------------------------------------------------------------
# mmio-access
# -----------------------------------------------------------------------------------------


def expect_equal_lines() -> list[int]:
    """Source lines of the checks in mmio-access.c (each prints its ``__LINE__``)."""
    source = (INMATES_SRC / "demos" / "mmio-access.c").read_text().splitlines()
    return [number for number, line in enumerate(source, 1)
            if "EXPECT_EQUAL(" in line and not line.lstrip().startswith("#define")]


@pytest.mark.parametrize("jailhouse_test_device", [True])
def test_mmio_access(jailhouse: CheckedJailhouse, inmates: Path, lab: Lab) -> None:
    """mmio-access against the test device (hypervisor with ``CONFIG_TEST_DEVICE``, cell
    with ``TEST_DEVICE``): every MOV/MOVZX form it tries on 0x101ff8 reads and writes
    the comm page's last 8 bytes; one ``passed`` line per check of the source, in order,
    none failed."""
    jh = jailhouse
    checks = expect_equal_lines()
    assert checks
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(CELLS / "mmio-access.toml")
    jh.cell_load("mmio-access", inmates / "mmio-access.bin")
    lab.cell_console.discard()
    mark = lab.cell_console.mark()
    jh.cell_start("mmio-access")

    jh.expect_inmate(rf"mmio-access: testing MMIO instruction forms on 0x{TEST_REGISTER:x}", FIRST_LINE)
    jh.expect_inmate(rf"mmio-access: {len(checks)} tests, 0 failed", NEXT_LINE * 2)
    jh.expect_inmate(r"MMIO write test passed", NEXT_LINE)
    passed = [int(m.group(1)) for line in serial1_since(lab, mark)
              if (m := re.fullmatch(r"Test at line #(\d+) passed", line))]
    assert passed == checks

    jh.cell_shutdown("mmio-access")
    jh.cell_destroy("mmio-access")
    jh.disable()


def test_mmio_access_without_test_device(jailhouse: CheckedJailhouse, inmates: Path, lab: Lab) -> None:
    """Without ``CONFIG_TEST_DEVICE`` (Jailhouse's default build) the TEST_DEVICE flag
    gives nothing: mmio-access's first write to 0x101ff8 (8 bytes) is an invalid MMIO
    access, FATAL on the hypervisor console, and the cell fails."""
    jh = jailhouse
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(CELLS / "mmio-access.toml")
    jh.cell_load("mmio-access", inmates / "mmio-access.bin")
    lab.cell_console.discard()
    failed = jh.cell_start("mmio-access", effects=[
        Violation("mmio-access", "mmio", TEST_REGISTER, 8, True, 0x1122334455667788)])
    assert re.search(r"\n1 +mmio-access +failed +2 +2 ", failed.view.cell_list), failed.view.cell_list
    jh.expect_inmate(r"mmio-access: testing MMIO instruction forms", FIRST_LINE, fatal_ok=True)
    jh.cell_destroy("mmio-access")
    jh.disable()


# -----------------------------------------------------------------------------------------
# ivshmem
# -----------------------------------------------------------------------------------------


def test_ivshmem_pair(jailhouse: CheckedJailhouse, inmates: Path, lab: Lab) -> None:
    """The ivshmem demo in both peers of the demo link 01:0e.0 at once (ivshmem: peer 1 on
    CPU 1, ivshmem-2: peer 2 on CPU 2; the root is peer 0): each sees the layout of its
    config's shared memory, waits for the other, rings its doorbell and gets the other's
    (MSI-X), finds its greeting and R/W mark; peer 1 (started first) gets state-change
    interrupts. Each peer's lines arrive whole and in order on the shared serial 1;
    afterwards the host reads (QMP) both states DONE in the state table and both greetings
    and marks."""
    jh = jailhouse
    configs = {1: cell_config("ivshmem"), 2: cell_config("ivshmem-2")}
    link = configs[1].pci_devices[0]
    assert link.shmem_peers == 3
    shmem = configs[1].memory_regions[link.shmem_regions_start:]
    state_table, rw, outputs = shmem[0], shmem[1], shmem[2:2 + link.shmem_peers]
    jh.enable(CONFIGS / "qemu-x86.toml")
    for peer, config in configs.items():
        assert config.pci_devices[0].shmem_dev_id == peer
        jh.cell_create(config)
    for config in configs.values():
        jh.cell_load(config.name, inmates / "ivshmem.bin", strings=[("wait-ms=60000", CMDLINE)])
    lab.cell_console.discard()
    mark = lab.cell_console.mark()
    # Peer 1 first; peer 2 once peer 1 waits for it (its interrupts are on by then).
    jh.cell_start(configs[1].name)
    jh.expect_inmate(r"ivshmem: waiting for peer 2", FIRST_LINE)
    jh.cell_start(configs[2].name)

    done = set()
    for _ in configs:
        line = jh.expect_inmate(r"ivshmem: state, doorbell and shared data with peer (\d): PASSED",
                                FIRST_LINE * 2)
        done.add(int(line.group(1)))
    assert done == set(configs)

    lines = serial1_since(lab, mark)
    layout = (rf"ivshmem: shared memory at 0x{state_table.phys_start:x}: state table "
              rf"0x{state_table.size:x}, R/W 0x{rw.size:x}, output 0x{outputs[0].size:x} x 3")
    for peer in configs:
        target = 3 - peer
        mine = [line for line in lines if re.search(rf"\bID {peer} of|\bpeer {target}\b", line)]
        in_order(mine, [
            rf"ivshmem: 01:0e\.0, ID {peer} of 3 peers, protocol 0x0000",
            rf"ivshmem: waiting for peer {target}",
            rf"ivshmem: peer {target} is ready",
            rf'ivshmem: peer {target} says "ivshmem: hello from peer {target}"',
            rf"ivshmem: R/W section mark of peer {target} found",
            rf"ivshmem: state, doorbell and shared data with peer {target}: PASSED",
        ])
    # The lines both peers print alike: whole, twice each.
    assert lines.count(layout) == 2, lines
    assert lines.count("ivshmem: doorbell from peer received (vector 1)") == 2, lines
    counts = [m for line in lines if (m := re.fullmatch(r"ivshmem: (\d+) state-change and (\d+) "
                                                        r"doorbell interrupts", line))]
    # One doorbell each. Peer 1 waited with interrupts on, so it got peer 2's state
    # changes; peer 2 may see peer 1's last one in the state table before its interrupt.
    assert len(counts) == 2 and all(m.group(2) == "1" for m in counts), lines
    assert max(int(m.group(1)) for m in counts) >= 1, lines
    assert all(line.startswith("ivshmem: ") for line in lines), lines   # nothing interleaved

    # The host's view of the shared memory (QMP): the peers' states, greetings and marks.
    states = lab.qmp.read_phys(state_table.phys_start, 4 * link.shmem_peers)
    assert [int.from_bytes(states[i:i + 4], "little") for i in range(0, len(states), 4)] == [0, 2, 2]
    for peer in configs:
        greeting = lab.qmp.read_phys(outputs[peer].phys_start, 64).split(b"\0")[0]
        assert greeting == f"ivshmem: hello from peer {peer}".encode()
        mark_bytes = lab.qmp.read_phys(rw.phys_start + 64 * peer, 64).split(b"\0")[0]
        assert mark_bytes == f"peer {peer} was here".encode()

    for config in configs.values():
        jh.cell_shutdown(config.name)
    for config in configs.values():
        jh.cell_destroy(config.name)
    jh.disable()
