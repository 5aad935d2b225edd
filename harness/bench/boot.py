"""Boot benchmark: a lab's cold boot through jhlab against a bare QEMU boot of the same
kernel and initramfs to the same marker (``jhlab: root cell ready`` on serial 0).

Method: images are built (or found in the cache) once, untimed.  Then, ``repeats``
times and interleaved (bare, jhlab, bare, jhlab, ...): the bare run starts
``qemu-system-x86_64`` directly with the same machine, devices, kernel, initramfs (with
the same guest payload) and kernel command line, serial 0 on a pipe, and times Popen to
the marker; the jhlab run times ``Lab.up()`` (image lookup, accelerator choice, payload,
launch with QMP and both consoles, boot) to the same marker, and separately to
ssh-ready.  Each figure is min/median/max; the overhead ratio is jhlab / bare per pair.

The reset benchmark (:func:`bench_reset`) times resets by snapshot against cold boots
of the same lab.  Both keep every lab's logs in a folder they print first.
"""

from __future__ import annotations

import os
import select
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from harness import progress
from harness.bench import Figure, bench_log_dir
from harness.bench.cells import FIRST_LINE
from harness.images import ImageBuilder, ImageSet, build_payload
from harness.lab import READY, Lab
from harness.labfile import load_lab
from harness.machine import AccelChoice, Machine, choose_accel

#: Deadline of one boot (seconds).
BOOT_TIMEOUT = 300.0
#: Resets in a row in one run of the reset benchmark.
RESETS = 50
#: The cell start after each reset (Jailhouse's QEMU target, jhlab's hello on serial 1).
CELL_START = ("jailhouse enable /etc/jailhouse/qemu-x86.cell"
              " && jailhouse cell create /etc/jailhouse/hello.cell"
              " && jailhouse cell load hello /usr/libexec/jailhouse/demos/hello.bin"
              " && jailhouse cell start hello")
#: Deadline of that cell start, and of the wait for its first line (seconds).
CELL_TIMEOUT = 300.0
MARKER = READY.encode()


def bare_boot(images: ImageSet, accel: AccelChoice, payload: Path, log_dir: Path) -> float:
    """Seconds from starting QEMU directly to the ready marker on serial 0."""
    spec = load_lab("default")
    machine = Machine(spec, images, accel, log_dir=log_dir)
    with tempfile.TemporaryDirectory(prefix="jhlab-bare-") as tmp:
        initrd = Path(tmp) / "initrd.img"
        initrd.write_bytes(images.initramfs.read_bytes() + payload.read_bytes())
        cmd = _bare_command(machine.command_line(Path(tmp), initrd, _free_port()))
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return _wait_marker(proc, started) - started
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            if proc.stdout:
                proc.stdout.close()


def _bare_command(cmd: list[str]) -> list[str]:
    """The same machine without the harness: no -S, no QMP, serial 0 on stdout."""
    bare: list[str] = []
    skip = 0
    for i, arg in enumerate(cmd):
        if skip:
            skip -= 1
            continue
        nxt = cmd[i + 1] if i + 1 < len(cmd) else ""
        if arg == "-S":
            continue
        if arg in ("-chardev", "-mon", "-serial") and any(
                key in nxt for key in ("id=qmp", "chardev=qmp", "id=serial", "chardev:serial")):
            skip = 1
            continue
        bare.append(arg)
    return [*bare, "-serial", "stdio", "-serial", "null"]


def _wait_marker(proc: subprocess.Popen[bytes], started: float) -> float:
    assert proc.stdout is not None  # PIPE requested
    seen = b""
    fd = proc.stdout.fileno()
    while time.monotonic() - started < BOOT_TIMEOUT:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                raise RuntimeError(f"bare QEMU exited with {proc.returncode}")
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RuntimeError("bare QEMU closed its serial output")
        seen = (seen + chunk)[-4096:]
        if MARKER in seen:
            return time.monotonic()
    raise RuntimeError(f"bare QEMU did not print {READY!r} in {BOOT_TIMEOUT:.0f} s")


def _free_port() -> int:
    from harness.machine import free_port

    return free_port()


def jhlab_boot(log_dir: Path) -> tuple[float, float]:
    """Seconds from ``Lab.up()`` to the ready marker, and to ssh-ready (up() returns)."""
    started = time.monotonic()
    lab = Lab("default", log_dir=log_dir, quiet=True)
    try:
        lab.up()
        up_done = time.monotonic()
        assert lab.machine is not None and lab.summary is not None  # up() succeeded
        marker = lab.machine.started_at + lab.summary.boot_seconds
        return marker - started, up_done - started
    finally:
        lab.down()


def bench(repeats: int = 3) -> list[Figure]:
    images = ImageBuilder(quiet=True).build()
    root = bench_log_dir("boot")
    accel = choose_accel(load_lab("default").accel, images, log_dir=root)
    payload = build_payload(root / "payload.cpio.gz", authorized_key="ssh-rsa AAAA bench",
                            inmates=images.inmates)
    bare, marked, ready, ratios = [], [], [], []
    for index in range(repeats):
        b = bare_boot(images, accel, payload, root / f"bare{index}")
        j, r = jhlab_boot(root / f"jhlab{index}")
        bare.append(b)
        marked.append(j)
        ready.append(r)
        ratios.append(j / b)
    name = f"({accel.accel}, default lab)"
    return [
        Figure.of(f"bare QEMU boot to ready marker {name}", "s", bare),
        Figure.of(f"jhlab cold boot to ready marker {name}", "s", marked),
        Figure.of("jhlab overhead ratio (jhlab / bare, per pair)", "x", ratios, "<= 1.10",
                  lambda median: median <= 1.10),
        Figure.of(f"jhlab boot to ssh-ready, cached images {name}", "s", ready, "< 20 s",
                  lambda median: median < 20.0),
    ]


def bench_reset(repeats: int = 3, resets: int = RESETS) -> list[Figure]:
    """Lab resets against cold boots of the same lab, in one run.

    Method: ``repeats`` cold boots (``Lab.up()`` to ssh-ready, images cached), each in
    its own lab; after the first, its reset point is saved right after boot and
    restored ``resets`` times in a row.  Each reset is timed until the root cell ran a
    first command over ssh (the restore, the devices QEMU does not migrate put back,
    the KVM users stopped for the save continued, a new ssh session); then a real cell
    is started on it: ``jailhouse enable`` qemu-x86, ``cell create``/``load``/``start``
    of hello, timed until hello's first line arrived on serial 1 at the host.  The
    next reset throws that state away.  Ratio: each reset over the median cold boot.
    A failure ends the benchmark with its error; every lab's logs are kept (the folder
    is printed first).
    """
    ImageBuilder(quiet=True).build()  # untimed: a cold boot here never includes a build
    logs = bench_log_dir("reset")
    cold: list[float] = []
    restores: list[float] = []
    cells: list[float] = []
    for boot in range(max(repeats, 1)):
        lab = Lab("default", log_dir=logs / f"boot{boot}", quiet=True)
        try:
            started = time.monotonic()
            lab.up()
            cold.append(time.monotonic() - started)
            progress.console.print(f"cold boot {boot + 1}/{max(repeats, 1)}: {cold[-1]:.1f} s")
            if boot == 0:
                _resets_in_a_row(lab, resets, restores, cells)
        finally:
            lab.down()
    boot_median = statistics.median(cold)
    return [
        Figure.of("lab cold boot to ssh-ready (default lab)", "s", cold),
        Figure.of("lab reset by snapshot, until a command ran", "s", restores),
        Figure.of("reset / cold boot ratio (each reset over the median boot)", "x",
                  [r / boot_median for r in restores], "<= 0.10", lambda m: m <= 0.10),
        Figure.of("cell start after a reset: jailhouse enable, cell create+load+start to "
                  "hello's first line", "s", cells),
        Figure.of("resets in a row, each with a command and a cell start", "resets",
                  [len(restores)], f">= {resets}", lambda n: n >= resets),
    ]


def _resets_in_a_row(lab: Lab, resets: int, restores: list[float], cells: list[float]) -> None:
    """Save the reset point of a freshly booted lab, then restore it ``resets`` times,
    each followed by a command and a cell start (appending the timings)."""
    lab.snapshot()
    for index in range(resets):
        started = time.monotonic()
        lab.reset()
        lab.run("true", check=True)
        restores.append(time.monotonic() - started)
        started = time.monotonic()
        lab.run(CELL_START, check=True, timeout=CELL_TIMEOUT)
        lab.cell_console.expect(FIRST_LINE, timeout=CELL_TIMEOUT)
        cells.append(time.monotonic() - started)
        progress.console.print(f"reset {index + 1}/{resets}: {restores[-1]:.2f} s, "
                               f"then a cell start: {cells[-1]:.1f} s")
