"""Timing on the serial lines (:mod:`harness.bench.marks`): the markers' shell words,
and the clock that records each line's arrival, on a fake console fed by a thread."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import cast

import pytest

from harness.bench.marks import MARK_DEVICE, LineClock, begin_marker, end_marker, mark, marked
from harness.bench.timecheck import TIMECHECK_DONE, parse_timecheck
from harness.errors import ConsoleError, ConsoleTimeout
from harness.protocol import Console


class FakeConsole:
    """A console whose bytes arrive when :meth:`feed` is called (as the reader thread of
    :class:`~harness.console.SerialConsole` hands them over)."""

    name = "fake serial"

    def __init__(self) -> None:
        self._text = ""
        self._cond = threading.Condition()
        self.failure: ConsoleError | None = None

    def feed(self, text: str) -> None:
        with self._cond:
            self._text += text
            self._cond.notify_all()

    def expect(self, patterns: str, timeout: float = 30.0) -> re.Match[str]:
        regex = re.compile(patterns)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self.failure is not None:
                    raise self.failure
                match = regex.search(self._text)
                if match:
                    self._text = self._text[match.end():]
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConsoleTimeout(self.name, patterns, timeout, "")
                self._cond.wait(remaining)

    def discard(self) -> None:
        with self._cond:
            self._text = ""

    def tail(self, lines: int = 25) -> str:
        return self._text


@pytest.fixture
def clocked() -> Iterator[tuple[FakeConsole, LineClock]]:
    console = FakeConsole()
    clock = LineClock(cast(Console, console))  # the clock needs only what FakeConsole has
    clock.start()
    yield console, clock
    clock.stop()


def test_markers_are_shell_words_for_the_root_console() -> None:
    """A marker is one ``echo`` to ttyS0; a marked command writes its end marker only
    when it succeeded."""
    assert mark(begin_marker("enable-0")) == f"echo 'jhlab-mark enable-0 begin' > {MARK_DEVICE}"
    line = marked("x", "false")
    assert line.startswith(mark(begin_marker("x")) + " && false && ")
    assert line.endswith(mark(end_marker("x")))
    out = subprocess.run(["sh", "-c", marked("y", "true").replace(MARK_DEVICE, "/dev/stdout")],
                         capture_output=True, text=True, check=True).stdout
    assert out == "jhlab-mark y begin\njhlab-mark y end\n"


def test_lines_arrive_with_their_time(clocked: tuple[FakeConsole, LineClock]) -> None:
    """Each whole line is recorded when its end arrives; a line that is still being
    written is not seen; the seconds between two markers are their arrival difference."""
    console, clock = clocked
    console.feed("boot noise\r\n" + begin_marker("a") + "\r\n")
    first, index = clock.wait_line(begin_marker("a"), 5)
    console.feed("jhlab-mark a e")  # the end marker, half written
    time.sleep(0.2)
    assert clock.position == 2
    console.feed("nd\r\n")
    second, _ = clock.wait_line(end_marker("a"), 5, since=index)
    assert second - first >= 0.2
    assert clock.between(begin_marker("a"), end_marker("a"), 5) == pytest.approx(second - first)


def test_a_marker_may_end_a_foreign_line(clocked: tuple[FakeConsole, LineClock]) -> None:
    """Another writer of the port (the hypervisor's console) may leave a line open; the
    marker written after it still counts."""
    console, clock = clocked
    console.feed("Page pool usage after cell creation" + begin_marker("b") + "\r\n")
    clock.wait_line(begin_marker("b"), 5)


def test_waits_look_from_a_position_on(clocked: tuple[FakeConsole, LineClock]) -> None:
    """A pattern seen before ``since`` does not count; a line that never comes times out
    naming the console and the pattern."""
    console, clock = clocked
    console.feed("Hello\r\n")
    _, _, after = clock.wait("Hello", 5)
    with pytest.raises(ConsoleTimeout, match=r"fake serial.*Hello"):
        clock.wait("Hello", 0.3, since=after)


def test_a_failed_console_fails_the_waits(clocked: tuple[FakeConsole, LineClock]) -> None:
    """A console failure (QEMU closed the port, a failure pattern) ends the clock's
    reading and every later wait raises it."""
    console, clock = clocked
    console.failure = ConsoleError("fake serial: FATAL: something")
    console.feed("")
    with pytest.raises(ConsoleError, match="FATAL"):
        clock.wait("never", 5)


#: what timecheck prints in a benchmark run (shortened to what the parser needs)
TIMECHECK_LINES = (
    "timecheck: tsc-rate: PASS (2599617 kHz over 5000 ms of PM timer, comm region 2600002 kHz, -148 ppm)",
    "timecheck: tsc-rate-idle: PASS (TSC vs PM timer across 592 ms mostly in HLT: -19 ppm)",
    "timecheck: tick 1 jitter 480 us",
    "timecheck: tick 2 jitter -12 us",
    "timecheck: 3 checks, 0 failed: PASSED",
)


def test_a_cell_run_is_waited_for_and_read_back(clocked: tuple[FakeConsole, LineClock]) -> None:
    """The cells benchmark waits on the clock for timecheck's verdict line (line ends are
    stripped by then) and parses the lines from where the cell started to that one."""
    console, clock = clocked
    console.feed("an earlier cell's line\r\n")
    clock.wait("earlier", 5)
    since = clock.position
    console.feed("".join(f"{line}\r\n" for line in TIMECHECK_LINES) + "a later line\r\n")
    _, _, after = clock.wait(TIMECHECK_DONE, 5, since=since)
    text = clock.text(since, after)
    assert text.splitlines() == list(TIMECHECK_LINES)
    run = parse_timecheck(text)
    assert run.passed and run.jitter_us == (480, -12)
