"""Jailhouse's demo sequences replayed on the model (reference §2.2, §3, §6).

* apic-demo locks itself: creating or destroying other cells fails with EPERM, the
  first shutdown is refused, the second accepted;
* ivshmem-demo + linux-x86-demo, the co-resident set: console lines, states, the
  ivshmem link, ``jailhouse cell list``, a failing CPU, destruction and disable.
"""

from __future__ import annotations

import re

import pytest
from test_model_configs import apic_demo, ivshmem_demo, linux_x86_demo, qemu_x86, tiny_demo

from harness.hvmodel.abi import CellState, CommOffset, Message, comm_read_u32
from harness.hvmodel.arch.oracle import OracleArch, deny_first_shutdown
from harness.hvmodel.driver import Driver, Image
from harness.hvmodel.errors import Errno, HvError
from harness.hvmodel.sysfs import CELL_LIST_HEADER, cell_list

POOL_LINE = re.compile(r"Page pool usage after cell (creation|destruction): mem \d+/\d+, remap \d+/\d+")


def row(cell_id: int, name: str, state: str, cpus: str, failed: str = "") -> str:
    return "%-8d%-24s%-18s%-24s%-24s\n" % (cell_id, name, state, cpus, failed)


@pytest.fixture
def driver() -> Driver:
    """An enabled driver on the oracle, qemu-x86, apic-demo answering like apic-demo."""
    arch = OracleArch()
    arch.responders["apic-demo"] = deny_first_shutdown()
    drv = Driver(arch)
    drv.enable(qemu_x86().to_bytes())
    return drv


def new_lines(drv: Driver, mark: int) -> list[str]:
    assert drv.hv is not None
    return list(drv.hv.console.lines)[mark:]


def mark(drv: Driver) -> int:
    assert drv.hv is not None
    return len(drv.hv.console.lines)


def test_apic_demo_locks_itself_and_refuses_the_first_shutdown(driver: Driver) -> None:
    """The README sequence with apic-demo and tiny-demo."""
    hv = driver.hv
    assert hv is not None
    tiny = driver.cell_create(tiny_demo().to_bytes())
    driver.cell_load(tiny, [Image(b"\xf4", 0)])
    driver.cell_start(tiny)
    apic = driver.cell_create(apic_demo().to_bytes())
    assert (tiny, apic) == (1, 2)
    driver.cell_load("apic-demo", [Image(b"\xf4" * 64, 0)])
    driver.cell_start("apic-demo")
    # The inmate writes RUNNING_LOCKED into its comm region (guest address 0x100008).
    assert hv.handle_mmio(3, 0x100008, 4, True, CellState.RUNNING_LOCKED).handled
    assert cell_list(driver) == (
        CELL_LIST_HEADER
        + row(0, "QEMU-VM", "running", "0-1")
        + row(1, "tiny-demo", "running", "2")
        + row(2, "apic-demo", "running/locked", "3")
    )
    before = mark(driver)
    with pytest.raises(HvError) as info:
        driver.cell_create(ivshmem_demo().to_bytes())
    assert info.value.errno == Errno.EPERM
    assert 1 in driver.online, "the driver brings the CPU back after a failed create"
    with pytest.raises(HvError) as info:
        driver.cell_destroy("tiny-demo")
    assert info.value.errno == Errno.EPERM
    with pytest.raises(HvError) as info:
        driver.cell_shutdown("apic-demo")
    assert info.value.errno == Errno.EPERM
    assert new_lines(driver, before) == []
    driver.cell_shutdown("apic-demo")
    assert new_lines(driver, before) == ['Cell "apic-demo" can be loaded']
    assert hv.cell_by_id(2).state == CellState.SHUT_DOWN  # type: ignore[union-attr]
    driver.cell_destroy("tiny-demo")
    driver.cell_destroy("apic-demo")
    lines = new_lines(driver, before)
    assert lines[1] == 'Closing cell "tiny-demo"'
    assert POOL_LINE.fullmatch(lines[2])
    assert lines[3] == 'Closing cell "apic-demo"'
    assert cell_list(driver) == CELL_LIST_HEADER + row(0, "QEMU-VM", "running", "0-3")


def test_apic_demo_refusal_aborts_disable(driver: Driver) -> None:
    """``jailhouse disable`` fails with EPERM while apic-demo refuses its first shutdown."""
    driver.cell_create(apic_demo().to_bytes())
    driver.cell_load("apic-demo", [Image(b"\xf4", 0)])
    driver.cell_start("apic-demo")
    with pytest.raises(HvError) as info:
        driver.disable()
    assert info.value.errno == Errno.EPERM
    assert driver.enabled
    driver.disable()
    assert not driver.enabled


def test_apic_demo_gets_reconfig_messages(driver: Driver) -> None:
    """A non-passive running cell is told about every reconfiguration."""
    arch = driver.arch
    assert isinstance(arch, OracleArch)
    driver.cell_create(apic_demo().to_bytes())
    driver.cell_load("apic-demo", [Image(b"\xf4", 0)])
    driver.cell_start("apic-demo")
    arch.events.clear()
    driver.cell_create(tiny_demo().to_bytes())
    driver.cell_destroy("tiny-demo")
    messages = [event[2] for event in arch.events_of("message")]
    assert messages == [Message.RECONFIG_COMPLETED, Message.RECONFIG_COMPLETED]


def test_ivshmem_and_linux_demo_set(driver: Driver) -> None:
    """The co-resident set: create, load, start, list, fail a CPU, destroy, disable."""
    hv = driver.hv
    arch = driver.arch
    assert hv is not None and isinstance(arch, OracleArch)
    enabled_pools = hv.pool_usage()
    start = mark(driver)
    assert driver.cell_create(ivshmem_demo().to_bytes()) == 1
    driver.cell_load("ivshmem-demo", [Image(b"\xea" * 32, 0)])
    driver.cell_start("ivshmem-demo")
    assert driver.cell_create(linux_x86_demo().to_bytes()) == 2
    driver.cell_load(
        "linux-x86-demo",
        [Image(b"loader", 0), Image(b"params", 0x1000), Image(b"kernel" * 100, 0x200000)],
    )
    linux_cell = hv.cell_by_id(2)
    assert linux_cell is not None and linux_cell.loadable
    # While loadable, the root maps the cell's RAM again (to write the images).
    assert hv.root.ept.covers(0x3A700000, 0x4700000)
    driver.cell_start("linux-x86-demo")
    assert not hv.root.ept.covers(0x3A700000, 0x1000)
    assert arch.phys_read(0x3A700000, 6) == b"kernel"
    lines = new_lines(driver, start)
    assert [line for line in lines if not POOL_LINE.fullmatch(line)] == [
        'Adding virtual PCI device 01:0e.0 to cell "ivshmem-demo"',
        'Created cell "ivshmem-demo"',
        'Cell "ivshmem-demo" can be loaded',
        'Started cell "ivshmem-demo"',
        'Adding virtual PCI device 01:0c.0 to cell "linux-x86-demo"',
        'Adding virtual PCI device 01:0d.0 to cell "linux-x86-demo"',
        'Adding virtual PCI device 01:0e.0 to cell "linux-x86-demo"',
        'Adding virtual PCI device 01:0f.0 to cell "linux-x86-demo"',
        'Created cell "linux-x86-demo"',
        'Cell "linux-x86-demo" can be loaded',
        'Started cell "linux-x86-demo"',
    ]
    assert sum(1 for line in lines if POOL_LINE.fullmatch(line)) == 2
    assert hv.ivshmem.to_dict()["0000:0170"]["endpoints"] == {
        "0": "QEMU-VM",
        "1": "ivshmem-demo",
        "2": "linux-x86-demo",
    }
    comm = hv.cell_by_id(2).comm_page  # type: ignore[union-attr]
    assert bytes(comm[0:6]) == b"JHCOMM"
    assert comm_read_u32(comm, CommOffset.CELL_STATE) == CellState.RUNNING
    assert int.from_bytes(comm[66:68], "little") == 2
    assert cell_list(driver) == (
        CELL_LIST_HEADER
        + row(0, "QEMU-VM", "running", "0")
        + row(1, "ivshmem-demo", "running", "1")
        + row(2, "linux-x86-demo", "running", "2-3")
    )
    # ivshmem-demo touches a port it does not own: FATAL, parked, the cell fails.
    mark_fail = mark(driver)
    result = hv.handle_pio(1, 0x70, 1, False)
    assert not result.handled
    assert new_lines(driver, mark_fail) == [
        "FATAL: Invalid PIO read, port: 70 size: 1",
        'Parking CPU 1 (Cell: "ivshmem-demo")',
    ]
    # Only one of linux-x86-demo's two CPUs fails: the cell keeps running.
    assert not hv.handle_mmio(2, 0xFEB00000, 4, True, 0).handled
    assert cell_list(driver) == (
        CELL_LIST_HEADER
        + row(0, "QEMU-VM", "running", "0")
        + row(1, "ivshmem-demo", "failed", "1", "1")
        + row(2, "linux-x86-demo", "running", "2-3", "2")
    )
    mark_end = mark(driver)
    driver.disable()
    assert driver.hv is None
    lines = hv.console.lines and list(hv.console.lines)[mark_end:]
    assert [line for line in lines if not POOL_LINE.fullmatch(line)] == [
        'Closing cell "ivshmem-demo"',
        'Closing cell "linux-x86-demo"',
        "Shutting down hypervisor",
        " Releasing CPU 0",
        " Releasing CPU 1",
        " Releasing CPU 2",
        " Releasing CPU 3",
    ]
    assert hv.pool_usage() == enabled_pools
    assert driver.kernel_log[-1] == "The Jailhouse was closed."


def test_fatal_mmio_line_and_register_width(driver: Driver) -> None:
    """``FATAL: Invalid MMIO/RAM write, addr: 0x%016llx size: %d`` for an unmapped access."""
    hv = driver.hv
    assert hv is not None
    driver.cell_create(tiny_demo().to_bytes())
    driver.cell_load("tiny-demo", [Image(b"\xf4", 0)])
    driver.cell_start("tiny-demo")
    start = mark(driver)
    assert not hv.handle_mmio(2, 0x3A000000, 8, True, 1).handled
    assert new_lines(driver, start) == [
        "FATAL: Invalid MMIO/RAM write, addr: 0x000000003a000000 size: 8",
        'Parking CPU 2 (Cell: "tiny-demo")',
    ]
    assert hv.cell_by_id(1).state == CellState.FAILED  # type: ignore[union-attr]


def test_driver_sysfs_cell_directories_follow_the_cells(driver: Driver) -> None:
    """``cells/<id>`` appear with create and disappear with destroy; CPU stats move."""
    from harness.hvmodel.sysfs import sysfs_tree

    driver.cell_create(linux_x86_demo().to_bytes())
    tree = sysfs_tree(driver)
    assert tree["cells/1/name"] == "linux-x86-demo\n"
    assert tree["cells/1/cpus_assigned"] == "c\n"
    assert "cells/1/statistics/cpu3/vmexits_total" in tree
    assert "cells/0/statistics/cpu3/vmexits_total" not in tree
    driver.cell_destroy(1)
    tree = sysfs_tree(driver)
    assert not any(path.startswith("cells/1/") for path in tree)
    assert tree["cells/0/cpus_assigned_list"] == "0-3\n"
    assert "cells/0/statistics/cpu3/vmexits_total" in tree


def test_reply_timeout_fails_the_cell_and_the_request_proceeds() -> None:
    """A cell that never answers within msg_reply_timeout is FAILED; the shutdown goes on."""
    import dataclasses

    arch = OracleArch()
    arch.responders["slow"] = lambda name, message, page: None
    driver = Driver(arch)
    driver.enable(qemu_x86().to_bytes())
    slow = dataclasses.replace(apic_demo(), name="slow", msg_reply_timeout=1000)
    driver.cell_create(slow.to_bytes())
    driver.cell_load("slow", [Image(b"\xf4", 0)])
    driver.cell_start("slow")
    hv = driver.hv
    assert hv is not None
    start = mark(driver)
    driver.cell_shutdown("slow")
    assert new_lines(driver, start) == [
        "Timeout expired while waiting for reply from target cell",
        'Cell "slow" can be loaded',
    ]
    assert arch.events_of("message")[-1][1:] == (1, Message.SHUTDOWN_REQUEST, None)
    assert hv.cell_by_id(1).state == CellState.SHUT_DOWN  # type: ignore[union-attr]


def test_waiting_for_a_reply_lets_the_cell_run() -> None:
    """While the root waits for an answer, the cell's CPUs can still exit into the model."""
    import threading

    class ThreadedArch(OracleArch):
        hv: object = None

        def wait_for_reply(self, cell_id: int, comm_page: memoryview, timeout: float | None) -> bool:
            def inmate() -> None:
                hv = self.hv
                assert hv is not None
                # the inmate prints on its UART, then approves
                hv.handle_pio(3, 0x3F8, 1, True, ord("!"))  # type: ignore[attr-defined]
                hv.handle_pio(3, 0x80, 1, True, 0)  # type: ignore[attr-defined]
                super(ThreadedArch, self).wait_for_reply(cell_id, comm_page, timeout)

            worker = threading.Thread(target=inmate)
            worker.start()
            worker.join(timeout=10)
            return not worker.is_alive()

    arch = ThreadedArch()
    driver = Driver(arch)
    driver.enable(qemu_x86().to_bytes())
    arch.hv = driver.hv
    driver.cell_create(apic_demo().to_bytes())
    driver.cell_load(1, [Image(b"\xf4", 0)])
    driver.cell_start(1)
    driver.cell_destroy(1)
    assert arch.ports[0x3F8] == ord("!")
    assert driver.cells.keys() == {0}


def test_state_snapshots_of_two_identical_runs_are_equal_and_json() -> None:
    """The oracle and a guest running the same steps produce the same snapshot."""
    import json

    def run() -> dict[str, object]:
        drv = Driver(OracleArch())
        drv.enable(qemu_x86().to_bytes())
        drv.cell_create(ivshmem_demo().to_bytes())
        drv.cell_create(linux_x86_demo().to_bytes())
        drv.cell_load("linux-x86-demo", [Image(b"k" * 64, 0x200000)])
        drv.cell_start("linux-x86-demo")
        assert drv.hv is not None
        drv.hv.handle_pio(2, 0x80, 1, True, 0)
        return drv.hv.to_dict()

    first, second = run(), run()
    assert first == second
    text = json.dumps(first, sort_keys=True)
    assert '"linux-x86-demo"' in text and '"running"' in text
