"""Errors of the model; models ``hypervisor/include/jailhouse/entry.h`` (errno subset).

The root of every jhlab exception, :class:`JhlabError`, lives here because hvmodel may
import nothing from the rest of the harness, while the harness builds on it::

    JhlabError
     ├── ConfigError          malformed or inconsistent Jailhouse configuration
     ├── HvError              a hypervisor operation failed with a Jailhouse errno
     └── DaemonError          the driver daemon cannot start or run as asked
          └── DaemonBusy      another daemon holds the run directory

The harness adds its own layer bases (``MachineError``, ``ConsoleError``, ...) in
:mod:`harness.errors`.
"""

from __future__ import annotations

import enum
import os


class Errno(enum.IntEnum):
    """The errno values Jailhouse uses (positive; hypercalls return the negative)."""

    EPERM = 1
    ENOENT = 2
    EIO = 5
    E2BIG = 7
    ENOMEM = 12
    EBUSY = 16
    EEXIST = 17
    ENODEV = 19
    EINVAL = 22
    ERANGE = 34
    ENOSYS = 38

    @property
    def strerror(self) -> str:
        """The C library's text for this code, as ``perror`` prints it."""
        return os.strerror(int(self))


class JhlabError(Exception):
    """Root of all jhlab errors."""


class ConfigError(JhlabError):
    """A Jailhouse configuration could not be read, or fails a check.

    :param message: what is wrong and what was expected
    :param source: the file (or other origin) of the configuration
    :param offset: byte offset of the offending field, when known
    :param field: dotted name of the offending field, when known
    """

    def __init__(
        self,
        message: str,
        *,
        source: str = "<config>",
        offset: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.offset = offset
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source
        if self.offset is not None:
            where += f" at byte {self.offset:#x}"
        if self.field:
            where += f" ({self.field})"
        return f"{where}: {self.message}"


class HvError(JhlabError):
    """A hypervisor operation failed; carries the Jailhouse errno.

    Inside the model this is raised; only at the hypercall / driver boundary is it
    turned into a negative return code (:attr:`code`).
    """

    def __init__(self, errno: Errno, message: str = "") -> None:
        self.errno = Errno(errno)
        self.message = message
        super().__init__(str(self))

    @property
    def code(self) -> int:
        """The negative return value of the hypercall or ioctl."""
        return -int(self.errno)

    def __str__(self) -> str:
        text = f"{self.errno.name} ({self.errno.strerror})"
        return f"{text}: {self.message}" if self.message else text


class DaemonError(JhlabError):
    """The driver daemon cannot start or run as asked (bad option, missing device)."""


class DaemonBusy(DaemonError):
    """Another daemon holds the run directory."""


class Exit(Exception):
    """Leave the ``jailhouse`` command with ``status`` (``exit()`` of the C tool)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status
