"""The checked driver: every ``jailhouse`` command in the lab, checked against the oracle.

:class:`CheckedJailhouse` runs the real ``jailhouse`` command in the lab's root cell (the
guest's driver daemon and model, on the KVM executor or on the bookkeeping oracle Arch),
applies the same operation to a host-side oracle (:class:`Oracle`: a
:class:`~harness.hvmodel.driver.Driver` on an :class:`~harness.hvmodel.arch.oracle.OracleArch`
with the :class:`~harness.hvmodel.driver.HostInfo` the guest's daemon reports), and then
compares what the guests show with what the oracle predicts::

    jh = CheckedJailhouse(lab, arch="executor", responders={"apic-timer": "deny-first-shutdown"})
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(INMATES / "cells" / "apic-timer.toml")
    jh.cell_load("apic-timer", build / "apic-timer.bin")
    jh.cell_start("apic-timer", effects=[Locks("apic-timer")])
    jh.expect_inmate(r"Timer fired, jitter")
    jh.cell_shutdown("apic-timer", expect="EPERM")     # apic-timer refuses the first one
    ...

What is compared after every step (one round trip to the guest gathers it all):

* the command's **exit status, stdout and stderr** (``JAILHOUSE_CELL_CREATE: File exists``)
  with what the C tool prints for the ioctl result the oracle's driver returns;
* **``jailhouse cell list``** (run in the guest, which also refreshes the sysfs files);
* the **sysfs tree**: every file under ``/sys/devices/jailhouse`` of the guest's driver
  (``$JAILHOUSE_RUN_DIR/sys/devices/jailhouse``), except the figures that depend on real
  time or timing (see :data:`EXECUTOR_EXCLUSIONS`; none with the oracle Arch in the guest);
* the **root's CPU scheduling**: ``Cpus_allowed_list`` of a process started in the root
  cell after the step, and ``cpuset.cpus`` of the executor's cgroup when it exists: with
  the executor, no CPU of a non-root cell may be there; with the oracle Arch nothing
  changes;
* **PCI driver bindings** (``/sys/bus/pci/devices/*/driver``): with the executor, devices
  of non-root cells are bound to ``vfio-pci`` (or unbound), devices back in the root are
  not bound to ``vfio-pci``; with the oracle Arch every binding stays as it was;
* **loaded bytes** (executor only: the oracle Arch keeps cell memory in the daemon's
  process): after ``cell load``, QMP reads physical memory at each image's address in its
  region (``phys_start`` + offset) and it must hold what the oracle wrote there (the
  images and ``-s`` strings, later ones over earlier ones);
* the **hypervisor console**: every line the oracle printed during the step must appear,
  in order, in the guest's console (serial 0, the system config's debug UART). That UART
  is also the root kernel's console, whose messages would interleave with the
  hypervisor's characters: the kernel's console log level is lowered to 1 while the
  checked driver runs (restored at cleanup), and whole ``[ time]`` lines are ignored.

A mismatch raises :class:`ValidationError`, whose text has one unified diff per thing
that differed, ``--- oracle: WHAT`` against ``+++ guest: WHAT``.

Inmates do things on their own (lock their cell, commit violations). A step declares
those as *effects* (:class:`Locks`, :class:`SetsState`, :class:`Violation`): they are
applied to the oracle right after the operation, and the guest is polled until it agrees
(bounded by ``settle_timeout``). :meth:`CheckedJailhouse.settle` does the same between
steps.

A step costs one round trip to the guest (a few seconds under nested TCG, mostly
Python start-up there). Loops of many steps go into a :class:`Batch`: one round trip, the
tool run in-process in the guest script, every result still compared.

Lifecycle: construct (one look at the guest: no daemon may run; the PCI bindings and CPUs
seen now are the baseline) → steps → :meth:`CheckedJailhouse.cleanup` (destroy what is
left, disable, remove the uploaded files, restore the console level; reports whether the
lab is clean).
"""

from __future__ import annotations

import dataclasses
import difflib
import errno as errno_mod
import fnmatch
import hashlib
import json
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from harness.errors import JhlabError
from harness.hvmodel.abi import CellState, CommOffset, comm_write_u32
from harness.hvmodel.arch.oracle import OracleArch, responder_for
from harness.hvmodel.config import load_source
from harness.hvmodel.cpus import format_cpu_list, parse_cpu_list
from harness.hvmodel.daemon import host_from_wire
from harness.hvmodel.driver import CellRef, Driver, HostInfo, Image
from harness.hvmodel.errors import Errno, HvError
from harness.hvmodel.sysfs import cell_list, sysfs_tree
from harness.ssh import CommandResult

__all__ = [
    "DEFAULT_RESPONDERS",
    "EXECUTOR_EXCLUSIONS",
    "Batch",
    "CheckedJailhouse",
    "Difference",
    "Effect",
    "Exclusion",
    "ExpectationError",
    "GuestView",
    "Locks",
    "Oracle",
    "SetsState",
    "StepResult",
    "ValidationError",
    "Violation",
]

LOG = logging.getLogger(__name__)

#: where the guest tools live in the lab (``bin/jailhouse``, ``lib/harness/hvmodel``)
GUEST_TOOLS: Final = "/opt/jhlab"
#: the guest driver's run directory
GUEST_RUN_DIR: Final = "/run/jailhouse"
#: where configs and images are uploaded
GUEST_FILES: Final = "/tmp/jhlab-checked"
#: the executor's cgroup for the root cell's tasks (``arch/cpuset.py``)
ROOT_CPUSET: Final = "/sys/fs/cgroup/jailhouse-root"
#: the driver that holds devices of cells with the executor (Jailhouse: jailhouse-pci-stub)
CELL_PCI_DRIVERS: Final = frozenset({"vfio-pci", "jailhouse-pci-stub"})
#: how apic-demo-like inmates answer (the oracle plays them; the guest's oracle Arch too)
DEFAULT_RESPONDERS: Final[Mapping[str, str]] = {
    "apic-demo": "deny-first-shutdown",
    "apic-timer": "deny-first-shutdown",
}
#: seconds one guest command may take (enable under nested TCG is the slowest)
STEP_TIMEOUT: Final = 300.0
#: seconds the oracle's console lines may take to reach the serial port
CONSOLE_TIMEOUT: Final = 60.0
#: seconds the guest may take to show an inmate's declared effects
SETTLE_TIMEOUT: Final = 120.0
#: inmate output that ends :meth:`CheckedJailhouse.expect_inmate` as a failure
INMATE_FAILURES: Final = (r"FATAL:[^\r\n]*", r"\bFAILED\b[^\r\n]*", r"EXCEPTION on CPU[^\r\n]*")
#: the perror() names of the ioctls
IOCTL: Final[Mapping[str, str]] = {
    "enable": "JAILHOUSE_ENABLE",
    "disable": "JAILHOUSE_DISABLE",
    "create": "JAILHOUSE_CELL_CREATE",
    "load": "JAILHOUSE_CELL_LOAD",
    "shutdown": "JAILHOUSE_CELL_LOAD",
    "start": "JAILHOUSE_CELL_START",
    "destroy": "JAILHOUSE_CELL_DESTROY",
}
_KERNEL_LINE: Final = re.compile(r"\[\s*\d+\.\d+\] [^\r\n]*\r?\n")


# =======================================================================================
# results and errors
# =======================================================================================


@dataclasses.dataclass(frozen=True)
class Difference:
    """One thing the guest shows differently from the oracle.

    :param what: what was compared (``exit status``, ``sysfs tree``, ``cell list`` ...)
    :param expected: the oracle's text
    :param actual: the guest's text
    :param note: one line of explanation (optional)
    """

    what: str
    expected: str
    actual: str
    note: str = ""

    def diff(self) -> str:
        """A unified diff, oracle against guest."""
        old = self.expected.splitlines(keepends=True) or ["(nothing)\n"]
        new = self.actual.splitlines(keepends=True) or ["(nothing)\n"]
        old = [line if line.endswith("\n") else line + "\n" for line in old]
        new = [line if line.endswith("\n") else line + "\n" for line in new]
        text = "".join(difflib.unified_diff(old, new, f"oracle: {self.what}", f"guest: {self.what}", n=2))
        return (f"# {self.note}\n" if self.note else "") + text


class ValidationError(JhlabError):
    """What the guests show differs from what the oracle predicts.

    :param step: the step (``cell create apic-timer.cell``)
    :param differences: every difference found
    """

    def __init__(self, step: str, differences: Sequence[Difference]) -> None:
        self.step = step
        self.differences = tuple(differences)
        super().__init__(str(self))

    def __str__(self) -> str:
        names = ", ".join(d.what for d in self.differences)
        body = "\n".join(d.diff() for d in self.differences)
        return f"{self.step}: the guest differs from the oracle in {names}\n{body}"


class ExpectationError(JhlabError):
    """Guest and oracle agree, but not with what the test meant to provoke.

    :param step: the step
    :param expected: what the test expected (``EEXIST``, ``success``)
    :param got: what happened
    """

    def __init__(self, step: str, expected: str, got: str) -> None:
        self.step = step
        self.expected = expected
        self.got = got
        super().__init__(f"{step}: expected {expected}, guest and oracle both gave {got}")


def _errno_name(code: int) -> str:
    return "success" if code == 0 else errno_mod.errorcode.get(abs(code), f"errno {abs(code)}")


@dataclasses.dataclass(frozen=True)
class GuestView:
    """Everything one look at the root cell gathers (see the module docstring)."""

    #: ``jailhouse cell list``: stdout (stderr appended when not empty)
    cell_list: str
    #: the sysfs tree, ``{relative path: text}``
    sysfs: dict[str, str]
    #: ``Cpus_allowed_list`` of a fresh root process
    cpus_allowed: str
    #: ``cpuset.cpus`` of the executor's root group, None when there is none
    cpuset: str | None
    #: PCI functions and their drivers (None: unbound)
    pci: dict[str, str | None]
    #: the daemon's ``state`` reply, None when no daemon runs
    daemon: dict[str, Any] | None
    #: the daemon's process figures (``fds``, ``threads``, ``rss_kib``), when asked for
    resources: dict[str, int] | None

    @classmethod
    def from_wire(cls, value: Mapping[str, Any]) -> GuestView:
        """Parse the guest script's JSON."""
        return cls(
            cell_list=str(value["cell_list"]),
            sysfs={str(k): str(v) for k, v in value["sysfs"].items()},
            cpus_allowed=str(value["cpus_allowed"]),
            cpuset=value.get("cpuset"),
            pci={str(k): v for k, v in value["pci"].items()},
            daemon=value.get("daemon"),
            resources=value.get("resources"),
        )


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One checked step.

    :param step: its description
    :param status: the command's exit status (guest and oracle agree)
    :param stdout: its output
    :param stderr: its error output
    :param code: the ioctl's result the oracle computed (0 or -errno; 0 without ioctl)
    :param view: what the guest showed afterwards
    """

    step: str
    status: int
    stdout: str
    stderr: str
    code: int
    view: GuestView

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def errno(self) -> str:
        """``success`` or the errno name (``EEXIST``)."""
        return _errno_name(self.code)


# =======================================================================================
# effects: what inmates do on their own
# =======================================================================================


class Effect(Protocol):
    """Something a cell does by itself; :meth:`apply` makes the oracle do the same."""

    def apply(self, oracle: Oracle) -> None:
        """Change the oracle's state accordingly."""


@dataclasses.dataclass(frozen=True)
class SetsState:
    """The inmate writes its comm region's ``cell_state`` (e.g. RUNNING_LOCKED).

    :param cell: the cell's name
    :param state: the new state
    """

    cell: str
    state: CellState

    def apply(self, oracle: Oracle) -> None:
        cell = oracle.hv_cell(self.cell)
        comm_write_u32(cell.comm_page, CommOffset.CELL_STATE, int(self.state))


def Locks(cell: str) -> SetsState:
    """apic-demo's effect: the cell locks itself (RUNNING_LOCKED) once calibrated."""
    return SetsState(cell, CellState.RUNNING_LOCKED)


@dataclasses.dataclass(frozen=True)
class Violation:
    """The inmate commits an access the hypervisor must stop: the oracle takes the same
    exit on the cell's CPU (``handle_mmio`` / ``handle_pio``), so it prints the same
    ``FATAL`` line, parks the CPU and fails the cell.

    :param cell: the cell's name
    :param kind: ``mmio`` or ``pio``
    :param address: guest-physical address (mmio) or port (pio)
    :param size: access size in bytes
    :param write: a write (else a read)
    :param value: the value written
    :param cpu: the CPU that commits it (default: the cell's first)
    """

    cell: str
    kind: str
    address: int
    size: int = 4
    write: bool = True
    value: int = 0
    cpu: int | None = None

    def apply(self, oracle: Oracle) -> None:
        hv = oracle.hv
        cpu = self.cpu if self.cpu is not None else min(oracle.hv_cell(self.cell).cpus)
        if self.kind == "mmio":
            hv.handle_mmio(cpu, self.address, self.size, self.write, self.value)
        elif self.kind == "pio":
            hv.handle_pio(cpu, self.address, self.size, self.write, self.value)
        else:
            raise ValueError(f"Violation kind {self.kind!r}: expected mmio or pio")


# =======================================================================================
# exclusions
# =======================================================================================


@dataclasses.dataclass(frozen=True)
class Exclusion:
    """A sysfs file (``fnmatch`` pattern over its relative path) that is not compared.

    :param pattern: e.g. ``cells/0/statistics/vmexits_hypercall``
    :param reason: why its value depends on real time or timing
    """

    pattern: str
    reason: str

    def matches(self, path: str) -> bool:
        return fnmatch.fnmatchcase(path, self.pattern)


_PERIODIC = ("the executor's daemon refreshes the sysfs files every second while a cell "
             "runs, and every refresh costs the root CPU hypercalls: the count depends on "
             "how long the steps took")
_INMATE = ("counts of the exits a real inmate took (PM-timer polls, timer interrupts, "
           "how far it got when the file was read): real time")

#: sysfs files not compared when the guest's daemon runs the KVM executor
EXECUTOR_EXCLUSIONS: Final = (
    Exclusion("cells/0/statistics/vmexits_total", _PERIODIC),
    Exclusion("cells/0/statistics/vmexits_hypercall", _PERIODIC),
    Exclusion("cells/0/statistics/cpu*/vmexits_total", _PERIODIC),
    Exclusion("cells/0/statistics/cpu*/vmexits_hypercall", _PERIODIC),
    Exclusion("cells/[1-9]*/statistics/*", _INMATE),
    Exclusion("console", "the 2048-byte ring also holds executor text (register dumps after "
              "fatal exits), so its window differs; the oracle's lines are checked on the "
              "serial console instead"),
)


# =======================================================================================
# the oracle
# =======================================================================================


class _ConsoleOracle(OracleArch):
    """An OracleArch that keeps the whole hypervisor console text."""

    def __init__(self) -> None:
        super().__init__(record=False)
        self.console_text: list[str] = []

    def console_write(self, text: str) -> None:
        self.console_text.append(text)


class Oracle:
    """The host-side prediction: what the guest's driver daemon must do and show.

    It follows the daemon's life: a new :class:`~harness.hvmodel.driver.Driver` (on a
    fresh :class:`~harness.hvmodel.arch.oracle.OracleArch`) for every ``enable`` that
    starts a daemon, dropped when the daemon ends (successful disable, failed enable).
    Every operation the daemon serves is followed by a sysfs refresh, as the daemon does
    (reading the tree costs the root CPU hypercalls, which its statistics count).

    :param responders: how cells answer messages (cell name -> daemon responder policy)
    :param test_device: the hypervisor has ``CONFIG_TEST_DEVICE`` (as the guest's daemon)
    """

    def __init__(self, responders: Mapping[str, str] | None = None, *, test_device: bool = False) -> None:
        self.responders = dict(responders or {})
        self.test_device = test_device
        self.driver: Driver | None = None
        self.arch: _ConsoleOracle | None = None
        #: the guest's run directory has a sysfs tree ("the module is loaded")
        self.module_loaded = False
        self.host = HostInfo()
        #: console text of every hypervisor this oracle ran
        self._console_done = ""
        self.tree: dict[str, str] = {}

    # -- state --------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.driver is not None and self.driver.enabled

    @property
    def hv(self) -> Any:
        """The running hypervisor model.

        :raise JhlabError: when disabled
        """
        if self.driver is None or self.driver.hv is None:
            raise JhlabError("the oracle's hypervisor is not enabled")
        return self.driver.hv

    def hv_cell(self, name: str) -> Any:
        """The hypervisor's cell ``name``.

        :raise JhlabError: when there is none
        """
        cell = self.hv.cell_by_name(name)
        if cell is None:
            raise JhlabError(f"the oracle has no cell {name!r}")
        return cell

    @property
    def console(self) -> str:
        """Everything the oracle's hypervisors printed."""
        if self.arch is None:
            return self._console_done
        return self._console_done + "".join(self.arch.console_text)

    def _start(self, host: HostInfo) -> Driver:
        arch = _ConsoleOracle()
        for name, policy in self.responders.items():
            arch.responders[name] = responder_for(policy)
        self.arch = arch
        self.host = host
        self.driver = Driver(arch, host, test_device=self.test_device)
        self.module_loaded = True
        return self.driver

    def _end(self) -> None:
        if self.arch is not None:
            self._console_done += "".join(self.arch.console_text)
        self.arch = None
        self.driver = None

    def refresh(self) -> dict[str, str]:
        """One reading of the sysfs tree (a daemon refresh, or the disabled tree)."""
        if self.driver is None:
            self.tree = {"enabled": "0\n", "mem_pool_size": "0\n", "mem_pool_used": "0\n",
                         "remap_pool_size": "0\n", "remap_pool_used": "0\n", "console": ""}
            if not self.module_loaded:
                self.tree = {}
        else:
            self.tree = sysfs_tree(self.driver)
        return self.tree

    def cell_list(self) -> str:
        """``jailhouse cell list`` (a refresh, then the table)."""
        tree = self.refresh()
        if self.driver is None:
            return ""
        return cell_list(self.driver, tree)

    # -- commands -----------------------------------------------------------------------

    def run(self, kind: str, operation: Callable[[Driver], object], host: HostInfo | None = None
            ) -> tuple[int, int | None]:
        """Apply one command the way the guest's ``jailhouse`` tool and daemon do.

        :param kind: ``enable``, ``disable``, ``create``, ``load``, ``shutdown``, ``start``,
            ``destroy``
        :param operation: the Driver call
        :param host: the guest's machine, for an ``enable`` that starts a daemon
        :return: ``(ioctl result, None)`` or ``(-ENOENT, 0)``-style pairs: the second item
            is not None when the command never reached an ioctl (module not loaded) and
            then is the errno ``opening /dev/jailhouse`` failed with
        """
        if kind != "enable" and not self.module_loaded:
            return -errno_mod.ENOENT, errno_mod.ENOENT
        started = False
        if kind == "enable" and self.driver is None:
            self._start(host or self.host)
            started = True
        driver = self.driver
        if driver is None:
            return -errno_mod.EINVAL, None  # the module loaded, no daemon: every ioctl EINVAL
        try:
            if kind in ("load", "shutdown", "start", "destroy") and not driver.enabled:
                raise HvError(Errno.EINVAL, "hypervisor not enabled")
            operation(driver)
            result = 0
        except HvError as err:
            result = err.code
        except Exception:  # the daemon answers EIO for a model bug
            LOG.exception("the oracle's model failed on %s", kind)
            result = -errno_mod.EIO
        self.refresh()  # the daemon refreshes sysfs after every operation it serves
        if (kind == "disable" and result == 0) or (started and not driver.enabled):
            self._end()
        return result, None


# =======================================================================================
# what runs in the guest
# =======================================================================================

#: Runs ``jailhouse`` commands in the root cell and looks at it (after each command or
#: once at the end); prints one JSON line. Standard library plus the guest's
#: harness.hvmodel; ``ARGS`` is prepended. A command runs as its own process (the real
#: ``jailhouse`` on PATH); while it starts, this script imports the tool for ``cell list``.
#: With ``in_process`` (batches) every command calls the same ``tool.main`` here instead.
GUEST_SCRIPT: Final = r"""
import contextlib, io, json, os, socket, subprocess, sys, time

RUN = ARGS["run_dir"]
os.environ["JAILHOUSE_RUN_DIR"] = RUN
tool = None


def load_tool():
    global tool
    if tool is None:
        from harness.hvmodel import tool as module
        tool = module
    return tool


def in_process(argv):
    saved = dict(os.environ)
    os.environ.update(ARGS["env"])
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = load_tool().main(["jailhouse", *argv])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return status, out.getvalue(), err.getvalue()


def as_process(argv):
    env = dict(os.environ)
    env.update(ARGS["env"])
    proc = subprocess.Popen(["jailhouse", *argv], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if ARGS["looks"]:
        load_tool()  # meanwhile
    try:
        out, err = proc.communicate(timeout=ARGS["timeout"])
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return -1, out.decode("utf-8", "replace"), "timed out after %s s" % ARGS["timeout"]
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def daemon_state():
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(os.path.join(RUN, "driver.sock"))
            sock.sendall(b'{"op": "state"}\n')
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
        return json.loads(data)
    except (OSError, ValueError):
        return None


def look():
    listing, problems = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(listing), contextlib.redirect_stderr(problems):
        status = load_tool().main(["jailhouse", "cell", "list"])
    text = listing.getvalue()
    if status or problems.getvalue():
        text += "(exit %d) %s" % (status, problems.getvalue())
    root = os.path.join(RUN, "sys", "devices", "jailhouse")
    tree = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name.startswith("."):
                continue  # the daemon's temporary files (it replaces files by rename)
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as handle:
                    tree[os.path.relpath(path, root)] = handle.read().decode("latin-1")
            except FileNotFoundError:
                continue  # a cell went away meanwhile
    with open("/proc/self/status") as handle:
        allowed = handle.read().split("Cpus_allowed_list:")[1].split()[0]
    cpuset = None
    with contextlib.suppress(OSError):
        with open(os.path.join(ARGS["cpuset"], "cpuset.cpus")) as handle:
            cpuset = handle.read().strip()
    pci = {}
    with contextlib.suppress(OSError):
        for address in sorted(os.listdir(ARGS["pci"])):
            link = os.path.join(ARGS["pci"], address, "driver")
            pci[address] = os.path.basename(os.readlink(link)) if os.path.islink(link) else None
    daemon = daemon_state()
    resources = None
    if ARGS["resources"] and daemon is not None:
        # The least of a few readings: the thread and socket of a connection that is just
        # ending (this script's own state request) are not a leak.
        pid = daemon["pid"]
        readings = []
        for attempt in range(5):
            time.sleep(0.1 * attempt)
            with open("/proc/%d/status" % pid) as handle:
                proc = handle.read()
            readings.append((len(os.listdir("/proc/%d/fd" % pid)),
                             int(proc.split("Threads:")[1].split()[0]),
                             int(proc.split("VmRSS:")[1].split()[0])))
        resources = {
            "fds": min(r[0] for r in readings),
            "threads": min(r[1] for r in readings),
            "rss_kib": readings[-1][2],
        }
    return {"cell_list": text, "sysfs": tree, "cpus_allowed": allowed, "cpuset": cpuset,
            "pci": pci, "daemon": daemon, "resources": resources}


out = {"commands": [], "view": None, "printk": None}
if ARGS["printk"] is not None:
    with open("/proc/sys/kernel/printk") as handle:
        out["printk"] = handle.read().split()[0]
    with open("/proc/sys/kernel/printk", "w") as handle:  # at offset 0 (sysctl_writes_strict)
        handle.write(ARGS["printk"])
for item in ARGS["commands"]:
    started = time.monotonic()
    status, stdout, stderr = (in_process if ARGS["in_process"] else as_process)(item["argv"])
    done = {"argv": item["argv"], "status": status, "stdout": stdout, "stderr": stderr,
            "seconds": time.monotonic() - started}
    if item["look"]:
        done["view"] = look()
    out["commands"].append(done)
if ARGS["final_look"]:
    out["view"] = look()
print(json.dumps(out))
"""


class LabLike(Protocol):
    """What the checked driver needs of a :class:`~harness.lab.Lab`: ``run`` (root shell),
    ``ssh.put``, ``console``/``cell_console`` (:class:`~harness.console.SerialConsole`, with
    a ``transcript`` file), ``qmp.read_phys``."""

    def run(self, command: str, *, timeout: float = ..., check: bool = ...,
            stdin: str | None = ...) -> CommandResult: ...

    @property
    def ssh(self) -> Any: ...

    @property
    def console(self) -> Any: ...

    @property
    def cell_console(self) -> Any: ...

    @property
    def qmp(self) -> Any: ...


# =======================================================================================
# the checked driver
# =======================================================================================

ConfigSource = bytes | str | os.PathLike[str] | Any
ImageSource = bytes | str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One ``jailhouse`` command and what it does to the oracle's driver."""

    step: str
    argv: list[str]
    kind: str
    operation: Callable[[Driver], object]
    expect: int | str | None
    images: tuple[Image, ...] = ()
    cell: CellRef | None = None


class Batch:
    """Steps collected and run in one guest script: for loops of many steps (stress),
    where one round trip per step would cost more than the steps.

    Differences from single steps: the commands run inside the guest script through the
    same ``harness.hvmodel.tool.main`` the ``jailhouse`` script calls (one interpreter
    instead of one per command; the daemon and its socket are the real ones); the guest
    is looked at after every command (``observe_each``, the default) or once at the end;
    loaded bytes are not read back (the cells run on meanwhile); effects are not
    supported; the console lines of all steps are checked at the end. The first step that
    differs raises :class:`ValidationError` naming its place in the batch.

    ::

        with jh.batch(observe_each=False) as batch:
            for _ in range(20):
                batch.cell_create(config)
                batch.cell_destroy("hello")
                batch.look()                 # compare the whole view here
        results = batch.results

    :param jailhouse: the checked driver
    :param observe_each: look after every command (else after :meth:`look` points, or
        once at the end when there are none)
    """

    def __init__(self, jailhouse: CheckedJailhouse, *, observe_each: bool = True) -> None:
        self.jailhouse = jailhouse
        self.observe_each = observe_each
        self.plans: list[_Plan] = []
        self.looks: list[bool] = []
        self.results: list[StepResult] = []

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self.run()

    def run(self) -> list[StepResult]:
        """Run what was collected (done by the ``with`` block's end)."""
        plans, self.plans = self.plans, []
        looks, self.looks = self.looks, []
        self.results += self.jailhouse._run_batch(plans, looks)
        return self.results

    def look(self) -> None:
        """Compare the whole view after the step collected last."""
        if self.looks:
            self.looks[-1] = True

    def _add(self, plan: _Plan) -> None:
        self.plans.append(plan)
        self.looks.append(self.observe_each)

    def enable(self, sysconfig: ConfigSource, *, expect: int | str | None = 0) -> None:
        self._add(self.jailhouse._plan_enable(sysconfig, expect))

    def disable(self, *, expect: int | str | None = 0) -> None:
        self._add(_Plan("disable", ["disable"], "disable", lambda d: d.disable(), expect))

    def cell_create(self, config: ConfigSource, *, expect: int | str | None = 0) -> None:
        self._add(self.jailhouse._plan_create(config, expect))

    def cell_load(self, cell: CellRef, image: ImageSource | None = None, address: int = 0, *,
                  strings: Iterable[tuple[str, int]] = (), expect: int | str | None = 0) -> None:
        pairs = [(image, address)] if image is not None else []
        self._add(self.jailhouse._plan_load(cell, pairs, strings, expect))

    def cell_start(self, cell: CellRef, *, expect: int | str | None = 0) -> None:
        self._add(self.jailhouse._plan_cell("start", cell, expect))

    def cell_shutdown(self, cell: CellRef, *, expect: int | str | None = 0) -> None:
        self._add(self.jailhouse._plan_cell("shutdown", cell, expect))

    def cell_destroy(self, cell: CellRef, *, expect: int | str | None = 0) -> None:
        self._add(self.jailhouse._plan_cell("destroy", cell, expect))


class CheckedJailhouse:
    """The ``jailhouse`` command in a lab, checked step by step against the oracle.

    :param lab: the booted lab (or anything :class:`LabLike`)
    :param arch: what the guest's daemon runs cells on: ``executor`` (KVM) or ``oracle``
    :param responders: how cells answer hypervisor messages, cell name -> policy
        (``approve``, ``deny-first-shutdown``, ``deny``, ``silent``); the host oracle uses
        them with either arch (it plays the inmates), the guest's daemon only with the
        oracle Arch (default: :data:`DEFAULT_RESPONDERS`)
    :param env: more environment for the guest's ``jailhouse`` commands (e.g.
        ``{"JHLAB_FAULT": "destroy-leaks-pages"}``; the daemon ``enable`` starts inherits it)
    :param daemon_args: more options for that daemon (``JAILHOUSE_DAEMON_ARGS``)
    :param tools: where the guest tools are (``bin/``, ``lib/``)
    :param run_dir: the guest driver's run directory
    :param files: where configs and images are uploaded in the guest
    :param pci_root: the guest's PCI device folder
    :param cpuset: the executor's root cgroup
    :param exclusions: sysfs files not compared (default: :data:`EXECUTOR_EXCLUSIONS` with
        the executor, none with the oracle Arch)
    :param kernel_console_level: the guest kernel's console log level while the checked
        driver runs (restored by :meth:`cleanup`; None: left alone). The hypervisor's
        debug UART is the root's console (qemu-x86: 0x3f8), and kernel messages printed
        there interleave with the hypervisor's lines character by character; the default
        1 lets only emergencies (panics) through.
    :param test_device: run the guest's hypervisor (daemon ``--test-device``) and the
        oracle with ``CONFIG_TEST_DEVICE``: cells with the ``TEST_DEVICE`` flag get the
        test page after their comm region (``mmio-access``)
    :raise JhlabError: when a driver daemon already runs in the guest
    """

    def __init__(self, lab: LabLike, arch: str = "executor", *,
                 responders: Mapping[str, str] | None = None,
                 env: Mapping[str, str] | None = None, daemon_args: Sequence[str] = (),
                 tools: str = GUEST_TOOLS, run_dir: str = GUEST_RUN_DIR,
                 files: str = GUEST_FILES, pci_root: str = "/sys/bus/pci/devices",
                 cpuset: str = ROOT_CPUSET,
                 exclusions: Sequence[Exclusion] | None = None,
                 kernel_console_level: int | None = 1, test_device: bool = False) -> None:
        if arch not in ("executor", "oracle"):
            raise ValueError(f"arch {arch!r}: expected executor or oracle")
        self.lab = lab
        self.arch = arch
        self.responders = dict(DEFAULT_RESPONDERS if responders is None else responders)
        self.tools = tools
        self.run_dir = run_dir
        self.files = files
        self.pci_root = pci_root
        self.cpuset_path = cpuset
        self.exclusions = tuple((EXECUTOR_EXCLUSIONS if arch == "executor" else ())
                                if exclusions is None else exclusions)
        args = list(daemon_args)
        if arch == "oracle":
            args += [f"--responder={name}={policy}" for name, policy in sorted(self.responders.items())]
        if test_device:
            args.append("--test-device")
        self.env = {"JAILHOUSE_ARCH": arch, "JAILHOUSE_DAEMON_ARGS": shlex.join(args),
                    **dict(env or {})}
        self.oracle = Oracle(self.responders, test_device=test_device)
        self.steps: list[StepResult] = []
        #: set when :meth:`cleanup` could not leave the lab as it found it
        self.dirty = False
        self._uploaded: dict[str, str] = {}
        #: serial 0 transcript size when the last step began
        self._last_mark = 0
        level = None if kernel_console_level is None else str(kernel_console_level)
        data = self._run_guest([], printk=level)
        #: the kernel console level before (restored at cleanup)
        self.saved_console_level: str | None = data["printk"]
        baseline = GuestView.from_wire(data["view"])
        if baseline.daemon is not None:
            raise JhlabError(f"a jailhouse daemon (pid {baseline.daemon.get('pid')}) already runs "
                             f"in the lab; the checked driver needs a disabled hypervisor")
        self.baseline = baseline
        self.oracle.module_loaded = "enabled" in baseline.sysfs
        self.oracle.refresh()

    def __repr__(self) -> str:
        state = "enabled" if self.oracle.enabled else "disabled"
        return f"CheckedJailhouse({self.arch}, {state}, {len(self.steps)} steps)"

    # -- the guest ----------------------------------------------------------------------

    def _prefix(self) -> str:
        return (f"PATH={shlex.quote(self.tools)}/bin:$PATH "
                f"PYTHONPATH={shlex.quote(self.tools)}/lib")

    def _run_guest(self, commands: Sequence[Sequence[str]], *, looks: Sequence[bool] = (),
                   final_look: bool = True, in_process: bool = False, resources: bool = False,
                   printk: str | None = None, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        """Run ``jailhouse`` commands in the guest, looking at it after the commands
        ``looks`` flags and at the end (``final_look``); the guest script's JSON.

        :param printk: first set the kernel's console log level (``/proc/sys/kernel/printk``)
        """
        flags = list(looks) or [False] * len(commands)
        args = {
            "run_dir": self.run_dir, "env": self.env, "timeout": timeout, "in_process": in_process,
            "commands": [{"argv": list(c), "look": flag} for c, flag in zip(commands, flags, strict=True)],
            "looks": final_look or any(flags), "final_look": final_look, "resources": resources,
            "cpuset": self.cpuset_path, "pci": self.pci_root, "printk": printk,
        }
        script = f"import json\nARGS = json.loads({json.dumps(json.dumps(args))})\n" + GUEST_SCRIPT
        result = self.lab.run(f"{self._prefix()} python3 -", stdin=script,
                              timeout=timeout * max(1, len(commands)) + 60)
        if result.status != 0:
            raise JhlabError(f"the checked driver's guest script failed (status {result.status}):\n"
                             f"{result.stderr or result.stdout}")
        try:
            data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise JhlabError(f"the guest script printed no result:\n{result.output}") from exc
        return data

    def _guest(self, commands: Sequence[Sequence[str]], *, observe: bool = True,
               resources: bool = False, timeout: float = STEP_TIMEOUT
               ) -> tuple[list[dict[str, Any]], GuestView | None]:
        """Run ``jailhouse`` commands in the guest, then (optionally) look at it."""
        data = self._run_guest(commands, final_look=observe, resources=resources, timeout=timeout)
        view = GuestView.from_wire(data["view"]) if observe else None
        return list(data["commands"]), view

    def upload(self, data: bytes, name: str) -> str:
        """Put ``data`` into the guest (once per content); return its path there."""
        digest = hashlib.sha256(data).hexdigest()[:12]
        path = self._uploaded.get(digest)
        if path is not None:
            return path
        if not self._uploaded:
            self.lab.run(f"mkdir -p {shlex.quote(self.files)}", check=True, timeout=60)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "file"
        path = f"{self.files}/{digest}-{safe}"
        self.lab.ssh.put(data, path)
        self._uploaded[digest] = path
        return path

    @staticmethod
    def _config(source: ConfigSource) -> tuple[bytes, str]:
        """A config as bytes and a short name."""
        if isinstance(source, bytes):
            return source, "config.cell"
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.suffix == ".toml":
                return load_source(path).to_bytes(), path.stem + ".cell"
            return path.read_bytes(), path.name
        to_bytes = getattr(source, "to_bytes", None)
        if callable(to_bytes):
            name = getattr(source, "name", "config")
            return bytes(to_bytes()), f"{name}.cell"
        raise TypeError(f"not a config: {source!r}")

    @staticmethod
    def _image(source: ImageSource) -> tuple[bytes, str]:
        if isinstance(source, bytes):
            return source, "image.bin"
        path = Path(source)
        return path.read_bytes(), path.name

    # -- the console ----------------------------------------------------------------------

    def _transcript(self) -> Path | None:
        return getattr(self.lab.console, "transcript", None)

    def _console_mark(self) -> int:
        path = self._transcript()
        try:
            return path.stat().st_size if path is not None else 0
        except OSError:
            return 0

    def _console_since(self, mark: int) -> str:
        path = self._transcript()
        if path is None:
            return ""
        try:
            with open(path, "rb") as handle:
                handle.seek(mark)
                data = handle.read()
        except OSError:
            return ""
        text = data.decode("utf-8", "replace")
        text = _KERNEL_LINE.sub("", text)
        return text.replace("\r", "")

    def _check_console(self, expected: str, mark: int, timeout: float) -> Difference | None:
        """Every line of ``expected`` must appear, in order, in the console since ``mark``."""
        wanted = [line for line in expected.replace("\r", "").split("\n") if line.strip()]
        if not wanted:
            return None
        deadline = time.monotonic() + timeout
        while True:
            seen = self._console_since(mark)
            missing = _missing_lines(wanted, seen.split("\n"))
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not missing:
            return None
        return Difference(
            "hypervisor console", "\n".join(wanted) + "\n", seen,
            note=f"{len(missing)} line(s) of the oracle never reached the guest's console "
                 f"within {timeout:.0f} s, first: {missing[0]!r}")

    # -- comparing ----------------------------------------------------------------------

    def _excluded(self, path: str) -> bool:
        return any(rule.matches(path) for rule in self.exclusions)

    def _compare_view(self, view: GuestView, expected_list: str) -> list[Difference]:
        diffs: list[Difference] = []
        if view.cell_list != expected_list:
            diffs.append(Difference("cell list", expected_list, view.cell_list))
        diffs += self._compare_tree(self.oracle.tree, view.sysfs)
        diffs += self._compare_cpus(view)
        diffs += self._compare_pci(view)
        daemon_expected = "running" if self.oracle.driver is not None else "none"
        daemon_actual = "running" if view.daemon is not None else "none"
        if daemon_expected == "running" and view.daemon is not None and view.daemon.get("arch") != self.arch:
            daemon_actual = f"running on {view.daemon.get('arch')}"
            daemon_expected = f"running on {self.arch}"
        if daemon_expected != daemon_actual:
            diffs.append(Difference("driver daemon", daemon_expected + "\n", daemon_actual + "\n"))
        return diffs

    def _compare_tree(self, expected: Mapping[str, str], actual: Mapping[str, str]) -> list[Difference]:
        diffs: list[Difference] = []
        old: list[str] = []
        new: list[str] = []
        for path in sorted(set(expected) | set(actual)):
            if path == "console":
                continue
            if self._excluded(path) and path in expected and path in actual:
                continue
            if path in expected:
                old.append(f"{path}: {expected[path].rstrip(chr(10))}\n")
            if path in actual:
                new.append(f"{path}: {actual[path].rstrip(chr(10))}\n")
        if old != new:
            changed = sorted({line.split(":", 1)[0] for line in set(old) ^ set(new)})
            diffs.append(Difference("sysfs tree", "".join(old), "".join(new),
                                    note="files differing: " + ", ".join(changed)))
        if not self._excluded("console") and expected.get("console") != actual.get("console"):
            diffs.append(Difference("sysfs console", expected.get("console", "(no file)\n"),
                                    actual.get("console", "(no file)\n")))
        return diffs

    def _root_cpus_expected(self) -> str:
        baseline = self.baseline.cpus_allowed
        driver = self.oracle.driver
        if self.arch != "executor" or driver is None or not driver.enabled:
            return baseline
        taken = {cpu for cell_id, cell in driver.cells.items() if cell_id != 0 for cpu in cell.cpus_assigned}
        return format_cpu_list(parse_cpu_list(baseline) - taken)

    def _compare_cpus(self, view: GuestView) -> list[Difference]:
        expected = self._root_cpus_expected()
        diffs = []
        if view.cpus_allowed != expected:
            diffs.append(Difference("root CPUs (Cpus_allowed_list of a new root process)",
                                    expected + "\n", view.cpus_allowed + "\n"))
        if view.cpuset is not None and view.cpuset != expected and self.arch == "executor":
            diffs.append(Difference(f"root CPUs ({self.cpuset_path}/cpuset.cpus)",
                                    expected + "\n", view.cpuset + "\n"))
        return diffs

    def _compare_pci(self, view: GuestView) -> list[Difference]:
        driver = self.oracle.driver
        cell_devices: set[str] = set()
        if self.arch == "executor" and driver is not None and driver.enabled:
            for cell_id, cell in driver.cells.items():
                if cell_id == 0:
                    continue
                for dev in cell.config.pci_devices:
                    if dev.type == 1:  # JAILHOUSE_PCI_TYPE_DEVICE
                        cell_devices.add("%04x:%02x:%02x.%x" % (dev.domain, dev.bdf >> 8,
                                                                 (dev.bdf >> 3) & 0x1F, dev.bdf & 7))
        old: list[str] = []
        new: list[str] = []
        for address in sorted(set(self.baseline.pci) | set(view.pci)):
            actual = view.pci.get(address, "(gone)")
            before = self.baseline.pci.get(address, "(absent)")
            if address in cell_devices:
                allowed = {*CELL_PCI_DRIVERS, None}
                want = actual if actual in allowed else "vfio-pci (cell device)"
            elif self.arch == "executor":
                # Back in the root: not held for a cell; Jailhouse leaves it unbound.
                ok = actual not in CELL_PCI_DRIVERS and actual in (before, None)
                want = actual if ok else f"{before or 'none'} (root device)"
            else:
                want = before
            old.append(f"{address}: {want or 'none'}\n")
            new.append(f"{address}: {actual or 'none'}\n")
        if old != new:
            return [Difference("PCI driver bindings", "".join(old), "".join(new))]
        return []

    def _check_loaded(self, cell: CellRef, images: Sequence[Image]) -> list[Difference]:
        """After a load: physical memory over QMP must hold what the oracle wrote there
        (later images win where they overlap, e.g. a ``-s`` string over the image's
        command-line page)."""
        driver, arch = self.oracle.driver, self.oracle.arch
        if self.arch != "executor" or driver is None or arch is None:
            return []
        config = driver.find_cell(cell).config
        diffs = []
        for image in images:
            region = next((m for m in config.memory_regions
                           if m.virt_start <= image.target < m.virt_start + m.size), None)
            if region is None:
                continue
            phys = region.phys_start + (image.target - region.virt_start)
            expected = arch.phys_read(phys, len(image.data))
            data = self.lab.qmp.read_phys(phys, len(image.data))
            if data != expected:
                first = next(i for i, (a, b) in enumerate(zip(data, expected, strict=True)) if a != b)
                diffs.append(Difference(
                    f"loaded bytes at {phys:#x} (QMP)", expected[first:first + 32].hex() + "\n",
                    data[first:first + 32].hex() + "\n",
                    note=f"{len(image.data)} bytes, first difference at offset {first:#x}"))
        return diffs

    # -- steps --------------------------------------------------------------------------

    def _outcome(self, plan: _Plan, done: Mapping[str, Any], host: HostInfo) -> tuple[int, list[Difference]]:
        """Apply ``plan`` to the oracle; compare the command's exit status and output."""
        code, open_errno = self.oracle.run(plan.kind, plan.operation, host)
        predicted = _tool_output(plan.kind, code, open_errno)
        command = "jailhouse " + " ".join(plan.argv)
        diffs = [
            Difference(f"{what} of {command}", want, got)
            for what, want, got in (("exit status", f"{predicted[0]}\n", f"{done['status']}\n"),
                                    ("stdout", predicted[1], str(done["stdout"])),
                                    ("stderr", predicted[2], str(done["stderr"])))
            if want != got
        ]
        return code, diffs

    def _host(self, plan: _Plan, view: GuestView | None) -> HostInfo:
        """The machine an ``enable`` that started a daemon runs on (as the daemon says)."""
        if plan.kind == "enable" and view is not None and view.daemon is not None \
                and isinstance(view.daemon.get("host"), dict):
            return host_from_wire(view.daemon["host"])
        return self.oracle.host

    def _step(self, plan: _Plan, *, effects: Sequence[Effect] = (),
              settle_timeout: float = SETTLE_TIMEOUT) -> StepResult:
        mark = self._last_mark = self._console_mark()
        oracle_mark = len(self.oracle.console)
        started = time.monotonic()
        commands, view = self._guest([plan.argv])
        assert view is not None  # observe=True
        guest_done = time.monotonic()
        done = commands[0]
        code, diffs = self._outcome(plan, done, self._host(plan, view))
        for effect in effects:
            effect.apply(self.oracle)
        view_diffs = self._compare_view(view, self.oracle.cell_list())
        if view_diffs and effects:
            view, view_diffs = self._settle(settle_timeout)
        diffs += view_diffs
        if code == 0 and plan.images and plan.cell is not None:
            diffs += self._check_loaded(plan.cell, plan.images)
        console_diff = self._check_console(self.oracle.console[oracle_mark:], mark,
                                           CONSOLE_TIMEOUT if not diffs else 2.0)
        if console_diff is not None:
            diffs.append(console_diff)
        result = StepResult(plan.step, int(done["status"]), str(done["stdout"]), str(done["stderr"]),
                            code, view)
        self.steps.append(result)
        LOG.info("checked %s: %s (command %.1f s, guest round trip %.1f s, step %.1f s)", plan.step,
                 result.errno, done.get("seconds", 0.0), guest_done - started, time.monotonic() - started)
        if diffs:
            raise ValidationError(plan.step, diffs)
        _check_expectation(plan.step, plan.expect, code)
        return result

    def _settle(self, timeout: float) -> tuple[GuestView, list[Difference]]:
        """Look until the guest agrees with the oracle (an inmate's effects take time)."""
        deadline = time.monotonic() + timeout
        while True:
            view = self._guest([])[1]
            assert view is not None  # observe=True
            diffs = self._compare_view(view, self.oracle.cell_list())
            if not diffs or time.monotonic() > deadline:
                return view, diffs
            time.sleep(1.0)

    def _run_batch(self, plans: Sequence[_Plan], looks: Sequence[bool]) -> list[StepResult]:
        """Run ``plans`` in one guest script (the tool in-process, see :class:`Batch`),
        looking at the guest after the steps ``looks`` flags (else once at the end)."""
        if not plans:
            return []
        mark = self._last_mark = self._console_mark()
        oracle_mark = len(self.oracle.console)
        data = self._run_guest([plan.argv for plan in plans], looks=looks, final_look=not any(looks),
                               in_process=True)
        results: list[StepResult] = []
        final = GuestView.from_wire(data["view"]) if data.get("view") else None
        for index, (plan, done) in enumerate(zip(plans, data["commands"], strict=True)):
            view = GuestView.from_wire(done["view"]) if done.get("view") else None
            step = f"{plan.step} (batch step {index + 1} of {len(plans)})"
            code, diffs = self._outcome(plan, done, self._host(plan, view or final))
            if view is not None:
                diffs += self._compare_view(view, self.oracle.cell_list())
            if diffs:
                raise ValidationError(step, diffs)
            _check_expectation(step, plan.expect, code)
            result = StepResult(step, int(done["status"]), str(done["stdout"]), str(done["stderr"]),
                                code, view or final)  # type: ignore[arg-type]
            results.append(result)
        self.steps += results
        if final is not None:
            diffs = self._compare_view(final, self.oracle.cell_list())
            if diffs:
                raise ValidationError(f"after a batch of {len(plans)} steps", diffs)
        console_diff = self._check_console(self.oracle.console[oracle_mark:], mark, CONSOLE_TIMEOUT)
        if console_diff is not None:
            raise ValidationError(f"a batch of {len(plans)} steps", [console_diff])
        return results

    def batch(self, *, observe_each: bool = True) -> Batch:
        """Collect steps and run them in one go (see :class:`Batch`)."""
        return Batch(self, observe_each=observe_each)

    # -- the commands ---------------------------------------------------------------------

    def _plan_enable(self, sysconfig: ConfigSource, expect: int | str | None) -> _Plan:
        data, name = self._config(sysconfig)
        return _Plan(f"enable {name}", ["enable", self.upload(data, name)], "enable",
                     lambda d: d.enable(data), expect)

    def _plan_create(self, config: ConfigSource, expect: int | str | None) -> _Plan:
        data, name = self._config(config)
        return _Plan(f"cell create {name}", ["cell", "create", self.upload(data, name)], "create",
                     lambda d: d.cell_create(data), expect)

    def _plan_load(self, cell: CellRef, pairs: Sequence[tuple[ImageSource, int]],
                   strings: Iterable[tuple[str, int]], expect: int | str | None) -> _Plan:
        argv = ["cell", "load", *_cell_args(cell)]
        loaded: list[Image] = []
        for source, target in pairs:
            data, name = self._image(source)
            argv += [self.upload(data, name), "-a", hex(target)]
            loaded.append(Image(data, target))
        for text, target in strings:
            argv += ["-s", text, "-a", hex(target)]
            loaded.append(Image(os.fsencode(text) + b"\0", target))
        wire = tuple(img for img in loaded if img.data)
        ref = _driver_ref(cell)
        return _Plan(f"cell load {cell}", argv, "load", lambda d: d.cell_load(ref, wire), expect,
                     images=wire, cell=ref)

    def _plan_cell(self, verb: str, cell: CellRef, expect: int | str | None) -> _Plan:
        ref = _driver_ref(cell)
        operation: Callable[[Driver], object] = {
            "start": lambda d: d.cell_start(ref),
            "shutdown": lambda d: d.cell_shutdown(ref),
            "destroy": lambda d: d.cell_destroy(ref),
        }[verb]
        return _Plan(f"cell {verb} {cell}", ["cell", verb, *_cell_args(cell)], verb, operation, expect)

    def enable(self, sysconfig: ConfigSource, *, expect: int | str | None = 0) -> StepResult:
        """``jailhouse enable SYSCONFIG`` (a ``.cell`` file, a TOML source, bytes or a
        config object).

        :param expect: what the step is meant to give: 0 (success, the default), an errno
            (``"EEXIST"`` or ``errno.EEXIST``), or None (anything the oracle agrees with)
        :raise ValidationError: when the guest differs from the oracle
        :raise ExpectationError: when both agree on something else than ``expect``
        """
        return self._step(self._plan_enable(sysconfig, expect))

    def disable(self, *, expect: int | str | None = 0) -> StepResult:
        """``jailhouse disable``."""
        return self._step(_Plan("disable", ["disable"], "disable", lambda d: d.disable(), expect))

    def cell_create(self, config: ConfigSource, *, expect: int | str | None = 0) -> StepResult:
        """``jailhouse cell create CELLCONFIG``."""
        return self._step(self._plan_create(config, expect))

    def cell_load(self, cell: CellRef, image: ImageSource | None = None, address: int = 0, *,
                  strings: Iterable[tuple[str, int]] = (),
                  images: Iterable[tuple[ImageSource, int]] = (),
                  expect: int | str | None = 0) -> StepResult:
        """``jailhouse cell load CELL IMAGE -a ADDRESS [IMAGE -a ADDR]... [-s STRING -a ADDR]...``.

        :param image: the main image (path or bytes), loaded at ``address``
        :param strings: ``(text, address)`` pairs, passed with ``-s`` (the NUL is added)
        :param images: further ``(image, address)`` pairs
        """
        pairs = ([(image, address)] if image is not None else []) + list(images)
        return self._step(self._plan_load(cell, pairs, strings, expect))

    def cell_start(self, cell: CellRef, *, effects: Sequence[Effect] = (),
                   settle_timeout: float = SETTLE_TIMEOUT,
                   expect: int | str | None = 0) -> StepResult:
        """``jailhouse cell start CELL``; ``effects``: what the inmate does on its own once
        started (the guest is then given ``settle_timeout`` seconds to show it)."""
        return self._step(self._plan_cell("start", cell, expect), effects=effects,
                          settle_timeout=settle_timeout)

    def cell_shutdown(self, cell: CellRef, *, expect: int | str | None = 0) -> StepResult:
        """``jailhouse cell shutdown CELL``."""
        return self._step(self._plan_cell("shutdown", cell, expect))

    def cell_destroy(self, cell: CellRef, *, expect: int | str | None = 0) -> StepResult:
        """``jailhouse cell destroy CELL``."""
        return self._step(self._plan_cell("destroy", cell, expect))

    def settle(self, *effects: Effect, timeout: float = SETTLE_TIMEOUT) -> GuestView:
        """An inmate did something on its own since the last step: apply ``effects`` to
        the oracle and wait until the guest shows the same (console lines included).

        :raise ValidationError: when it does not within ``timeout`` seconds
        """
        oracle_mark = len(self.oracle.console)
        for effect in effects:
            effect.apply(self.oracle)
        view, diffs = self._settle(timeout)
        # The inmate may have acted before this call: search the console from the start
        # of the last step.
        console_diff = self._check_console(self.oracle.console[oracle_mark:], self._last_mark,
                                           CONSOLE_TIMEOUT)
        if console_diff is not None:
            diffs.append(console_diff)
        if diffs:
            raise ValidationError("settle " + ", ".join(map(repr, effects)), diffs)
        return view

    def stats(self, cell: CellRef) -> dict[str, int]:
        """``jailhouse cell stats CELL -n -i 0``: the counters; checked against the oracle
        (the values unless excluded, see :data:`EXECUTOR_EXCLUSIONS`)."""
        argv = ["cell", "stats", *_cell_args(cell), "-n", "-i", "0"]
        commands, _ = self._guest([argv], observe=False)
        done = commands[0]
        self.oracle.refresh()  # the stats tool refreshes once, then reads
        step = f"cell stats {cell}"
        driver = self.oracle.driver
        diffs: list[Difference] = []
        if driver is None or not driver.enabled:
            raise JhlabError(f"{step}: the hypervisor is not enabled")
        target = driver.find_cell(_driver_ref(cell))
        values = {path.rsplit("/", 1)[1]: int(text)
                  for path, text in self.oracle.tree.items()
                  if path.startswith(f"cells/{target.id}/statistics/") and path.count("/") == 3}
        excluded = self._excluded(f"cells/{target.id}/statistics/vmexits_total")
        got = _parse_stats(done["stdout"])
        if excluded:
            # A real inmate's counts: compare the layout and the counter names only.
            expected_text = _render_stats(target.name, dict.fromkeys(values, 0))
            actual_text = _render_stats(_stats_title(done["stdout"]) or "?", dict.fromkeys(got, 0))
        else:
            expected_text = _render_stats(target.name, values)
            actual_text = done["stdout"]
        if done["status"] != 0 or done["stderr"] or expected_text != actual_text:
            diffs.append(Difference(
                f"jailhouse {' '.join(argv)}", expected_text, actual_text + done["stderr"],
                note="counter names only (values excluded: a real inmate's)" if excluded else ""))
        if diffs:
            raise ValidationError(step, diffs)
        return _parse_stats(done["stdout"])

    def look(self, *, resources: bool = False) -> GuestView:
        """Look at the guest and compare it with the oracle (no command).

        :param resources: also read the daemon's fds, threads and RSS from ``/proc``
        """
        view = self._guest([], resources=resources)[1]
        assert view is not None
        diffs = self._compare_view(view, self.oracle.cell_list())
        if diffs:
            raise ValidationError("look", diffs)
        return view

    def daemon_resources(self, settle_timeout: float = SETTLE_TIMEOUT) -> dict[str, int]:
        """The guest daemon's open fds, threads and RSS (KiB), from ``/proc/<pid>``, once
        no vCPU thread of a destroyed cell is still on its way out (the executor's
        ``zombies``: a destroy that met a thread inside the model leaves it to a reaper,
        which ends with it), at most ``settle_timeout`` seconds later."""
        deadline = time.monotonic() + settle_timeout
        while True:
            view = self.look(resources=True)
            if view.resources is None or view.daemon is None:
                raise JhlabError("no driver daemon runs in the guest")
            executor = view.daemon.get("executor") or {}
            if not executor.get("zombies") or time.monotonic() > deadline:
                return dict(view.resources)
            time.sleep(0.5)

    # -- inmate output --------------------------------------------------------------------

    def expect_inmate(self, pattern: str, timeout: float = 60.0, *,
                      failures: Sequence[str] = INMATE_FAILURES, fatal_ok: bool = False) -> re.Match[str]:
        """Wait for ``pattern`` on the cell console (serial 1); fail at once on one of
        ``failures`` there, or on a new ``FATAL:`` line of the hypervisor (serial 0,
        unless ``fatal_ok``).

        :raise ConsoleTimeout: when it does not appear within ``timeout`` seconds
        :raise ConsoleFailure: when a failure pattern appears first
        """
        from harness.console import ConsoleFailure
        from harness.errors import ConsoleTimeout

        mark = self._console_mark()
        deadline = time.monotonic() + timeout
        console = self.lab.cell_console
        while True:
            remaining = deadline - time.monotonic()
            try:
                return console.expect(pattern, timeout=max(0.1, min(1.0, remaining)),  # type: ignore[no-any-return]
                                      failures=failures)
            except ConsoleTimeout:
                if remaining <= 1.0:
                    raise ConsoleTimeout(console.name, pattern, timeout, console.tail()) from None
            if not fatal_ok:
                fatal = re.search(r"FATAL:[^\n]*", self._console_since(mark))
                if fatal:
                    raise ConsoleFailure("serial0 (hypervisor console)", fatal.group(0),
                                         self._console_since(mark)[-2000:])

    # -- cleanup --------------------------------------------------------------------------

    def cleanup(self, timeout: float = STEP_TIMEOUT) -> list[str]:
        """Leave the lab as found: destroy the cells left (a cell that refuses is asked
        twice), disable, make sure the daemon ended, remove the uploaded files. Unchecked:
        a test that failed may have left anything.

        :return: what could not be cleaned (empty: clean); :attr:`dirty` is set then
        """
        problems: list[str] = []
        script = (
            "import json, os\n"
            f"run = {self.run_dir!r}\n"
            "cells = os.path.join(run, 'sys/devices/jailhouse/cells')\n"
            "ids = sorted(int(c) for c in os.listdir(cells) if c != '0') if os.path.isdir(cells) else []\n"
            "print(json.dumps({'cells': ids, 'daemon': os.path.exists(os.path.join(run, 'driver.sock'))}))\n"
        )
        try:
            listed = self.lab.run("python3 -", stdin=script, timeout=60, check=True)
            left = json.loads(listed.stdout.strip().splitlines()[-1])
            if left["daemon"]:
                commands = [["cell", "destroy", str(c)] for c in left["cells"] for _ in range(2)]
                self._guest([*commands, ["disable"]], observe=False, timeout=timeout)
            view = self._guest([])[1]
            assert view is not None  # observe=True
            if view.daemon is not None:
                pid = int(view.daemon["pid"])
                self.lab.run(f"kill -TERM {pid}; for i in $(seq 100); do [ -d /proc/{pid} ] || break; "
                             "sleep 0.1; done", timeout=60)
                problems.append(f"the daemon (pid {pid}) did not disable and had to be killed")
            if view.cpuset is not None and view.cpuset != self.baseline.cpus_allowed:
                problems.append(f"the root cpuset is {view.cpuset}, not {self.baseline.cpus_allowed}")
            if self._uploaded:
                self.lab.run(f"rm -rf {shlex.quote(self.files)}", timeout=60)
                self._uploaded.clear()
            if self.saved_console_level is not None:
                self.lab.run(f"echo {shlex.quote(self.saved_console_level)} > /proc/sys/kernel/printk",
                             timeout=60, check=True)
        except (JhlabError, ValueError, KeyError) as exc:
            problems.append(f"cleanup failed: {exc}")
        self.oracle._end()
        self.dirty = bool(problems)
        return problems


# =======================================================================================
# helpers
# =======================================================================================


def _cell_args(cell: CellRef) -> list[str]:
    """The tool's cell argument: an id, or ``--name NAME``."""
    return [str(cell)] if isinstance(cell, int) else ["--name", cell]


def _driver_ref(cell: CellRef) -> CellRef:
    """What the daemon looks the cell up by (the tool truncates names to 31 bytes)."""
    if isinstance(cell, int):
        return cell
    return os.fsdecode(os.fsencode(cell)[:31])


def _tool_output(kind: str, code: int, open_errno: int | None) -> tuple[int, str, str]:
    """What the ``jailhouse`` tool prints for an ioctl result: status, stdout, stderr."""
    if open_errno is not None:
        return 1, "", f"opening /dev/jailhouse: {os.strerror(open_errno)}\n"
    if code == 0:
        return 0, "", ""
    return 1, "", f"{IOCTL[kind]}: {os.strerror(-code)}\n"


def _check_expectation(step: str, expect: int | str | None, code: int) -> None:
    if expect is None:
        return
    if isinstance(expect, str):
        wanted = 0 if expect in ("0", "success") else int(getattr(errno_mod, expect))
    else:
        wanted = abs(expect)
    if abs(code) != wanted:
        raise ExpectationError(step, _errno_name(wanted), _errno_name(code))


def _missing_lines(wanted: Sequence[str], seen: Sequence[str]) -> list[str]:
    """The lines of ``wanted`` that are not in ``seen`` in order: the longest in-order
    matching (a wanted line matches a seen line that contains it; a longest common
    subsequence, so repeated lines such as ``Created cell "x"`` in a loop pair up right)
    leaves these out."""
    # The UART transcript is a check of delivery: the exact text is compared through the
    # console ring (sysfs ``console``). Under TCG the serial path has been seen to repeat
    # a character once in thousands of lines ("mem  50"), so runs of one character are
    # squeezed on both sides before matching.
    original = list(wanted)
    wanted = [_squeeze(line) for line in wanted]
    seen = [_squeeze(line) for line in seen]
    rows, cols = len(wanted), len(seen)
    best = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(rows - 1, -1, -1):
        line, here, below = wanted[i], best[i], best[i + 1]
        for j in range(cols - 1, -1, -1):
            here[j] = below[j + 1] + 1 if line in seen[j] else max(below[j], here[j + 1])
    missing: list[str] = []
    i = j = 0
    while i < rows:
        if j < cols and wanted[i] in seen[j] and best[i][j] == best[i + 1][j + 1] + 1:
            i, j = i + 1, j + 1
        elif j < cols and best[i][j + 1] >= best[i + 1][j]:
            j += 1
        else:
            missing.append(original[i])
            i += 1
    return missing


def _squeeze(line: str) -> str:
    """``line`` with every run of one repeated character cut to one."""
    return _RUNS.sub(r"\1", line)


_RUNS: Final = re.compile(r"(.)\1+")


def _parse_stats(text: str) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in text.splitlines()[3:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    return values


def _stats_title(text: str) -> str:
    first = text.splitlines()[0] if text else ""
    match = re.fullmatch(r"Statistics for (.*) cell(, CPU \d+)?", first)
    return match.group(1) if match else ""


def _render_stats(name: str, values: Mapping[str, int]) -> str:
    """``jailhouse cell stats -n -i 0``'s text (tools/jailhouse-cell-stats layout)."""
    lines = [f"Statistics for {name} cell", "", "COUNTER".ljust(30) + "%10s" % "SUM" + "%10s" % "PER SEC"]
    for counter in sorted(values, key=lambda c: (-values[c], c)):
        lines.append(counter.ljust(30) + "%10u" % values[counter])
    return "\n".join(lines) + "\n"
