"""The cell benchmark's parsing of the pio-loop inmate's result line
(:func:`harness.bench.cells.parse_pio_line`) and its wiring into ``jhlab bench``."""

from __future__ import annotations

import re

import pytest

from harness.bench import BENCHES
from harness.bench.cells import PIO_LINE, PioRun, parse_pio_line

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
