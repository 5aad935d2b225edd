"""Snapshots and resets of a real lab: what a test leaves (a busy guest, the hypervisor
enabled with a cell running, a device passed through) is restored exactly or refused
with a reason.  Each test restores the session's reset point when it is done."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.errors import SnapshotRefused
from harness.hvmodel.loader import DAEMON_PROCESS_NAME
from harness.lab import Lab, LabState

pytestmark = [pytest.mark.lab, pytest.mark.slow]

SWEEPER = Path(__file__).with_name("guest_sweeper.py")
SWEEP_STATUS = "/run/jhlab-sweeper.status"
TIMER_LINE = r"Timer fired, jitter:[^\r\n]*\r?\n"
EDU = "0000:01:01.0"
#: seconds a guest program may take for the sweeps awaited (TCG, shared machine)
SWEEP_TIMEOUT = 240.0


@pytest.fixture
def session_point_back(lab: Lab) -> Iterator[None]:
    """The test may take reset points of its own; the session's comes back after it."""
    session = lab.reset_point
    yield
    if session is not None and lab.reset_point is not session and lab.state is LabState.READY:
        lab.reset(session)


def _sweeps(lab: Lab) -> dict[str, str]:
    text = lab.run(f"cat {SWEEP_STATUS} 2>/dev/null", timeout=60).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _await_sweeps(lab: Lab, count: int) -> dict[str, str]:
    deadline = time.monotonic() + SWEEP_TIMEOUT
    while True:
        status = _sweeps(lab)
        if int(status.get("sweeps", 0)) >= count:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"the sweeper did not reach {count} sweeps in "
                                 f"{SWEEP_TIMEOUT:.0f} s: {status}")
        time.sleep(1)


def test_a_snapshot_keeps_every_store_of_a_busy_guest(lab: Lab, session_point_back: None) -> None:
    """A program storing into 64 MiB all the time (check each page holds what the last
    sweep stored, store the next value) finds no page with an older value after a
    restore, and runs on.  QEMU 7.2 saving a running TCG guest live lost about a
    hundred pages of stores per snapshot; a save of the stopped guest loses none."""
    lab.ssh.put(SWEEPER.read_bytes(), "/root/guest_sweeper.py")
    lab.run(f"nohup python3 /root/guest_sweeper.py {SWEEP_STATUS} >/dev/null 2>&1 &", check=True)
    _await_sweeps(lab, 2)
    lab.snapshot()
    lab.reset()
    restored = int(_sweeps(lab)["sweeps"])
    status = _await_sweeps(lab, restored + 3)
    assert status["errors"] == "0", f"stores lost across the snapshot: {status}"
    kernel = lab.run("dmesg | grep -E 'BUG|WARNING|Oops|\\bstalls?\\b' || true", check=True).stdout
    assert not kernel.strip(), kernel


@pytest.mark.kvm
def test_a_snapshot_with_a_cell_running_restores_and_the_cell_runs_on(
        lab: Lab, session_point_back: None) -> None:
    """The hypervisor enabled and apic-timer running on its CPU: three snapshots in a
    row (the cell's process is stopped for each save, so no CPU is inside the cell when
    QEMU stops) restore, and after each the timer lines go on and ``cell list`` shows
    the cell running/locked; then the cell is destroyed, hello runs and says PASSED, and
    the hypervisor disables."""
    lab.run("jailhouse enable /etc/jailhouse/qemu-x86.cell", check=True, timeout=300)
    lab.cell_console.discard()
    lab.run("jailhouse cell create /etc/jailhouse/apic-timer.cell"
            " && jailhouse cell load apic-timer /usr/libexec/jailhouse/demos/apic-timer.bin"
            " && jailhouse cell start apic-timer", check=True, timeout=300)
    lab.cell_console.expect(TIMER_LINE, timeout=120)
    for _ in range(3):
        point = lab.snapshot()
        assert any(user.name == DAEMON_PROCESS_NAME or "harness.hvmodel.daemon" in user.cmdline
                   for user in point.guest.stopped), \
            point.guest.stopped
        lab.run("touch /root/after-the-snapshot", check=True)
        lab.reset()
        lab.cell_console.discard()
        for _ in range(3):
            lab.cell_console.expect(TIMER_LINE, timeout=60)
        listing = lab.run("test ! -e /root/after-the-snapshot && jailhouse cell list",
                          check=True, timeout=120).stdout
        assert re.search(r"apic-timer\s+running/locked\s+3\b", listing), listing
    lab.run("jailhouse cell shutdown apic-timer; jailhouse cell shutdown apic-timer"
            " && jailhouse cell destroy apic-timer", check=True, timeout=300)
    lab.run("jailhouse cell create /etc/jailhouse/hello.cell"
            " && jailhouse cell load hello /usr/libexec/jailhouse/demos/hello.bin"
            " && jailhouse cell start hello", check=True, timeout=300)
    assert "PASSED" in lab.cell_console.expect(r"hello: (PASSED|FAILED)", timeout=120).group(0)
    lab.run("jailhouse cell destroy hello && jailhouse disable", check=True, timeout=300)
    kernel = lab.run("dmesg | grep -E 'BUG|WARNING|Oops|\\bstalls?\\b' || true", check=True).stdout
    assert not kernel.strip(), kernel


def test_a_snapshot_is_refused_while_a_device_without_migration_state_is_bound(lab: Lab) -> None:
    """edu (QEMU keeps no state of it) bound to vfio-pci, as when passed through to a
    cell: the snapshot is refused naming the device, its driver and what to do; the reset
    point stays, no root-cell process is left stopped, no snapshot file is left."""
    session = lab.reset_point
    snapshots_before = set(Path("/tmp").glob(f"jhlab-{lab.spec.name}-snap-*"))
    dev = f"/sys/bus/pci/devices/{EDU}"
    lab.run(f"echo vfio-pci > {dev}/driver_override && echo {EDU} > /sys/bus/pci/drivers_probe"
            f" && test $(basename $(readlink {dev}/driver)) = vfio-pci", check=True)
    try:
        with pytest.raises(SnapshotRefused,
                           match=r"edu at 01:01\.0 \(bound to vfio-pci\).*jailhouse cell destroy"):
            lab.snapshot()
    finally:
        lab.run(f"echo {EDU} > {dev}/driver/unbind; echo > {dev}/driver_override", check=True)
    assert lab.reset_point is session
    assert set(Path("/tmp").glob(f"jhlab-{lab.spec.name}-snap-*")) == snapshots_before
    states = lab.run("for s in /proc/[0-9]*/stat; do cut -d' ' -f3 $s; done", check=True).stdout
    assert "T" not in states.split()
