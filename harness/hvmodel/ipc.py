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

This module is on the path of every ``jailhouse`` command, which must start in a fraction
of a second in the lab's root cell (Python there runs under nested TCG): it imports only
modules the interpreter has built in or frozen (no ``json``, ``socket``, ``pathlib``,
``dataclasses`` or ``typing`` at run time; the wire format goes through the C parts of
``json``, the socket is ``_socket``'s). :class:`RunDir` gives paths as
:class:`~pathlib.Path` (imported when one is built); :func:`run_dir_path` and the
``*_NAME`` constants give the same places as strings.
"""

from __future__ import annotations

import _json  # the C half of the json package: parsing and encoding without re
import _socket
import binascii
import errno
import os
import time

from .abi import CELL_ID_NAMELEN, CELL_ID_UNUSED

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from typing import Any, Final

__all__ = [
    "DEFAULT_RUN_DIR",
    "EXIT_BUSY",
    "LAST_CONSOLE_NAME",
    "LOG_NAME",
    "PROTOCOL_VERSION",
    "READY_LINE",
    "RUN_DIR_ENV",
    "SOCKET_NAME",
    "SYSFS_PATH",
    "CellId",
    "DriverClient",
    "DriverError",
    "RunDir",
    "b64decode",
    "b64encode",
    "decode",
    "encode",
    "reply",
    "run_dir_path",
]

#: where the daemon keeps its files unless ``$JAILHOUSE_RUN_DIR`` says otherwise
DEFAULT_RUN_DIR: Final = "/run/jailhouse"
RUN_DIR_ENV: Final = "JAILHOUSE_RUN_DIR"
#: the files of a run directory, relative to it
SOCKET_NAME: Final = "driver.sock"
LOG_NAME: Final = "daemon.log"
LAST_CONSOLE_NAME: Final = "last_console"
SYSFS_PATH: Final = "sys/devices/jailhouse"
CELLS_PATH: Final = SYSFS_PATH + "/cells"
PROTOCOL_VERSION: Final = 1
#: what a daemon prints on stdout once it accepts connections (then its pid)
READY_LINE: Final = "ready"
#: exit status of a daemon that found another one holding its run directory
#: (``EX_TEMPFAIL``): the starting command connects to that one instead
EXIT_BUSY: Final = 75
#: longest request or reply line accepted (images travel base64-encoded)
MAX_LINE: Final = 512 * 1024 * 1024
_RECV_SIZE: Final = 65536


class DriverError(OSError):
    """The driver could not be reached or answered nonsense; ``errno`` says why."""


def run_dir_path(override: str | os.PathLike[str] | None = None) -> str:
    """The run directory named by ``override``, else the environment, else the default."""
    if override is not None:
        return os.fspath(override)
    return os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR


class RunDir:
    """The daemon's run directory and the files in it (immutable; equal when the
    directories are).

    :param path: the directory
    """

    __slots__ = ("path",)
    path: Path

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from pathlib import Path

        object.__setattr__(self, "path", Path(path))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"RunDir is immutable: cannot set {name!r}")

    def __repr__(self) -> str:
        return f"RunDir(path={self.path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    @classmethod
    def from_env(cls, override: str | os.PathLike[str] | None = None) -> RunDir:
        """The run directory named by ``override``, else the environment, else the default."""
        return cls(run_dir_path(override))

    @property
    def socket(self) -> Path:
        """The driver socket (the stand-in for ``/dev/jailhouse``)."""
        return self.path / SOCKET_NAME

    @property
    def log(self) -> Path:
        """The daemon's log file."""
        return self.path / LOG_NAME

    @property
    def last_console(self) -> Path:
        """The console ring saved at disable (the driver's ``last_console``)."""
        return self.path / LAST_CONSOLE_NAME

    @property
    def sysfs(self) -> Path:
        """``/sys/devices/jailhouse`` of this driver."""
        return self.path / SYSFS_PATH

    @property
    def cells(self) -> Path:
        """``/sys/devices/jailhouse/cells``."""
        return self.path / CELLS_PATH


class CellId:
    """``struct jailhouse_cell_id``: a cell by id, or by name when ``id`` is -1
    (immutable; equal when id and name are).

    :param id: the cell id, or :data:`~harness.hvmodel.abi.CELL_ID_UNUSED`
    :param name: the name (at most :data:`~harness.hvmodel.abi.CELL_ID_NAMELEN` bytes are significant)
    """

    __slots__ = ("id", "name")
    id: int
    name: str

    def __init__(self, id: int = CELL_ID_UNUSED, name: str = "") -> None:
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "name", name)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"CellId is immutable: cannot set {name!r}")

    def __repr__(self) -> str:
        return f"CellId(id={self.id!r}, name={self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CellId) and (self.id, self.name) == (other.id, other.name)

    def __hash__(self) -> int:
        return hash((self.id, self.name))

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
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def b64decode(text: object) -> bytes:
    """Bytes from the wire.

    :raise ValueError: when ``text`` is not valid base64
    """
    if not isinstance(text, str):
        raise ValueError("expected a base64 string")
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"invalid base64: {exc}") from exc


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


class _ScanContext:
    """What ``_json.make_scanner`` reads of a ``json.JSONDecoder``: strict parsing,
    plain dicts, Python ints and floats, no NaN or Infinity."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_no_constant)


def _refuse(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]  # any object with those attributes
# markers None: no cycle check (messages are trees); ":" and "," with no spaces; no NaN
_encode = _json.make_encoder(None, _refuse, _json.encode_basestring_ascii, None, ":", ",",
                             False, False, False)


def encode(message: dict[str, Any]) -> bytes:
    """One wire line (compact JSON, ASCII, then ``\n``)."""
    return "".join(_encode(message, 0)).encode("ascii") + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse one wire line.

    :raise ValueError: when it is not a JSON object
    """
    text = line.decode("utf-8").strip(" \t\r\n")
    try:
        value, end = _scan(text, 0)
    except StopIteration as exc:
        raise ValueError(f"no JSON value at character {exc.value}") from None
    if end != len(text):
        raise ValueError(f"extra data after the JSON value at character {end}")
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
        self.timeout = timeout
        self._buffer = b""
        self._sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(self.path)
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> DriverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; idempotent."""
        self._sock.close()

    def send(self, op: str, **fields: Any) -> None:
        """Send one request without waiting for the reply."""
        self._sock.sendall(encode({"op": op, **fields}))

    def _readline(self) -> bytes:
        """One line from the daemon, or b"" when it closed the connection first."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line, self._buffer = self._buffer[: end + 1], self._buffer[end + 1 :]
                return line
            if len(self._buffer) > MAX_LINE:
                raise DriverError(errno.EPROTO, f"reply longer than {MAX_LINE} bytes")
            chunk = self._sock.recv(_RECV_SIZE)
            if not chunk:
                return b""
            self._buffer += chunk

    def receive(self) -> dict[str, Any]:
        """Read one reply.

        :raise DriverError: ``EPIPE`` when the daemon closed the connection,
            ``EPROTO`` for a malformed reply
        """
        line = self._readline()
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
            self._sock.settimeout(remaining)
            try:
                if not self._sock.recv(_RECV_SIZE):
                    return True
            except TimeoutError:
                continue
            except OSError:
                return True
