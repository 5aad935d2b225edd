"""Cell benchmarks in the default lab (``jhlab bench cells``): how long a cell takes to
come up through the real ``jailhouse`` command, and how fast the executor serves a cell's
port I/O against a minimal C KVM loop in the same lab VM.

Method. One lab is booted (untimed) and the hypervisor enabled with ``jailhouse enable``
(qemu-x86); configs are compiled on the host, configs, inmates and the C tool uploaded.

* **Start to first line**: ``starts`` times, the host issues ``jailhouse cell create
  hello.cell && jailhouse cell load hello hello.bin && jailhouse cell start hello`` as
  one ssh command and times it from issuing the command to the hello inmate's first line
  (``Hello from jhlab inmate``) arriving on serial 1 at the host; the time until the
  command returned is a second figure. After ``hello: PASSED`` the cell is destroyed.
* **PIO exits per second**: the pio-loop inmate (``images/inmates/demos/pio-loop.c``)
  writes and reads back the scratch register 0x2ff of the cell's UART (whitelisted) for
  ``ms`` milliseconds, every access an exit from KVM to user space, and prints how many
  exits it made in how many microseconds by the PM timer. The same image runs, side by
  side in every repeat, (i) in the pio-loop cell on the executor, (ii) in
  ``tools/kvmloop`` (C: one vCPU on the cell's CPU, whitelisted ports forwarded to the
  real ports with ``in``/``out``), and (iii) on the executor again with every exit
  through Python (daemon option ``--no-native-pio``), with (ii) again beside it; (i) and
  (ii) swap order every other repeat. The executor serves the whitelisted accesses in its
  I/O bitmap loop (machine code, :class:`~harness.hvmodel.arch.portio.IoBitmapLoop`), the
  same bitmap check and real-port access the Python path does through
  ``Hypervisor.handle_pio``. Each rate comes from the inmate's line on serial 1; the
  ratios are per adjacent pair.
* **Time in a cell** (``repeats`` times): jhlab's timecheck probe in its cell
  (:mod:`harness.bench.timecheck`): every tick's jitter of a 100 ms periodic APIC timer
  (CPU in HLT), each run's median |jitter|, and the cell's TSC rate against the PM timer
  as a ratio to the comm region's ``tsc_khz`` (busy, and across HLT).

Every wait has a deadline; a failed step ends the benchmark with its output.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shlex
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Final

from harness.bench import Figure, bench_log_dir, timecheck
from harness.errors import ConsoleTimeout, JhlabError
from harness.hvmodel.config import CellConfig, load_source
from harness.images import ImageBuilder, compiled_configs
from harness.lab import Lab
from harness.protocol import CommandResult, LabChannels
from harness.recipes import build_inmates, find_recipes

LOG = logging.getLogger(__name__)

#: where the benchmark's files go in the root cell
GUEST_DIR: Final = "/tmp/jhlab-bench"
FIRST_LINE: Final = r"Hello from jhlab inmate"
HELLO_DONE: Final = r"hello: (PASSED|FAILED)"
#: the whole result line (up to its end: a verdict cut short would not parse)
PIO_LINE: Final = r"pio-loop: \d+ exits in [^\r\n]*\r?\n"
#: seconds: one cell start to its first line; one command; the C tool's own limit
START_TIMEOUT: Final = 120.0
COMMAND_TIMEOUT: Final = 300.0
KVMLOOP_TIMEOUT: Final = 120
#: seconds to build the C tool
BUILD_TIMEOUT: Final = 300.0
#: milliseconds each pio-loop run loops
PIO_MS: Final = 2000
GOAL_RATIO: Final = 0.5
GOAL_START_S: Final = 5.0
#: issue 14: median |jitter| of a 100 ms periodic timer (nested TCG, 2 cores)
GOAL_JITTER_US: Final = 5000
#: seconds from a timecheck start to its summary (rates, one-shots, periodic: ~10 s idle)
TIMECHECK_TIMEOUT: Final = 300.0

_PIO_RESULT: Final = re.compile(r"pio-loop: (\d+) exits in (\d+) us, (\d+) mismatches: (PASSED|FAILED)")


@dataclasses.dataclass(frozen=True)
class PioRun:
    """One pio-loop result line: ``exits`` port exits in ``microseconds`` (PM timer)."""

    exits: int
    microseconds: int
    mismatches: int

    @property
    def rate(self) -> float:
        """Exits per second."""
        return self.exits / (self.microseconds / 1e6)


def parse_pio_line(text: str) -> PioRun:
    """The last pio-loop result line in ``text`` (console output, ``\\r`` allowed).

    :raise ValueError: when there is none, it says FAILED, or it covers no time
    """
    found = _PIO_RESULT.findall(text)
    if not found:
        raise ValueError(f"no pio-loop result line in {text[-200:]!r}")
    exits, micros, mismatches, verdict = found[-1]
    if verdict != "PASSED" or int(mismatches):
        raise ValueError(f"pio-loop FAILED: {mismatches} reads did not return the byte written")
    if not int(micros) or not int(exits):
        raise ValueError(f"pio-loop result covers {micros} us and {exits} exits")
    return PioRun(int(exits), int(micros), int(mismatches))


def build_kvmloop(dest: Path) -> Path:
    """``make kvmloop`` of the inmates Makefile into ``dest``; the static binary."""
    build_inmates(dest, "kvmloop", timeout=BUILD_TIMEOUT)
    return dest / "tools" / "kvmloop"


class CellBench:
    """The benchmark's steps on a lab that is up (:func:`bench` drives them).

    Lifecycle: :meth:`upload` -> :meth:`enable` -> steps (:meth:`start_hello`,
    :meth:`pio_on_executor`, :meth:`pio_in_c`) -> :meth:`disable` (and enable again).

    :param lab: the lab (default lab: qemu-x86, the cells in ``images/inmates/cells``)
    """

    def __init__(self, lab: LabChannels) -> None:
        self.lab = lab
        pio = load_source(find_recipes().cells / "pio-loop.toml")
        if not isinstance(pio, CellConfig):
            raise JhlabError("cells/pio-loop.toml is not a cell config")
        self.pio_cpu = min(pio.cpus)

    def upload(self, inmates: Path, kvmloop: Path) -> None:
        """Configs (compiled here), the two inmates and the C tool into :data:`GUEST_DIR`."""
        self.run(f"mkdir -p {GUEST_DIR}")
        configs = compiled_configs()
        for name in ("qemu-x86.cell", "hello.cell", "pio-loop.cell", "timecheck.cell"):
            self.lab.put(configs[name], f"{GUEST_DIR}/{name}")
        for name in ("hello.bin", "pio-loop.bin", "timecheck.bin"):
            self.lab.put((inmates / name).read_bytes(), f"{GUEST_DIR}/{name}")
        self.lab.put(kvmloop.read_bytes(), f"{GUEST_DIR}/kvmloop", mode=0o755)

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> CommandResult:
        return self.lab.run(command, timeout=timeout, check=True)

    def enable(self, *, native_pio: bool = True) -> None:
        args = "" if native_pio else "JAILHOUSE_DAEMON_ARGS=--no-native-pio "
        self.run(f"{args}jailhouse enable {GUEST_DIR}/qemu-x86.cell")

    def disable(self) -> None:
        self.run("jailhouse disable")

    def expect(self, pattern: str, timeout: float, failed: list[BaseException] | None = None) -> str:
        """Wait for ``pattern`` on serial 1 for ``timeout`` seconds; give up early when a
        command issued meanwhile failed (its error lands in ``failed``).

        :raise ConsoleTimeout: when the pattern did not appear in time
        """
        console = self.lab.cell_console
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                return console.expect(pattern, timeout=max(0.1, min(1.0, remaining))).group(0)
            except ConsoleTimeout:
                if failed:
                    raise failed[0] from None
                if remaining <= 1.0:
                    raise ConsoleTimeout(console.name, pattern, timeout, console.tail()) from None

    def start_hello(self) -> tuple[float, float]:
        """One create+load+start of hello: seconds to its first line on serial 1, and to
        the command's return; then wait for its verdict and destroy it."""
        self.lab.cell_console.discard()
        command = (f"jailhouse cell create {GUEST_DIR}/hello.cell"
                   f" && jailhouse cell load hello {GUEST_DIR}/hello.bin"
                   " && jailhouse cell start hello")
        failed: list[BaseException] = []
        returned: list[float] = []

        def issue() -> None:
            try:
                self.run(command)
                returned.append(time.monotonic())
            except BaseException as exc:  # handed to the waiting thread
                failed.append(exc)

        worker = threading.Thread(target=issue, name="bench-start", daemon=True)
        started = time.monotonic()
        worker.start()
        self.expect(FIRST_LINE, START_TIMEOUT, failed)
        first = time.monotonic() - started
        worker.join(COMMAND_TIMEOUT)
        if failed:
            raise failed[0]
        if not returned:
            raise JhlabError(f"{command!r} did not return within {COMMAND_TIMEOUT:.0f} s")
        verdict = self.expect(HELLO_DONE, START_TIMEOUT)
        if "PASSED" not in verdict:
            raise JhlabError(f"the hello inmate said {verdict!r}")
        self.run("jailhouse cell destroy hello")
        LOG.info("hello: first line after %.2f s, commands returned after %.2f s",
                 first, returned[0] - started)
        return first, returned[0] - started

    def pio_on_executor(self) -> PioRun:
        """pio-loop in its cell on the executor."""
        self.lab.cell_console.discard()
        self.run(f"jailhouse cell create {GUEST_DIR}/pio-loop.cell"
                 f" && jailhouse cell load pio-loop {GUEST_DIR}/pio-loop.bin"
                 f" -s ms={PIO_MS} -a 0x1000 && jailhouse cell start pio-loop")
        line = self.expect(PIO_LINE, PIO_MS / 1000 + START_TIMEOUT)
        self.run("jailhouse cell destroy pio-loop")
        run = parse_pio_line(line)
        LOG.info("pio-loop on the executor: %.0f exits/s", run.rate)
        return run

    def run_cell(self, name: str, cmdline: str, done: str, timeout: float) -> str:
        """Create, load (``cmdline`` at 0x1000) and start cell ``name`` (``name.cell``,
        ``name.bin``), wait ``timeout`` seconds for ``done`` on serial 1, destroy it;
        the cell's console text."""
        console = self.lab.cell_console
        console.discard()
        mark = console.mark()
        self.run(f"jailhouse cell create {GUEST_DIR}/{name}.cell"
                 f" && jailhouse cell load {name} {GUEST_DIR}/{name}.bin"
                 f" -s {shlex.quote(cmdline)} -a 0x1000 && jailhouse cell start {name}")
        self.expect(done, timeout)
        self.run(f"jailhouse cell destroy {name}")
        return console.since(mark)

    def pio_in_c(self) -> PioRun:
        """pio-loop in tools/kvmloop on the cell's CPU (the hypervisor stays enabled: its
        keeper VM keeps KVM's global state as it is while cells come and go)."""
        self.lab.cell_console.discard()
        args = shlex.join([f"{GUEST_DIR}/kvmloop", "-C", str(self.pio_cpu), "-t", str(KVMLOOP_TIMEOUT),
                           "-c", f"ms={PIO_MS}", "-e", "mismatches:", f"{GUEST_DIR}/pio-loop.bin"])
        self.run(args, timeout=KVMLOOP_TIMEOUT + 60)
        run = parse_pio_line(self.expect(PIO_LINE, START_TIMEOUT))
        LOG.info("pio-loop in kvmloop: %.0f exits/s", run.rate)
        return run


def bench(repeats: int = 3, starts: int = 10) -> list[Figure]:
    """Boot the default lab, run both benchmarks, return the figures.

    :param repeats: interleaved repeats of the PIO benchmark
    :param starts: cell starts timed
    """
    images = ImageBuilder(quiet=True).build()
    if images.inmates is None:
        raise JhlabError("the image set has no inmates")
    with tempfile.TemporaryDirectory(prefix="jhlab-bench-") as tmp:
        kvmloop = build_kvmloop(Path(tmp) / "tools-build")
        with Lab("default", log_dir=bench_log_dir("cells"), quiet=True) as lab:
            cells = CellBench(lab)
            cells.upload(images.inmates, kvmloop)
            cells.enable()
            first, returned = [], []
            for _ in range(starts):
                line, command = cells.start_hello()
                first.append(line)
                returned.append(command)
            native, c_native, python, c_python = [], [], [], []
            for index in range(repeats):
                # Each pair runs in both orders over the repeats (drifting noise cancels).
                if index:
                    cells.enable()
                if index % 2 == 0:
                    native.append(cells.pio_on_executor().rate)
                    c_native.append(cells.pio_in_c().rate)
                else:
                    c_native.append(cells.pio_in_c().rate)
                    native.append(cells.pio_on_executor().rate)
                cells.disable()
                cells.enable(native_pio=False)
                python.append(cells.pio_on_executor().rate)
                c_python.append(cells.pio_in_c().rate)
                cells.disable()
            cells.enable()
            times = [timecheck.run(cells, TIMECHECK_TIMEOUT) for _ in range(repeats)]
            cells.disable()
    ratio = [e / c for e, c in zip(native, c_native, strict=True)]
    python_ratio = [e / c for e, c in zip(python, c_python, strict=True)]
    return [
        Figure.of("cell create+load+start to first inmate line (hello; ssh command to serial 1 at "
                  "the host)", "s", first, f"< {GOAL_START_S:.0f} s", lambda m: m < GOAL_START_S),
        Figure.of("cell create+load+start: the jailhouse commands returned", "s", returned),
        Figure.of("PIO exits/s, executor (cell pio-loop, I/O bitmap loop)", "exits/s", native),
        Figure.of("PIO exits/s, minimal C KVM loop (tools/kvmloop), same image", "exits/s",
                  c_native + c_python),
        Figure.of("PIO exits/s, executor with every exit through Python", "exits/s", python),
        Figure.of("PIO ratio executor / C (per pair)", "x", ratio, f">= {GOAL_RATIO}",
                  lambda m: m >= GOAL_RATIO),
        Figure.of("PIO ratio Python path / C (per pair)", "x", python_ratio),
        *time_figures(times),
    ]


def time_figures(times: list[timecheck.TimeRun]) -> list[Figure]:
    """The timecheck runs' figures: every tick's jitter, each run's median |jitter|, the
    cell's TSC/PM-timer rate ratio (busy, and across HLT)."""
    failed = sum(not run.passed for run in times)
    if failed:
        LOG.warning("timecheck: %d of %d runs FAILED a check (see the lab logs)", failed, len(times))
    return [
        Figure.of("cell timer jitter, 100 ms periodic APIC timer, CPU in HLT (every tick; "
                  "positive: late)", "us", [tick for run in times for tick in run.jitter_us]),
        Figure.of("the same, median |jitter| of each run", "us",
                  [statistics.median(abs(tick) for tick in run.jitter_us) for run in times],
                  f"<= {GOAL_JITTER_US} us", lambda m: m <= GOAL_JITTER_US),
        Figure.of("cell TSC rate / comm region tsc_khz, by the PM timer (busy)", "x",
                  [run.tsc_pm for run in times], "1 +- 1 %", lambda m: abs(m - 1) <= 0.01),
        Figure.of("the same across HLT (one-shot timers)", "x", [run.tsc_pm_idle for run in times],
                  "1 +- 1 %", lambda m: abs(m - 1) <= 0.01),
    ]
