"""Serial consoles of a lab machine, driven with pexpect.

QEMU serves each serial port on a unix socket and writes its own transcript of it
(``logfile=``), so the log survives whatever happens to the harness.  A reader thread
drains the socket all the time (the guest never stalls on a full socket, and the
transcript stays complete), and :meth:`SerialConsole.expect` searches what arrived with a
deadline per step and failure patterns (``Kernel panic``, ``FATAL:``) that end the wait
at once.  :meth:`SerialConsole.abort` ends any wait from outside, e.g. on a QMP
``GUEST_PANICKED`` event.

A process that does not own the lab reaches its consoles as :class:`TranscriptConsole`:
waits read QEMU's transcript file, typing goes through the owner (the lab's QMP relay).
"""

from __future__ import annotations

import codecs
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pexpect
from pexpect.spawnbase import SpawnBase

from harness.errors import ConsoleError, ConsoleTimeout
from harness.runtime import connect_unix

LOG = logging.getLogger(__name__)

#: Patterns that end a wait on the root console as a failure.
ROOT_FAILURES = (r"Kernel panic - not syncing[^\r\n]*", r"jhlab: boot failed[^\r\n]*")
#: Patterns that end a wait on the hypervisor / cell console as a failure.
CELL_FAILURES = (r"FATAL:[^\r\n]*",)
#: Default deadline of one console wait (seconds).
EXPECT_TIMEOUT = 30.0
#: seconds between two looks at a transcript file
TRANSCRIPT_POLL = 0.05


def transcript_tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a console transcript (``\\r`` removed)."""
    try:
        data = path.read_bytes()[-16384:]
    except OSError:
        return "(no transcript)"
    text = data.decode("utf-8", "replace").replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])


def transcript_since(path: Path, mark: int) -> str:
    """A console transcript's text after byte ``mark`` (``\\r`` removed)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(mark)
            data = handle.read()
    except OSError:
        return ""
    return data.decode("utf-8", "replace").replace("\r", "")


class ConsoleFailure(ConsoleError):
    """A failure pattern appeared on the console.

    :param line: the matching text
    :param tail: the last console lines
    """

    def __init__(self, console: str, line: str, tail: str) -> None:
        self.console = console
        self.line = line
        self.tail = tail
        super().__init__(f"{console}: {line.strip()}\n--- last console lines ---\n{tail}")


if TYPE_CHECKING:
    _TextSpawn = SpawnBase[str]
else:  # pexpect's SpawnBase is generic only in its stubs
    _TextSpawn = SpawnBase


class _StreamSpawn(_TextSpawn):
    """pexpect over the bytes the reader thread collects (no file descriptor of its own)."""

    def __init__(self, console: SerialConsole) -> None:
        super().__init__(timeout=EXPECT_TIMEOUT, maxread=65536, encoding="utf-8",
                         codec_errors="replace")
        self._console = console
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> str:
        if timeout == -1:
            timeout = self.timeout
        data = self._console._take(size, timeout)
        return self._utf8.decode(data)

    def send(self, s: str | bytes) -> int:
        data = s.encode() if isinstance(s, str) else s
        self._console._write(data)
        return len(data)

    def sendline(self, s: str = "") -> int:
        return self.send(s + "\r")


class SerialConsole:
    """One serial port of a lab machine (a :class:`~harness.protocol.Console`).

    Lifecycle: ``connect()`` (right after QEMU starts, before the guest runs) → waits and
    sends → ``close()`` (idempotent).

    :param name: shown in errors, e.g. ``"serial0 (root console)"``
    :param socket_path: QEMU's chardev socket
    :param transcript: QEMU's log file of this port
    :param failures: regular expressions that end any wait as a failure
    """

    def __init__(self, name: str, socket_path: Path, transcript: Path,
                 failures: Sequence[str] = ()) -> None:
        self.name = name
        self.socket_path = socket_path
        self.transcript = transcript
        self.failures = tuple(failures)
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._buffer = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._aborted: BaseException | None = None
        self._spawn = _StreamSpawn(self)
        self.received = 0

    def __repr__(self) -> str:
        return f"SerialConsole({self.name!r}, {'open' if self._sock else 'closed'})"

    def connect(self, timeout: float = 10.0) -> None:
        """Connect to QEMU's socket and start draining it."""
        try:
            sock = connect_unix(self.socket_path, timeout)
        except OSError as exc:
            raise ConsoleError(f"{self.name}: cannot connect to {self.socket_path}: "
                               f"{exc.strerror or exc}") from exc
        self._sock = sock
        self._reader = threading.Thread(target=self._drain, name=f"{self.name}-reader",
                                        daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        sock = self._sock
        assert sock is not None  # set before the thread starts
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._buffer += data
                self.received += len(data)
                self._cond.notify_all()

    def _take(self, size: int, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._buffer:
                if self._aborted is not None:
                    raise self._aborted
                if self._eof:
                    raise pexpect.EOF(f"{self.name}: QEMU closed the serial port")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise pexpect.TIMEOUT(f"{self.name}: nothing new")
                self._cond.wait(remaining)
            data = bytes(self._buffer[:size])
            del self._buffer[:size]
            return data

    def _write(self, data: bytes) -> None:
        if self._sock is None:
            raise ConsoleError(f"{self.name}: not connected")
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise ConsoleError(f"{self.name}: write failed: {exc.strerror}") from exc

    def abort(self, error: BaseException) -> None:
        """Make the current and every later wait raise ``error`` (e.g. guest panicked)."""
        with self._cond:
            self._aborted = error
            self._cond.notify_all()

    def expect(self, patterns: str | Sequence[str], timeout: float = EXPECT_TIMEOUT,
               *, failures: Sequence[str] | None = None) -> re.Match[str]:
        """Wait until one of ``patterns`` (regular expressions) appears.

        :param failures: patterns that end the wait as a failure (default: the console's)
        :return: the match; ``match.re.pattern`` tells which pattern matched
        :raise ConsoleTimeout: when none appears within ``timeout`` seconds
        :raise ConsoleFailure: when a failure pattern appears first
        :raise ConsoleError: when QEMU closed the port
        """
        wanted = [patterns] if isinstance(patterns, str) else list(patterns)
        bad = list(self.failures if failures is None else failures)
        try:
            index = self._spawn.expect([re.compile(p) for p in wanted + bad], timeout=timeout)
        except pexpect.TIMEOUT:
            raise ConsoleTimeout(self.name, " | ".join(wanted), timeout, self.tail()) from None
        except pexpect.EOF:
            raise ConsoleError(f"{self.name}: QEMU closed the port while waiting for "
                               f"{' | '.join(wanted)!r}\n--- last console lines ---\n"
                               f"{self.tail()}") from None
        match = self._spawn.match
        if not isinstance(match, re.Match):
            raise ConsoleError(f"{self.name}: pexpect returned no match for {' | '.join(wanted)!r}")
        if index >= len(wanted):
            raise ConsoleFailure(self.name, match.group(0), self.tail())
        return match

    def send(self, text: str) -> None:
        """Type ``text`` (no newline)."""
        self._spawn.send(text)

    def sendline(self, text: str = "") -> None:
        """Type ``text`` and Enter."""
        self._spawn.sendline(text)

    def discard(self) -> None:
        """Forget everything received so far (waits then see only new output)."""
        with self._cond:
            self._buffer.clear()
        self._spawn.buffer = ""
        self._spawn.before = ""

    @property
    def before(self) -> str:
        """What arrived between the previous match and the last one."""
        return str(self._spawn.before or "")

    def mark(self) -> int:
        """A point in the transcript (its size now), for :meth:`since`."""
        try:
            return self.transcript.stat().st_size
        except OSError:
            return 0

    def since(self, mark: int) -> str:
        """The transcript's text after ``mark`` (``\\r`` removed)."""
        return transcript_since(self.transcript, mark)

    def tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the transcript."""
        return transcript_tail(self.transcript, lines)

    def close(self) -> None:
        """Disconnect (idempotent); the transcript stays."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError as exc:
                LOG.debug("%s: shutdown: %s", self.name, exc)
            sock.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None


class TranscriptConsole:
    """A :class:`~harness.protocol.Console` read from its transcript file, which someone
    else writes (QEMU's ``logfile=`` of a lab this process does not own, a daemon's debug
    console); what is typed goes to ``typist``.

    Waits see what the file gains after ``start``, the earliest match winning (as with
    pexpect).  Lifecycle: construct → use; nothing to close.

    :param name: shown in errors
    :param transcript: the file
    :param failures: regular expressions that end any wait as a failure
    :param typist: types text into the console; None: typing raises ConsoleError
    :param start: byte offset of the transcript where waits begin (default: its start)
    """

    def __init__(self, name: str, transcript: Path, failures: Sequence[str] = (), *,
                 typist: Callable[[str], None] | None = None, start: int = 0) -> None:
        self._name = name
        self._transcript = transcript
        self.failures = tuple(failures)
        self._typist = typist
        self._read = start
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""
        self._before = ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r}, {self._transcript})"

    @property
    def name(self) -> str:
        return self._name

    @property
    def transcript(self) -> Path:
        return self._transcript

    @property
    def before(self) -> str:
        """What arrived between the previous match and the last one."""
        return self._before

    def _collect(self) -> None:
        try:
            with open(self._transcript, "rb") as handle:
                handle.seek(self._read)
                data = handle.read()
        except FileNotFoundError:
            return
        self._read += len(data)
        self._pending += self._utf8.decode(data)

    def expect(self, patterns: str | Sequence[str], timeout: float = EXPECT_TIMEOUT,
               *, failures: Sequence[str] | None = None) -> re.Match[str]:
        """Wait until one of ``patterns`` appears in the file; see
        :meth:`harness.protocol.Console.expect`."""
        wanted = [patterns] if isinstance(patterns, str) else list(patterns)
        bad = list(self.failures if failures is None else failures)
        compiled = [re.compile(p) for p in wanted + bad]
        deadline = time.monotonic() + timeout
        while True:
            self._collect()
            found = [(m.start(), index, m) for index, rx in enumerate(compiled)
                     if (m := rx.search(self._pending)) is not None]
            if found:
                _, index, match = min(found, key=lambda item: (item[0], item[1]))
                self._before = self._pending[:match.start()]
                self._pending = self._pending[match.end():]
                if index >= len(wanted):
                    raise ConsoleFailure(self._name, match.group(0), self.tail())
                return match
            if time.monotonic() >= deadline:
                raise ConsoleTimeout(self._name, " | ".join(wanted), timeout, self.tail())
            time.sleep(TRANSCRIPT_POLL)

    def send(self, text: str) -> None:
        """Type ``text`` (no newline)."""
        if self._typist is None:
            raise ConsoleError(f"{self._name}: this console cannot be typed into")
        self._typist(text)

    def sendline(self, text: str = "") -> None:
        """Type ``text`` and Enter."""
        self.send(text + "\r")

    def discard(self) -> None:
        """Forget everything received so far (waits then see only new output)."""
        self._read = self.mark()
        self._pending = ""

    def tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the transcript."""
        return transcript_tail(self._transcript, lines)

    def mark(self) -> int:
        """A point in the transcript (its size now), for :meth:`since`."""
        try:
            return self._transcript.stat().st_size
        except OSError:
            return 0

    def since(self, mark: int) -> str:
        """The transcript's text after ``mark`` (``\\r`` removed)."""
        return transcript_since(self._transcript, mark)
