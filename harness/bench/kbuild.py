"""Benchmark: the kernel builds of ``harness.kbuild``, cold and warm.

* Warm: ``ImageBuilder.build()`` with every image in the cache (what each lab boot and
  ``jhlab images build`` pay when nothing changed), timed ``repeats`` times.
* Cold: a cold build takes minutes of both CPUs, so it is not repeated here; each build
  records its phases when it runs, wall and CPU seconds (``kbuild.json`` in the artefact,
  ``<source>.unpack.json`` beside the unpacked source), and those are reported (one sample
  each) for the artefacts the current recipes name. CPU seconds vary less than wall
  seconds on a shared machine.

Run with ``jhlab bench kbuild``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness.bench import Figure
from harness.images import ImageBuilder
from harness.kbuild.debian import unpack_record


def _recorded(path: Path, field: str = "phases") -> dict[str, float]:
    """Seconds per phase a build recorded (``phases``: wall time, ``cpu``: CPU time)."""
    try:
        phases = json.loads(path.read_text()).get(field, {})
        return {str(name): float(seconds) for name, seconds in phases.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def bench(repeats: int = 5) -> list[Figure]:
    """Warm image set (measured) and the recorded cold phases of its kernel builds."""
    builder = ImageBuilder(quiet=True)
    images = builder.build()  # untimed: builds whatever is missing
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        builder.build()
        samples.append(time.perf_counter() - started)
    figures = [Figure.of("images build, everything cached (warm)", "s", samples)]
    cold: list[tuple[str, Path]] = [("root kernel (KVM modules)", images.kernel.root / "kbuild.json")]
    if images.linux_cell is not None:
        cold.append(("Linux-cell kernel", images.linux_cell.kernel.parent / "kbuild.json"))
    source = unpack_record(images.kernel.version)
    for what, path in [("kernel source", source), *cold]:
        phases = _recorded(path)
        for phase, seconds in phases.items():
            figures.append(Figure.of(f"cold {what}: {phase} (recorded)", "s", [seconds]))
        if len(phases) > 1:
            figures.append(Figure.of(f"cold {what}: all phases (recorded)", "s", [sum(phases.values())]))
        cpu = _recorded(path, "cpu")
        if cpu:
            figures.append(Figure.of(f"cold {what}: CPU time of all phases (recorded)", "s",
                                     [sum(cpu.values())]))
    return figures
