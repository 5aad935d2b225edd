"""The ``jailhouse`` command and the driver daemon on the host, with the oracle Arch.

Every test runs the real command (``images/guest/libexec/jailhouse``) as a subprocess with
``JAILHOUSE_RUN_DIR`` in a temporary directory; ``enable`` starts the daemon exactly as in
the lab (``--arch oracle``, the apic-demo cell refusing its first shutdown, the debug
console written to a file since the host has no lab UART). An in-process
:class:`~harness.hvmodel.driver.Driver` on an :class:`~harness.hvmodel.arch.oracle.OracleArch`
replays the same operations (and the same sysfs reads) and predicts every output:
``cell list`` byte for byte, every sysfs file, ``cell stats``, the console, the UART bytes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.hvmodel.arch.oracle import OracleArch, deny_first_shutdown
from harness.hvmodel.config import load_source
from harness.hvmodel.daemon import host_from_wire
from harness.hvmodel.driver import Driver, HostInfo, Image
from harness.hvmodel.errors import HvError
from harness.hvmodel.ipc import DriverClient, RunDir, b64encode
from harness.hvmodel.sysfs import cell_list, sysfs_tree
from harness.hvmodel.tool import CellStats
from test_suites.unit.test_linux_params import kernel_image

REPO = Path(__file__).resolve().parents[2]
JAILHOUSE = REPO / "images" / "guest" / "libexec" / "jailhouse"
CONFIGS = REPO / "harness" / "configs"
#: seconds one command may take
COMMAND_TIMEOUT = 60.0
USAGE_FIRST_LINE = "Usage: jailhouse { COMMAND | --help | --version }\n"

#: ``cell list`` lines of the demo, trailing spaces included (reference §6.4)
LIST_HEADER = ("ID      Name                    State             Assigned CPUs           "
               "Failed CPUs             \n")
ROOT_ROW = ("0       QEMU-VM                 running           0-2                     "
            "                        \n")
APIC_SHUT_DOWN = ("1       apic-demo               shut down         3                       "
                  "                        \n")
APIC_RUNNING = ("1       apic-demo               running           3                       "
                "                        \n")


@dataclass(frozen=True)
class Files:
    """The compiled configs and images the tests load."""

    system: str
    apic: str
    cpu0: str
    image: str
    image_bytes: bytes


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    """qemu-x86 and apic-demo compiled to ``.cell``, a cell config claiming CPU 0, an image."""
    folder = tmp_path_factory.mktemp("configs")
    system = folder / "qemu-x86.cell"
    system.write_bytes(load_source(CONFIGS / "qemu-x86.toml").to_bytes())
    apic = folder / "apic-demo.cell"
    apic.write_bytes(load_source(CONFIGS / "apic-demo.toml").to_bytes())
    source = (CONFIGS / "apic-demo.toml").read_text()
    cpu0_source = folder / "cpu0-demo.toml"
    cpu0_source.write_text(source.replace('name = "apic-demo"', 'name = "cpu0-demo"')
                           .replace('cpus = "3"', 'cpus = "0"'))
    cpu0 = folder / "cpu0-demo.cell"
    cpu0.write_bytes(load_source(cpu0_source).to_bytes())
    image_bytes = bytes(range(256)) * 16
    image = folder / "apic-demo.bin"
    image.write_bytes(image_bytes)
    return Files(os.fspath(system), os.fspath(apic), os.fspath(cpu0), os.fspath(image), image_bytes)


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie not yet reaped counts as gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return text.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    """Wait until ``pid`` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.05)
    return process_gone(pid)


class Setup:
    """The command line, a run directory, and the oracle that predicts both.

    :param run: the run directory
    :param uart: the file the daemon's debug console writes to
    """

    def __init__(self, run: Path, uart: Path) -> None:
        self.run = RunDir(run)
        self.uart = uart
        self.env = dict(os.environ)
        self.env.update({
            "JAILHOUSE_RUN_DIR": os.fspath(run),
            "JAILHOUSE_ARCH": "oracle",
            "JAILHOUSE_DAEMON_ARGS": f"--responder apic-demo=deny-first-shutdown --debug-console file:{uart}",
            "PYTHONPATH": os.fspath(REPO),
        })
        self.arch = OracleArch()
        self.arch.responders["apic-demo"] = deny_first_shutdown()
        self.oracle = Driver(self.arch, HostInfo())
        self.tree: dict[str, str] = sysfs_tree(self.oracle)
        self.pids: set[int] = set()

    def jailhouse(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``jailhouse ARGS``."""
        return subprocess.run([sys.executable, os.fspath(JAILHOUSE), *args], env=self.env,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        """Start ``jailhouse ARGS`` without waiting."""
        return subprocess.Popen([sys.executable, os.fspath(JAILHOUSE), *args], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # -- the oracle, doing what the daemon does ------------------------------------------

    def apply(self, operation: Callable[[Driver], object]) -> int:
        """One driver command in the oracle, then the sysfs refresh the daemon does."""
        try:
            operation(self.oracle)
            result = 0
        except HvError as err:
            result = err.code
        self.refresh()
        return result

    def refresh(self) -> dict[str, str]:
        """A reading of the whole sysfs tree (what the daemon does for a refresh)."""
        self.tree = sysfs_tree(self.oracle)
        return self.tree

    # -- the daemon ------------------------------------------------------------------------

    def state(self) -> dict[str, object]:
        """The daemon's ``state`` reply."""
        with DriverClient(self.run.socket, timeout=10) as client:
            return client.request("state")

    def files(self) -> dict[str, str]:
        """The sysfs tree the daemon wrote, as ``{path: text}``."""
        root = self.run.sysfs
        tree = {}
        for path in sorted(root.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                rel = path.relative_to(root).as_posix()
                tree[rel] = data.decode("latin-1" if rel == "console" else "utf-8")
        return tree

    def daemon_pid(self) -> int | None:
        """The running daemon's pid, or None."""
        try:
            pid = self.state()["pid"]
        except OSError:
            return None
        assert isinstance(pid, int)
        self.pids.add(pid)
        return pid

    def cleanup(self) -> None:
        """Stop a daemon a test left running (and say so)."""
        pid = self.daemon_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            wait_gone(pid)
        for pid in self.pids:
            if not wait_gone(pid, 5.0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def jh(tmp_path: Path) -> Iterator[Setup]:
    """A fresh run directory with the command and its oracle; no daemon survives."""
    made = Setup(tmp_path / "run", tmp_path / "uart.txt")
    try:
        yield made
    finally:
        made.cleanup()


def ok(result: subprocess.CompletedProcess[str], stdout: str = "") -> None:
    """Exit 0, the expected stdout, nothing on stderr."""
    assert (result.returncode, result.stderr, result.stdout) == (0, "", stdout)


def fails(result: subprocess.CompletedProcess[str], stderr: str, status: int = 1) -> None:
    """Exit 1 with exactly ``stderr`` and no stdout."""
    assert (result.returncode, result.stdout, result.stderr) == (status, "", stderr)


def usage(result: subprocess.CompletedProcess[str], status: int = 1) -> None:
    """The usage text on stdout, exit ``status``."""
    assert result.returncode == status
    assert result.stderr == ""
    assert result.stdout.startswith(USAGE_FIRST_LINE)
    assert "   cell destroy { ID | [--name] NAME }\n" in result.stdout


def _render(name: str, values: dict[str, int]) -> str:
    """What ``cell stats ... -n -i 0`` prints for these counters."""
    stats = object.__new__(CellStats)
    stats.cpu = None
    return stats.render(name, values, None, 0.0)


# =========================================================================================
# the demo sequence
# =========================================================================================


def test_demo_sequence(jh: Setup, files: Files) -> None:
    """Jailhouse's demo: enable, create, load, start, list, stats, shutdown twice (apic-demo
    refuses the first), destroy, disable; every output and every sysfs file as the oracle
    predicts, the daemon gone at the end and the console on the debug UART."""
    system = Path(files.system).read_bytes()
    apic = Path(files.apic).read_bytes()

    ok(jh.jailhouse("enable", files.system))
    jh.apply(lambda d: d.enable(system))
    pid = jh.daemon_pid()
    assert pid is not None
    state = jh.state()
    assert state["arch"] == "oracle" and state["enabled"] is True
    assert host_from_wire(state["host"]) == HostInfo()  # type: ignore[arg-type]
    assert jh.files() == jh.tree

    ok(jh.jailhouse("cell", "create", files.apic))
    jh.apply(lambda d: d.cell_create(apic))
    ok(jh.jailhouse("cell", "list"), cell_list(jh.oracle, jh.refresh()))
    assert jh.files() == jh.tree

    ok(jh.jailhouse("cell", "load", "apic-demo", files.image, "-s", "console=ttyS0", "-a", "0x1000"))
    jh.apply(lambda d: d.cell_load("apic-demo", [Image(files.image_bytes, 0),
                                                   Image(b"console=ttyS0\0", 0x1000)]))
    ok(jh.jailhouse("cell", "start", "apic-demo"))
    jh.apply(lambda d: d.cell_start("apic-demo"))
    listing = cell_list(jh.oracle, jh.refresh())
    ok(jh.jailhouse("cell", "list"), listing)
    assert listing == LIST_HEADER + ROOT_ROW + APIC_RUNNING
    assert jh.files() == jh.tree

    result = jh.jailhouse("cell", "stats", "apic-demo", "-n", "--interval", "0")
    jh.refresh()
    ok(result, _render("apic-demo", {k.rsplit("/", 1)[1]: int(v) for k, v in jh.tree.items()
                                     if k.startswith("cells/1/statistics/vmexits_")}))
    result = jh.jailhouse("cell", "stats", "0", "--non-interactive", "-i", "0")
    jh.refresh()
    ok(result, _render("QEMU-VM", {k.rsplit("/", 1)[1]: int(v) for k, v in jh.tree.items()
                                   if k.startswith("cells/0/statistics/vmexits_")}))
    assert "vmexits_hypercall" in result.stdout.splitlines()[3]  # the root reads sysfs

    fails(jh.jailhouse("cell", "shutdown", "apic-demo"), "JAILHOUSE_CELL_LOAD: Operation not permitted\n")
    assert jh.apply(lambda d: d.cell_shutdown("apic-demo")) == -1
    ok(jh.jailhouse("cell", "shutdown", "apic-demo"))
    jh.apply(lambda d: d.cell_shutdown("apic-demo"))
    ok(jh.jailhouse("cell", "list"), cell_list(jh.oracle, jh.refresh()))
    assert "apic-demo               shut down" in cell_list(jh.oracle, jh.tree)

    ok(jh.jailhouse("cell", "destroy", "apic-demo"))
    jh.apply(lambda d: d.cell_destroy("apic-demo"))
    assert jh.files() == jh.tree
    assert not (jh.run.cells / "1").exists()
    hv = jh.oracle.hv
    assert hv is not None
    console = hv.console.content
    ok(jh.jailhouse("console"), console)

    ok(jh.jailhouse("disable"))
    jh.apply(lambda d: d.disable())
    assert process_gone(pid)
    assert not jh.run.socket.exists()
    assert jh.files() == jh.tree == {
        "enabled": "0\n", "mem_pool_size": "0\n", "mem_pool_used": "0\n",
        "remap_pool_size": "0\n", "remap_pool_used": "0\n", "console": "",
    }
    ok(jh.jailhouse("cell", "list"))
    uart = "".join(jh.arch.uart)
    assert uart.endswith(" Releasing CPU 3\n")
    assert jh.uart.read_bytes() == uart.replace("\n", "\r\n").encode("latin-1")
    # The console kept at disable, as the driver's last_console.
    ok(jh.jailhouse("console"), uart[-2048:] if len(uart) <= 2048 else
       f"<missed {len(uart) - 2048} bytes of console log>\n" + uart[-2048:])


def test_disable_twice_with_a_refusing_cell(jh: Setup, files: Files) -> None:
    """``disable`` destroys the cells first; apic-demo refuses once, so the first disable
    fails with EPERM and names the cell in the kernel log, the second one succeeds."""
    ok(jh.jailhouse("enable", files.system))
    ok(jh.jailhouse("cell", "create", files.apic))
    ok(jh.jailhouse("cell", "load", "1", files.image))
    ok(jh.jailhouse("cell", "start", "1"))
    pid = jh.daemon_pid()
    assert pid is not None
    with DriverClient(jh.run.socket) as client:
        answer = client.request("disable")
    assert answer["result"] == -1 and answer["errno"] == "EPERM"
    assert answer["kernel_log"] == ['Jailhouse: failed to destroy cell "apic-demo"']
    assert not process_gone(pid)
    ok(jh.jailhouse("disable"))
    assert wait_gone(pid)


# =========================================================================================
# errors
# =========================================================================================


@pytest.mark.parametrize("args", [
    [], ["foo"], ["enable"], ["enable", "a", "b"], ["cell"], ["cell", "foo"], ["cell", "create"],
    ["cell", "create", "a", "b"], ["cell", "list", "x"], ["cell", "load"], ["cell", "load", "apic-demo"],
    ["cell", "load", "1", "img", "-a"], ["cell", "load", "1", "-s"], ["cell", "load", "--name"],
    ["cell", "load", "1", "-s", "x", "--address"], ["cell", "start"], ["cell", "start", "--name"],
    ["cell", "start", "1", "2"], ["cell", "shutdown"], ["cell", "shutdown", "1", "img"],
    ["cell", "destroy"], ["cell", "destroy", "--name", "a", "b"], ["console", "-x"], ["config"],
    ["config", "foo"], ["config", "create", "x"], ["hardware"], ["hardware", "foo"],
    ["--Help"],
])
def test_usage_errors_exit_1(jh: Setup, args: list[str]) -> None:
    """Wrong command lines print the usage on stdout and exit 1 (``help(argv[0], 1)``)."""
    usage(jh.jailhouse(*args))


def test_help_and_version(jh: Setup) -> None:
    """``--help`` exits 0 with the usage, ``--version`` names the tool and version."""
    usage(jh.jailhouse("--help"), status=0)
    ok(jh.jailhouse("--version"), "Jailhouse management tool v0.12 (jhlab)\n")


def test_bad_address_is_a_usage_error(jh: Setup, files: Files) -> None:
    """An address ``strtoll`` does not take completely is a usage error, checked after
    the image was read (as jailhouse.c does)."""
    usage(jh.jailhouse("cell", "load", "1", files.image, "-a", "0x1000z"))
    fails(jh.jailhouse("cell", "load", "1", "/nonexistent", "-a", "zz"),
          "opening /nonexistent: No such file or directory\n")


def test_without_a_daemon_the_module_is_not_loaded(jh: Setup, files: Files, tmp_path: Path) -> None:
    """No run directory: commands that open the device fail as if ``/dev/jailhouse`` were
    missing, ``cell list`` prints nothing; files are read (and fail) first."""
    for args in (["disable"], ["console"], ["console", "-f"], ["cell", "create", files.apic],
                 ["cell", "start", "1"], ["cell", "destroy", "apic-demo"], ["cell", "shutdown", "1"],
                 ["cell", "load", "1", files.image]):
        fails(jh.jailhouse(*args), "opening /dev/jailhouse: No such file or directory\n")
    ok(jh.jailhouse("cell", "list"))
    fails(jh.jailhouse("enable", "/nonexistent.cell"),
          "opening /nonexistent.cell: No such file or directory\n")
    fails(jh.jailhouse("cell", "create", "/nonexistent.cell"),
          "opening /nonexistent.cell: No such file or directory\n")
    fails(jh.jailhouse("enable", os.fspath(tmp_path)), f"reading {tmp_path}: Is a directory\n")
    fails(jh.jailhouse("cell", "stats", "1", "-n"), "reading stats: No such file or directory\n")
    assert not jh.run.socket.exists()


def test_test_device_option_builds_the_unit_in(jh: Setup, files: Files) -> None:
    """``--test-device`` (CONFIG_TEST_DEVICE): the daemon's hypervisor has the test device
    unit, initialized between the IOAPIC and CAT as the oracle built the same way
    predicts; without the option (the fixture's daemon before) it has none."""
    system = Path(files.system).read_bytes()
    ok(jh.jailhouse("enable", files.system))
    ok(jh.jailhouse("disable"))
    assert b"Initializing unit: Test device" not in jh.uart.read_bytes()
    jh.uart.unlink()
    jh.env["JAILHOUSE_DAEMON_ARGS"] += " --test-device"
    ok(jh.jailhouse("enable", files.system))
    oracle = Driver(OracleArch(), HostInfo(), test_device=True)
    oracle.enable(system)
    assert oracle.hv is not None
    expected = oracle.hv.console.content
    assert "Initializing unit: IOAPIC\nInitializing unit: Test device\n" \
           "Initializing unit: Cache Allocation Technology\n" in expected
    assert jh.uart.read_bytes() == expected.replace("\n", "\r\n").encode("latin-1")
    ok(jh.jailhouse("disable"))


def test_failed_enable_ends_the_daemon(jh: Setup, files: Files) -> None:
    """A cell config given to ``enable`` is refused (EINVAL, "Not a system configuration")
    and the daemon it started ends; the module then counts as loaded but disabled."""
    fails(jh.jailhouse("enable", files.apic), "JAILHOUSE_ENABLE: Invalid argument\n")
    assert not jh.run.socket.exists()  # the command waited for the daemon to end
    log = jh.run.log.read_text()
    assert "jailhouse: Not a system configuration" in log
    assert "daemon" in log and "ends (enable failed)" in log
    fails(jh.jailhouse("disable"), "JAILHOUSE_DISABLE: Invalid argument\n")
    fails(jh.jailhouse("console"), "read(console): Resource temporarily unavailable\n")


def test_ioctl_errors_while_enabled(jh: Setup, files: Files) -> None:
    """The driver's and the hypervisor's errors, as ``perror`` of the ioctl name; the
    driver's ``pr_err`` texts come back in the reply's kernel log."""
    ok(jh.jailhouse("enable", files.system))
    fails(jh.jailhouse("enable", files.system), "JAILHOUSE_ENABLE: Device or resource busy\n")
    ok(jh.jailhouse("cell", "create", files.apic))
    fails(jh.jailhouse("cell", "create", files.apic), "JAILHOUSE_CELL_CREATE: File exists\n")
    fails(jh.jailhouse("cell", "create", files.system), "JAILHOUSE_CELL_CREATE: Invalid argument\n")
    fails(jh.jailhouse("cell", "create", files.cpu0), "JAILHOUSE_CELL_CREATE: Invalid argument\n")
    fails(jh.jailhouse("cell", "start", "nosuch"), "JAILHOUSE_CELL_START: No such file or directory\n")
    fails(jh.jailhouse("cell", "start", "--name", "1"), "JAILHOUSE_CELL_START: No such file or directory\n")
    fails(jh.jailhouse("cell", "start", "7"), "JAILHOUSE_CELL_START: No such file or directory\n")
    fails(jh.jailhouse("cell", "destroy", "0"), "JAILHOUSE_CELL_DESTROY: Invalid argument\n")
    fails(jh.jailhouse("cell", "shutdown", "QEMU-VM"), "JAILHOUSE_CELL_LOAD: Invalid argument\n")
    fails(jh.jailhouse("cell", "load", "0x1", files.image, "-a", "0x200000"),
          "JAILHOUSE_CELL_LOAD: Invalid argument\n")
    fails(jh.jailhouse("cell", "load", "apic-demo", files.image, "-a", "0xff800"),
          "JAILHOUSE_CELL_LOAD: Invalid argument\n")
    ok(jh.jailhouse("cell", "load", "apic-demo", files.image, "-a", "0xff000"))
    log = jh.run.log.read_text()
    assert "jailhouse: Not a cell configuration" in log
    assert "Cannot assign CPU 0 to other cells" in log
    with DriverClient(jh.run.socket) as client:
        answer = client.request("cell_create", config=b64encode(Path(files.cpu0).read_bytes()))
        assert (answer["result"], answer["errno"]) == (-22, "EINVAL")
        assert answer["kernel_log"] == ["Cannot assign CPU 0 to other cells"]
        assert client.request("no_such_ioctl")["result"] == -22
    ok(jh.jailhouse("cell", "list"), LIST_HEADER + ROOT_ROW + APIC_SHUT_DOWN)
    ok(jh.jailhouse("disable"))


def test_after_disable_the_module_stays_loaded(jh: Setup, files: Files) -> None:
    """After ``disable``: the device answers EINVAL, ``cell list`` is empty, ``console``
    shows the last console once and exits 0."""
    ok(jh.jailhouse("enable", files.system))
    console = jh.jailhouse("console").stdout
    ok(jh.jailhouse("disable"))
    for args, name in ((["disable"], "JAILHOUSE_DISABLE"),
                       (["cell", "create", files.apic], "JAILHOUSE_CELL_CREATE"),
                       (["cell", "start", "1"], "JAILHOUSE_CELL_START"),
                       (["cell", "destroy", "1"], "JAILHOUSE_CELL_DESTROY"),
                       (["cell", "shutdown", "apic-demo"], "JAILHOUSE_CELL_LOAD")):
        fails(jh.jailhouse(*args), f"{name}: Invalid argument\n")
    ok(jh.jailhouse("cell", "list"))
    result = jh.jailhouse("console")
    assert result.returncode == 0
    assert result.stdout.startswith(console)
    assert result.stdout.endswith("Shutting down hypervisor\n Releasing CPU 0\n Releasing CPU 1\n"
                                  " Releasing CPU 2\n Releasing CPU 3\n")


# =========================================================================================
# console, signals, concurrency
# =========================================================================================


def read_until(stream: object, needle: bytes, timeout: float) -> bytes:
    """Read a pipe until ``needle`` appears (bounded)."""
    import selectors

    data = b""
    fd = stream.fileno()  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while needle not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    return data


def test_console_follow_streams_and_ends_with_the_daemon(jh: Setup, files: Files) -> None:
    """``console -f`` shows the console so far, then each new line as it is written, while
    other commands keep working; it ends (exit 0) when ``disable`` ends the daemon."""
    ok(jh.jailhouse("enable", files.system))
    follower = jh.popen("console", "-f")
    try:
        assert follower.stdout is not None
        first = read_until(follower.stdout, b"Activating hypervisor\n", 20)
        assert first.startswith(b"Initializing Jailhouse hypervisor v0.12 (jhlab) on CPU 0\n")
        ok(jh.jailhouse("cell", "create", files.apic))
        more = read_until(follower.stdout, b"Page pool usage after cell creation", 20)
        assert b'Created cell "apic-demo"\n' in more
        ok(jh.jailhouse("cell", "list"), cell_list_after_create())
        ok(jh.jailhouse("disable"))
        rest = read_until(follower.stdout, b" Releasing CPU 3\n", 20)
        assert b"Closing cell \"apic-demo\"\n" in rest
        assert follower.wait(20) == 0
        assert follower.stderr is not None and follower.stderr.read() == b""
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(10)


def cell_list_after_create() -> str:
    """``cell list`` right after apic-demo was created."""
    return LIST_HEADER + ROOT_ROW + APIC_SHUT_DOWN


def test_sigterm_leaves_nothing_behind(jh: Setup, files: Files) -> None:
    """SIGTERM with a running cell that refuses its first shutdown: the daemon disables
    through the model (asking again), resets the sysfs tree, removes its socket and ends;
    only its log, the kept console and the disabled tree remain."""
    ok(jh.jailhouse("enable", files.system))
    ok(jh.jailhouse("cell", "create", files.apic))
    ok(jh.jailhouse("cell", "load", "apic-demo", files.image))
    ok(jh.jailhouse("cell", "start", "apic-demo"))
    pid = jh.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid)
    assert sorted(p.name for p in jh.run.path.iterdir()) == ["daemon.log", "last_console", "sys"]
    assert jh.files() == {
        "enabled": "0\n", "mem_pool_size": "0\n", "mem_pool_used": "0\n",
        "remap_pool_size": "0\n", "remap_pool_used": "0\n", "console": "",
    }
    log = jh.run.log.read_text()
    assert "disable at shutdown, attempt 1: EPERM" in log
    assert "hypervisor disabled at shutdown" in log
    assert "ends (signal SIGTERM)" in log
    console = jh.jailhouse("console").stdout
    assert 'Closing cell "apic-demo"\n' in console and console.endswith(" Releasing CPU 3\n")
    # A new enable works in the same run directory.
    ok(jh.jailhouse("enable", files.system))
    ok(jh.jailhouse("disable"))


def test_socket_is_private_and_daemon_detached(jh: Setup, files: Files) -> None:
    """The socket is mode 0600; the daemon runs in its own session, outliving ``enable``."""
    ok(jh.jailhouse("enable", files.system))
    assert (jh.run.socket.stat().st_mode & 0o777) == 0o600
    pid = jh.daemon_pid()
    assert pid is not None
    assert os.getsid(pid) == pid
    ok(jh.jailhouse("disable"))
    assert wait_gone(pid)


def test_concurrent_enables_start_one_daemon(jh: Setup, files: Files) -> None:
    """Two ``enable`` at once: one daemon (the run directory is locked), one success, one
    EBUSY."""
    first, second = jh.popen("enable", files.system), jh.popen("enable", files.system)
    results = sorted((proc.wait(COMMAND_TIMEOUT), proc.communicate()[1]) for proc in (first, second))
    assert results == [(0, b""), (1, b"JAILHOUSE_ENABLE: Device or resource busy\n")]
    pid = jh.daemon_pid()
    assert pid is not None
    ok(jh.jailhouse("disable"))
    assert wait_gone(pid)


def test_config_commands_delegate_to_the_config_cli(jh: Setup, files: Files) -> None:
    """``config check`` is Jailhouse's ``jailhouse-config-check`` (usage named ``jailhouse
    config check``, no jhlab options); ``config show`` is hvmodel's config CLI named
    ``jailhouse config``."""
    module = [sys.executable, "-m", "harness.hvmodel.config"]
    for args in (["check", files.system, files.apic], ["show", files.apic]):
        expected = subprocess.run([*module, *args], env=jh.env, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT, check=False)
        result = jh.jailhouse("config", *args)
        assert (result.returncode, result.stdout, result.stderr) == \
            (expected.returncode, expected.stdout, expected.stderr)
    result = jh.jailhouse("config", "check", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: jailhouse config check [-h] SYSCONFIG [CELLCONFIG ...]\n")
    result = jh.jailhouse("config", "check", "--next", files.system)
    assert result.returncode == 2
    assert result.stderr.endswith("jailhouse config check: error: unrecognized arguments: --next\n")
    result = jh.jailhouse("config", "show", "/nonexistent.cell")
    assert result.returncode == 1
    assert result.stderr.startswith("jailhouse config: /nonexistent.cell")


def test_cell_stats_on_a_terminal_is_interactive(jh: Setup, files: Files) -> None:
    """On a terminal ``cell stats`` is the curses screen; ``q`` quits with status 0."""
    import pty
    import selectors

    ok(jh.jailhouse("enable", files.system))
    ok(jh.jailhouse("cell", "create", files.apic))
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command on the terminal
        os.environ.update(jh.env, TERM="xterm")
        os.execv(sys.executable, [sys.executable, os.fspath(JAILHOUSE), "cell", "stats", "apic-demo"])
    screen = b""
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            deadline = time.monotonic() + 20
            while b"vmexits_total" not in screen and time.monotonic() < deadline:
                if sel.select(0.2):
                    screen += os.read(fd, 65536)
            os.write(fd, b"q")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if sel.select(0.2):
                    with contextlib.suppress(OSError):
                        screen += os.read(fd, 65536)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("cell stats did not quit on 'q'")
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"Statistics for apic-demo cell" in screen
    ok(jh.jailhouse("disable"))


def _daemon_resources(pid: int) -> tuple[int, int]:
    """Open file descriptors and threads of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return fds, threads


def test_repeated_cycles_leak_nothing(jh: Setup, files: Files) -> None:
    """20 create/load/start/destroy cycles through the socket (plus console readers that
    come and go) leave the daemon with the descriptors and threads it had."""
    ok(jh.jailhouse("enable", files.system))
    pid = jh.daemon_pid()
    assert pid is not None
    time.sleep(0.5)  # connection threads of the last commands have ended
    before = _daemon_resources(pid)
    apic = b64encode(Path(files.apic).read_bytes())
    image = [{"data": b64encode(files.image_bytes), "target": 0}]
    cell = {"id": -1, "name": "apic-demo"}
    for _ in range(20):
        with DriverClient(jh.run.socket) as client:
            assert client.request("cell_create", config=apic)["result"] == 0
            assert client.request("cell_load", cell=cell, images=image)["result"] == 0
            assert client.request("cell_start", cell=cell)["result"] == 0
            client.request("cell_load", cell=cell, images=[])  # apic-demo refuses once
            assert client.request("cell_destroy", cell=cell)["result"] == 0
            assert client.request("console", head=0)["result"] > 0
    deadline = time.monotonic() + 10
    while _daemon_resources(pid) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _daemon_resources(pid) == before
    ok(jh.jailhouse("disable"))


def test_cell_linux_creates_loads_and_starts_through_the_daemon(jh: Setup, tmp_path: Path) -> None:
    """``cell linux`` on a running daemon: the cell created from the config, the loader at
    0, the kernel, the initrd and the parameters (the file ``-w`` writes) loaded at the
    addresses ``-w`` prints, in that order, then started: every sysfs file, the console
    and ``cell list`` as the oracle predicts for the same ioctls; a second ``cell linux``
    after a destroy does it again."""
    system = tmp_path / "qemu-x86.cell"
    system.write_bytes(load_source(CONFIGS / "qemu-x86.toml").to_bytes())
    cell = tmp_path / "linux-x86-demo.cell"
    cell.write_bytes(load_source(CONFIGS / "linux-x86-demo.toml").to_bytes())
    kernel, initrd, loader, params = (tmp_path / name for name in
                                      ("bzImage", "rootfs.cpio", "linux-loader.bin", "params"))
    kernel.write_bytes(kernel_image())
    initrd.write_bytes(b"070701" + bytes(5000))
    loader.write_bytes(b"\xf4" * 256)
    jh.env["JAILHOUSE_LINUX_LOADER"] = os.fspath(loader)
    # -k: the synthetic kernel file is tiny beside the init_size its header claims
    args = (os.fspath(cell), os.fspath(kernel), "-i", os.fspath(initrd), "-c", "quiet", "-k", "1100")

    written = jh.jailhouse("cell", "linux", *args, "-w", os.fspath(params))
    assert written.returncode == 0, written.stderr
    load_line = written.stdout.splitlines()[3].split()
    assert load_line[:4] == ["jailhouse", "cell", "load", "linux-x86-demo"]
    targets = [int(value, 16) for value in load_line[6::3]]
    images = [Image(path.read_bytes(), target)
              for path, target in zip((loader, kernel, initrd, params), targets, strict=True)]

    ok(jh.jailhouse("enable", os.fspath(system)))
    jh.apply(lambda d: d.enable(system.read_bytes()))
    for _ in range(2):
        ok(jh.jailhouse("cell", "linux", *args))
        jh.apply(lambda d: d.cell_create(cell.read_bytes()))
        for image in images:
            jh.apply(lambda d, image=image: d.cell_load("linux-x86-demo", [image]))
        jh.apply(lambda d: d.cell_start("linux-x86-demo"))
        listing = cell_list(jh.oracle, jh.refresh())
        ok(jh.jailhouse("cell", "list"), listing)
        assert "linux-x86-demo          running           2-3" in listing
        assert jh.files() == jh.tree
        ok(jh.jailhouse("cell", "destroy", "linux-x86-demo"))
        jh.apply(lambda d: d.cell_destroy("linux-x86-demo"))
    ok(jh.jailhouse("disable"))
