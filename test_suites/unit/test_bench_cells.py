"""The cell benchmark's parsing of the pio-loop inmate's result line
(:func:`harness.bench.cells.parse_pio_line`) and of the timecheck probe's output
(:func:`harness.bench.timecheck.parse_timecheck`), and its wiring into ``jhlab bench``."""

from __future__ import annotations

import re

import pytest

from harness.bench import BENCHES
from harness.bench.cells import PIO_LINE, PioRun, parse_pio_line, time_figures
from harness.bench.timecheck import parse_timecheck

LINE = "pio-loop: 37668 exits in 2004623 us, 0 mismatches: PASSED\r\n"


def test_result_line_gives_exits_time_and_rate() -> None:
    """Exits and microseconds as printed; the rate is exits per second of PM-timer time."""
    run = parse_pio_line(LINE)
    assert run == PioRun(exits=37668, microseconds=2004623, mismatches=0)
    assert run.rate == pytest.approx(37668 / 2.004623)


def test_the_last_result_line_counts() -> None:
    """Console text around it (the start line, other output) does not matter; of two
    results the last one is taken."""
    text = ("pio-loop: port 0x2ff for 2000 ms\r\n"
            "pio-loop: 10 exits in 1000 us, 0 mismatches: PASSED\r\n" + LINE + "something else\r\n")
    assert parse_pio_line(text).exits == 37668


@pytest.mark.parametrize("text", [
    "",
    "pio-loop: port 0x2ff for 2000 ms\r\n",
    "pio-loop: 37668 exits in 2004623 us, 3 mismatches: FAILED\r\n",
    "pio-loop: 37668 exits in 0 us, 0 mismatches: PASSED\r\n",
    "pio-loop: 0 exits in 2000000 us, 0 mismatches: PASSED\r\n",
    "pio-loop: no PM timer: FAILED\r\n",
])
def test_missing_failed_or_empty_results_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_pio_line(text)


def test_the_result_pattern_finds_the_result_line_only() -> None:
    """The pattern the benchmark waits for on serial 1 (whole lines, from the clock)
    finds the result line, not the start line."""
    assert re.search(PIO_LINE, LINE.rstrip("\r\n"))
    assert not re.search(PIO_LINE, "pio-loop: port 0x2ff for 2000 ms")


def test_cells_is_a_benchmark() -> None:
    """``jhlab bench cells`` / ``scripts/bench cells`` find it."""
    assert "cells" in BENCHES


TIMECHECK = "".join(line + "\r\n" for line in (
    "timecheck: comm region tsc_khz 2600002 apic_khz 1000000, PM timer 0x608,"
    " TSC-deadline no, TDCR at start 0x3",
    "timecheck: apic-divider: PASS (TDCR 0x3 at start, divide-by-16 expected)",
    "timecheck: tsc-rate: PASS (2599617 kHz over 5000 ms of PM timer, comm region"
    " 2600002 kHz, -149 ppm)",
    "timecheck: apic-rate: PASS (1000007 kHz bus clock (TDCR /16) over 5000 ms of PM"
    " timer, comm region 1000000 kHz, 7 ppm)",
    "timecheck: apic-vs-tsc: PASS (APIC timer vs TSC over the same window: 155 ppm)",
    "timecheck: oneshot-early: PASS (20 one-shot timers of 10-50 ms: at worst -573"
    " us early by the TSC, -957 us by the PM timer (negative: late))",
    "timecheck: tsc-rate-idle: PASS (TSC vs PM timer across 592 ms mostly in HLT: -19 ppm)",
    "timecheck: tick 1 jitter 480 us",
    "timecheck: tick 2 jitter -12 us",
    "timecheck: tick 3 jitter 2500 us",
    "timecheck: periodic-jitter: PASS (3 ticks of 100 ms by the TSC, CPU in HLT:"
    " jitter min -12 us, median |jitter| 480 us, max 2500 us)",
    "timecheck: periodic-early-busy: PASS (3 ticks of 100 ms by the TSC, CPU"
    " spinning: jitter min 10 us, median |jitter| 20 us, max 30 us)",
    "timecheck: 8 checks, 0 failed: PASSED",
))  # fmt: skip


def test_timecheck_output_gives_ticks_and_tsc_ratios() -> None:
    """Every printed tick's jitter (in HLT), the TSC's measured rate over the advertised
    one, the idle ratio from its ppm, the verdict."""
    run = parse_timecheck(TIMECHECK)
    assert run.jitter_us == (480, -12, 2500)
    assert run.tsc_pm == pytest.approx(2599617 / 2600002)
    assert run.tsc_pm_idle == pytest.approx(1 - 19e-6)
    assert run.passed
    figures = {figure.name: figure for figure in time_figures([run, run])}
    jitter = next(f for name, f in figures.items() if name.startswith("cell timer jitter"))
    assert (jitter.min, jitter.median, jitter.max, jitter.repeats) == (-12, 480, 2500, 6)
    median = next(f for name, f in figures.items() if "median |jitter|" in name)
    assert median.median == 480 and median.met is True


@pytest.mark.parametrize("cut", ["timecheck: tick", "timecheck: tsc-rate-idle", "timecheck: 8 checks"])
def test_timecheck_output_cut_short_is_refused(cut: str) -> None:
    """A run that did not print a tick, a rate or its summary gives no figures."""
    text = "\n".join(line for line in TIMECHECK.split("\n") if not line.startswith(cut))
    with pytest.raises(ValueError):
        parse_timecheck(text)
