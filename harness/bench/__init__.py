"""Benchmarks of jhlab (``jhlab bench`` / ``scripts/bench``).

Timings on shared machines are noisy, so every figure is min/median/max over repeats,
and every comparison is a ratio of two things measured side by side in the same run
(interleaved), never an absolute number from another day.  Absolute seconds are printed
together with the machine they came from.

Benchmarks: ``config`` (parse + check of the default system config), ``model``
(create/destroy pairs per second of the pure hypervisor model), ``boot`` (lab cold boot
through jhlab vs a bare QEMU boot of the same kernel and initramfs to the same marker),
``reset`` (restoring a lab's snapshot vs a cold boot of the same lab), ``cells`` (cell
create+load+start to the inmate's first line, the executor's PIO exits per second
against a minimal C KVM loop in the same lab VM, a cell's timer jitter and TSC/PM-timer
rate ratio), ``checked`` (a checked step's cost with the guest program kept and with
one started per step, side by side), ``kbuild`` (the image set when all is cached, and
the recorded phases of the kernel builds' cold runs), ``phases`` (where a cold boot's time goes, from the root
console's markers), ``jitter`` (the timer jitter of jhlab's apic-timer cell),
``parallel`` (a selection of lab tests by pytest serially and with a lab per xdist
worker).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Figure:
    """One measured quantity: min/median/max over repeats, and the goal it is held to."""

    name: str
    unit: str
    min: float
    median: float
    max: float
    repeats: int
    goal: str = ""
    met: bool | None = None

    @classmethod
    def of(cls, name: str, unit: str, samples: Sequence[float], goal: str = "",
           met: Callable[[float], bool] | None = None) -> Figure:
        median = statistics.median(samples)
        return cls(name, unit, min(samples), median, max(samples), len(samples), goal,
                   met(median) if met else None)


def bench_log_dir(name: str) -> Path:
    """A new folder for the lab logs of one benchmark run, kept whatever happens
    (``$XDG_STATE_HOME/jhlab/bench-logs/NAME-TIME-PID``); its path is printed at once,
    so the evidence of a failure is found."""
    from harness.lab import state_dir
    from harness.progress import console

    path = state_dir() / "bench-logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    console.print(f"{name}: lab logs in {path}")
    return path


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}"


def _bench_config(repeats: int) -> list[Figure]:
    from harness.bench import config

    results = config.bench(repeats=max(repeats, 200))
    return [
        Figure(f"config {name}", "ms", r["min"], r["median"], r["max"], max(repeats, 200),
               "< 1 ms" if name == "parse+check" else "",
               r["median"] < config.GOAL_MS if name == "parse+check" else None)
        for name, r in results.items()
    ]


def _bench_model(repeats: int) -> list[Figure]:
    from harness.bench import model

    r = model.bench(repeats=max(repeats, 3))
    return [Figure("model create/destroy pairs", "pairs/s", r["min"], r["median"], r["max"],
                   max(repeats, 3), ">= 10000/s", r["median"] >= model.GOAL)]


def _bench_boot(repeats: int) -> list[Figure]:
    from harness.bench import boot

    return boot.bench(repeats=repeats)


def _bench_reset(repeats: int, resets: int | None = None) -> list[Figure]:
    from harness.bench import boot

    return boot.bench_reset(repeats=max(repeats, 3), resets=resets or boot.RESETS)


def _bench_cells(repeats: int) -> list[Figure]:
    from harness.bench import cells

    return cells.bench(repeats=max(repeats, 3))


def _bench_checked(repeats: int) -> list[Figure]:
    from harness.bench import checked

    return checked.bench(repeats=max(repeats, 3))


def _bench_kbuild(repeats: int) -> list[Figure]:
    from harness.bench import kbuild

    return kbuild.bench(repeats=max(repeats, 5))


def _bench_phases(repeats: int) -> list[Figure]:
    from harness.bench import labtiming

    return labtiming.bench_phases(repeats=max(repeats, 1))


def _bench_jitter(repeats: int) -> list[Figure]:
    from harness.bench import labtiming

    return labtiming.bench_jitter(repeats=max(repeats, 1))


def _bench_parallel(repeats: int) -> list[Figure]:
    from harness.bench import parallel

    return parallel.bench(repeats=max(repeats, 1))


BENCHES: dict[str, Callable[[int], list[Figure]]] = {
    "config": _bench_config,
    "model": _bench_model,
    "boot": _bench_boot,
    "reset": _bench_reset,
    "cells": _bench_cells,
    "checked": _bench_checked,
    "kbuild": _bench_kbuild,
    "phases": _bench_phases,
    "jitter": _bench_jitter,
    "parallel": _bench_parallel,
}


def render(figures: list[Figure], out: Console) -> None:
    table = Table("figure", "unit", "min", "median", "max", "n", "goal", "")
    for f in figures:
        verdict = "" if f.met is None else ("[green]met[/]" if f.met else "[red]MISSED[/]")
        table.add_row(f.name, f.unit, f"{f.min:.4g}", f"{f.median:.4g}", f"{f.max:.4g}",
                      str(f.repeats), f.goal, verdict)
    out.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jhlab bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=[],
                        help=f"benchmarks to run (default: all): {', '.join(BENCHES)}")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of slow benchmarks")
    parser.add_argument("--resets", type=int, default=None,
                        help="resets in a row of the reset benchmark (default 50)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--history", metavar="DIR", help="also keep the figures as a dated JSON "
                        "file in DIR and plot the trend of all of them (DIR/trend.html)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(BENCHES)})")
    out = Console(width=None if sys.stdout.isatty() else 140)
    out.print(f"machine: {machine_description()}")
    figures: list[Figure] = []
    for name in args.names or list(BENCHES):
        out.print(f"[bold]{name}[/] ...")
        if name == "reset":
            figures += _bench_reset(args.repeats, args.resets)
        else:
            figures += BENCHES[name](args.repeats)
    render(figures, out)
    measured = {"machine": machine_description(), "figures": [asdict(f) for f in figures]}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(measured, handle, indent=1)
    if args.history:
        from pathlib import Path

        from harness.report import keep_in_history

        kept, page = keep_in_history(Path(args.history), measured, list(args.names))
        out.print(f"kept as {kept}; trend: {page}")
    return 0 if all(f.met is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
