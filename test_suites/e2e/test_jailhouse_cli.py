"""The ``jailhouse`` command in a real lab, checked against the host-side oracle.

Jailhouse's demo sequence (enable qemu-x86, create apic-demo, load, start, list, stats,
shutdown twice, destroy, disable) runs in the lab's root cell with the guest's own
``jailhouse`` command and driver daemon. On the host, a
:class:`~harness.hvmodel.driver.Driver` on an :class:`~harness.hvmodel.arch.oracle.OracleArch`,
built for the machine the guest's daemon reports, replays the same operations and sysfs
reads. Every ``jailhouse cell list`` of the guest must equal the oracle's
:func:`~harness.hvmodel.sysfs.cell_list`; with the oracle Arch in the guest too (the default),
every sysfs file must be equal as well. The hypervisor console must reach serial 0 (the
config's debug UART, 0x3f8).

The guest daemon's Arch comes from ``$JHLAB_E2E_ARCH`` (``oracle`` by default; ``executor``
or ``auto`` to run the cells on KVM). With the oracle, the image is a dummy and the cell
is Jailhouse's apic-demo; on KVM it is jhlab's apic-timer inmate (built here; like
apic-demo it locks its cell and refuses the first shutdown) with its own cell config,
its timer lines are awaited on serial 1, and only ``cell list`` is compared (statistics
and timing are the machine's).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.hvmodel.arch.oracle import OracleArch, deny_first_shutdown
from harness.hvmodel.config import load_source
from harness.hvmodel.daemon import host_from_wire
from harness.hvmodel.driver import Driver, Image
from harness.hvmodel.errors import HvError
from harness.hvmodel.sysfs import cell_list, sysfs_tree
from harness.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "harness" / "configs"
ARCH = os.environ.get("JHLAB_E2E_ARCH", "oracle")
GUEST_DIR = "/tmp/jhlab-e2e-cli"
RUN_DIR = "/run/jailhouse"
#: every command the way a Jailhouse demo script runs it, with jhlab's daemon settings
PREFIX = (
    "export PATH=/opt/jhlab/bin:$PATH PYTHONPATH=/opt/jhlab/lib "
    f"JAILHOUSE_ARCH={ARCH} "
    "JAILHOUSE_DAEMON_ARGS='--responder apic-demo=deny-first-shutdown "
    "--responder apic-timer=deny-first-shutdown'; "
    f"cd {GUEST_DIR} && "
)
#: dumps the guest's sysfs tree as JSON ({path: text})
DUMP_SYSFS = f"""
import json, os
root = {RUN_DIR!r} + "/sys/devices/jailhouse"
tree = {{}}
for folder, _, names in os.walk(root):
    for name in names:
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, root)
        with open(path, "rb") as handle:
            data = handle.read()
        tree[rel] = data.decode("latin-1" if rel == "console" else "utf-8")
print(json.dumps(tree))
"""
#: prints the pid of the daemon, or nothing
DAEMON_PID = f"""
from harness.hvmodel.ipc import DriverClient
try:
    with DriverClient({RUN_DIR!r} + "/driver.sock", timeout=10) as client:
        print(client.request("state")["pid"])
except OSError:
    pass
"""
IMAGE = bytes(range(256)) * 16
INMATES = REPO / "images" / "inmates"


class Guest:
    """The lab's root cell with the files of the demo, and the host-side oracle.

    :param lab: the booted lab
    """

    def __init__(self, lab: Lab, build: Path) -> None:
        self.lab = lab
        self.system = load_source(CONFIGS / "qemu-x86.toml").to_bytes()
        if ARCH == "oracle":
            self.cell_name = "apic-demo"
            self.cell = load_source(CONFIGS / "apic-demo.toml").to_bytes()
            self.image = IMAGE
        else:
            self.cell_name = "apic-timer"
            self.cell = load_source(INMATES / "cells" / "apic-timer.toml").to_bytes()
            subprocess.run(["make", "-C", os.fspath(INMATES), f"O={build}", "apic-timer"],
                           check=True, capture_output=True, timeout=300)
            self.image = (build / "apic-timer.bin").read_bytes()
        self.arch = OracleArch()
        self.arch.responders[self.cell_name] = deny_first_shutdown()
        self.oracle: Driver | None = None
        self.tree: dict[str, str] = {}

    def put_files(self) -> None:
        """The compiled configs and the image, in the guest."""
        self.lab.run(f"mkdir -p {GUEST_DIR}", check=True)
        for name, data in (("qemu-x86.cell", self.system), ("cell.cell", self.cell),
                           ("inmate.bin", self.image)):
            self.lab.ssh.put(data, f"{GUEST_DIR}/{name}")

    def jailhouse(self, *args: str, timeout: float = 180.0) -> tuple[int, str, str]:
        """``jailhouse ARGS`` in the guest: status, stdout, stderr."""
        command = PREFIX + "jailhouse " + " ".join(shlex.quote(arg) for arg in args)
        result = self.lab.run(command, timeout=timeout)
        return result.status, result.stdout, result.stderr

    def python(self, script: str) -> str:
        """Run a Python script in the guest (with the guest's hvmodel)."""
        return self.lab.run("PYTHONPATH=/opt/jhlab/lib python3 -", stdin=script, timeout=60,
                            check=True).stdout

    def sysfs(self) -> dict[str, str]:
        """The guest's sysfs tree."""
        return dict(json.loads(self.python(DUMP_SYSFS)))

    def daemon_pid(self) -> int | None:
        """The guest daemon's pid, or None when none runs."""
        text = self.python(DAEMON_PID).strip()
        return int(text) if text else None

    def state(self) -> dict[str, object]:
        """The guest daemon's ``state`` reply."""
        script = DAEMON_PID.replace('print(client.request("state")["pid"])',
                                    'import json; print(json.dumps(client.request("state")))')
        return dict(json.loads(self.python(script)))

    # -- the oracle, doing what the guest's daemon does -----------------------------------

    def apply(self, operation: Callable[[Driver], object]) -> int:
        """One driver command in the oracle, then the daemon's sysfs refresh."""
        assert self.oracle is not None
        try:
            operation(self.oracle)
            result = 0
        except HvError as err:
            result = err.code
        self.refresh()
        return result

    def refresh(self) -> dict[str, str]:
        """One reading of the whole tree (a daemon refresh)."""
        assert self.oracle is not None
        self.tree = sysfs_tree(self.oracle)
        return self.tree

    def expected_list(self) -> str:
        """What ``cell list`` prints: the CLI asks the daemon for a refresh, then reads."""
        assert self.oracle is not None
        return cell_list(self.oracle, self.refresh())

    def cleanup(self) -> None:
        """Stop a daemon a failed test left running (by its pid), remove the files."""
        pid = self.daemon_pid()
        if pid is not None:
            self.lab.run(f"kill -TERM {pid}; for i in $(seq 100); do "
                         f"[ -d /proc/{pid} ] && ! grep -q '^State:.*Z' /proc/{pid}/status "
                         "|| break; sleep 0.1; done", timeout=60)
        self.lab.run(f"rm -rf {GUEST_DIR}", timeout=60)


@pytest.fixture
def guest(lab: Lab, tmp_path: Path) -> Iterator[Guest]:
    """The demo's files in the lab; no daemon left behind."""
    made = Guest(lab, tmp_path)
    assert made.daemon_pid() is None, "a jailhouse daemon already runs in the lab"
    made.put_files()
    try:
        yield made
    finally:
        made.cleanup()


def test_demo_sequence_matches_the_oracle(guest: Guest) -> None:
    """Jailhouse's demo in the lab: every ``cell list`` equals the oracle's, the sysfs
    tree too (oracle Arch), the cell refuses its first shutdown, the console reaches
    serial 0, and after ``disable`` the daemon is gone and the list is empty."""
    lab = guest.lab
    name = guest.cell_name
    status, out, err = guest.jailhouse("enable", "qemu-x86.cell")
    assert (status, out, err) == (0, "", "")
    state = guest.state()
    pid = state["pid"]
    assert isinstance(pid, int)
    assert state["arch"] == ARCH or ARCH == "auto"
    host = host_from_wire(state["host"])  # type: ignore[arg-type]
    guest.oracle = Driver(guest.arch, host)
    guest.apply(lambda d: d.enable(guest.system))
    lab.console.expect(r"Activating hypervisor", timeout=60)

    assert guest.jailhouse("cell", "create", "cell.cell") == (0, "", "")
    guest.apply(lambda d: d.cell_create(guest.cell))
    lab.console.expect(f'Created cell "{name}"', timeout=60)
    assert guest.jailhouse("cell", "list") == (0, guest.expected_list(), "")

    assert guest.jailhouse("cell", "load", name, "inmate.bin") == (0, "", "")
    guest.apply(lambda d: d.cell_load(name, [Image(guest.image, 0)]))
    assert guest.jailhouse("cell", "start", name) == (0, "", "")
    guest.apply(lambda d: d.cell_start(name))
    if state["arch"] == "oracle":
        assert guest.jailhouse("cell", "list") == (0, guest.expected_list(), "")
        assert guest.sysfs() == guest.tree
    else:
        # A real inmate calibrates its timers, then locks its cell.
        lab.cell_console.expect(r"Timer fired, jitter", timeout=120)
        locked = guest.expected_list().replace("running           3", "running/locked    3")
        deadline = time.monotonic() + 60
        while guest.jailhouse("cell", "list")[1] != locked and time.monotonic() < deadline:
            time.sleep(1)
        assert guest.jailhouse("cell", "list") == (0, locked, "")

    status, stats, err = guest.jailhouse("cell", "stats", name, "-n", "-i", "0")
    guest.refresh()
    assert (status, err) == (0, "")
    assert stats.splitlines()[:3] == [f"Statistics for {name} cell", "",
                                      "COUNTER                              SUM   PER SEC"]
    assert len(stats.splitlines()) == 3 + 12

    assert guest.jailhouse("cell", "shutdown", name) == (
        1, "", "JAILHOUSE_CELL_LOAD: Operation not permitted\n")
    assert guest.apply(lambda d: d.cell_shutdown(name)) == -1
    assert guest.jailhouse("cell", "shutdown", name) == (0, "", "")
    guest.apply(lambda d: d.cell_shutdown(name))
    assert guest.jailhouse("cell", "list") == (0, guest.expected_list(), "")

    assert guest.jailhouse("cell", "destroy", name) == (0, "", "")
    guest.apply(lambda d: d.cell_destroy(name))
    assert guest.jailhouse("cell", "list") == (0, guest.expected_list(), "")
    if state["arch"] == "oracle":
        assert guest.sysfs() == guest.tree

    assert guest.jailhouse("disable") == (0, "", "")
    guest.apply(lambda d: d.disable())
    lab.console.expect(r" Releasing CPU 3", timeout=60)
    assert guest.daemon_pid() is None
    gone = lab.run(f"test ! -d /proc/{pid} || grep -q '^State:.*Z' /proc/{pid}/status", timeout=60)
    assert gone.status == 0
    assert guest.jailhouse("cell", "list") == (0, "", "")
    assert guest.oracle is not None
    assert guest.sysfs() == guest.tree == sysfs_tree(guest.oracle)
    status, console, err = guest.jailhouse("console")
    assert (status, err) == (0, "")
    assert re.search(f'Closing cell "{name}"\n.*Shutting down hypervisor\n', console, re.S)
