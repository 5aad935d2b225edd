"""Benchmark: what a checked step costs in a lab (``jhlab bench checked``).

One default lab. ``repeats`` rounds, each running the same checked sequence twice,
interleaved: once as the checked driver runs on a lab (its guest program kept running,
a request line per step) and once with a guest program started for every step (what a
lab that can only run commands gets, e.g. with SSH down, and what every step cost
before the program was kept). The sequence is Jailhouse's demo with apic-demo on the
bookkeeping-only Arch in the guest (enable, create, load, start, shutdown refused,
shutdown, destroy, disable: 8 steps), so the figures are the driver's own cost around
commands that take 0.1-0.6 s, not a cell's. Each step is timed from the host around
the whole checked call (command, look, oracle, comparisons, console check).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from harness.bench import Figure, bench_log_dir
from harness.checked import CheckedJailhouse, StepResult
from harness.errors import JhlabError
from harness.fake import WithoutPrograms
from harness.lab import Lab
from harness.labfile import load_lab
from harness.progress import step
from harness.protocol import LabChannels
from harness.recipes import CONFIGS

#: what the loaded "image" is (the oracle Arch runs nothing)
IMAGE = bytes(range(256)) * 16
#: Jailhouse's demo sequence with apic-demo (the guest's oracle Arch refuses the first
#: shutdown as apic-demo does)
DEMO: Final[tuple[Callable[[CheckedJailhouse], StepResult], ...]] = (
    lambda jh: jh.enable(CONFIGS / "qemu-x86.toml"),
    lambda jh: jh.cell_create(CONFIGS / "apic-demo.toml"),
    lambda jh: jh.cell_load("apic-demo", IMAGE),
    lambda jh: jh.cell_start("apic-demo"),
    lambda jh: jh.cell_shutdown("apic-demo", expect="EPERM"),
    lambda jh: jh.cell_shutdown("apic-demo"),
    lambda jh: jh.cell_destroy("apic-demo"),
    lambda jh: jh.disable(),
)


def sequence(lab: LabChannels, **options: Any) -> tuple[list[float], int]:
    """Run the demo sequence once with a new checked driver on ``lab``; each step's
    seconds, and how many guest programs the driver started.

    :param options: more keyword arguments of :class:`~harness.checked.CheckedJailhouse`
    """
    jh = CheckedJailhouse(lab, "oracle", **options)
    seconds: list[float] = []
    try:
        for action in DEMO:
            started = time.monotonic()
            action(jh)
            seconds.append(time.monotonic() - started)
    finally:
        problems = jh.cleanup()
    if problems:
        raise JhlabError(f"the checked sequence left the lab unclean: {problems}")
    return seconds, jh.channel.starts


def bench(repeats: int = 3) -> list[Figure]:
    """Boot the default lab and time the sequence both ways, interleaved."""
    kept: list[float] = []
    per_step: list[float] = []
    ratios: list[float] = []
    with Lab(load_lab("default"), log_dir=bench_log_dir("checked")) as lab:
        with step(f"Checked steps, guest program kept and one per step, {repeats} rounds "
                  f"(logs in {lab.log_dir})") as st:
            sequence(lab)  # warm-up: the guest's page cache, the daemon loader
            for index in range(repeats):
                st.note(f"round {index + 1}/{repeats}")
                fast, starts = sequence(lab)
                if starts != 1:
                    raise JhlabError(f"the checked driver started {starts} guest programs "
                                       "for one sequence, not 1")
                slow, _ = sequence(WithoutPrograms(lab))
                kept += fast
                per_step += slow
                ratios.append(sum(fast) / sum(slow))
    return [
        Figure.of(f"checked step, guest program kept (oracle Arch, {len(DEMO)} steps a round)", "s", kept),
        Figure.of("checked step, a guest program started per step (the same steps)", "s", per_step),
        Figure.of("ratio kept / per step (a round's total, pairs side by side)", "x", ratios,
                  "< 1", lambda median: median < 1.0),
    ]
