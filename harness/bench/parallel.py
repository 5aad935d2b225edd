"""Parallel labs benchmark (``jhlab bench parallel``): the same selection of lab tests
run by pytest serially (``-n 0``: one lab) and by pytest-xdist (``-n 2``: one lab per
worker), interleaved, in one run.

Method: ``repeats`` times, in alternating order (serial first on even repeats), pytest
runs :data:`SELECTION` in a child process with its own log folder (kept, under the
bench's log folder, with the run's HTML report).  For each run: wall seconds from start
to exit, the CPU seconds of the run's whole process tree (pytest, its workers and their
QEMUs, all reaped by their parents: ``RUSAGE_CHILDREN``), and the machine's busy share
over the run from ``/proc/stat`` (everyone's load, this run's included).  A run whose
tests fail (on a loaded host some lab tests miss their deadlines) is kept and counted,
its output saved; a run pytest could not finish (status other than 0 or 1) ends the
benchmark.  Figures: wall seconds of each mode, the speed-up serial / parallel per pair,
the cores each mode kept busy (CPU seconds / wall seconds), the machine's busy share,
the runs with failures.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.bench import Figure, bench_log_dir
from harness.errors import JhlabError
from harness.progress import console
from harness.recipes import find_recipes

#: the lab tests run in both modes (each boots a lab per worker, then shares it)
SELECTION = ("e2e/test_lifecycle.py", "e2e/test_demos.py", "e2e/test_negative_configs.py")
#: workers of the parallel mode
WORKERS = 2
#: deadline of one pytest run (seconds)
RUN_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Run:
    """One pytest run of the selection."""

    workers: int
    wall: float
    cpu: float
    machine_busy: float
    #: whether some tests failed (pytest's status 1)
    failed: bool = False

    @property
    def cores(self) -> float:
        """Cores the run kept busy on average."""
        return self.cpu / self.wall


def _cpu_times() -> tuple[int, int]:
    """The machine's busy and total jiffies since boot (``/proc/stat``, all CPUs)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def run_selection(workers: int, log_dir: Path, selection: tuple[str, ...] = SELECTION) -> Run:
    """Run the selection once with ``workers`` xdist workers (0: serial).

    :raise JhlabError: when pytest fails or exceeds :data:`RUN_TIMEOUT`
    """
    suites = find_recipes().test_suites
    command = [sys.executable, "-m", "pytest", *(str(suites / path) for path in selection),
               "-q", "-p", "no:cacheprovider", "-n", str(workers), f"--lab-log-dir={log_dir}",
               f"--lab-report={log_dir / 'report.html'}"]
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, total0 = _cpu_times()
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                              check=False, cwd=suites.parent)
    except subprocess.TimeoutExpired as exc:
        raise JhlabError(f"{' '.join(command)} took more than {RUN_TIMEOUT:.0f} s; "
                         f"logs in {log_dir}") from exc
    wall = time.monotonic() - started
    busy1, total1 = _cpu_times()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (log_dir / "pytest-output.txt").write_text(done.stdout + done.stderr)
    if done.returncode not in (0, 1):
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise JhlabError(f"pytest did not finish the selection with -n {workers} (status "
                         f"{done.returncode}); logs in {log_dir}\n{tail}")
    if done.returncode == 1:
        summary = (done.stdout.strip().splitlines() or ["?"])[-1]
        console.print(f"[yellow]-n {workers}: tests failed ({summary}); output in {log_dir}[/]")
    cpu = (after.ru_utime - before_children.ru_utime) + (after.ru_stime - before_children.ru_stime)
    return Run(workers, wall, cpu, (busy1 - busy0) / max(total1 - total0, 1), done.returncode == 1)


def bench(repeats: int = 2) -> list[Figure]:
    """Serial and parallel runs of :data:`SELECTION`, interleaved; the figures."""
    logs = bench_log_dir("parallel")  # pytest's output and the labs' logs of every run
    serial: list[Run] = []
    parallel: list[Run] = []
    for index in range(repeats):
        order = (0, WORKERS) if index % 2 == 0 else (WORKERS, 0)
        for workers in order:
            run = run_selection(workers, logs / f"run{index}-n{workers}")
            (serial if workers == 0 else parallel).append(run)
            console.print(f"run {index + 1}/{repeats}, -n {workers}: {run.wall:.0f} s, "
                          f"{run.cores:.2f} cores busy, machine {run.machine_busy:.0%} busy "
                          f"(load average {os.getloadavg()[0]:.1f})")
    what = f"{len(SELECTION)} lab test modules"
    return [
        Figure.of(f"pytest -n 0 ({what}, one lab)", "s", [r.wall for r in serial]),
        Figure.of(f"pytest -n {WORKERS} ({what}, a lab per worker)", "s", [r.wall for r in parallel]),
        Figure.of(f"speed-up -n 0 / -n {WORKERS} (per pair)", "x",
                  [s.wall / p.wall for s, p in zip(serial, parallel, strict=True)]),
        Figure.of("cores kept busy, -n 0 (CPU s / wall s)", "cores", [r.cores for r in serial]),
        Figure.of(f"cores kept busy, -n {WORKERS}", "cores", [r.cores for r in parallel]),
        Figure.of("machine busy during -n 0 (everyone's load)", "%", [100 * r.machine_busy for r in serial]),
        Figure.of(f"machine busy during -n {WORKERS}", "%", [100 * r.machine_busy for r in parallel]),
        Figure.of("runs with failing tests (of all runs)", "runs",
                  [sum(r.failed for r in serial + parallel)]),
    ]
