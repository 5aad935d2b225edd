"""Stand-ins for unit tests (labgrid's ``driver/fake.py``), shipped once with the package.

None of them pretends a result: each does the real thing on this host instead of in a lab.

* :class:`LocalRootCell`: a :class:`~harness.protocol.LabChannels` whose "root cell" is
  this host: commands run with ``sh -c`` here, files are local, both consoles are
  transcript files (:class:`FileConsole`), and there is no QEMU behind it (its
  :attr:`~LocalRootCell.qmp` refuses with :class:`~harness.errors.QmpError`). With
  :meth:`~LocalRootCell.checked_options` the checked driver runs the real ``jailhouse``
  command and driver daemon (oracle Arch) here, in a private run directory.
* :class:`LocalProgram`: a :class:`~harness.protocol.LineProgram` that is a process on
  this host (what :meth:`LocalRootCell.start` returns).
* :class:`WithoutPrograms`: a lab's channels minus starting programs
  (:class:`~harness.protocol.ProgramRunner`), as a lab with SSH down offers them.
* :class:`FileConsole`: a :class:`~harness.protocol.Console` that waits for text another
  process writes to a file.
* :class:`FakeChardev`: QEMU's side of a serial chardev socket, to drive a real
  :class:`~harness.console.SerialConsole`.
* :class:`LabLogs`: a lab's log folder with no QEMU behind it: a test writes its serial
  transcripts and QMP event log as QEMU and the lab's recorder do (for the report).
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from harness.console import TranscriptConsole
from harness.errors import ConsoleError, QmpError
from harness.protocol import COMMAND_TIMEOUT, CommandResult, Console, LabChannels, QmpChannel
from harness.recipes import PACKAGE_DIR, find_recipes

LOG = logging.getLogger(__name__)

__all__ = ["FakeChardev", "FileConsole", "LabLogs", "LocalProgram", "LocalRootCell", "WithoutPrograms"]


class FileConsole(TranscriptConsole):
    """A console whose output is a file written by someone else (a daemon's debug
    console, for example); what is typed is kept in :attr:`typed`.

    :param name: shown in errors
    :param transcript: the file (created empty when missing)
    :param failures: regular expressions that end any wait as a failure
    """

    def __init__(self, name: str, transcript: Path, failures: Sequence[str] = ()) -> None:
        transcript.touch()
        #: what was sent, in order
        self.typed: list[str] = []
        super().__init__(name, transcript, failures, typist=self.typed.append)


class LocalRootCell:
    """This host as a lab's root cell (see the module docstring).

    Lifecycle: construct (lays out ``root``: ``tools/`` with the guest's ``jailhouse``
    command and this package as its ``lib/harness``, a fake PCI device folder, the two
    console files) → use → nothing to close (``root`` is the caller's).

    :param root: an empty folder of the caller's (a test's ``tmp_path``)
    """

    #: the fake PCI functions, address -> driver (None: unbound)
    PCI_DEVICES: Final[Mapping[str, str | None]] = {"0000:00:02.0": "e1000e", "0000:00:05.0": None}

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tools = root / "tools"
        self.pci_root = root / "pci"
        (self.tools / "bin").mkdir(parents=True, exist_ok=True)
        (self.tools / "lib").mkdir(exist_ok=True)
        shutil.copy2(find_recipes().guest_libexec / "jailhouse", self.tools / "bin" / "jailhouse")
        lib = self.tools / "lib" / "harness"
        if not lib.exists():
            lib.symlink_to(PACKAGE_DIR)
        for address, driver in self.PCI_DEVICES.items():
            (self.pci_root / address).mkdir(parents=True, exist_ok=True)
            if driver is not None and not (self.pci_root / address / "driver").exists():
                (root / "drivers" / driver).mkdir(parents=True, exist_ok=True)
                (self.pci_root / address / "driver").symlink_to(root / "drivers" / driver)
        self._console = FileConsole("local console (hypervisor debug console)", root / "console.log")
        self._cell_console = FileConsole("local cell console", root / "cell.log")

    def __repr__(self) -> str:
        return f"LocalRootCell({self.root})"

    def checked_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~harness.checked.CheckedJailhouse` that point it
        at this root cell: its tools, run directory, upload folder, PCI folder, no
        cpuset, the daemon's debug console into :attr:`console`'s file, and the host
        kernel's console level left alone."""
        return {
            "tools": str(self.tools), "run_dir": str(self.root / "run"),
            "files": str(self.root / "files"), "pci_root": str(self.pci_root),
            "cpuset": str(self.root / "no-cpuset"),
            "daemon_args": [f"--debug-console=file:{self._console.transcript}"],
            "kernel_console_level": None,
        }

    def run(self, command: str, *, timeout: float = COMMAND_TIMEOUT, check: bool = False,
            stdin: str | None = None) -> CommandResult:
        done = subprocess.run(["sh", "-c", command], input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
        result = CommandResult(command, done.returncode, done.stdout, done.stderr)
        return result.check() if check else result

    def start(self, command: str) -> LocalProgram:
        return LocalProgram(command)

    def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        Path(path).write_bytes(data)
        os.chmod(path, mode)

    def get(self, path: str) -> bytes:
        return Path(path).read_bytes()

    @property
    def console(self) -> Console:
        return self._console

    @property
    def cell_console(self) -> Console:
        return self._cell_console

    @property
    def qmp(self) -> QmpChannel:
        raise QmpError("the local root cell has no QEMU behind it: QMP is not available")


class LocalProgram:
    """A process on this host, ``sh -c COMMAND``, that answers lines with lines
    (:class:`~harness.protocol.LineProgram`); its standard error goes to a temporary file
    (read for error messages, so it can never block the process).

    Lifecycle: start (construct) → :meth:`send`/:meth:`receive` → :meth:`close` (closes
    its input, waits a moment for it to end, else kills it).
    """

    #: seconds it may take to end after its input closed
    CLOSE_TIMEOUT: Final = 2.0

    def __init__(self, command: str) -> None:
        self.command = command
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        self._process = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._stderr)
        self._buffer = b""

    def __repr__(self) -> str:
        return f"LocalProgram({self.command!r}, {'alive' if self.alive else 'ended'})"

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def send(self, line: str) -> None:
        assert self._process.stdin is not None  # a pipe (Popen above)
        try:
            self._process.stdin.write((line + "\n").encode())
            self._process.stdin.flush()
        except (OSError, ValueError) as exc:
            raise ConsoleError(f"{self.command!r} does not take input: {exc}{self._errors()}") from exc

    def receive(self, timeout: float) -> str:
        assert self._process.stdout is not None  # a pipe (Popen above)
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self._process.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise ConsoleError(f"{self.command!r} answered nothing within "
                                       f"{timeout:.0f} s{self._errors()}")
                chunk = os.read(self._process.stdout.fileno(), 65536)
                if not chunk:
                    raise ConsoleError(f"{self.command!r} ended (status {self._process.wait()}) "
                                       f"without an answer{self._errors()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace")

    def _errors(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", "replace").strip()
        return f":\n{text}" if text else ""

    def close(self) -> None:
        if self._process.stdin is not None and not self._process.stdin.closed:
            try:
                self._process.stdin.close()
            except OSError as exc:
                LOG.debug("%r: closing its input: %s", self, exc)
        try:
            self._process.wait(timeout=self.CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            LOG.warning("%r did not end when its input closed; killing it", self)
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._stderr.close()


class WithoutPrograms:
    """``channels`` (a :class:`~harness.protocol.LabChannels`) that can run commands,
    move files and reach the consoles and QMP, but not start programs: what a lab whose
    SSH is down offers (commands go over the root console then). For the checked
    driver's fallback, in tests and side by side in ``jhlab bench checked``.

    :param channels: the lab (or stand-in) behind it
    """

    def __init__(self, channels: LabChannels) -> None:
        self.channels = channels

    def __repr__(self) -> str:
        return f"WithoutPrograms({self.channels!r})"

    def run(self, command: str, *, timeout: float = COMMAND_TIMEOUT, check: bool = False,
            stdin: str | None = None) -> CommandResult:
        return self.channels.run(command, timeout=timeout, check=check, stdin=stdin)

    def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        self.channels.put(data, path, mode)

    def get(self, path: str) -> bytes:
        return self.channels.get(path)

    @property
    def console(self) -> Console:
        return self.channels.console

    @property
    def cell_console(self) -> Console:
        return self.channels.cell_console

    @property
    def qmp(self) -> QmpChannel:
        return self.channels.qmp


class FakeChardev:
    """QEMU's side of a serial chardev: a listening unix socket that accepts one
    console, sends it bytes (also appended to the transcript, as QEMU's ``logfile=``
    does) and reads what the console types.

    :param path: the socket to create
    :param transcript: the transcript file
    """

    #: seconds to wait for the console to connect, or for typed bytes
    TIMEOUT = 5.0

    def __init__(self, path: Path, transcript: Path) -> None:
        self.transcript = transcript
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self._accepted = threading.Thread(target=self._accept, daemon=True)
        self._accepted.start()

    def _accept(self) -> None:
        self.conn, _ = self.server.accept()

    def _connection(self) -> socket.socket:
        self._accepted.join(self.TIMEOUT)
        if self.conn is None:
            raise ConsoleError(f"no console connected to the fake chardev within {self.TIMEOUT} s")
        return self.conn

    def emit(self, data: bytes) -> None:
        """Send ``data`` to the console and append it to the transcript."""
        self._connection().sendall(data)
        with open(self.transcript, "ab") as log:
            log.write(data)

    def received(self, size: int) -> bytes:
        """Up to ``size`` bytes the console typed."""
        conn = self._connection()
        conn.settimeout(self.TIMEOUT)
        return conn.recv(size)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


class LabLogs:
    """A lab's name and log folder, written by a test instead of QEMU: ``serial0.log``,
    ``serial1.log`` (what the consoles printed) and ``qmp-events.jsonl`` (one JSON line
    per event, as :class:`~harness.qmp.EventRecorder` writes it).  What the report reads
    of a lab (:mod:`harness.report.records`) is all there.

    :param name: the lab's name
    :param log_dir: its log folder (created)
    """

    def __init__(self, name: str, log_dir: Path) -> None:
        from harness.labfile import LabSpec

        self.spec = LabSpec(name=name)
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)

    def serial(self, index: int, text: str) -> None:
        """Append ``text`` to serial ``index``'s transcript (lines end in CR LF, as a
        Linux console sends them)."""
        with open(self.log_dir / f"serial{index}.log", "ab") as log:
            log.write(text.replace("\n", "\r\n").encode())

    def event(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Log QMP event ``name`` now."""
        import json
        import time

        with open(self.log_dir / "qmp-events.jsonl", "a") as log:
            log.write(json.dumps({"event": name, "data": dict(data or {}), "qemu_time": time.time()}) + "\n")
