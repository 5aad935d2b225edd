"""The sysfs tree and ``jailhouse cell list`` (reference §6.3, §6.4): names and formats."""

from __future__ import annotations

import pytest
from test_model_configs import linux_x86_demo, qemu_x86, tiny_demo

from harness.hvmodel.abi import CpuStat
from harness.hvmodel.arch.oracle import OracleArch
from harness.hvmodel.cpus import (
    cpu_set_from,
    cpus_from_bitmap,
    format_cpu_list,
    format_cpu_mask,
    parse_cpu_list,
)
from harness.hvmodel.driver import Driver, HostInfo, Image
from harness.hvmodel.sysfs import CELL_LIST_HEADER, cell_list, sysfs_tree

STAT_NAMES = [
    "vmexits_total", "vmexits_mmio", "vmexits_management", "vmexits_hypercall", "vmexits_pio",
    "vmexits_xapic", "vmexits_cr", "vmexits_cpuid", "vmexits_xsetbv", "vmexits_exception",
    "vmexits_msr_other", "vmexits_msr_x2apic_icr",
]


def test_stat_names_are_the_driver_ones() -> None:
    """The 12 x86 counters, in index order, with their sysfs names."""
    assert [stat.sysfs_name for stat in CpuStat] == STAT_NAMES
    assert [int(stat) for stat in CpuStat] == list(range(12))


def test_disabled_tree() -> None:
    """Without the hypervisor: enabled 0, pools 0, empty console, no cells, no list."""
    driver = Driver(OracleArch())
    tree = sysfs_tree(driver)
    assert tree == {
        "enabled": "0\n", "mem_pool_size": "0\n", "mem_pool_used": "0\n",
        "remap_pool_size": "0\n", "remap_pool_used": "0\n", "console": "",
    }
    assert cell_list(driver) == ""


def test_enabled_tree_names_and_formats() -> None:
    """Every file of an enabled system with one cell, formatted as the driver does."""
    driver = Driver(OracleArch())
    driver.enable(qemu_x86().to_bytes())
    driver.cell_create(linux_x86_demo().to_bytes())
    hv = driver.hv
    assert hv is not None
    tree = sysfs_tree(driver)
    assert tree["enabled"] == "1\n"
    assert tree["mem_pool_size"] == f"{hv.mem_pool.size}\n"
    assert tree["remap_pool_size"] == "131072\n"
    assert tree["console"] == hv.console.content
    assert tree["console"].startswith("Initializing Jailhouse hypervisor")
    expected_cell_files = {"name", "state", "cpus_assigned", "cpus_assigned_list",
                           "cpus_failed", "cpus_failed_list"}
    for cell_id, cpus, mask, listing in ((0, [0, 1], "3", "0-1"), (1, [2, 3], "c", "2-3")):
        base = f"cells/{cell_id}/"
        assert {p[len(base):] for p in tree if p.startswith(base) and "/" not in p[len(base):]} \
            == expected_cell_files
        assert tree[base + "cpus_assigned"] == mask + "\n"
        assert tree[base + "cpus_assigned_list"] == listing + "\n"
        assert tree[base + "cpus_failed"] == "0\n"
        assert tree[base + "cpus_failed_list"] == "\n"
        for name in STAT_NAMES:
            assert tree[f"{base}statistics/{name}"].endswith("\n")
            for cpu in cpus:
                assert f"{base}statistics/cpu{cpu}/{name}" in tree
    assert tree["cells/1/state"] == "shut down\n"
    assert tree["cells/1/name"] == "linux-x86-demo\n"


def test_statistics_sum_over_the_cell() -> None:
    """The cell total is the sum of its CPUs' counters."""
    driver = Driver(OracleArch())
    driver.enable(qemu_x86().to_bytes())
    driver.cell_create(linux_x86_demo().to_bytes())
    driver.cell_load(1, [Image(b"\xf4", 0)])
    driver.cell_start(1)
    hv = driver.hv
    assert hv is not None
    for _ in range(3):
        hv.handle_pio(2, 0x80, 1, True, 0)
    hv.handle_pio(3, 0x80, 1, True, 0)
    tree = sysfs_tree(driver)
    assert tree["cells/1/statistics/cpu2/vmexits_pio"] == "3\n"
    assert tree["cells/1/statistics/cpu3/vmexits_pio"] == "1\n"
    assert tree["cells/1/statistics/vmexits_pio"] == "4\n"
    # and two management exits per CPU (cell load and cell start suspend the cell)
    assert tree["cells/1/statistics/vmexits_management"] == "4\n"
    assert tree["cells/1/statistics/vmexits_total"] == "8\n"


def test_cell_list_columns_and_alphasort() -> None:
    """Fixed-width columns with trailing spaces; rows sorted by id *name* (10 before 2)."""
    driver = Driver(OracleArch(), HostInfo(online_cpus=frozenset(range(12)), possible_cpus=12))
    system = qemu_x86(tuple(range(12)))
    driver.enable(system.to_bytes())
    import dataclasses

    for n in range(1, 11):
        config = dataclasses.replace(
            tiny_demo(),
            name=f"c{n}",
            cpu_set=(1 << (n + 1)).to_bytes(8, "little"),
            memory_regions=(
                dataclasses.replace(tiny_demo().memory_regions[0],
                                    phys_start=0x3A600000 + n * 0x100000),
                tiny_demo().memory_regions[1],
            ),
        )
        driver.cell_create(config.to_bytes())
    text = cell_list(driver)
    lines = text.splitlines(keepends=True)
    assert lines[0] == CELL_LIST_HEADER
    assert CELL_LIST_HEADER == (
        "ID      Name                    State             Assigned CPUs           "
        "Failed CPUs             \n"
    )
    assert [line[:8].strip() for line in lines[1:]] == ["0", "1", "10", "2", "3", "4", "5", "6",
                                                        "7", "8", "9"]
    assert lines[1] == "%-8s%-24s%-18s%-24s%-24s\n" % ("0", "QEMU-VM", "running", "0-1", "")
    assert lines[2] == "%-8s%-24s%-18s%-24s%-24s\n" % ("1", "c1", "shut down", "2", "")
    tree = sysfs_tree(driver)
    assert tree["cells/10/cpus_assigned"] == "800\n"


@pytest.mark.parametrize(
    ("cpus", "nbits", "mask", "listing"),
    [
        ([], 4, "0", ""),
        ([3], 4, "8", "3"),
        ([0, 1, 2], 4, "7", "0-2"),
        ([2, 3], 8, "0c", "2-3"),
        ([0, 2, 3, 5], 8, "2d", "0,2-3,5"),
        ([0, 5], 4, "1", "0,5"),
        ([0, 33], 40, "02,00000001", "0,33"),
        ([31], 32, "80000000", "31"),
    ],
)
def test_cpu_mask_formats(cpus: list[int], nbits: int, mask: str, listing: str) -> None:
    """Linux ``%*pb`` (padded to nr_cpu_ids, 32-bit chunks) and ``%*pbl``."""
    assert format_cpu_mask(cpus, nbits) == mask
    assert format_cpu_list(cpus) == listing
    assert parse_cpu_list(listing + "\n") == set(cpus)
    assert cpus_from_bitmap(cpu_set_from(cpus, 8)) == set(cpus)


def test_parse_cpu_list() -> None:
    """Linux's list form as sysfs and cgroups print it; anything else is named."""
    assert parse_cpu_list("0-3\n") == {0, 1, 2, 3}
    assert parse_cpu_list("0-1,3,5-6") == {0, 1, 3, 5, 6}
    assert parse_cpu_list(" 2 , ,4-4 ") == {2, 4}
    assert parse_cpu_list("") == frozenset()
    for bad in ("0-", "a", "3-1", "-1", "1-2-3"):
        with pytest.raises(ValueError, match="CPU list"):
            parse_cpu_list(bad)


def test_console_is_missing_without_virtual_debug_console() -> None:
    """Without the system flag the console file cannot be read (not rendered)."""
    import dataclasses

    driver = Driver(OracleArch())
    driver.enable(dataclasses.replace(qemu_x86(), flags=0).to_bytes())
    assert "console" not in sysfs_tree(driver)
