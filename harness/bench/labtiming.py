"""Where a lab's time goes: its boot phases (``jhlab bench phases``) and the timer jitter
a cell sees (``jhlab bench jitter``), figures the report plots.

**Boot phases.** ``repeats`` cold boots of the default lab (images cached, untimed).  A
watcher thread reads the root console's transcript (QEMU writes it as the bytes arrive)
and notes when each marker line first appears; the clock starts as ``Lab.up()`` is
called and the last phase ends when it returns (ssh connected):

* harness and firmware: ``Lab.up()`` to the kernel's first line (images found, accelerator,
  payload, QEMU started, firmware, kernel decompressed);
* kernel: ``Linux version`` to ``Run /init`` (the kernel's own initialisation);
* stage 1: ``/init`` to ``jhlab: stage 2`` (modules, root file system mounted);
* stage 2: to ``jhlab: root cell ready`` (services, the guest payload, the readiness probe);
* harness: ready to ssh-ready (QMP relay, the first ssh session).

**Timer jitter.** One default lab; ``repeats`` times: ``jailhouse enable`` (qemu-x86),
jhlab's apic-timer inmate (x2APIC timer at 10 Hz, in the manner of Jailhouse's
apic-demo) created, loaded and started on the executor, :data:`JITTER_LINES` of its
``Timer fired, jitter: N ns`` lines read from serial 1 (the first :data:`SETTLE_LINES`
of each start left out), the cell destroyed (twice: it refuses the first request) and
the hypervisor disabled.  Nested KVM under TCG: the figures say how late this lab's
timer interrupts arrive, not what hardware would show.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from harness.bench import Figure, bench_log_dir
from harness.errors import JhlabError
from harness.images import ImageBuilder
from harness.lab import Lab
from harness.progress import console

#: boot markers on serial 0, in order, and the phase that ends at each
MARKERS = (
    (re.compile(rb"Linux version "), "boot phase: harness, QEMU and firmware to the kernel's first line"),
    (re.compile(rb"Run /init as init process"), "boot phase: kernel initialisation to stage 1 (/init)"),
    (re.compile(rb"jhlab: stage 2"), "boot phase: stage 1 (modules, root file system) to stage 2"),
    (re.compile(rb"jhlab: root cell ready"), "boot phase: stage 2 to root cell ready"),
)
LAST_PHASE = "boot phase: root cell ready to ssh-ready (harness)"
#: timer lines kept per start, and lines left out at each start (calibration settling)
JITTER_LINES = 30
SETTLE_LINES = 2
#: seconds for one timer line (10 Hz when well; a loaded host delays the cell)
LINE_TIMEOUT = 60.0
JITTER_LINE = r"Timer fired, jitter: *(-?\d+) ns"
START_APIC_TIMER = ("jailhouse enable /etc/jailhouse/qemu-x86.cell"
                    " && jailhouse cell create /etc/jailhouse/apic-timer.cell"
                    " && jailhouse cell load apic-timer /usr/libexec/jailhouse/demos/apic-timer.bin"
                    " && jailhouse cell start apic-timer")


class MarkerWatch:
    """Notes when each of :data:`MARKERS` first appears in a growing transcript.

    Lifecycle: :meth:`start` (a thread polls the file) → :meth:`stop` → :attr:`seen`.

    :param transcript: the file (it may not exist yet)
    """

    def __init__(self, transcript: Path) -> None:
        self.transcript = transcript
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="boot-markers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._look()  # what arrived after the last poll

    def _look(self) -> None:
        try:
            data = self.transcript.read_bytes()
        except FileNotFoundError:
            return
        now = time.monotonic()
        for index, (pattern, _) in enumerate(MARKERS):
            if index not in self.seen and pattern.search(data):
                self.seen[index] = now

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self._look()


def boot_phases(log_dir: Path) -> dict[str, float]:
    """One cold boot of the default lab, its phases in seconds (every marker seen)."""
    lab = Lab("default", log_dir=log_dir, quiet=True)
    watch = MarkerWatch(log_dir / "serial0.log")
    watch.start()
    started = time.monotonic()
    try:
        lab.up()
        ready = time.monotonic()
    finally:
        watch.stop()
        lab.down()
    missing = [MARKERS[i][1] for i in range(len(MARKERS)) if i not in watch.seen]
    if missing:
        raise JhlabError(f"boot markers not seen in {log_dir / 'serial0.log'}: {', '.join(missing)}")
    phases, before = {}, started
    for index, (_, name) in enumerate(MARKERS):
        phases[name] = watch.seen[index] - before
        before = watch.seen[index]
    phases[LAST_PHASE] = ready - before
    return phases


def bench_phases(repeats: int = 3) -> list[Figure]:
    """Boot phases of ``repeats`` cold boots."""
    ImageBuilder(quiet=True).build()  # untimed: a boot here never includes a build
    logs = bench_log_dir("phases")
    runs = []
    for index in range(repeats):
        runs.append(boot_phases(logs / f"boot{index}"))
        phases = ", ".join(f"{seconds:.1f}" for seconds in runs[-1].values())
        console.print(f"boot {index + 1}/{repeats}: {phases} s")
    names = [name for _, name in MARKERS] + [LAST_PHASE]
    figures = [Figure.of(name, "s", [run[name] for run in runs]) for name in names]
    figures.append(Figure.of("boot phases summed: Lab.up() to ssh-ready", "s",
                             [sum(run.values()) for run in runs]))
    return figures


def timer_jitter(lab: Lab) -> list[float]:
    """One start of apic-timer on ``lab``: the jitter of its timer lines, microseconds."""
    lab.cell_console.discard()  # lines of an earlier start
    since = lab.cell_console.mark()
    lab.run(START_APIC_TIMER, check=True, timeout=300)
    samples = []
    try:
        for index in range(SETTLE_LINES + JITTER_LINES):
            match = lab.cell_console.expect(JITTER_LINE, timeout=LINE_TIMEOUT)
            if index >= SETTLE_LINES:
                samples.append(int(match.group(1)) / 1000)
    except JhlabError as exc:
        shown = lab.cell_console.since(since)[-2000:]
        raise JhlabError(f"{exc}\nserial 1 since the start:\n{shown}") from exc
    finally:
        lab.run("jailhouse cell destroy apic-timer || jailhouse cell destroy apic-timer; jailhouse disable",
                timeout=300)
    return samples


def bench_jitter(repeats: int = 3) -> list[Figure]:
    """Timer jitter of apic-timer over ``repeats`` starts in one lab."""
    ImageBuilder(quiet=True).build()
    logs = bench_log_dir("jitter")
    samples: list[float] = []
    medians: list[float] = []
    with Lab("default", log_dir=logs / "lab", quiet=True) as lab:
        if lab.summary is None or not lab.summary.kvm_in_guest:
            raise JhlabError("the lab shows no KVM inside: apic-timer needs the executor")
        for index in range(repeats):
            run = timer_jitter(lab)
            samples += run
            medians.append(sorted(run)[len(run) // 2])
            console.print(f"start {index + 1}/{repeats}: jitter median {medians[-1]:.0f} µs "
                          f"({min(run):.0f}-{max(run):.0f})")
    return [
        Figure.of(f"APIC timer jitter, every line (apic-timer at 10 Hz, {repeats}x{JITTER_LINES} lines, "
                  "nested KVM under TCG)", "us", samples),
        Figure.of("APIC timer jitter, median of each start", "us", medians),
    ]
