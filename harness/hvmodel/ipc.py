"""The driver's user interface; models ``/dev/jailhouse`` (``driver/main.c`` ioctls and
console read, ``include/jailhouse/cell-config.h``'s ``jailhouse_cell_id``).

In jhlab the Linux driver is a process, :mod:`harness.hvmodel.daemon`, and its device
node is a unix stream socket. This module holds what both ends share: where the run
directory and its files are, the wire format, and :class:`DriverClient`, the ``open`` +
``ioctl`` + ``read`` of the ``jailhouse`` command.

Run directory (``$JAILHOUSE_RUN_DIR``, default ``/run/jailhouse``)::

    driver.sock                  the "device node" (mode 0600) while the daemon runs
    daemon.log                   the daemon's log (requests, kernel and console lines)
    last_console                 the console ring kept at disable (``last_console``)
    sys/devices/jailhouse/...    the sysfs tree, as real files

Wire format: one JSON object per line (UTF-8), request then reply, any number of
requests per connection. Every request has ``op``; every reply has ``result`` (the
ioctl's return value: 0 or ``-errno``; for ``console`` the byte count), ``errno`` (its
name or null), ``kernel_log`` (lines the Linux driver would print, ``dmesg`` style),
``console`` (hypervisor console text written during the operation) and ``detail`` (the
model's own explanation of a failure, for logs)::

    {"op": "enable", "config": B64}                       JAILHOUSE_ENABLE
    {"op": "disable"}                                     JAILHOUSE_DISABLE
    {"op": "cell_create", "config": B64}                  JAILHOUSE_CELL_CREATE
    {"op": "cell_load", "cell": CELL_ID,
     "images": [{"data": B64, "target": ADDR}, ...]}      JAILHOUSE_CELL_LOAD
    {"op": "cell_start", "cell": CELL_ID}                 JAILHOUSE_CELL_START
    {"op": "cell_destroy", "cell": CELL_ID}               JAILHOUSE_CELL_DESTROY
    {"op": "console", "head": N, "follow": BOOL}          read() of the device
    {"op": "sysfs"}                                       refresh the sysfs files now
    {"op": "state"}                                       daemon and driver summary

``CELL_ID`` is ``struct jailhouse_cell_id``: ``{"id": N, "name": ""}``, or
``{"id": -1, "name": NAME}`` to look the cell up by name. A ``console`` reply carries
``data`` (text, Latin-1 bytes as code points) and the new ``head``; with ``follow`` the
daemon sends one reply per chunk as the console grows and a last one with
``"eof": true`` when it shuts down. After a successful ``disable`` and after a failed
``enable`` the daemon ends: its reply says ``"ending": true``, and that connection is
closed only when the process exits.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from .abi import CELL_ID_NAMELEN, CELL_ID_UNUSED

__all__ = [
    "DEFAULT_RUN_DIR",
    "PROTOCOL_VERSION",
    "RUN_DIR_ENV",
    "CellId",
    "DriverClient",
    "DriverError",
    "RunDir",
    "b64decode",
    "b64encode",
    "decode",
    "encode",
    "reply",
]

#: where the daemon keeps its files unless ``$JAILHOUSE_RUN_DIR`` says otherwise
DEFAULT_RUN_DIR: Final = "/run/jailhouse"
RUN_DIR_ENV: Final = "JAILHOUSE_RUN_DIR"
PROTOCOL_VERSION: Final = 1
#: longest request or reply line accepted (images travel base64-encoded)
MAX_LINE: Final = 512 * 1024 * 1024


class DriverError(OSError):
    """The driver could not be reached or answered nonsense; ``errno`` says why."""


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The daemon's run directory and the files in it.

    :param path: the directory (default: ``$JAILHOUSE_RUN_DIR`` or ``/run/jailhouse``)
    """

    path: Path

    @classmethod
    def from_env(cls, override: str | os.PathLike[str] | None = None) -> RunDir:
        """The run directory named by ``override``, else the environment, else the default."""
        if override is not None:
            return cls(Path(override))
        return cls(Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR))

    @property
    def socket(self) -> Path:
        """The driver socket (the stand-in for ``/dev/jailhouse``)."""
        return self.path / "driver.sock"

    @property
    def log(self) -> Path:
        """The daemon's log file."""
        return self.path / "daemon.log"

    @property
    def last_console(self) -> Path:
        """The console ring saved at disable (the driver's ``last_console``)."""
        return self.path / "last_console"

    @property
    def sysfs(self) -> Path:
        """``/sys/devices/jailhouse`` of this driver."""
        return self.path / "sys" / "devices" / "jailhouse"

    @property
    def cells(self) -> Path:
        """``/sys/devices/jailhouse/cells``."""
        return self.sysfs / "cells"


@dataclasses.dataclass(frozen=True)
class CellId:
    """``struct jailhouse_cell_id``: a cell by id, or by name when ``id`` is -1.

    :param id: the cell id, or :data:`~harness.hvmodel.abi.CELL_ID_UNUSED`
    :param name: the name (at most :data:`~harness.hvmodel.abi.CELL_ID_NAMELEN` bytes are significant)
    """

    id: int = CELL_ID_UNUSED
    name: str = ""

    def to_wire(self) -> dict[str, Any]:
        """The JSON form."""
        return {"id": self.id, "name": self.name}

    @classmethod
    def from_wire(cls, value: object) -> CellId:
        """Parse the JSON form.

        :raise ValueError: when it is not ``{"id": int, "name": str}``
        """
        if not isinstance(value, dict):
            raise ValueError("cell: expected an object")
        cell_id = value.get("id", CELL_ID_UNUSED)
        name = value.get("name", "")
        if not isinstance(cell_id, int) or isinstance(cell_id, bool) or not isinstance(name, str):
            raise ValueError("cell: expected {'id': int, 'name': str}")
        # The driver forces a NUL into the last byte of the name (cell_management_prologue).
        raw = name.encode("utf-8", "surrogateescape")[:CELL_ID_NAMELEN]
        return cls(cell_id, raw.decode("utf-8", "replace"))


def b64encode(data: bytes) -> str:
    """Bytes for the wire."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: object) -> bytes:
    """Bytes from the wire.

    :raise ValueError: when ``text`` is not valid base64
    """
    if not isinstance(text, str):
        raise ValueError("expected a base64 string")
    return base64.b64decode(text.encode("ascii"), validate=True)


def encode(message: dict[str, Any]) -> bytes:
    """One wire line."""
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse one wire line.

    :raise ValueError: when it is not a JSON object
    """
    value = json.loads(line.decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def reply(result: int, **fields: Any) -> dict[str, Any]:
    """A reply with the common fields filled in."""
    name = None
    if result < 0:
        name = errno.errorcode.get(-result, f"E{-result}")
    message: dict[str, Any] = {
        "result": result, "errno": name, "kernel_log": [], "console": "", "detail": "",
    }
    message.update(fields)
    return message


class DriverClient:
    """A connection to the driver daemon (``open("/dev/jailhouse")``).

    Lifecycle: connect in the constructor, any number of :meth:`request`, then
    :meth:`close` (or use it as a context manager).

    :param path: the socket
    :param timeout: seconds to wait for each reply (None: no limit)
    :raise OSError: when the socket cannot be connected (``ENOENT`` when no daemon runs)
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float | None = 60.0) -> None:
        self.path = os.fspath(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(self.path)
        except BaseException:
            self._sock.close()
            raise
        self._reader = self._sock.makefile("rb")

    def __enter__(self) -> DriverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; idempotent."""
        self._reader.close()
        self._sock.close()

    def send(self, op: str, **fields: Any) -> None:
        """Send one request without waiting for the reply."""
        self._sock.sendall(encode({"op": op, **fields}))

    def receive(self) -> dict[str, Any]:
        """Read one reply.

        :raise DriverError: ``EPIPE`` when the daemon closed the connection,
            ``EPROTO`` for a malformed reply
        """
        line = self._reader.readline(MAX_LINE)
        if not line:
            raise DriverError(errno.EPIPE, "the driver closed the connection")
        try:
            return decode(line)
        except ValueError as exc:
            raise DriverError(errno.EPROTO, f"malformed reply: {exc}") from exc

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send a request and return its reply."""
        self.send(op, **fields)
        return self.receive()

    def stream(self, op: str, **fields: Any) -> Iterator[dict[str, Any]]:
        """Send a request and yield its replies until one has ``eof`` (or the connection
        ends)."""
        self.send(op, **fields)
        while True:
            try:
                message = self.receive()
            except DriverError as exc:
                if exc.errno == errno.EPIPE:
                    return
                raise
            yield message
            if message.get("eof"):
                return

    def wait_closed(self, timeout: float) -> bool:
        """Wait until the daemon closes the connection (it does so when it exits).

        :return: False when ``timeout`` passed first
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._sock.settimeout(min(remaining, 1.0))
            try:
                if not self._sock.recv(4096):
                    return True
            except TimeoutError:
                continue
            except OSError:
                return True
