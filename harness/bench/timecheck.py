"""Time in a cell, for ``jhlab bench cells``: the figures of jhlab's ``timecheck`` probe
(``images/inmates/demos/timecheck.c``) run in its cell on the executor.

Method. Each run creates, loads (command line ``seconds=N ticks``) and starts the
timecheck cell and waits for its summary line on serial 1, then destroys it. From its
lines: the jitter of every tick of a 100 ms periodic local APIC timer with the CPU in
HLT (tick n due n x 100 ms after the arming, by the cell's TSC; positive: late), and
the cell's TSC rate over the PM timer's, as a ratio of the rate measured against the
PM timer to the comm region's ``tsc_khz`` (busy over the rate window, and across the
one-shot phase spent mostly in HLT). The probe's own checks (rates within 1 %, no
early timer) are its business; a FAILED summary is reported but does not stop the
benchmark, the figures are what it measures.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Final, Protocol

__all__ = ["TIMECHECK_DONE", "TimeRun", "parse_timecheck"]

#: the verdict line (the clock hands over whole lines, their ends stripped)
TIMECHECK_DONE: Final = r"timecheck: \d+ checks, \d+ failed: (PASSED|FAILED)"
#: seconds of the probe's rate window in the benchmark
SECONDS: Final = 5

_TICK: Final = re.compile(r"timecheck: tick \d+ jitter (-?\d+) us")
_TSC_RATE: Final = re.compile(r"timecheck: tsc-rate: \w+ \((\d+) kHz over \d+ ms of PM timer, "
                              r"comm region (\d+) kHz")
_TSC_IDLE: Final = re.compile(r"timecheck: tsc-rate-idle: \w+ \(TSC vs PM timer across \d+ ms "
                              r"mostly in HLT: (-?\d+) ppm")


@dataclasses.dataclass(frozen=True)
class TimeRun:
    """One timecheck run's figures.

    :param jitter_us: every periodic tick's jitter (CPU in HLT), microseconds
    :param tsc_pm: cell TSC rate / advertised rate, measured against the PM timer (busy)
    :param tsc_pm_idle: the same across the phase spent in HLT
    :param passed: the probe's verdict
    """

    jitter_us: tuple[int, ...]
    tsc_pm: float
    tsc_pm_idle: float
    passed: bool


def parse_timecheck(text: str) -> TimeRun:
    """The figures of one run's console text (``\\r`` allowed).

    :raise ValueError: when a line is missing (the probe did not get that far)
    """
    ticks = tuple(int(value) for value in _TICK.findall(text))
    rate = _TSC_RATE.search(text)
    idle = _TSC_IDLE.search(text)
    verdict = re.search(TIMECHECK_DONE, text)
    missing = [name for name, found in (("tick", ticks), ("tsc-rate", rate),
                                        ("tsc-rate-idle", idle), ("summary", verdict)) if not found]
    if missing or rate is None or idle is None or verdict is None:
        raise ValueError(f"timecheck output lacks {missing}: {text[-300:]!r}")
    measured, advertised = int(rate.group(1)), int(rate.group(2))
    if not advertised:
        raise ValueError("timecheck: the comm region's tsc_khz is 0")
    return TimeRun(ticks, measured / advertised, 1 + int(idle.group(1)) / 1e6,
                   verdict.group(1) == "PASSED")


class _Steps(Protocol):
    """What a run needs of :class:`~harness.bench.cells.CellBench`."""

    def run_cell(self, name: str, cmdline: str, done: str, timeout: float) -> str: ...


def run(cells: _Steps, timeout: float) -> TimeRun:
    """One timecheck run in its cell (see the module docstring)."""
    return parse_timecheck(cells.run_cell("timecheck", f"seconds={SECONDS} ticks", TIMECHECK_DONE, timeout))
