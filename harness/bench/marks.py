"""Timing on the lab's serial lines: markers written to ``/dev/ttyS0`` around commands in
the root cell, and the time each line arrives at the host.

A command timed this way costs what it costs in the guest: no ssh round trip, no host
scheduling of the command is counted, only the lines' way from the guest's UART to the
host, which is the same for the marker before and the one after. Lines of several
consoles (the root console and the cells' UART) are on one clock, so "marker before
``cell start`` on serial 0" to "the inmate's first line on serial 1" is one figure.

::

    clock = LineClock(lab.console)          # reads serial 0 from now on
    clock.start()
    lab.ssh.run(marked("enable", "jailhouse enable /etc/jailhouse/qemu-x86.cell"))
    seconds = clock.between(begin_marker("enable"), end_marker("enable"), timeout=60)
    clock.stop()
"""

from __future__ import annotations

import re
import shlex
import threading
import time
from typing import Final

from harness.errors import ConsoleError, ConsoleTimeout
from harness.protocol import Console

#: the device the markers are written to (serial 0, the root console)
MARK_DEVICE: Final = "/dev/ttyS0"
#: the first word of every marker line
MARK_PREFIX: Final = "jhlab-mark"
#: one line as the clock sees it (``\r\n`` from the UART's line discipline)
_LINE: Final = r"[^\n]*\n"
#: seconds one read of the clock's thread waits before it looks at its stop flag
_POLL: Final = 0.5


def begin_marker(name: str) -> str:
    """The line written before the command ``name``."""
    return f"{MARK_PREFIX} {name} begin"


def end_marker(name: str) -> str:
    """The line written after the command ``name`` succeeded."""
    return f"{MARK_PREFIX} {name} end"


def mark(line: str) -> str:
    """Shell words that write ``line`` to :data:`MARK_DEVICE` (one ``write``)."""
    return f"echo {shlex.quote(line)} > {MARK_DEVICE}"


def marked(name: str, command: str) -> str:
    """``command`` between the begin and end markers of ``name``; the end marker is
    written only when the command succeeded (shell ``&&``)."""
    return f"{mark(begin_marker(name))} && {command} && {mark(end_marker(name))}"


class LineClock:
    """The lines of one console with their arrival times (``time.monotonic``).

    Lifecycle: :meth:`start` (forgets what the console received before, starts the
    reading thread), waits (:meth:`wait`, :meth:`between`), :meth:`stop`. While the
    clock runs it is the console's only reader: other waits on that console go
    through it. A failure pattern of the console (``FATAL:``, a kernel panic) ends the
    reading and makes every later wait raise it.

    :param console: the serial console to read
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self._lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._error: ConsoleError | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start reading (what arrived before is dropped)."""
        if self._thread is not None:
            return
        self.console.discard()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._read, name=f"clock-{self.console.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reading; idempotent."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(_POLL * 4)
            self._thread = None

    def _read(self) -> None:
        while not self._stopping.is_set():
            try:
                match = self.console.expect(_LINE, timeout=_POLL)
            except ConsoleTimeout:
                continue
            except ConsoleError as exc:
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            arrived = time.monotonic()
            with self._cond:
                self._lines.append((arrived, match.group(0).rstrip("\r\n")))
                self._cond.notify_all()

    @property
    def position(self) -> int:
        """How many lines arrived so far (a starting point for :meth:`wait`)."""
        with self._cond:
            return len(self._lines)

    def text(self, since: int = 0, until: int | None = None) -> str:
        """The lines from index ``since`` up to ``until`` (default: all that arrived), one
        per line."""
        with self._cond:
            return "".join(f"{line}\n" for _, line in self._lines[since:until])

    def wait(self, pattern: str, timeout: float, *, since: int = 0) -> tuple[float, str, int]:
        """The first line from index ``since`` on that matches ``pattern``.

        :return: its arrival time, its text and the index after it
        :raise ConsoleTimeout: when no such line arrived within ``timeout`` seconds
        :raise ConsoleError: when the console failed (QEMU closed it, a failure pattern)
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                while index < len(self._lines):
                    arrived, text = self._lines[index]
                    index += 1
                    if regex.search(text):
                        return arrived, text, index
                if self._error is not None:
                    raise self._error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConsoleTimeout(self.console.name, pattern, timeout, self.console.tail())
                self._cond.wait(remaining)

    def wait_line(self, line: str, timeout: float, *, since: int = 0) -> tuple[float, int]:
        """The arrival time of ``line`` (a marker) and the index after it. The marker may
        end a line another writer of the port left unfinished."""
        arrived, _, index = self.wait(f"{re.escape(line)}$", timeout, since=since)
        return arrived, index

    def between(self, first: str, second: str, timeout: float, *, since: int = 0) -> float:
        """Seconds from the line ``first`` to the line ``second`` after it (markers)."""
        begin, index = self.wait_line(first, timeout, since=since)
        end, _ = self.wait_line(second, timeout, since=index)
        return end - begin
