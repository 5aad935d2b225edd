"""Benchmark: parse + check of the default lab's system config (harness.hvmodel.config).

Measures, over many repeats, the time to parse the binary qemu-x86 system config (compiled
from harness/configs/qemu-x86.toml) and run every check on it (Jailhouse's and jhlab's),
and prints min/median/max per operation. Goal: parse + check under 1 ms.

Method: the binary is compiled once; each sample is one parse + check; samples are timed
with time.perf_counter_ns after a warm-up; the garbage collector stays on (as in use).
Timings are noisy on shared machines: compare figures from one run, side by side.

Run with ``jhlab bench config`` (or ``scripts/bench config``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from harness.hvmodel.config import check, load_source, parse_system
from harness.recipes import CONFIGS

SOURCE = CONFIGS / "qemu-x86.toml"
GOAL_MS = 1.0


def bench(repeats: int = 2000, warmup: int = 200) -> dict[str, dict[str, float]]:
    """Time parse, check and parse+check of qemu-x86; figures in milliseconds.

    :param repeats: timed samples per operation
    :param warmup: untimed runs first
    :return: ``{"parse": {"min":..,"median":..,"max":..}, "check": {...},
        "parse+check": {...}}``
    """
    data = load_source(SOURCE).to_bytes()
    system = parse_system(data, "qemu-x86.cell")
    operations: dict[str, Callable[[], object]] = {
        "parse": lambda: parse_system(data, "qemu-x86.cell"),
        "check": lambda: check(system, next_checks=True, extra=True),
        "parse+check": lambda: check(parse_system(data, "qemu-x86.cell"), next_checks=True,
                                     extra=True),
    }
    results: dict[str, dict[str, float]] = {}
    for name, operation in operations.items():
        for _ in range(warmup):
            operation()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter_ns()
            operation()
            samples.append((time.perf_counter_ns() - start) / 1e6)
        results[name] = {
            "min": min(samples), "median": statistics.median(samples), "max": max(samples),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    """Print the figures; exit 1 if the median of parse+check misses the goal."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args(argv)
    results = bench(args.repeats)
    print(f"config parse+check, qemu-x86 ({SOURCE.name}), {args.repeats} repeats, ms:")
    for name, figures in results.items():
        print(f"  {name:12} min {figures['min']:.3f}  median {figures['median']:.3f}  "
              f"max {figures['max']:.3f}")
    median = results["parse+check"]["median"]
    verdict = "meets" if median < GOAL_MS else "MISSES"
    print(f"  goal < {GOAL_MS} ms: {verdict} (median {median:.3f} ms)")
    return 0 if median < GOAL_MS else 1


if __name__ == "__main__":
    sys.exit(main())
