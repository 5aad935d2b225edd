"""The checked driver's guest half (:mod:`harness.checked`): runs ``jailhouse`` commands
in the root cell and looks at it, after each command or once at the end.

Run as ``python3 -m harness.guest.checked`` with the guest tools on ``PATH`` and
``PYTHONPATH``; answers each JSON line on stdin (a :class:`Request`) with one JSON line
(:class:`Reply`) until stdin ends. The host keeps one such program per checked driver, so
its start-up and imports are paid once, not per step (a one-shot run is one line then
the end of input). A command runs as its own process (the real ``jailhouse`` on
``PATH``); while the first one starts, this program imports the tool for ``cell list``.
With ``in_process`` (batches) every command calls the same
:func:`harness.hvmodel.tool.main` here instead (one interpreter for all).

Standard library and the guest's :mod:`harness.hvmodel` only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, TypedDict

#: seconds to wait for the driver daemon's answer to a state request
DAEMON_TIMEOUT = 30.0
#: readings of the daemon's process figures (the least counts)
RESOURCE_READINGS = 5


class Command(TypedDict):
    """One ``jailhouse`` command line (without ``jailhouse``) and whether to look after it."""

    argv: list[str]
    look: bool


class Request(TypedDict):
    """What the host asks for."""

    #: the driver's run directory (``JAILHOUSE_RUN_DIR``)
    run_dir: str
    #: more environment for the commands (and the daemon ``enable`` starts)
    env: dict[str, str]
    #: seconds one command may take
    timeout: float
    #: call the tool here instead of starting ``jailhouse`` processes
    in_process: bool
    commands: list[Command]
    #: some look will happen (import the tool while the first command starts)
    looks: bool
    #: look once more after the commands
    final_look: bool
    #: read the daemon's fds, threads and RSS in each look
    resources: bool
    #: the executor's root cgroup folder
    cpuset: str
    #: the PCI device folder
    pci: str
    #: first set the kernel console log level to this (None: leave it)
    printk: str | None


class Done(TypedDict, total=False):
    """One command's outcome (``view`` when the request asked to look after it)."""

    argv: list[str]
    status: int
    stdout: str
    stderr: str
    seconds: float
    view: dict[str, Any]


class Reply(TypedDict):
    """What the host gets: each command's outcome, the final look, and the kernel
    console level before the change (None when unchanged)."""

    commands: list[Done]
    view: dict[str, Any] | None
    printk: str | None


class Guest:
    """The requests' work in the root cell: :meth:`serve` one request after the other
    (the tool, once imported, stays)."""

    def __init__(self) -> None:
        self._request: Request | None = None
        self._tool: ModuleType | None = None

    @property
    def request(self) -> Request:
        """The request being served."""
        if self._request is None:
            raise RuntimeError("no request is being served")
        return self._request

    @property
    def run_dir(self) -> str:
        return self.request["run_dir"]

    def tool(self) -> ModuleType:
        """The ``jailhouse`` tool's module (imported on first use: it takes a while)."""
        if self._tool is None:
            from harness.hvmodel import tool

            self._tool = tool
        return self._tool

    def in_process(self, argv: Sequence[str]) -> tuple[int, str, str]:
        """Run the tool's ``main`` here with the request's environment."""
        saved = dict(os.environ)
        os.environ.update(self.request["env"])
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = int(self.tool().main(["jailhouse", *argv]))
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return status, out.getvalue(), err.getvalue()

    def as_process(self, argv: Sequence[str]) -> tuple[int, str, str]:
        """Run ``jailhouse ARGV`` as its own process with the request's environment."""
        env = dict(os.environ)
        env.update(self.request["env"])
        proc = subprocess.Popen(["jailhouse", *argv], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if self.request["looks"]:
            self.tool()  # meanwhile
        timeout = self.request["timeout"]
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return -1, out.decode("utf-8", "replace"), f"timed out after {timeout} s"
        return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def daemon_state(self) -> dict[str, Any] | None:
        """The driver daemon's ``state`` reply; None when no daemon answers."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(DAEMON_TIMEOUT)
                sock.connect(os.path.join(self.run_dir, "driver.sock"))
                sock.sendall(b'{"op": "state"}\n')
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        return None
                    data += chunk
            state = json.loads(data)
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def look(self) -> dict[str, Any]:
        """Everything the host compares (:class:`harness.checked.GuestView` on the wire)."""
        listing, problems = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(listing), contextlib.redirect_stderr(problems):
            status = int(self.tool().main(["jailhouse", "cell", "list"]))
        text = listing.getvalue()
        if status or problems.getvalue():
            text += f"(exit {status}) {problems.getvalue()}"
        daemon = self.daemon_state()
        resources = None
        if self.request["resources"] and daemon is not None:
            resources = daemon_resources(int(daemon["pid"]))
        return {"cell_list": text, "sysfs": sysfs_tree(self.run_dir),
                "cpus_allowed": cpus_allowed(), "cpuset": read_cpuset(self.request["cpuset"]),
                "pci": pci_drivers(self.request["pci"]), "daemon": daemon, "resources": resources}

    def serve(self, request: Request) -> Reply:
        """Set the console level if asked, run the commands, look where asked."""
        self._request = request
        os.environ["JAILHOUSE_RUN_DIR"] = request["run_dir"]
        reply: Reply = {"commands": [], "view": None, "printk": None}
        if request["printk"] is not None:
            reply["printk"] = set_console_level(request["printk"])
        run: Callable[[Sequence[str]], tuple[int, str, str]] = (
            self.in_process if request["in_process"] else self.as_process)
        for item in request["commands"]:
            started = time.monotonic()
            status, stdout, stderr = run(item["argv"])
            done: Done = {"argv": item["argv"], "status": status, "stdout": stdout,
                          "stderr": stderr, "seconds": time.monotonic() - started}
            if item["look"]:
                done["view"] = self.look()
            reply["commands"].append(done)
        if request["final_look"]:
            reply["view"] = self.look()
        return reply


def sysfs_tree(run_dir: str) -> dict[str, str]:
    """Every file of the driver's sysfs tree, ``{relative path: text}``."""
    root = os.path.join(run_dir, "sys", "devices", "jailhouse")
    tree: dict[str, str] = {}
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
    return tree


def cpus_allowed() -> str:
    """``Cpus_allowed_list`` of a process started now in the root cell (this program was
    started earlier: what a new process gets is what counts)."""
    status = subprocess.run(["cat", "/proc/self/status"], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, check=True).stdout
    return status.split("Cpus_allowed_list:")[1].split()[0]


def read_cpuset(folder: str) -> str | None:
    """``cpuset.cpus`` of the executor's root cgroup; None when there is none."""
    try:
        with open(os.path.join(folder, "cpuset.cpus")) as handle:
            return handle.read().strip()
    except OSError:
        return None


def pci_drivers(folder: str) -> dict[str, str | None]:
    """Each PCI function and the driver bound to it (None: unbound)."""
    drivers: dict[str, str | None] = {}
    with contextlib.suppress(OSError):
        for address in sorted(os.listdir(folder)):
            link = os.path.join(folder, address, "driver")
            drivers[address] = os.path.basename(os.readlink(link)) if os.path.islink(link) else None
    return drivers


def daemon_resources(pid: int) -> dict[str, int]:
    """The daemon's open fds, threads and RSS (KiB).

    The least of a few readings: the thread and socket of a connection that is just
    ending (this program's own state request) are not a leak.
    """
    readings: list[tuple[int, int, int]] = []
    for attempt in range(RESOURCE_READINGS):
        time.sleep(0.1 * attempt)
        with open(f"/proc/{pid}/status") as handle:
            status = handle.read()
        readings.append((len(os.listdir(f"/proc/{pid}/fd")),
                         int(status.split("Threads:")[1].split()[0]),
                         int(status.split("VmRSS:")[1].split()[0])))
    return {"fds": min(r[0] for r in readings), "threads": min(r[1] for r in readings),
            "rss_kib": readings[-1][2]}


def set_console_level(level: str) -> str:
    """Set the kernel's console log level; return the one before."""
    with open("/proc/sys/kernel/printk") as handle:
        before = handle.read().split()[0]
    with open("/proc/sys/kernel/printk", "w") as handle:  # at offset 0 (sysctl_writes_strict)
        handle.write(level)
    return before


def parse_request(text: str) -> Request:
    """The request on stdin.

    :raise ValueError: when it is not a JSON object with the request's keys
    """
    value = json.loads(text)
    if not isinstance(value, Mapping) or Request.__required_keys__ - set(value):
        raise ValueError(f"not a checked-driver request: {text[:200]!r}")
    request: Request = dict(value)  # type: ignore[assignment]
    return request


def main() -> int:
    """Serve each request line on stdin with one reply line, until stdin ends."""
    guest = Guest()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = parse_request(line)
        except ValueError as exc:
            print(f"harness.guest.checked: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(guest.serve(request)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
