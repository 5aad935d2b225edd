"""The demo cell configs (cells/*.toml): they compile with the lab's TOML schema and
match the lab's memory layout (reference §2.1, §2.2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.hvmodel.abi import COMM_REGION_BASE, PAGE_SIZE, CellFlags, ConsoleType, MemFlags
from harness.hvmodel.config import CellConfig
from harness.hvmodel.config import toml as toml_config
from harness.recipes import find_recipes

DEMOS = find_recipes().demos()
CELLS_DIR = find_recipes().cells
SOURCES = sorted(CELLS_DIR.glob("*.toml"))

INMATE_RAM = range(0x3A600000, 0x3F000000)
CELL_UART = 0x2F8

#: demos that answer comm region messages; the others are passive like Jailhouse's
ACTIVE = {"hello", "apic-timer"}
#: demos whose devices do DMA into the cell RAM
DMA = {"edu", "e1000e"}


def test_every_demo_has_a_cell_config() -> None:
    """cells/<demo>.toml exists for each demo the Makefile builds."""
    names = {path.stem for path in SOURCES}
    assert set(DEMOS) <= names, sorted(set(DEMOS) - names)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_cell_config(source: Path) -> None:
    """Name = file name; 1 MiB loadable RAM at virt 0 inside the inmate window; comm
    region at 0x100000; console 8250 on ttyS1 with 0x2f8/8 whitelisted; flags fit the
    demo; the compiled blob has the cell signature and revision 14."""
    cell = toml_config.load_source(source)
    assert isinstance(cell, CellConfig)
    blob = cell.to_bytes()
    assert blob[:5] == b"JHCLL" and int.from_bytes(blob[6:8], "little") == 14
    assert cell.name == source.stem

    ram = [r for r in cell.memory_regions if r.virt_start == 0 and r.size]
    assert len(ram) == 1
    ram_region = ram[0]
    assert ram_region.size == 0x100000
    assert ram_region.phys_start in INMATE_RAM
    assert ram_region.phys_start + ram_region.size - 1 in INMATE_RAM
    want = MemFlags.READ | MemFlags.WRITE | MemFlags.EXECUTE | MemFlags.LOADABLE
    assert ram_region.flags & want == want
    assert bool(ram_region.flags & MemFlags.DMA) == (cell.name in DMA)

    comm = [r for r in cell.memory_regions if r.flags & MemFlags.COMM_REGION]
    assert [(r.virt_start, r.size) for r in comm] == [(COMM_REGION_BASE, PAGE_SIZE)]

    assert cell.console.type == ConsoleType.UART_8250
    assert cell.console.address == CELL_UART
    assert any(p.base <= CELL_UART and p.base + p.length >= CELL_UART + 8
               for p in cell.pio_regions)
    assert not any(p.base <= 0x3F8 < p.base + p.length for p in cell.pio_regions), \
        "0x3f8 is the hypervisor console in the lab"

    passive = bool(cell.flags & CellFlags.PASSIVE_COMMREG)
    assert passive == (cell.name not in ACTIVE)
    assert bool(cell.flags & CellFlags.TEST_DEVICE) == (cell.name == "mmio-access")


def test_co_resident_pairs_do_not_overlap() -> None:
    """The pairs meant to run together use different CPUs and RAM."""
    for first, second in (("apic-timer", "hello"), ("ivshmem", "ivshmem-2")):
        a = toml_config.load_source(CELLS_DIR / f"{first}.toml")
        b = toml_config.load_source(CELLS_DIR / f"{second}.toml")
        assert isinstance(a, CellConfig) and isinstance(b, CellConfig)
        assert not set(a.cpus) & set(b.cpus)
        ram_a = next(r for r in a.memory_regions if r.virt_start == 0 and r.size)
        ram_b = next(r for r in b.memory_regions if r.virt_start == 0 and r.size)
        assert (ram_a.phys_start + ram_a.size <= ram_b.phys_start
                or ram_b.phys_start + ram_b.size <= ram_a.phys_start)
