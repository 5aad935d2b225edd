"""The driver loader (:mod:`harness.hvmodel.loader`) on the host, with the oracle Arch.

A real loader process preloads the daemon; ``jailhouse enable`` (the real command, as a
subprocess) asks it for the daemon, which is then the loader's child in a session of its
own, and behaves as a spawned one: it serves, it ends at ``disable`` or when ``enable``
fails, and the loader reports how it ended. A loader whose code changed on disk answers
``ESTALE`` once (the command spawns the daemon itself) and replaces itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.hvmodel.config import load_source
from harness.hvmodel.ipc import DriverClient, RunDir, decode, encode
from harness.hvmodel.loader import DAEMON_PROCESS_NAME

REPO = Path(__file__).resolve().parents[2]
JAILHOUSE = REPO / "images" / "guest" / "libexec" / "jailhouse"
CONFIGS = REPO / "harness" / "configs"
#: seconds one command may take; the loader's start (it imports the model and executor)
COMMAND_TIMEOUT = 60.0
LOADER_TIMEOUT = 60.0


@dataclass
class Loaded:
    """A running loader and the environment that points the command at it."""

    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path
    run: RunDir
    env: dict[str, str]
    system: str
    apic: str

    def jailhouse(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``jailhouse ARGS``."""
        return subprocess.run([sys.executable, os.fspath(JAILHOUSE), *args], env=self.env,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)

    def daemon_pid(self) -> int:
        """The running daemon's pid."""
        with DriverClient(self.run.socket, timeout=10) as client:
            pid = client.request("state")["pid"]
        assert isinstance(pid, int)
        return pid

    def log_text(self) -> str:
        return self.log.read_text()

    def wait_log(self, text: str, count: int = 1, timeout: float = LOADER_TIMEOUT) -> None:
        """Wait until the loader's log says ``text`` (``count`` times)."""
        deadline = time.monotonic() + timeout
        while self.log_text().count(text) < count:
            assert self.proc.poll() is None, f"the loader ended:\n{self.log_text()}"
            assert time.monotonic() < deadline, f"no {text!r} in the loader's log:\n{self.log_text()}"
            time.sleep(0.05)


def parent_of(pid: int) -> int:
    """The parent pid of ``pid`` (``/proc/PID/stat`` field 4)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def gone(pid: int, timeout: float = 15.0) -> bool:
    """Wait until ``pid`` has exited (reaped, or a zombie)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def start_loader(tmp_path: Path, lib: Path) -> Loaded:
    """A loader importing ``harness`` from ``lib``, and configs compiled for the tests."""
    folder = tmp_path / "configs"
    folder.mkdir()
    system, apic = folder / "qemu-x86.cell", folder / "apic-demo.cell"
    system.write_bytes(load_source(CONFIGS / "qemu-x86.toml").to_bytes())
    apic.write_bytes(load_source(CONFIGS / "apic-demo.toml").to_bytes())
    sock, log = tmp_path / "loader.sock", tmp_path / "loader.log"
    env = dict(os.environ, PYTHONPATH=os.fspath(lib))
    proc = subprocess.Popen([sys.executable, "-m", "harness.hvmodel.loader", "--socket", os.fspath(sock),
                             "--log", os.fspath(log)], env=env, cwd="/",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "run"
    env.update({
        "JAILHOUSE_RUN_DIR": os.fspath(run),
        "JAILHOUSE_ARCH": "oracle",
        "JAILHOUSE_LOADER": os.fspath(sock),
        "JAILHOUSE_DAEMON_ARGS": "--responder apic-demo=deny-first-shutdown --debug-console none",
    })
    loaded = Loaded(proc, sock, log, RunDir(run), env, os.fspath(system), os.fspath(apic))
    deadline = time.monotonic() + LOADER_TIMEOUT
    while not log.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the loader did not start"
        time.sleep(0.05)
    loaded.wait_log("preloaded")
    return loaded


def stop_loader(loaded: Loaded) -> None:
    """Disable a daemon a test left running, then stop the loader."""
    try:
        pid = loaded.daemon_pid()
    except OSError:
        pid = 0
    if pid:
        os.kill(pid, signal.SIGTERM)
        gone(pid)
    loaded.proc.send_signal(signal.SIGTERM)
    try:
        loaded.proc.wait(15)
    except subprocess.TimeoutExpired:
        loaded.proc.kill()
        loaded.proc.wait(15)


@pytest.fixture
def loader(tmp_path: Path) -> Iterator[Loaded]:
    loaded = start_loader(tmp_path, REPO)
    try:
        yield loaded
    finally:
        stop_loader(loaded)


def ok(result: subprocess.CompletedProcess[str], stdout: str = "") -> None:
    assert (result.returncode, result.stderr, result.stdout) == (0, "", stdout)


def test_enable_forks_the_daemon_from_the_loader(loader: Loaded) -> None:
    """The daemon ``enable`` asks for is the loader's child, in its own session, with the
    command's environment (a test fault it names is injected); it serves cells and ends
    at ``disable``, and the loader reaps it and keeps serving the next ``enable``."""
    loader.env["JHLAB_FAULT"] = "destroy-leaks-pages"
    ok(loader.jailhouse("enable", loader.system))
    del loader.env["JHLAB_FAULT"]
    pid = loader.daemon_pid()
    assert parent_of(pid) == loader.proc.pid
    assert os.getsid(pid) == pid
    assert Path(f"/proc/{pid}/comm").read_text().strip() == DAEMON_PROCESS_NAME  # for ps
    assert "FAULT INJECTED (test only): destroy-leaks-pages" in loader.run.log.read_text()
    ok(loader.jailhouse("cell", "create", loader.apic))
    listing = loader.jailhouse("cell", "list")
    assert "apic-demo               shut down" in listing.stdout
    ok(loader.jailhouse("disable"))
    assert gone(pid)
    loader.wait_log(f"process {pid} ended with status 0")
    assert not loader.run.socket.exists()
    ok(loader.jailhouse("enable", loader.system))
    second = loader.daemon_pid()
    assert second != pid and parent_of(second) == loader.proc.pid
    ok(loader.jailhouse("disable"))


def test_failed_enable_and_busy_daemons_through_the_loader(loader: Loaded) -> None:
    """A refused enable ends the forked daemon as it ends a spawned one; of two enables
    at once one daemon wins and the other command reports EBUSY, as without a loader."""
    result = loader.jailhouse("enable", loader.apic)
    assert (result.returncode, result.stderr) == (1, "JAILHOUSE_ENABLE: Invalid argument\n")
    assert "ends (enable failed)" in loader.run.log.read_text()
    procs = [subprocess.Popen([sys.executable, os.fspath(JAILHOUSE), "enable", loader.system],
                              env=loader.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    results = sorted((proc.wait(COMMAND_TIMEOUT), proc.communicate()[1]) for proc in procs)
    assert results == [(0, b""), (1, b"JAILHOUSE_ENABLE: Device or resource busy\n")]
    ok(loader.jailhouse("disable"))


def test_a_bad_request_is_refused_and_serving_goes_on(loader: Loaded) -> None:
    """A request without the two descriptors, or not a start request, is answered with
    EINVAL; the loader stays up."""
    for line in (encode({"op": "start", "argv": [], "env": {}}), b"nonsense\n"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(os.fspath(loader.socket))
            sock.sendall(line)
            answer = decode(sock.makefile("rb").readline())
        assert answer["result"] == -22
    assert loader.proc.poll() is None
    ok(loader.jailhouse("enable", loader.system))
    ok(loader.jailhouse("disable"))


def test_changed_code_replaces_the_loader(tmp_path: Path) -> None:
    """When a preloaded module changed on disk (``jhlab sync``), the next enable is
    served by a spawned daemon running the new code, and the loader replaces itself
    (same pid, preloading again); the enable after that is forked again."""
    lib = tmp_path / "lib"
    shutil.copytree(REPO / "harness", lib / "harness",
                    ignore=shutil.ignore_patterns("__pycache__", "configs", "labs"))
    loaded = start_loader(tmp_path, lib)
    try:
        sysfs = lib / "harness" / "hvmodel" / "sysfs.py"
        sysfs.write_text(sysfs.read_text() + "\n# changed\n")
        ok(loaded.jailhouse("enable", loaded.system))
        pid = loaded.daemon_pid()
        assert parent_of(pid) != loaded.proc.pid  # spawned: not the loader's child
        loaded.wait_log("code changed since the preload")
        loaded.wait_log("preloaded", count=2)
        ok(loaded.jailhouse("disable"))
        assert gone(pid)
        ok(loaded.jailhouse("enable", loaded.system))
        assert parent_of(loaded.daemon_pid()) == loaded.proc.pid
        ok(loaded.jailhouse("disable"))
    finally:
        stop_loader(loaded)


# =========================================================================================
# the launcher (images/guest/src/jailhouse.c)
# =========================================================================================


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guest's tool layout: ``bin/jailhouse`` (the launcher, built as for the
    payload), ``libexec/jailhouse`` (the Python command) and ``lib/harness`` (this
    checkout)."""
    from harness.images import guest_programs

    root = tmp_path_factory.mktemp("tools")
    for folder in ("bin", "lib", "libexec"):
        (root / folder).mkdir()
    shutil.copy2(guest_programs() / "jailhouse", root / "bin" / "jailhouse")
    shutil.copy2(JAILHOUSE, root / "libexec" / "jailhouse")
    (root / "lib" / "harness").symlink_to(REPO / "harness")
    return root


def launch(loader: Loaded, tools: Path, *args: str | bytes,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the launcher with ``args`` (bytes kept as they are)."""
    return subprocess.run([os.fspath(tools / "bin" / "jailhouse"), *args], env=env or loader.env,
                          capture_output=True, timeout=COMMAND_TIMEOUT, check=False)


def script(loader: Loaded, *args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    """Run the Python command itself with ``args``."""
    return subprocess.run([sys.executable, os.fspath(JAILHOUSE), *args], env=loader.env,
                          capture_output=True, timeout=COMMAND_TIMEOUT, check=False)


def outcome(result: subprocess.CompletedProcess[bytes]) -> tuple[int, bytes, bytes]:
    return result.returncode, result.stdout, result.stderr


#: commands that change nothing: the launcher and the Python command must agree on them
STATELESS: tuple[tuple[str | bytes, ...], ...] = (
    (), ("--version",), ("--help",), ("foo",), ("cell", "list"), ("cell", "start", "nosuch"),
    ("cell", "destroy", "0"), ("cell", "create", b"/nonexistent/\xff\xfe.cell"),
    ("console",),
)


def test_the_launcher_answers_as_the_python_command(loader: Loaded, tools: Path) -> None:
    """With and without a hypervisor enabled, each command the launcher is given runs in a
    child of the loader and ends exactly as the Python command does (output, errors, exit
    status; arguments byte for byte)."""
    for enabled in (False, True):
        if enabled:
            assert outcome(launch(loader, tools, "enable", loader.system)) == (0, b"", b"")
        for args in STATELESS:
            assert outcome(launch(loader, tools, *args)) == outcome(script(loader, *args)), args
    assert loader.log_text().count("command ") >= 2 * len(STATELESS) + 1
    assert outcome(launch(loader, tools, "disable")) == (0, b"", b"")


def test_the_launcher_drives_a_lifecycle(loader: Loaded, tools: Path) -> None:
    """Jailhouse's demo steps through the launcher: the cell list it prints, the refused
    first shutdown of apic-demo, the daemon forked for enable and gone after disable."""
    ok = (0, b"", b"")
    assert outcome(launch(loader, tools, "enable", loader.system)) == ok
    pid = loader.daemon_pid()
    assert outcome(launch(loader, tools, "cell", "create", loader.apic)) == ok
    assert outcome(launch(loader, tools, "cell", "load", "apic-demo", "-s", "x", "-a", "0x1000")) == ok
    assert outcome(launch(loader, tools, "cell", "start", "apic-demo")) == ok
    listing = launch(loader, tools, "cell", "list")
    assert listing.returncode == 0 and b"1       apic-demo               running" in listing.stdout
    assert outcome(launch(loader, tools, "cell", "shutdown", "apic-demo")) == \
        (1, b"", b"JAILHOUSE_CELL_LOAD: Operation not permitted\n")
    assert outcome(launch(loader, tools, "cell", "destroy", "apic-demo")) == ok
    assert outcome(launch(loader, tools, "disable")) == ok
    assert gone(pid)


def test_standard_input_keeps_its_name_through_the_loader(loader: Loaded, tools: Path) -> None:
    """A command the loader runs sees its standard streams named as the interpreter names
    them: Jailhouse's config check reads a set from ``-`` and prints ``(<stdin>)``."""
    system = Path(loader.system).read_bytes()
    args = ("config", "check", "-")
    results = [subprocess.run(command, input=system, env=loader.env, capture_output=True,
                              timeout=COMMAND_TIMEOUT, check=False)
               for command in ([os.fspath(tools / "bin" / "jailhouse"), *args],
                               [sys.executable, os.fspath(JAILHOUSE), *args])]
    assert b"Root cell:     QEMU-VM (<stdin>)" in results[0].stdout, results[0]
    assert outcome(results[0]) == outcome(results[1])


def test_without_a_loader_the_launcher_runs_the_script(loader: Loaded, tools: Path) -> None:
    """No loader at ``$JAILHOUSE_LOADER``: the launcher runs ``libexec/jailhouse`` beside
    its own directory, with the same result."""
    env = dict(loader.env, JAILHOUSE_LOADER=os.fspath(loader.socket) + ".absent")
    before = loader.log_text().count("command ")
    for args in (("--version",), ("cell", "start", "nosuch"), ("foo",)):
        assert outcome(launch(loader, tools, *args, env=env)) == outcome(script(loader, *args))
    assert loader.log_text().count("command ") == before


def test_the_launcher_passes_signals_and_ends_as_the_command(loader: Loaded, tools: Path) -> None:
    """SIGINT to the launcher reaches the command in the loader (``console -f`` ends as a
    Python command interrupted ends: status 130); the launcher ends with its status."""
    assert outcome(launch(loader, tools, "enable", loader.system))[0] == 0
    follower = subprocess.Popen([os.fspath(tools / "bin" / "jailhouse"), "console", "-f"],
                                env=loader.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline().startswith(b"Initializing Jailhouse hypervisor")
        follower.send_signal(signal.SIGINT)
        assert follower.wait(COMMAND_TIMEOUT) == 130
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(10)
    assert outcome(launch(loader, tools, "disable"))[0] == 0
