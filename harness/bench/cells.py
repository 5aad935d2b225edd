"""Cell benchmarks in the default lab (``jhlab bench cells``): how long the Jailhouse
lifecycle takes through the real ``jailhouse`` command, and how fast the executor serves
a cell's port I/O against a minimal C KVM loop in the same lab VM.

Method. One lab is booted (untimed; its logs are kept, failed or not); configs are
compiled on the host, configs, inmates and the C tool uploaded.

* **Lifecycle** (``cycles`` times): every command runs in the root cell between two
  markers written to ``/dev/ttyS0`` (:mod:`harness.bench.marks`); a figure is the time
  between the markers' arrival on serial 0 at the host, so ssh and the host's own
  scheduling of the command are not in it. One cycle: ``jailhouse enable`` (qemu-x86);
  ``cell create`` + ``cell load`` + ``cell start`` of hello as one figure, and from the
  marker before ``cell start`` to hello's first line (``Hello from jhlab inmate``) on
  serial 1; after ``hello: PASSED``, ``jailhouse cell list`` (two cells); ``cell
  destroy``; ``jailhouse disable``.
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

* **Linux cells** (``repeats`` boots; the lab's private network needs root, without it
  these figures are left out): ``jailhouse cell linux`` to the guest's ready line, and
  ping round trips from the lab's namespace to the cell (:mod:`harness.bench.linuxcell`).

Every wait has a deadline; a failed step ends the benchmark with its output and the
lab's log folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import statistics
import tempfile
from pathlib import Path
from typing import Final

from harness.bench import Figure, bench_log_dir, linuxcell, timecheck
from harness.bench.marks import LineClock, begin_marker, end_marker, mark, marked
from harness.errors import JhlabError
from harness.hvmodel.config import CellConfig, load_source
from harness.images import ImageBuilder, compiled_configs
from harness.lab import Lab
from harness.labfile import load_lab, with_lan_on_tap
from harness.progress import Step, step
from harness.protocol import CommandResult, LabChannels
from harness.recipes import build_inmates, find_recipes

LOG = logging.getLogger(__name__)

#: where the benchmark's files go in the root cell
GUEST_DIR: Final = "/tmp/jhlab-bench"
FIRST_LINE: Final = r"Hello from jhlab inmate"
HELLO_DONE: Final = r"hello: (PASSED|FAILED)"
#: the row ``cell list`` shows for the running hello cell
HELLO_ROW: Final = re.compile(r"^1 +hello +running +2 ", re.MULTILINE)
#: the result line of pio-loop (the clock hands over whole lines only)
PIO_LINE: Final = r"^pio-loop: \d+ exits in "
#: seconds: one cell start to its first line; one command; the C tool's own limit
START_TIMEOUT: Final = 120.0
COMMAND_TIMEOUT: Final = 300.0
KVMLOOP_TIMEOUT: Final = 120
#: seconds a marker may take to arrive after its command returned
MARK_TIMEOUT: Final = 30.0
#: seconds to build the C tool
BUILD_TIMEOUT: Final = 300.0
#: milliseconds each pio-loop run loops
PIO_MS: Final = 2000
GOAL_RATIO: Final = 0.5
#: lifecycle goals, seconds (issue 12)
GOAL_ENABLE_S: Final = 3.0
GOAL_CREATE_LOAD_START_S: Final = 1.5
GOAL_FIRST_LINE_S: Final = 1.0
GOAL_DESTROY_S: Final = 1.0
GOAL_LIST_S: Final = 0.3
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


@dataclasses.dataclass(frozen=True)
class Cycle:
    """One lifecycle cycle's figures, seconds between markers (and lines) on the serial
    lines."""

    enable: float
    create_load_start: float
    first_line: float
    cell_list: float
    destroy: float
    disable: float


class CellBench:
    """The benchmark's steps on a lab that is up (:func:`bench` drives them).

    Lifecycle: :meth:`start` (clocks on serial 0 and 1) -> :meth:`upload` -> steps
    (:meth:`cycle`; :meth:`enable`, :meth:`pio_on_executor`, :meth:`pio_in_c`,
    :meth:`disable`) -> :meth:`stop`.

    :param lab: the lab (default lab: qemu-x86, the cells in ``images/inmates/cells``)
    """

    def __init__(self, lab: LabChannels) -> None:
        self.lab = lab
        pio = load_source(find_recipes().cells / "pio-loop.toml")
        if not isinstance(pio, CellConfig):
            raise JhlabError("cells/pio-loop.toml is not a cell config")
        self.pio_cpu = min(pio.cpus)
        self.root = LineClock(lab.console)
        self.cells = LineClock(lab.cell_console)

    def start(self) -> None:
        """Start reading both serial lines (each clock is its console's only reader)."""
        self.root.start()
        self.cells.start()

    def stop(self) -> None:
        """Stop reading; idempotent."""
        self.root.stop()
        self.cells.stop()

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
        """``command`` in the root cell (over ssh: the root console carries the markers and
        the clock reads it); a failure raises with its output."""
        return self.lab.run(command, timeout=timeout, check=True)

    def timed(self, name: str, command: str) -> tuple[float, CommandResult]:
        """Run ``command`` between markers; seconds between them on serial 0."""
        since = self.root.position
        result = self.run(marked(name, command))
        return self.root.between(begin_marker(name), end_marker(name), MARK_TIMEOUT,
                                 since=since), result

    def enable(self, *, native_pio: bool = True) -> None:
        args = "" if native_pio else "JAILHOUSE_DAEMON_ARGS=--no-native-pio "
        self.run(f"{args}jailhouse enable {GUEST_DIR}/qemu-x86.cell")

    def disable(self) -> None:
        self.run("jailhouse disable")

    def cycle(self, index: int) -> Cycle:
        """enable, create+load+start of hello (and its first line), list, destroy,
        disable; every figure between markers."""
        enable, _ = self.timed(f"enable-{index}", f"jailhouse enable {GUEST_DIR}/qemu-x86.cell")
        cells_since = self.cells.position
        root_since = self.root.position
        up, start = f"create-load-start-{index}", f"start-{index}"
        self.run(f"{mark(begin_marker(up))}"
                 f" && jailhouse cell create {GUEST_DIR}/hello.cell"
                 f" && jailhouse cell load hello {GUEST_DIR}/hello.bin"
                 f" && {mark(begin_marker(start))}"
                 " && jailhouse cell start hello"
                 f" && {mark(end_marker(up))}")
        began, after = self.root.wait_line(begin_marker(up), MARK_TIMEOUT, since=root_since)
        started, after = self.root.wait_line(begin_marker(start), MARK_TIMEOUT, since=after)
        ended, _ = self.root.wait_line(end_marker(up), MARK_TIMEOUT, since=after)
        first, _, after = self.cells.wait(FIRST_LINE, START_TIMEOUT, since=cells_since)
        _, verdict, _ = self.cells.wait(HELLO_DONE, START_TIMEOUT, since=after)
        if "PASSED" not in verdict:
            raise JhlabError(f"the hello inmate said {verdict!r}")
        listing, shown = self.timed(f"list-{index}", "jailhouse cell list")
        if not HELLO_ROW.search(shown.stdout):
            raise JhlabError(f"jailhouse cell list does not show hello running:\n{shown.stdout}")
        destroy, _ = self.timed(f"destroy-{index}", "jailhouse cell destroy hello")
        disable, _ = self.timed(f"disable-{index}", "jailhouse disable")
        run = Cycle(enable=enable, create_load_start=ended - began, first_line=first - started,
                    cell_list=listing, destroy=destroy, disable=disable)
        LOG.info("cycle %d: %s", index, run)
        return run

    def pio_on_executor(self) -> PioRun:
        """pio-loop in its cell on the executor."""
        since = self.cells.position
        self.run(f"jailhouse cell create {GUEST_DIR}/pio-loop.cell"
                 f" && jailhouse cell load pio-loop {GUEST_DIR}/pio-loop.bin"
                 f" -s ms={PIO_MS} -a 0x1000 && jailhouse cell start pio-loop")
        _, line, _ = self.cells.wait(PIO_LINE, PIO_MS / 1000 + START_TIMEOUT, since=since)
        self.run("jailhouse cell destroy pio-loop")
        run = parse_pio_line(line)
        LOG.info("pio-loop on the executor: %.0f exits/s", run.rate)
        return run

    def run_cell(self, name: str, cmdline: str, done: str, timeout: float) -> str:
        """Create, load (``cmdline`` at 0x1000) and start cell ``name`` (``name.cell``,
        ``name.bin``), wait ``timeout`` seconds for ``done`` on serial 1, destroy it;
        the cell's console text up to that line."""
        since = self.cells.position
        self.run(f"jailhouse cell create {GUEST_DIR}/{name}.cell"
                 f" && jailhouse cell load {name} {GUEST_DIR}/{name}.bin"
                 f" -s {shlex.quote(cmdline)} -a 0x1000 && jailhouse cell start {name}")
        _, _, after = self.cells.wait(done, timeout, since=since)
        self.run(f"jailhouse cell destroy {name}")
        return self.cells.text(since, after)

    def pio_in_c(self) -> PioRun:
        """pio-loop in tools/kvmloop on the cell's CPU (the hypervisor stays enabled: its
        keeper VM keeps KVM's global state as it is while cells come and go)."""
        since = self.cells.position
        args = shlex.join([f"{GUEST_DIR}/kvmloop", "-C", str(self.pio_cpu), "-t", str(KVMLOOP_TIMEOUT),
                           "-c", f"ms={PIO_MS}", "-e", "mismatches:", f"{GUEST_DIR}/pio-loop.bin"])
        self.run(args, timeout=KVMLOOP_TIMEOUT + 60)
        _, line, _ = self.cells.wait(PIO_LINE, START_TIMEOUT, since=since)
        run = parse_pio_line(line)
        LOG.info("pio-loop in kvmloop: %.0f exits/s", run.rate)
        return run


def _pio_figures(cells: CellBench, repeats: int, st: Step) -> list[Figure]:
    native, c_native, python, c_python = [], [], [], []
    for index in range(repeats):
        st.note(f"repeat {index + 1}/{repeats}")
        cells.enable()
        # Each pair runs in both orders over the repeats (drifting noise cancels).
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
    ratio = [e / c for e, c in zip(native, c_native, strict=True)]
    python_ratio = [e / c for e, c in zip(python, c_python, strict=True)]
    return [
        Figure.of("PIO exits/s, executor (cell pio-loop, I/O bitmap loop)", "exits/s", native),
        Figure.of("PIO exits/s, minimal C KVM loop (tools/kvmloop), same image", "exits/s",
                  c_native + c_python),
        Figure.of("PIO exits/s, executor with every exit through Python", "exits/s", python),
        Figure.of("PIO ratio executor / C (per pair)", "x", ratio, f">= {GOAL_RATIO}",
                  lambda m: m >= GOAL_RATIO),
        Figure.of("PIO ratio Python path / C (per pair)", "x", python_ratio),
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


def _lifecycle_figures(runs: list[Cycle]) -> list[Figure]:
    def seconds(name: str, values: list[float], goal: float | None = None) -> Figure:
        if goal is None:
            return Figure.of(name, "s", values)
        return Figure.of(name, "s", values, f"<= {goal:g} s", lambda m: m <= goal)

    return [
        seconds("jailhouse enable (qemu-x86; markers on serial 0)", [r.enable for r in runs],
                GOAL_ENABLE_S),
        seconds("jailhouse cell create + load + start (hello)", [r.create_load_start for r in runs],
                GOAL_CREATE_LOAD_START_S),
        seconds("cell start -> hello's first line on serial 1", [r.first_line for r in runs],
                GOAL_FIRST_LINE_S),
        seconds("jailhouse cell list (root and hello)", [r.cell_list for r in runs], GOAL_LIST_S),
        seconds("jailhouse cell destroy (hello)", [r.destroy for r in runs], GOAL_DESTROY_S),
        seconds("jailhouse disable", [r.disable for r in runs]),
    ]


def _linux_figures(cells: CellBench, lab: Lab, repeats: int) -> list[Figure]:
    assert lab.network is not None  # the lab has a tap
    with step(f"Linux cells, {repeats} boots and pings") as st:
        cells.run("echo 1 > /proc/sys/kernel/printk")  # the cell owns serial 0
        # the root's e1000e driver resets the NIC between two cells: QEMU's e1000e model
        # aborts (e1000e_intrmgr_on_throttling_timer) when a cell's driver turns MSI-X on
        # while the timer the previous cell armed is pending
        cells.run(f"JAILHOUSE_DAEMON_ARGS=--rebind-pci jailhouse enable {GUEST_DIR}/qemu-x86.cell")
        runs = []
        for index in range(repeats):
            st.note(f"boot {index + 1}/{repeats}")
            runs.append(linuxcell.boot_and_ping(cells, lab.network, index))
        cells.disable()
    return linuxcell.figures(runs)


def bench(repeats: int = 3, cycles: int = 10) -> list[Figure]:
    """Boot the default lab, run both benchmarks, return the figures.

    :param repeats: interleaved repeats of the PIO benchmark
    :param cycles: lifecycle cycles timed
    """
    images = ImageBuilder().build()
    if images.inmates is None:
        raise JhlabError("the image set has no inmates")
    with tempfile.TemporaryDirectory(prefix="jhlab-bench-") as tmp:
        kvmloop = build_kvmloop(Path(tmp) / "tools-build")
        # the e1000e on a tap in a private namespace, for the Linux cell's pings (root only)
        spec = load_lab("default")
        linux = os.geteuid() == 0
        lab = Lab(with_lan_on_tap(spec) if linux else spec, log_dir=bench_log_dir("cells"))
        with lab:
            LOG.info("cells benchmark: lab logs in %s", lab.log_dir)
            cells = CellBench(lab)
            cells.start()
            try:
                cells.upload(images.inmates, kvmloop)
                runs = []
                with step(f"Cell lifecycle, {cycles} cycles (logs in {lab.log_dir})") as st:
                    for index in range(cycles):
                        st.note(f"cycle {index + 1}/{cycles}")
                        runs.append(cells.cycle(index))
                with step(f"PIO exits, executor and C side by side, {repeats} repeats") as st:
                    figures = _lifecycle_figures(runs) + _pio_figures(cells, repeats, st)
                with step(f"Time in a cell (timecheck), {repeats} runs") as st:
                    cells.enable()
                    times = []
                    for index in range(repeats):
                        st.note(f"run {index + 1}/{repeats}")
                        times.append(timecheck.run(cells, TIMECHECK_TIMEOUT))
                    cells.disable()
                    figures += time_figures(times)
                if linux:
                    figures += _linux_figures(cells, lab, repeats)
                else:
                    LOG.warning("no Linux-cell figures: the lab's private network needs root")
            except JhlabError as exc:
                raise JhlabError(f"{exc}\n(lab logs kept in {lab.log_dir})") from exc
            finally:
                cells.stop()
    return figures
