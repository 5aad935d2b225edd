"""Exception tree of the harness (host side).

::

    JhlabError                      (harness.hvmodel.errors)
     ├── ConfigError                 Jailhouse config format / checks
     ├── HvError                     hypervisor operation with errno
     ├── LabFileError                malformed lab description (TOML)
     ├── ImageError                  building or finding images failed
     ├── MachineError                QEMU process and accelerator
     │    ├── MissingToolError       a required program is not installed
     │    ├── LaunchError            QEMU exited or failed during launch
     │    ├── GuestPanic             the guest kernel panicked
     │    └── MachineDied            QEMU went away while in use
     ├── ConsoleError                serial console
     │    └── ConsoleTimeout         a pattern did not appear in time
     ├── QmpError                    QMP command failed or timed out
     └── CommandError                a command in the root cell failed
"""

from __future__ import annotations

from collections.abc import Sequence

from harness.hvmodel.errors import ConfigError, HvError, JhlabError

__all__ = [
    "CommandError",
    "ConfigError",
    "ConsoleError",
    "ConsoleTimeout",
    "GuestPanic",
    "HvError",
    "ImageError",
    "JhlabError",
    "LabFileError",
    "LaunchError",
    "MachineDied",
    "MachineError",
    "MissingToolError",
    "QmpError",
]


class LabFileError(JhlabError):
    """A lab description is malformed.

    :param path: the lab file
    :param message: what is wrong and how to fix it
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


class ImageError(JhlabError):
    """An image could not be built or found."""


class MachineError(JhlabError):
    """The QEMU machine could not be started, driven or stopped."""


class MissingToolError(MachineError):
    """A program the lab needs is not installed.

    :param tool: the program's name
    :param package: the Debian package that provides it
    """

    def __init__(self, tool: str, package: str, purpose: str = "") -> None:
        self.tool = tool
        self.package = package
        why = f" (needed {purpose})" if purpose else ""
        super().__init__(
            f"{tool} not found{why}: install it with 'apt-get install {package}' "
            "or run scripts/setup"
        )


class LaunchError(MachineError):
    """QEMU failed to start or exited during launch.

    :param exitcode: QEMU's exit status, or ``None`` if it is still running
    :param command: the command line
    :param output: what QEMU printed on stderr
    """

    def __init__(
        self, message: str, *, exitcode: int | None, command: Sequence[str], output: str
    ) -> None:
        self.exitcode = exitcode
        self.command = list(command)
        self.output = output
        super().__init__(message)

    def __str__(self) -> str:
        text = str(self.args[0])
        if self.exitcode is not None:
            text += f" (exit status {self.exitcode})"
        if self.output.strip():
            tail = "\n".join(self.output.strip().splitlines()[-10:])
            text += f"\nQEMU said:\n{tail}"
        return text


class GuestPanic(MachineError):
    """The guest kernel panicked (QMP ``GUEST_PANICKED``).

    :param tail: the last console lines before the panic
    """

    def __init__(self, message: str, tail: str) -> None:
        self.tail = tail
        super().__init__(f"{message}\n--- last console lines ---\n{tail}")


class MachineDied(MachineError):
    """QEMU exited while the lab was in use."""


class SnapshotRefused(MachineError):
    """A snapshot was not taken because the lab's state could not be restored faithfully;
    the message says what state and what to do.  The lab runs on unchanged."""


class ConsoleError(JhlabError):
    """The serial console failed."""


class ConsoleTimeout(ConsoleError):
    """A pattern did not appear on a console before its deadline.

    :param pattern: what was awaited
    :param timeout: seconds waited
    :param tail: the last console lines seen
    """

    def __init__(self, console: str, pattern: str, timeout: float, tail: str) -> None:
        self.console = console
        self.pattern = pattern
        self.timeout = timeout
        self.tail = tail
        super().__init__(
            f"{console}: {pattern!r} did not appear within {timeout:.1f} s"
            f"\n--- last console lines ---\n{tail}"
        )


class QmpError(JhlabError):
    """A QMP command failed or timed out."""


class CommandError(JhlabError):
    """A command in the root cell failed.

    :param command: the command
    :param status: its exit status
    :param output: its combined output
    """

    def __init__(self, command: str, status: int, output: str) -> None:
        self.command = command
        self.status = status
        self.output = output
        super().__init__(f"{command!r} exited with status {status}\n{output.rstrip()}")
