"""The executor in the lab: the model (Driver + Hypervisor) on an ExecutorArch runs real
inmates as KVM VMs inside the root cell (nested SVM under TCG), driven by a Python script
sent to the guest. The host checks what a user would see: the cell's UART on the lab's
serial 1 (where the scripts also put the hypervisor console, ``console_port=0x2f8``), the
image in physical memory over QMP, and the root cell's CPUs.

The ``jailhouse`` command and its daemon come separately; these tests drive the model
directly, so they only need the guest's ``harness.hvmodel`` (``/opt/jhlab/lib``).

Every guest script writes its pid to :data:`PID_FILE` and ends in a ``finally`` that
disables the hypervisor and shuts the executor down; the ``guest`` fixture kills a
leftover script (by its pid) and undoes a leftover cpuset, so the shared lab is left as
found.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.hvmodel.config import CellConfig, SystemConfig, load_source
from harness.hvmodel.cpus import cpu_set_from
from harness.lab import Lab
from harness.protocol import CommandResult
from harness.recipes import CONFIGS, build_inmates, find_recipes, missing_build_tools

pytestmark = [pytest.mark.lab, pytest.mark.kvm, pytest.mark.slow]

CELLS = find_recipes().cells
PID_FILE = "/tmp/jhlab-executor-test.pid"
HOLDER_PID_FILE = "/tmp/jhlab-executor-test-holder.pid"
CGROUP_GROUP = "/sys/fs/cgroup/jailhouse-root"
HELLO_RAM = 0x3EE00000
#: the rogue cell is moved to CPU 3 and apic-timer's RAM so that hello can run beside it
ROGUE_CPU = 3
ROGUE_RAM = 0x3EF00000
#: seconds from the hypervisor's last enable line to the inmate's first line (issue 5)
FIRST_LINE_DEADLINE = 5.0
ENABLE_TIMEOUT = 120.0
SCRIPT_TIMEOUT = 400.0
#: real mode at 0: lidt [0x10] (limit 0); ud2 at 5 -> #GP -> #DF -> triple fault
TRIPLE_FAULT = bytes.fromhex("0f011e1000" "0f0b" "f4").ljust(0x10, b"\x90") + bytes(6)


# ---------------------------------------------------------------------------------------
# what runs in the guest
# ---------------------------------------------------------------------------------------

#: Prelude of every guest script; the blobs (configs, images) are prepended as
#: base64-decoded constants, the body defines ``body()``, the epilogue runs it.
GUEST_PRELUDE = r'''
import dataclasses, gc, json, logging, os, sys, threading, time
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from harness.hvmodel.arch.executor import ExecutorArch
from harness.hvmodel.driver import Driver, Image

with open(PID_FILE, "w") as pid_file:
    pid_file.write(str(os.getpid()))
R = {}


def allowed(pid="1"):
    """Cpus_allowed_list of a process (1: init, a root task that is not the hypervisor)."""
    with open(f"/proc/{pid}/status") as status:
        return status.read().split("Cpus_allowed_list:")[1].split()[0]


def group():
    """The root cell's cpuset: its CPUs and process count, or None."""
    if not os.path.isdir(CGROUP_GROUP):
        return None
    with open(CGROUP_GROUP + "/cpuset.cpus") as cpus, open(CGROUP_GROUP + "/cgroup.procs") as procs:
        return {"cpus": cpus.read().strip(), "procs": len(procs.read().split())}


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout} s")
        time.sleep(0.02)


def resources():
    gc.collect()
    with open("/proc/self/status") as status:
        text = status.read()
    with open("/proc/self/maps") as maps_file:
        maps = maps_file.read().splitlines()
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": int(text.split("Threads:")[1].split()[0]),
        "kvm_maps": sum(1 for line in maps if "kvm" in line),
        "mem_maps": sum(1 for line in maps if "/dev/mem" in line),
        "rss_kib": int(text.split("VmRSS:")[1].split()[0]),
    }


arch = ExecutorArch(console_port=0x2F8, reply_wait_limit=20.0)
drv = Driver(arch, arch.host_info())
arch.attach(lambda: drv.hv)
'''

GUEST_EPILOGUE = r'''
try:
    drv.enable(SYSTEM)
    body()
except BaseException as exc:
    R["error"] = f"{type(exc).__name__}: {exc}"
    raise
finally:
    try:
        if drv.hv is not None:
            R["console"] = list(drv.hv.console.lines)
            drv.disable()
    finally:
        arch.shutdown()
        R["end"] = {"root_allowed": allowed(), "group": group(), "status": arch.status()}
        print("JHLAB-RESULT " + json.dumps(R))
'''

HELLO_BODY = r'''
def body():
    t0 = time.monotonic()
    cell = drv.cell_create(HELLO_CELL)
    R["create_s"] = time.monotonic() - t0
    R["during"] = {"root_allowed": allowed(), "self_allowed": allowed(str(os.getpid())),
                   "group": group()}
    drv.cell_load(cell, [Image(HELLO_BIN)])
    R["load_s"] = time.monotonic() - t0
    drv.cell_start(cell)
    R["start_s"] = time.monotonic() - t0
    wait_for(lambda: arch.status()["cpus"][2]["exits"], 10, "exit of CPU 2")
    R["cpu"] = arch.status()["cpus"][2]
    drv.cell_shutdown(cell)  # hello approves once its PM timer lines are out
    R["shut_down"] = {"state": drv.hv.cell_by_id(cell).state_text,
                      "cpu": arch.status()["cpus"][2]["state"]}
    drv.cell_destroy(cell)
    R["after_destroy"] = {"root_allowed": allowed(), "group": group(),
                          "cpus": sorted(drv.hv.root.cpus)}
'''

ROGUE_BODY = r'''
def body():
    hello = drv.cell_create(HELLO_CELL)
    drv.cell_load(hello, [Image(HELLO_BIN)])
    drv.cell_start(hello)
    R["rounds"] = []
    for name, images in (
        ("mem", [Image(ROGUE_BIN), Image(b"mode=mem\0", 0x1000)]),
        ("pio", [Image(ROGUE_BIN), Image(b"mode=pio\0", 0x1000)]),
        ("triple-fault", [Image(TRIPLE_FAULT)]),
    ):
        rogue = drv.cell_create(ROGUE_CELL)
        drv.cell_load(rogue, images)
        drv.cell_start(rogue)
        wait_for(lambda: drv.hv.cpus[ROGUE_CPU].failed, 30, f"failure of CPU {ROGUE_CPU}")
        R["rounds"].append({
            "name": name,
            "cell_state": drv.hv.cell_by_id(rogue).state_text,
            "cpu": arch.status()["cpus"][ROGUE_CPU],
            "stats": list(drv.hv.cpus[ROGUE_CPU].stats),
            "hello": drv.hv.cell_by_id(hello).state_text,
        })
        drv.cell_destroy(rogue)
    R["hello_cpu"] = arch.status()["cpus"][2]
    drv.cell_shutdown(hello)  # approved: the neighbour of the rogues still runs its loop
    R["hello_after"] = drv.hv.cell_by_id(hello).state_text
    drv.cell_destroy(hello)
'''

LEAK_BODY = r'''
def body():
    passive = HELLO_PASSIVE_CELL
    samples, timings = {}, []
    for cycle in range(23):
        if cycle == 3:  # after warm-up: allocator arenas and thread stacks settle
            samples["before"] = resources()
        t0 = time.monotonic()
        cell = drv.cell_create(passive if cycle % 2 else HELLO_CELL)
        drv.cell_load(cell, [Image(HELLO_BIN)])
        drv.cell_start(cell)
        wait_for(lambda: arch.status()["cpus"][2]["exits"].get("IoExit", 0) > 50, 20, "exits")
        t1 = time.monotonic()
        if cycle % 2 == 0:
            drv.cell_shutdown(cell)  # message exchange and quiesce
        drv.cell_destroy(cell)  # passive ones: destroyed while busy with exits
        timings.append([round(t1 - t0, 3), round(time.monotonic() - t1, 3)])
    samples["after"] = resources()
    R["samples"] = samples
    R["timings"] = timings
    R["zombies"] = arch.status()["zombies"]
'''


def guest_script(body: str, blobs: dict[str, bytes]) -> str:
    """The whole script: constants, the prelude, ``body``, the epilogue."""
    lines = [
        "import base64",
        f"PID_FILE = {PID_FILE!r}",
        f"CGROUP_GROUP = {CGROUP_GROUP!r}",
        f"ROGUE_CPU = {ROGUE_CPU}",
    ]
    lines += [f"{name} = base64.b64decode({base64.b64encode(data).decode()!r})"
              for name, data in blobs.items()]  # fmt: skip
    return "\n".join(lines) + "\n" + GUEST_PRELUDE + body + GUEST_EPILOGUE


# ---------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inmates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hello.bin and rogue.bin (with their maps), built once."""
    missing = missing_build_tools()
    if missing:
        pytest.skip(f"missing build tools: {', '.join(missing)}")
    out = tmp_path_factory.mktemp("inmates")
    build_inmates(out, "hello", "rogue")
    return out


@pytest.fixture(scope="module")
def blobs(inmates: Path) -> dict[str, bytes]:
    """Configs and images the guest scripts get as constants."""
    system = load_source(CONFIGS / "qemu-x86.toml")
    hello = load_source(CELLS / "hello.toml")
    rogue = load_source(CELLS / "rogue.toml")
    assert isinstance(system, SystemConfig)
    assert isinstance(hello, CellConfig) and isinstance(rogue, CellConfig)
    rogue = dataclasses.replace(
        rogue,
        cpu_set=cpu_set_from({ROGUE_CPU}),
        memory_regions=tuple(
            dataclasses.replace(mem, phys_start=ROGUE_RAM) if mem.phys_start == HELLO_RAM else mem
            for mem in rogue.memory_regions
        ),
    )
    return {
        "SYSTEM": system.to_bytes(),
        "HELLO_CELL": hello.to_bytes(),
        "HELLO_PASSIVE_CELL": dataclasses.replace(hello, flags=hello.flags | 1).to_bytes(),
        "ROGUE_CELL": rogue.to_bytes(),
        "HELLO_BIN": (inmates / "hello.bin").read_bytes(),
        "ROGUE_BIN": (inmates / "rogue.bin").read_bytes(),
        "TRIPLE_FAULT": TRIPLE_FAULT,
    }


class GuestRun:
    """A guest script running over ssh in a thread, while the host watches serial 1."""

    def __init__(self, lab: Lab, script: str) -> None:
        self._lab = lab
        self._script = script
        self._result: CommandResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="guest-script", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._lab.run("cd /opt/jhlab/lib && python3 -", stdin=self._script,
                                         timeout=SCRIPT_TIMEOUT)  # fmt: skip
        except BaseException as exc:  # handed to the test thread by result()
            self._error = exc

    def result(self, timeout: float = SCRIPT_TIMEOUT) -> dict[str, Any]:
        """The script's JSON result; fails with its output when it failed."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"guest script still running after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        found = re.search(r"^JHLAB-RESULT (.*)$", self._result.stdout, re.MULTILINE)
        if self._result.status != 0 or found is None:
            raise AssertionError(
                f"guest script failed ({self._result.status}):\n{self._result.stdout[-4000:]}\n"
                f"{self._result.stderr[-4000:]}"
            )
        result: dict[str, Any] = json.loads(found.group(1))
        return result


#: A process holding one idle KVM VM while this module runs (see :func:`kvm_holder`).
KVM_HOLDER = (
    "import os, sys, time; sys.path.insert(0, '/opt/jhlab/lib'); "
    "from harness.hvmodel.arch import kvm; k = kvm.Kvm(); vm = kvm.Vm(k); "
    "vm.enable_cap(kvm.Cap.SPLIT_IRQCHIP, 24); vm.create_vcpu(0); "
    f"open('{HOLDER_PID_FILE}', 'w').write(str(os.getpid())); time.sleep(3600)"
)


@pytest.fixture(scope="module")
def kvm_holder(lab: Lab) -> Iterator[None]:
    """Keep one idle KVM VM alive in the guest while the scripts come and go.

    Each script is a whole hypervisor lifetime: its executor's keeper VM is the guest's
    only VM, so every script start and end would take KVM from zero VMs to one and back
    (virtualization enabled and disabled on every CPU, KVM's static keys flipped). Under
    QEMU's TCG that transition, right after nested guests ran, wedged the lab's kernel
    about once in ten (RCU stalls, soft lockups, a CPU looping on a text-patching int3);
    with a VM held across the scripts, 25 lifetimes in a row ran clean. The holder is
    stopped (by its pid) when the module ends.
    """
    lab.run(f"rm -f {HOLDER_PID_FILE}; setsid nohup python3 -c \"{KVM_HOLDER}\" "
            "> /dev/null 2>&1 < /dev/null &", timeout=30, check=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while lab.run(f"test -s {HOLDER_PID_FILE}", timeout=30).status != 0:
        if time.monotonic() > deadline:
            pytest.fail("the KVM holder did not start within 60 s")
        time.sleep(0.5)
    try:
        yield
    finally:
        lab.run(f"kill $(cat {HOLDER_PID_FILE}) && rm -f {HOLDER_PID_FILE}", timeout=30)


@pytest.fixture
def guest(lab: Lab, kvm_holder: None) -> Iterator[Lab]:
    """The lab with a fresh serial 1 view; afterwards no script, no cpuset left over."""
    lab.cell_console.discard()
    yield lab
    leftover = lab.run(
        f"pid=$(cat {PID_FILE} 2>/dev/null) && kill -0 $pid 2>/dev/null && "
        f"kill -9 $pid && echo killed $pid; rm -f {PID_FILE}; "
        f"if [ -d {CGROUP_GROUP} ]; then for p in $(cat {CGROUP_GROUP}/cgroup.procs); do "
        f"echo $p > /sys/fs/cgroup/cgroup.procs; done; rmdir {CGROUP_GROUP}; echo cpuset; fi",
        timeout=60,
    ).stdout.strip()
    assert not leftover, f"the guest was not left clean: {leftover}"


def test_hello_runs_on_its_cpu_and_prints_on_serial_1(guest: Lab, blobs: dict[str, bytes],
                                                       inmates: Path) -> None:  # fmt: skip
    """enable, create + load + start hello: its first line on the host's serial 1 within
    5 s of the hypervisor's last enable line; the image at phys_start (QMP); CPU 2 pinned
    and out of the root's scheduling while the cell exists, back after destroy."""
    console = guest.cell_console
    run = GuestRun(guest, guest_script(HELLO_BODY, blobs))
    console.expect("Activating hypervisor", timeout=ENABLE_TIMEOUT)
    enabled = time.monotonic()
    console.expect('Hello from jhlab inmate "hello"!', timeout=FIRST_LINE_DEADLINE,
                   failures=["FATAL: "])  # fmt: skip
    first_line = time.monotonic() - enabled
    console.expect(r"comm region: JHCOMM rev 2, state 0, 1 CPU\(s\), PM timer 0x608", timeout=10)
    console.expect("hello: PASSED", timeout=60, failures=["FATAL: ", "hello: FAILED"])
    console.expect("Shutdown request approved", timeout=60)
    console.expect('Closing cell "hello"', timeout=60)
    result = run.result()
    print(f"first line {first_line:.2f} s after enable; guest: create {result['create_s']:.2f} s, "
          f"+load {result['load_s']:.2f} s, +start {result['start_s']:.2f} s")  # fmt: skip
    assert first_line < FIRST_LINE_DEADLINE
    assert result["during"]["root_allowed"] == "0-1,3"
    assert result["during"]["self_allowed"] == "0-3"  # the hypervisor keeps all CPUs
    assert result["during"]["group"]["cpus"] == "0-1,3"
    assert result["cpu"]["affinity"] == [2]
    assert result["cpu"]["state"] == "running"
    assert result["shut_down"] == {"state": "shut down", "cpu": "parked"}
    assert result["after_destroy"]["root_allowed"] == "0-3"
    assert result["after_destroy"]["group"]["cpus"] == "0-3"  # kept, with every CPU, until disable
    assert result["after_destroy"]["cpus"] == [0, 1, 2, 3]
    assert result["end"]["group"] is None and result["end"]["root_allowed"] == "0-3"
    assert result["end"]["status"]["state"] == "shut down"
    for line in ('Created cell "hello"', 'Started cell "hello"', 'Closing cell "hello"'):
        assert line in result["console"]
    # The image is where the cell config says (up to .data, which the inmate writes).
    data_start = int(re.search(r"^\.data\s+0x([0-9a-f]+)", (inmates / "hello.map").read_text(),
                               re.MULTILINE)[1], 16)  # type: ignore[index]  # fmt: skip
    image = blobs["HELLO_BIN"][:data_start]
    assert guest.qmp.read_phys(HELLO_RAM, len(image)) == image


def test_rogue_cells_fail_alone(guest: Lab, blobs: dict[str, bytes]) -> None:
    """A rogue on CPU 3 writes outside its memory, reads a port it does not own, triple
    faults: each time the FATAL line (the triple fault's with the faulting RIP), a
    parked and failed CPU, a FAILED cell; hello on CPU 2 and the root keep working."""
    console = guest.cell_console
    run = GuestRun(guest, guest_script(ROGUE_BODY, blobs))
    console.expect("Activating hypervisor", timeout=ENABLE_TIMEOUT)
    # The FATAL lines are the point here: no failure patterns.
    expected = [
        ("rogue: writing 0xdeadbeef to 0x1f0000", 60),
        (r"FATAL: Invalid MMIO/RAM write, addr: 0x00000000001f0000 size: 4", 10),
        (r'Parking CPU 3 \(Cell: "rogue"\)', 10),
        ("rogue: reading port 0x3f8", 60),
        ("FATAL: Invalid PIO read, port: 3f8 size: 1", 10),
        (r'Parking CPU 3 \(Cell: "rogue"\)', 10),
        (r"FATAL: Unexpected #VMEXIT, exitcode 7f, exitinfo1 0x0000000000000000 "
         r"exitinfo2 0x0000000000000000", 60),
        # the state at the failing exit (KVM's trace), not the vCPU after KVM's reset
        (r"RIP: 0x0000000000000005 \(the other registers are lost", 10),
        (r'Parking CPU 3 \(Cell: "rogue"\)', 10),
        ("Shutdown request approved", 60),
    ]  # fmt: skip
    for pattern, timeout in expected:
        console.expect(pattern, timeout=timeout, failures=[])
    result = run.result()
    rounds = {entry["name"]: entry for entry in result["rounds"]}
    for name, stat in (("mem", 1), ("pio", 4), ("triple-fault", 0)):
        entry = rounds[name]
        assert entry["cell_state"] == "failed", entry
        assert entry["cpu"]["state"] == "parked", entry
        assert entry["hello"] == "running", entry
        assert entry["stats"][0] >= 1 and entry["stats"][stat] >= 1, entry
    assert result["hello_cpu"]["state"] == "running"
    assert result["hello_after"] == "shut down"
    assert guest.run("echo alive", check=True).stdout.strip() == "alive"


def test_twenty_cycles_leave_nothing_behind(guest: Lab, blobs: dict[str, bytes]) -> None:
    """create/load/start/(shutdown)/destroy 20 times, half of them destroyed while the
    inmate is busy with exits: no file descriptor, thread or mapping more, RSS flat,
    every CPU back."""
    run = GuestRun(guest, guest_script(LEAK_BODY, blobs))
    result = run.result()
    before, after = result["samples"]["before"], result["samples"]["after"]
    print(f"before {before}\nafter  {after}\ncycles (start to 50 exits, teardown) "
          f"{result['timings']}")  # fmt: skip
    for key in ("fds", "threads", "kvm_maps", "mem_maps"):
        assert after[key] == before[key], (key, before, after)
    assert after["rss_kib"] - before["rss_kib"] < 4096
    assert result["zombies"] == 0
    assert result["end"]["group"] is None and result["end"]["root_allowed"] == "0-3"
