"""Pieces of the driver daemon and the ``jailhouse`` command, in process: Jailhouse's
argument parsing (``strtoll``, ``parse_cell_id``), the console ring as the driver reads it,
the 8250 debug console protocol, the sysfs file writer, host probing helpers, the usage
text, ``cell stats`` rendering and ``hardware check``."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.hvmodel.abi import CELL_ID_UNUSED
from harness.hvmodel.archfactory import make_arch
from harness.hvmodel.console_ring import ConsoleRing, dump_delta
from harness.hvmodel.errors import DaemonError
from harness.hvmodel.hostprobe import parse_memmap
from harness.hvmodel.ipc import CellId, RunDir, b64decode, b64encode, decode, encode
from harness.hvmodel.sysfs_files import SysfsWriter
from harness.hvmodel.tool import USAGE, CellStats, HardwareCheck, Tool, strtoll
from harness.hvmodel.uart import DebugConsole, Uart8250

#: ``help()`` of Jailhouse's tools/jailhouse.c (master) for the built-in commands
JAILHOUSE_USAGE = """Usage: jailhouse { COMMAND | --help | --version }

Available commands:
   enable SYSCONFIG
   disable
   console [-f | --follow]
   cell create CELLCONFIG
   cell list
   cell load { ID | [--name] NAME } { IMAGE | { -s | --string } "STRING" }
             [-a | --address ADDRESS] ...
   cell start { ID | [--name] NAME }
   cell shutdown { ID | [--name] NAME }
   cell destroy { ID | [--name] NAME }
"""


def test_usage_is_jailhouse_help_text() -> None:
    """The built-in part of the usage is Jailhouse's, byte for byte."""
    assert USAGE % "jailhouse" == JAILHOUSE_USAGE


@pytest.mark.parametrize(("text", "value", "ok"), [
    ("1", 1, True), ("0", 0, True), ("", 0, True), ("0x10", 16, True), ("0X1f", 31, True),
    ("010", 8, True), ("08", 0, False), ("-1", -1, True), ("+7", 7, True), ("  12", 12, True),
    ("12 ", 12, False), ("0x", 0, False), ("x1", 0, False), ("-", 0, False), (" ", 0, False),
    ("1a", 1, False), ("9223372036854775807", (1 << 63) - 1, True),
    ("9223372036854775808", (1 << 63) - 1, False), ("-9223372036854775808", -(1 << 63), True),
    ("0x3ef00000", 0x3EF00000, True), ("apic-demo", 0, False),
])
def test_strtoll_base0(text: str, value: int, ok: bool) -> None:
    """``strtoll(text, &end, 0)`` with the ``errno``/``*end`` check of jailhouse.c."""
    assert strtoll(text) == (value, ok)


@pytest.mark.parametrize(("args", "cell", "used"), [
    ([], CellId(), 0),
    (["1"], CellId(1, ""), 1),
    (["0x2", "x"], CellId(2, ""), 1),
    ([""], CellId(0, ""), 1),
    (["apic-demo"], CellId(CELL_ID_UNUSED, "apic-demo"), 1),
    (["-1"], CellId(CELL_ID_UNUSED, "-1"), 1),
    (["--name"], CellId(), 0),
    (["--name", "7"], CellId(CELL_ID_UNUSED, "7"), 2),
    (["4294967297"], CellId(1, ""), 1),
    (["2147483648"], CellId(CELL_ID_UNUSED, "2147483648"), 1),
    (["n" * 40], CellId(CELL_ID_UNUSED, "n" * 31), 1),
])
def test_parse_cell_id(args: list[str], cell: CellId, used: int) -> None:
    """Numbers (base 0, >= 0 as a 32-bit int) are ids, the rest or ``--name X`` names
    (cut to 31 bytes); no argument, or ``--name`` alone, names nothing."""
    assert Tool.parse_cell_id(args) == (cell, used)


def test_cell_id_wire_round_trip() -> None:
    """``struct jailhouse_cell_id`` on the wire; names longer than 31 bytes are cut."""
    assert CellId.from_wire(CellId(3, "").to_wire()) == CellId(3, "")
    assert CellId.from_wire({"id": -1, "name": "x" * 40}) == CellId(-1, "x" * 31)
    with pytest.raises(ValueError):
        CellId.from_wire({"id": "1"})


def test_dump_delta_follows_the_driver() -> None:
    """Nothing new: empty; new bytes up to the buffer size; a reader left behind by more
    than the 2048-byte ring first gets the missed-bytes notice, then the ring."""
    content = bytes(range(256)) * 8
    assert dump_delta(100, content[:100], 100, 128) == (b"", 100)
    assert dump_delta(100, content[:100], 40, 128) == (content[40:100], 100)
    assert dump_delta(100, content[:100], 0, 30) == (content[:30], 30)
    tail = 5000
    notice, head = dump_delta(tail, content, 0, 4096)
    assert notice == b"<missed 2952 bytes of console log>\n"
    assert head == 2952
    assert dump_delta(tail, content, head, 4096) == (content, tail)


def test_console_ring_keeps_the_last_2048_bytes() -> None:
    """The ring holds the newest bytes, counts all of them, and tells what was added."""
    ring = ConsoleRing()
    ring.append(b"a" * 2000)
    mark = ring.tail
    ring.append(b"b" * 100)
    assert ring.tail == 2100
    assert ring.snapshot() == (2100, b"a" * 1948 + b"b" * 100)
    assert ring.since(mark) == b"b" * 100
    assert ring.read(0, 100) == (b"<missed 52 bytes of console log>\n", 52)
    assert not ring.wait_beyond(2100, 0.01)
    assert ring.wait_beyond(2000, 0.01)


class FakePorts:
    """Port backend recording accesses; LSR reports 'busy' ``busy`` times per character."""

    def __init__(self, busy: int = 0) -> None:
        self.busy = busy
        self.pending = busy
        self.log: list[tuple[str, int, int]] = []
        self.closed = False

    def inb(self, port: int) -> int:
        if port == 0x3FD:
            if self.pending:
                self.pending -= 1
                return 0x00
            return 0x60
        return 0xFF

    def outb(self, port: int, value: int) -> None:
        self.log.append(("out", port, value))
        if port == 0x3F8:
            self.pending = self.busy

    def close(self) -> None:
        self.closed = True


def test_uart_8250_protocol() -> None:
    """Each character waits for THRE, goes to THR; a line feed is sent as CR LF."""
    ports = FakePorts(busy=2)
    uart = Uart8250(ports, 0x3F8)
    uart.write(b"ok\n")
    assert [value for _, port, value in ports.log if port == 0x3F8] == [0x6F, 0x6B, 0x0D, 0x0A]
    assert uart.thre_timeouts == 0
    uart.close()
    assert ports.closed


def test_uart_8250_divider_programs_the_baud_rate() -> None:
    """A non-zero divider is programmed first (``uart_init``): DLAB, DLL, DLM, 8N1."""
    ports = FakePorts()
    Uart8250(ports, 0x2F8, divider=1)
    assert ports.log == [("out", 0x2FB, 0x80), ("out", 0x2F8, 1), ("out", 0x2F9, 0), ("out", 0x2FB, 0x03)]


def test_sysfs_writer_adds_changes_and_prunes(tmp_path: Path) -> None:
    """Files appear read-only, change in place, and vanish with their empty directories."""
    root = tmp_path / "sys" / "devices" / "jailhouse"
    writer = SysfsWriter(root)
    writer.write({"enabled": "1\n", "cells/1/name": "x\n", "cells/1/statistics/cpu3/vmexits_total": "0\n"})
    assert (root / "cells/1/name").read_text() == "x\n"
    assert stat.S_IMODE(os.stat(root / "enabled").st_mode) == 0o444
    writer.write({"enabled": "0\n"})
    assert (root / "enabled").read_text() == "0\n"
    assert not (root / "cells").exists()
    assert sorted(p.name for p in root.iterdir()) == ["enabled"]
    writer.clear()
    assert not root.exists()


def test_host_probe_helpers() -> None:
    """``memmap=`` reservations as Linux writes them."""
    cmdline = "console=ttyS0,115200 memmap=82M$0x3a000000 intel_iommu=on memmap=4K$4G,1M!2G"
    assert parse_memmap(cmdline) == ((0x3A000000, 82 << 20), (4 << 30, 4096))


def test_make_arch_choices() -> None:
    """The oracle on request; an unknown arch is refused."""
    _arch, name = make_arch("oracle", {"apic-demo": "deny-first-shutdown"})
    assert name == "oracle"
    with pytest.raises(DaemonError):
        make_arch("qemu")


def _tool(tmp_path: Path) -> tuple[Tool, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Tool(["jailhouse"], RunDir(tmp_path), out, err), out, err


def test_cell_stats_layout(tmp_path: Path) -> None:
    """Title, blank line, COUNTER/SUM/PER SEC header at columns 0/30/40, rows ordered by
    change, then value, then name."""
    tool, _, _ = _tool(tmp_path)
    stats = CellStats(tool, [])
    old = {"vmexits_total": 10, "vmexits_pio": 4, "vmexits_mmio": 9}
    new = {"vmexits_total": 20, "vmexits_pio": 10, "vmexits_mmio": 9}
    assert stats.render("apic-demo", new, old, 2.0) == (
        "Statistics for apic-demo cell\n"
        "\n"
        "COUNTER                              SUM   PER SEC\n"
        "vmexits_total                         20         5\n"
        "vmexits_pio                           10         3\n"
        "vmexits_mmio                           9         0\n"
    )
    assert stats.render("x", new, None, 0.0).splitlines()[3:] == [
        "vmexits_total                         20",
        "vmexits_pio                           10",
        "vmexits_mmio                           9",
    ]


def test_hardware_check_format(tmp_path: Path) -> None:
    """``%-32s`` feature lines; a missing requirement fails the check with exit 2."""
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(
        "processor\t: 0\nflags\t\t: fpu lm svm npt x2apic\n\n"
        "processor\t: 1\nflags\t\t: fpu lm svm npt x2apic\n")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/mem").write_text("")
    (tmp_path / "dev/port").write_text("")
    (tmp_path / "sys/kernel/iommu_groups/0").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/cgroup.controllers").write_text("cpuset cpu io memory\n")
    out, err = io.StringIO(), io.StringIO()
    status = HardwareCheck(out, err, root=os.fspath(tmp_path)).run()
    assert out.getvalue() == (
        "Feature                         Availability\n"
        "------------------------------  ------------------\n"
        "Number of CPUs > 1              ok\n"
        "Long mode                       ok\n"
        "x2APIC                          ok\n"
        "\n"
        "AMD-V (SVM)                     ok\n"
        "  NPT                           ok\n"
        "  Decode assist                 missing (optional)\n"
        "KVM (/dev/kvm)                  MISSING\n"
        "\n"
        "IOMMU (VT-d or AMD-Vi)          ok\n"
        "  VFIO (/dev/vfio/vfio)         missing (optional)\n"
        "\n"
        "/dev/mem                        ok\n"
        "/dev/port                       ok\n"
        "cgroup2 cpuset                  ok\n"
        "\n"
        "Check FAILED!\n"
    )
    assert status == 2
    assert err.getvalue() == ""


class SlowTarget:
    """A console target that takes its time per write and records what it got."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        time.sleep(self.delay)
        self.data += data

    def close(self) -> None:
        self.closed = True


def test_debug_console_flush_waits_for_the_target() -> None:
    """Text goes out in order from the console's thread; :meth:`flush` returns once all
    of it reached the target (and says so), or reports that it did not in time."""
    console = DebugConsole()
    target = SlowTarget(0.2)
    console.set_target(target, "slow")
    for index in range(3):
        console.write(b"line %d\n" % index)
    assert not console.flush(0.01)
    assert console.flush(10)
    assert target.data == b"line 0\nline 1\nline 2\n"
    console.close()
    assert target.closed


@pytest.mark.parametrize("message", [
    {"op": "cell_load", "cell": {"id": -1, "name": "h\u00e9llo\u2028"},
     "images": [{"data": "", "target": 0}]},
    {"result": -22, "errno": "EINVAL", "kernel_log": ["a\nb"], "console": "\x00\xff", "detail": None},
    {"follow": True, "head": 12345678901234567890, "ratio": 0.5, "empty": {}, "list": []},
])
def test_wire_lines_are_compact_json(message: dict[str, object]) -> None:
    """The wire codec (on ``_json``, without the ``json`` package) writes what
    ``json.dumps`` writes with compact separators, and reads it back."""
    line = encode(message)
    assert line == json.dumps(message, separators=(",", ":")).encode() + b"\n"
    assert decode(line) == message


@pytest.mark.parametrize("line", [b"", b"[1]", b"{", b'{"a":1} x', b'{"a":NaN}', b"\xff"])
def test_malformed_wire_lines_are_value_errors(line: bytes) -> None:
    with pytest.raises(ValueError):
        decode(line)


def test_base64_on_the_wire_is_strict() -> None:
    data = bytes(range(256))
    assert b64decode(b64encode(data)) == data
    for text in ("a", "@@@@", "YQ==YQ=="):
        with pytest.raises(ValueError):
            b64decode(text)


#: modules the ``jailhouse`` command must not import on its way to the daemon when it runs
#: without the loader: each costs a noticeable part of a second under the lab's nested TCG.
#: What :mod:`harness.hvmodel.abi` needs (enum, typing, dataclasses) is allowed: the cell id
#: conventions have one definition, and the loader path imports it once for all commands.
HEAVY_MODULES = ("json", "pathlib", "socket", "subprocess", "logging", "threading",
                 "harness.hvmodel.control", "harness.hvmodel.config", "harness.hvmodel.daemon")


@pytest.mark.parametrize("argv", [["--version"], ["cell", "list"], ["cell", "start", "x"]])
def test_the_command_imports_only_the_wire_protocol(tmp_path: Path, argv: list[str]) -> None:
    """``jailhouse`` started as in the lab (``python3 -IS``) runs its built-in commands with
    the interpreter's own modules, :mod:`harness.hvmodel.ipc` and the ABI, nothing of the model."""
    repo = Path(__file__).resolve().parents[2]
    script = repo / "images" / "guest" / "libexec" / "jailhouse"
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {str(repo)!r})\n"
        f"sys.argv = ['jailhouse', *{argv!r}]\n"
        f"path = {str(script)!r}\n"
        "try:\n"
        "    exec(compile(open(path).read(), path, 'exec'), {'__name__': '__main__', '__file__': path})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules), file=sys.stderr)\n"
    )
    env = {"JAILHOUSE_RUN_DIR": os.fspath(tmp_path)}
    result = subprocess.run([sys.executable, "-S", "-c", probe], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.stderr.splitlines()[-1] == "[]", result.stderr


def test_a_daemon_pid_taken_by_another_process_thread_counts_as_gone() -> None:
    """``disable`` waits for the daemon's pid to end; once the loader reaped it, the number
    may name a thread (pidfd_open: EINVAL, ENOENT on later kernels), which means it is gone."""
    import threading

    from harness.hvmodel.tool import _wait_gone

    started, release = threading.Event(), threading.Event()
    ids: list[int] = []

    def body() -> None:
        ids.append(threading.get_native_id())
        started.set()
        release.wait(10)

    thread = threading.Thread(target=body)
    thread.start()
    try:
        assert started.wait(10)
        assert ids[0] != os.getpid()
        assert _wait_gone(ids[0], timeout=0.1) is True
        assert _wait_gone(os.getpid(), timeout=0.1) is False  # a live process is waited for
    finally:
        release.set()
        thread.join(10)
