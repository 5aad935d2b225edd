"""The interfaces host-side code asks for (labgrid's ``labgrid/protocol/*.py``).

Code that needs "something that runs a command in the root cell", "a serial console" or
"a QMP connection" asks for one of these small protocols, not for a
:class:`~harness.lab.Lab`, so the same code works on a lab it booted, a lab somebody else
owns, or a stand-in for unit tests (:mod:`harness.fake`):

=====================  ====================================================================
protocol               implemented by
=====================  ====================================================================
:class:`CommandRunner` :class:`~harness.ssh.SshShell`, :class:`~harness.ssh.SerialShell`,
                       :class:`~harness.lab.Lab`, :class:`~harness.fake.LocalRootCell`
:class:`FileTransfer`  :class:`~harness.ssh.SshShell`, :class:`~harness.lab.Lab`,
                       :class:`~harness.fake.LocalRootCell`
:class:`ProgramRunner` :class:`~harness.ssh.SshShell`, :class:`~harness.lab.Lab`,
                       :class:`~harness.fake.LocalRootCell` (each program a
                       :class:`LineProgram`)
:class:`Console`       :class:`~harness.console.SerialConsole`,
                       :class:`~harness.fake.FileConsole`
:class:`QmpChannel`    :class:`~harness.qmp.QmpSession`
:class:`LabChannels`   :class:`~harness.lab.Lab`, :class:`~harness.fake.LocalRootCell`
=====================  ====================================================================

:class:`CommandResult` is what every runner returns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from harness.errors import CommandError

if TYPE_CHECKING:
    from harness.qmp import EventRecorder

__all__ = [
    "COMMAND_TIMEOUT",
    "CommandResult",
    "CommandRunner",
    "Console",
    "FileTransfer",
    "LabChannels",
    "LineProgram",
    "ProgramRunner",
    "QmpChannel",
]

#: Default deadline of one command (seconds).
COMMAND_TIMEOUT = 120.0


@dataclass(frozen=True)
class CommandResult:
    """What a command in the root cell did."""

    command: str
    status: int
    stdout: str
    stderr: str = ""

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def check(self) -> CommandResult:
        """Raise :class:`~harness.errors.CommandError` unless the status is 0; return self."""
        if self.status != 0:
            raise CommandError(self.command, self.status, self.output)
        return self


class CommandRunner(Protocol):
    """Runs shell commands in the root cell."""

    def run(self, command: str, *, timeout: float = COMMAND_TIMEOUT, check: bool = False,
            stdin: str | None = None) -> CommandResult:
        """Run ``command`` with ``sh -c`` semantics and wait for its exit status.

        :param timeout: seconds until the command must have ended
        :param check: raise :class:`~harness.errors.CommandError` on a non-zero status
        :param stdin: text fed to the command's standard input
        :raise ConsoleError: when the channel to the root cell broke
        """
        ...


class LineProgram(Protocol):
    """A program running in the root cell that answers lines on its standard input
    with lines on its standard output (a request/reply loop); its standard error is kept
    for the error message when it ends."""

    @property
    def alive(self) -> bool:
        """The program still runs and its channel is open."""
        ...

    def send(self, line: str) -> None:
        """Write ``line`` and a newline to the program's standard input.

        :raise ConsoleError: when the program or its channel is gone
        """
        ...

    def receive(self, timeout: float) -> str:
        """The program's next output line (without the newline).

        :raise ConsoleError: when the program ends, its channel breaks, or no whole line
            arrives within ``timeout`` seconds (the message has its standard error)
        """
        ...

    def close(self) -> None:
        """Close its standard input (it should end) and the channel; idempotent."""
        ...


@runtime_checkable
class ProgramRunner(Protocol):
    """Starts long-running programs in the root cell (one channel each), for drivers that
    would otherwise start a new process for every request."""

    def start(self, command: str) -> LineProgram:
        """Start ``command`` with ``sh -c`` semantics, its standard input and output
        connected to the caller.

        :raise ConsoleError: when no channel to the root cell can carry it
        """
        ...


class FileTransfer(Protocol):
    """Moves files into and out of the root cell."""

    def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the root cell (file mode ``mode``)."""
        ...

    def get(self, path: str) -> bytes:
        """Read ``path`` from the root cell."""
        ...


class Console(Protocol):
    """A serial console: waits for output with a deadline, types input, and keeps a
    transcript file whose size marks a point in time."""

    @property
    def name(self) -> str:
        """Shown in errors, e.g. ``"serial1 (cell console)"``."""
        ...

    @property
    def transcript(self) -> Path:
        """The file everything received is written to."""
        ...

    @property
    def before(self) -> str:
        """What arrived between the previous match and the last one."""
        ...

    def expect(self, patterns: str | Sequence[str], timeout: float = ...,
               *, failures: Sequence[str] | None = None) -> re.Match[str]:
        """Wait until one of ``patterns`` (regular expressions) appears.

        :param failures: patterns that end the wait as a failure (default: the console's)
        :raise ConsoleTimeout: when none appears within ``timeout`` seconds
        :raise ConsoleFailure: when a failure pattern appears first
        """
        ...

    def send(self, text: str) -> None:
        """Type ``text`` (no newline)."""
        ...

    def sendline(self, text: str = "") -> None:
        """Type ``text`` and Enter."""
        ...

    def discard(self) -> None:
        """Forget everything received so far (waits then see only new output)."""
        ...

    def tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the transcript."""
        ...

    def mark(self) -> int:
        """A point in the transcript (its size now), for :meth:`since`."""
        ...

    def since(self, mark: int) -> str:
        """The transcript's text after ``mark`` (``\\r`` removed)."""
        ...


class QmpChannel(Protocol):
    """A QMP connection to the lab's QEMU, with the events it has seen."""

    @property
    def events(self) -> EventRecorder:
        """Every event of the session, in order (wait for, find, mark)."""
        ...

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                *, timeout: float = ...) -> Any:
        """Run a QMP command and return its result.

        :raise QmpError: on an error reply, a lost connection or the deadline
        """
        ...

    def read_phys(self, address: int, size: int, *, timeout: float = ...) -> bytes:
        """Read ``size`` bytes of guest-physical memory at ``address``."""
        ...

    def pci_devices(self) -> list[dict[str, Any]]:
        """Every PCI function QEMU emulates, flattened over buses, with ``bdf`` text."""
        ...


class LabChannels(CommandRunner, FileTransfer, Protocol):
    """Everything a test driver needs of a running lab: commands and files in the root
    cell, the root console (serial 0), the cells' console (serial 1) and QMP."""

    @property
    def console(self) -> Console:
        """Serial 0: the root cell's console (and the hypervisor's debug UART)."""
        ...

    @property
    def cell_console(self) -> Console:
        """Serial 1: the cells' UART (0x2f8)."""
        ...

    @property
    def qmp(self) -> QmpChannel:
        """The lab's QMP connection."""
        ...
