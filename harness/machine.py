"""A lab machine: the QEMU command line from a lab description, the process lifecycle
and the accelerator choice.

Launch (all-or-nothing, rolled back through an ExitStack on any failure)::

    run dir (0700, owner file, sockets 0600, initrd)  →  QEMU -S (paused)  →  QMP connected, events
    recorded  →  both serial ports connected and drained  →  ``cont``

so not a byte of console output is lost.  QEMU runs in its own session (a Ctrl-C of the
harness does not hit it) and gets SIGKILL from the kernel when the harness process dies,
however it dies (``PR_SET_PDEATHSIG``): no QEMU outlives its harness.  Shutdown is
layered: consoles closed, QMP ``quit``, SIGTERM, SIGKILL; the run directory is removed,
the log directory (QEMU's output, both serial transcripts, the QMP event log) is kept.
After a SIGKILL of the harness the run directory stays until the next ``Lab.up()`` reaps
it (:func:`harness.runtime.reap_run_dirs`).

Besides QMP and the two serial ports, QEMU serves its qtest protocol on
``qtest.sock`` (only for :meth:`~harness.qmp.QmpSession.write_phys`: QMP has no command
that writes guest memory); every such access is logged to ``qtest.log``.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import functools
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import runtime
from harness.console import CELL_FAILURES, ROOT_FAILURES, SerialConsole
from harness.errors import (
    ConsoleError,
    GuestPanic,
    LaunchError,
    MachineDied,
    MachineError,
    MissingToolError,
    QmpError,
)
from harness.images import ImageSet, cache_dir
from harness.labfile import LabSpec
from harness.qmp import Event, QmpSession

LOG = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
#: How long a KVM probe boot may take to reach the root cell before TCG is chosen.
PROBE_TIMEOUT = 60.0
#: Deadline for QEMU to create its QMP socket after start.
LAUNCH_TIMEOUT = 15.0
#: Paravirtual KVM features hidden from the guest, as Jailhouse's QEMU recipe does.
KVM_CPU_FEATURES = "-kvm-pv-eoi,-kvm-pv-ipi,-kvm-asyncpf,-kvm-steal-time,-kvmclock"
#: The TCG CPU: ``max`` without XSAVE and the VEX-encoded extensions that need it. QEMU
#: 7.2's TCG does not honour the SVM XSETBV intercept: a nested guest's XSETBV changes
#: XCR0 without the exit KVM relies on, so KVM puts its stale XCR0 (x87 only) back at the
#: guest's next entry and the guest's AVX code faults with #UD (Jailhouse's sse-demo,
#: images/inmates demos/xsave.c). Linux keeps AVX in its CPU caps when CPUID lacks XSAVE
#: (and KVM passes it on), so the AVX family goes too: the root cell, KVM and every cell
#: then see a consistent CPU that announces nothing it cannot keep.
TCG_CPU = "max,xsave=off,avx=off,avx2=off,fma=off,f16c=off,vaes=off"
_PR_SET_PDEATHSIG = 1


def qemu_binary() -> str:
    """Path of ``qemu-system-x86_64``; :raise MissingToolError: naming the package."""
    path = shutil.which(QEMU)
    if path is None:
        raise MissingToolError(QEMU, "qemu-system-x86", "to run lab machines")
    return path


def qemu_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    first = out.stdout.splitlines()[0] if out.stdout else "unknown"
    return first.removeprefix("QEMU emulator version ").strip()


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL when the parent dies; what QEMU
    creates (its sockets, transcripts, memory dumps) is for this user only."""
    os.umask(0o077)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator a lab runs on and why."""

    accel: str
    cpu: str
    reason: str

    def qemu_args(self) -> list[str]:
        return ["-accel", self.accel, "-cpu", self.cpu]


TCG = AccelChoice("tcg", TCG_CPU, "")


@dataclass(frozen=True)
class Snapshot:
    """A saved machine state (QEMU migration stream) and the initrd it was booted with
    (a restore must present byte-identical boot ROMs)."""

    state: Path
    initrd: Path
    size: int


class MachineState(enum.Enum):
    """Lifecycle of a :class:`Machine`."""

    #: constructed, not launched
    IDLE = "idle"
    #: QEMU started, channels being connected
    LAUNCHING = "launching"
    #: guest running (or paused) and channels connected
    RUNNING = "running"
    #: QEMU gone, cleanup done
    STOPPED = "stopped"


class Machine:
    """One QEMU process of a lab.

    Lifecycle: ``launch()`` → use :attr:`qmp`, :attr:`console` (serial 0, root console),
    :attr:`cell_console` (serial 1, the cells' UART) → ``shutdown()``.  ``shutdown()`` is
    idempotent and does nothing for a machine never launched.

    :param spec: the lab description
    :param images: kernel, initramfs and root file system
    :param accel: the accelerator choice
    :param log_dir: where QEMU's output, serial transcripts and the QMP event log go
    :param payload: this boot's guest payload (appended to the initramfs)
    :param ssh_port: host port forwarded to the guest's sshd; ``None`` picks a free one
    :param incoming: start from this snapshot instead of booting
    :param tap_fds: for each tap netdev of the lab, a descriptor QEMU inherits
    """

    def __init__(self, spec: LabSpec, images: ImageSet, accel: AccelChoice, *, log_dir: Path,
                 payload: Path | None = None, ssh_port: int | None = None,
                 extra_args: tuple[str, ...] = (), incoming: Snapshot | None = None,
                 tap_fds: dict[str, int] | None = None) -> None:
        self.spec = spec
        self.images = images
        self.accel = accel
        self.log_dir = log_dir
        self.payload = payload
        self.ssh_port = ssh_port
        self.extra_args = extra_args
        self.incoming = incoming
        self.tap_fds = dict(tap_fds or {})
        self.state = MachineState.IDLE
        self.run_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.qmp: QmpSession | None = None
        self.console: SerialConsole | None = None
        self.cell_console: SerialConsole | None = None
        self.started_at = 0.0
        self.panicked: Event | None = None
        self._stack = contextlib.ExitStack()

    def __repr__(self) -> str:
        pid = self.process.pid if self.process else None
        return f"Machine({self.spec.name!r}, {self.state.value}, pid={pid})"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def qemu_log(self) -> Path:
        return self.log_dir / "qemu.log"

    def _require(self, *states: MachineState) -> None:
        if self.state not in states:
            raise MachineError(f"{self!r}: not possible while {self.state.value}")

    # -- command line --------------------------------------------------------------------

    def kernel_cmdline(self) -> str:
        spec = self.spec
        args = ["console=ttyS0,115200", "panic=0", "8250.nr_uarts=2"]
        if spec.reserve is not None:
            args.append(spec.reserve.kernel_arg)
        if spec.iommu == "intel":
            # no_timer_check: on a loaded host, TCG's timer interrupt can miss the few
            # ticks check_timer() waits for, and with interrupt remapping that panics
            # ("timer doesn't work through Interrupt-remapped IO-APIC") instead of
            # falling back; the timer works, it is only late.
            args += ["intel_iommu=on", "iommu=pt", "no_timer_check"]
        if self.accel.accel == "tcg":
            # TCG's vCPUs all read one host-derived, lock-protected counter, so their
            # TSCs are synchronized; Linux only guesses otherwise (an AMD CPU without
            # invariant TSC, which TCG cannot offer, and more than one CPU). Marked
            # unstable, the TSC makes KVM freeze a cell's TSC at every vCPU load and
            # catch it up only forward: tens of thousands of offset rewrites in one
            # timecheck run, and a TSC that can lose time against the cell's APIC timer.
            # The kernel's own clock stays the HPET, as it was while the TSC was marked
            # unstable: its switch to the TSC clocksource (stop_machine, a second into
            # boot) deadlocked a TCG guest on a loaded host (soft lockups in
            # multi_cpu_stop and smp_call_function_many_cond, never ready).
            args += ["tsc=reliable", "clocksource=hpet"]
        if spec.cmdline:
            args.append(spec.cmdline)
        return " ".join(args)

    def command_line(self, run_dir: Path, initrd: Path, ssh_port: int) -> list[str]:
        """The full QEMU command line for this machine."""
        spec = self.spec
        machine = "q35,kernel-irqchip=split" if spec.iommu == "intel" else "q35"
        cmd = [
            qemu_binary(), "-name", f"jhlab-{spec.name},debug-threads=on",
            "-machine", machine, *self.accel.qemu_args(),
            "-smp", str(spec.cpus), "-m", f"{spec.memory_mib}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            "-no-reboot", "-action", "panic=pause", "-S",
            "-audiodev", "none,id=noaudio",
        ]
        if spec.iommu == "intel":
            # must precede the PCI devices it translates for
            cmd += ["-device", "intel-iommu,intremap=on,caching-mode=on"]
        cmd += [
            "-kernel", str(self.images.kernel.vmlinuz), "-initrd", str(initrd),
            "-append", self.kernel_cmdline(),
            "-drive", f"file={self.images.rootfs},if=none,id=rootdisk,format=raw,snapshot=on",
            "-device", "ide-hd,drive=rootdisk,bus=ide.0",
            "-chardev", f"socket,id=qmp,path={run_dir / 'qmp.sock'},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            # guest memory writes from the host (QMP only reads); TCG/KVM still run the guest
            "-qtest", f"unix:{run_dir / 'qtest.sock'},server=on,wait=off",
            "-qtest-log", str(self.log_dir / "qtest.log"),
        ]
        for index in (0, 1):
            cmd += [
                "-chardev",
                f"socket,id=serial{index},path={run_dir / f'serial{index}.sock'},server=on,"
                f"wait=off,logfile={self.log_dir / f'serial{index}.log'},logappend=on",
                "-serial", f"chardev:serial{index}",
            ]
        cmd += [
            "-netdev", f"user,id=mgmt,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
            # No option ROM (the lab boots with -kernel): a ROM BAR would shift the
            # firmware's BAR layout away from the one Jailhouse's qemu-x86 config lists.
            "-device", f"virtio-net-pci,netdev=mgmt,addr={spec.management_nic},id=mgmt,romfile=",
        ]
        for netdev in spec.netdevs:
            if netdev.type == "tap":
                if netdev.id not in self.tap_fds:
                    raise MachineError(f"lab {spec.name}: no tap descriptor for netdev {netdev.id}")
                cmd += ["-netdev", f"tap,id={netdev.id},fd={self.tap_fds[netdev.id]}"]
            else:
                restrict = "on" if netdev.restrict else "off"
                cmd += ["-netdev", f"user,id={netdev.id},restrict={restrict}"]
        for device in spec.devices:
            cmd += ["-device", device.qemu_arg()]
        if self.incoming is not None:
            cmd += ["-incoming", "defer"]
        return cmd + list(self.extra_args)

    # -- launch ---------------------------------------------------------------------------

    def launch(self, *, paused: bool = False) -> None:
        """Start QEMU paused, connect QMP and both consoles (and restore the snapshot, if
        any), then let the guest run, unless ``paused``: then :meth:`resume` does.

        :raise LaunchError: QEMU refused the command line or died during launch
        """
        self._require(MachineState.IDLE)
        self.state = MachineState.LAUNCHING
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as rollback:
            rollback.callback(self._cleanup)
            self.run_dir = runtime.new_run_dir(self.spec.name)
            initrd = self.run_dir / "initrd.img"
            if self.incoming is not None:
                shutil.copyfile(self.incoming.initrd, initrd)
            else:
                with open(initrd, "wb") as out:
                    out.write(self.images.initramfs.read_bytes())
                    if self.payload is not None:
                        out.write(self.payload.read_bytes())
            auto_port = self.ssh_port is None
            for attempt in range(3):
                port = free_port() if auto_port else self.ssh_port
                assert port is not None  # chosen above
                try:
                    self._start_process(self.command_line(self.run_dir, initrd, port))
                    self._connect_channels()
                    break
                except LaunchError as exc:
                    if auto_port and "hostfwd" in exc.output and attempt < 2:
                        LOG.info("port %d was taken meanwhile, trying another", port)
                        continue
                    if "hostfwd" in exc.output or "host forwarding" in exc.output:
                        raise LaunchError(
                            f"cannot forward 127.0.0.1:{port} to the guest's ssh: the port is "
                            "in use; pick another with --ssh-port or let jhlab choose",
                            exitcode=exc.exitcode, command=exc.command, output=exc.output,
                        ) from exc
                    raise
            self.ssh_port = port
            assert self.qmp is not None  # set by _connect_channels
            if self.incoming is not None:
                self._migrate_in(self.incoming)
            if not paused:
                self.resume()
            rollback.pop_all()
        self.state = MachineState.RUNNING

    def resume(self) -> None:
        """Let the guest run (QMP ``cont``): after ``launch(paused=True)``, or a stop."""
        assert self.qmp is not None  # launched
        self.qmp.execute("cont")
        self.started_at = time.monotonic()

    def _start_process(self, cmd: list[str]) -> None:
        assert self.run_dir is not None  # created by launch()
        (self.log_dir / "qemu-cmdline.txt").write_text(" ".join(cmd) + "\n")
        with open(self.qemu_log, "ab") as log:
            LOG.info("starting %s", " ".join(cmd))
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
                pass_fds=tuple(self.tap_fds.values()),
            )
        qmp_sock = self.run_dir / "qmp.sock"
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not qmp_sock.exists():
            if self.process.poll() is not None:
                raise LaunchError("QEMU exited during launch", exitcode=self.process.returncode,
                                  command=cmd, output=self._qemu_output())
            if time.monotonic() > deadline:
                raise LaunchError(f"QEMU did not create its QMP socket in {LAUNCH_TIMEOUT:.0f} s",
                                  exitcode=None, command=cmd, output=self._qemu_output())
            time.sleep(0.02)

    def _qemu_output(self) -> str:
        try:
            return self.qemu_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _connect_channels(self) -> None:
        """Connect QMP and both consoles; a QEMU that exits meanwhile is a LaunchError."""
        try:
            self._open_channels()
        except (QmpError, ConsoleError) as exc:
            assert self.process is not None  # started before
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(2)
            self._close_channels()
            if self.process.poll() is not None:
                raise LaunchError("QEMU exited during launch", exitcode=self.process.returncode,
                                  command=list(self.process.args),  # type: ignore[arg-type]
                                  output=self._qemu_output()) from exc
            raise

    def _close_channels(self) -> None:
        for console in (self.console, self.cell_console):
            if console is not None:
                console.close()
        if self.qmp is not None:
            self.qmp.close()
        self.qmp = self.console = self.cell_console = None

    def _open_channels(self) -> None:
        assert self.run_dir is not None  # created by launch()
        self.qmp = QmpSession(self.run_dir / "qmp.sock", event_log=self.log_dir / "qmp-events.jsonl",
                              name=f"{self.spec.name}-qmp", qtest=self.run_dir / "qtest.sock")
        self.qmp.connect()
        self.qmp.events.subscribe(self._on_event)
        self.console = SerialConsole("serial0 (root console)", self.run_dir / "serial0.sock",
                                     self.log_dir / "serial0.log", ROOT_FAILURES)
        self.cell_console = SerialConsole("serial1 (cell console)", self.run_dir / "serial1.sock",
                                          self.log_dir / "serial1.log", CELL_FAILURES)
        self.console.connect()
        self.cell_console.connect()

    def _on_event(self, event: Event) -> None:
        if event.name == "GUEST_PANICKED":
            self.panicked = event
            tail = self.console.tail() if self.console else ""
            error = GuestPanic(f"lab {self.spec.name}: the guest kernel panicked "
                               f"({dict(event.data).get('action', 'pause')})", tail)
            for console in (self.console, self.cell_console):
                if console is not None:
                    console.abort(error)
        elif event.name == "SHUTDOWN":
            LOG.info("lab %s: QEMU reports SHUTDOWN %s", self.spec.name, dict(event.data))

    # -- state ----------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        """:raise MachineDied: if QEMU has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise MachineDied(
                f"lab {self.spec.name}: QEMU exited with status {self.process.returncode}; "
                f"logs in {self.log_dir}\n{self._qemu_output()[-1500:]}"
            )

    # -- snapshots ------------------------------------------------------------------------

    def save_snapshot(self, folder: Path, *, timeout: float = 120.0) -> Snapshot:
        """Save the machine's whole state to ``folder`` and let it run on.

        The vCPUs are stopped (QMP ``stop``) *before* RAM is streamed out (``migrate`` to
        a file) and resumed after, so the file holds one instant of the guest.  A live
        (pre-copy) save of a running TCG guest is torn in QEMU 7.2: its dirty-bitmap sync
        clears the migration dirty bits of whole bitmap words without resetting the
        vCPUs' TLB entries, so stores through an entry that was already writable set no
        dirty bit and the page is never sent again (QEMU 9.0 fixed it, commit 03bfc2188f,
        "physmem: Fix migration dirty bitmap coherency with TCG memory access").  Such a
        snapshot restores a kernel whose memory mixes two moments; one taken while the
        root cell's KVM holder created its VM (text patching, per-CPU state) panicked on
        restore.  While stopped, the guest's clocks (TSC, virtual clock) stand still too.
        """
        self._require(MachineState.RUNNING)
        assert self.qmp is not None and self.run_dir is not None  # running
        folder.mkdir(parents=True, exist_ok=True)
        state = folder / "state.bin"
        initrd = folder / "initrd.img"
        shutil.copyfile(self.run_dir / "initrd.img", initrd)
        resume = self.qmp.status() == "running"
        self.qmp.execute("stop")
        try:
            self._migrate(lambda: self.qmp.execute(  # type: ignore[union-attr]
                "migrate", {"uri": f"exec:cat > {shlex.quote(str(state))}"}), timeout, "save")
        finally:
            if resume and self.alive():
                self.qmp.execute("cont")
        return Snapshot(state=state, initrd=initrd, size=state.stat().st_size)

    def _migrate_in(self, snapshot: Snapshot, timeout: float = 120.0) -> None:
        assert self.qmp is not None  # connected
        self._note_in_transcripts(f"jhlab: restoring the snapshot {snapshot.state}")
        self._migrate(lambda: self.qmp.execute(  # type: ignore[union-attr]
            "migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(snapshot.state))}"}),
            timeout, "restore")

    def _note_in_transcripts(self, text: str) -> None:
        """A line in both serial transcripts (QEMU appends to them) where this QEMU's
        output begins, so a reader sees which run each part of a transcript is from."""
        for index in (0, 1):
            with open(self.log_dir / f"serial{index}.log", "a") as transcript:
                transcript.write(f"\n--- {text} ({time.strftime('%H:%M:%S')}) ---\n")

    def _migrate(self, start: Callable[[], object], timeout: float, what: str) -> None:
        assert self.qmp is not None  # connected
        self.qmp.execute("migrate-set-capabilities",
                         {"capabilities": [{"capability": "events", "state": True}]})
        mark = self.qmp.events.mark()
        start()
        deadline = time.monotonic() + timeout
        while True:
            done = [e.data.get("status") for e in self.qmp.events.find("MIGRATION", since=mark)
                    if e.data.get("status") in ("completed", "failed", "cancelled")]
            if done:
                break
            self.check_alive()
            if time.monotonic() > deadline:
                raise MachineError(f"lab {self.spec.name}: snapshot {what} took more than "
                                   f"{timeout:.0f} s")
            time.sleep(0.05)
        if done[0] != "completed":
            raise MachineError(f"lab {self.spec.name}: snapshot {what} {done[0]}: "
                               f"{self._migration_error(what)}; logs in {self.log_dir}")
        # QEMU sends "completed" a moment before its migration thread leaves the run state
        # finish-migrate, and until then it refuses `cont` ("Migration is not finalized
        # yet"): under load that moment is long enough to be hit
        while self.qmp.status() == "finish-migrate":
            self.check_alive()
            if time.monotonic() > deadline:
                raise MachineError(f"lab {self.spec.name}: QEMU did not finish the snapshot "
                                   f"{what} in {timeout:.0f} s (run state finish-migrate)")
            time.sleep(0.02)

    def _migration_error(self, what: str) -> str:
        """Why a migration failed: QEMU's own account (an incoming QEMU exits at once and
        says it only in its output), with what to do for the failures we know."""
        if what == "save":
            info = self.qmp.execute("query-migrate") if self.qmp is not None else {}
            return str(info.get("error-desc", info))
        assert self.process is not None  # launched
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        lines = [line for line in self._qemu_output().splitlines()
                 if line.startswith("qemu-system") and "terminating on signal" not in line]
        text = "; ".join(line.split(": ", 1)[-1] for line in lines[-3:]) or "QEMU gave no reason"
        if "guest-mode inconsistent" in text:
            text += (" (a vCPU was inside a nested guest when the snapshot was saved, which "
                     "QEMU 7.2 under TCG saves but cannot load; Lab.snapshot stops the root "
                     "cell's KVM users first: take the snapshot through it)")
        return text

    # -- shutdown -------------------------------------------------------------------------

    def shutdown(self, *, hard: bool = False, timeout: float = 15.0) -> None:
        """Stop QEMU: consoles closed, QMP ``quit`` (unless ``hard``), SIGTERM, SIGKILL.

        Always cleans up; the log directory is kept.
        """
        if self.state in (MachineState.IDLE, MachineState.STOPPED):
            return
        try:
            self._stop_process(hard, timeout)
        finally:
            self._cleanup()

    def _stop_process(self, hard: bool, timeout: float) -> None:
        for console in (self.console, self.cell_console):
            if console is not None:
                console.close()
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        if not hard and self.qmp is not None and self.qmp.connected:
            try:
                self.qmp.execute("quit", timeout=timeout)
                proc.wait(timeout)
                return
            except (QmpError, subprocess.TimeoutExpired) as exc:
                LOG.warning("lab %s: QMP quit did not end QEMU (%s); terminating",
                            self.spec.name, exc)
        proc.terminate()
        try:
            proc.wait(5 if not hard else 1)
        except subprocess.TimeoutExpired:
            LOG.warning("lab %s: QEMU ignored SIGTERM; killing pid %d", self.spec.name, proc.pid)
            proc.kill()
            proc.wait(30)

    def _cleanup(self) -> None:
        for console in (self.console, self.cell_console):
            if console is not None:
                console.close()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        if self.qmp is not None:
            self.qmp.close()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
        self.state = MachineState.STOPPED


@functools.cache
def types_with_migration_state(binary: str | None = None) -> frozenset[str]:
    """The device types whose state this QEMU migrates: those with a VMState description
    (``-dump-vmstate``, keyed by type name).  A type missing here (QEMU's ``edu``) comes
    back from a snapshot as if reset.

    :raise MachineError: when QEMU cannot dump them
    """
    binary = binary or qemu_binary()
    with tempfile.TemporaryDirectory(prefix="jhlab-vmstate-") as tmp:
        dump = Path(tmp) / "vmstate.json"
        proc = subprocess.run(
            [binary, "-machine", "q35", "-nodefaults", "-display", "none", "-dump-vmstate", str(dump)],
            capture_output=True, text=True, timeout=60, check=False)
        try:
            return frozenset(json.loads(dump.read_text()))
        except (OSError, ValueError) as exc:
            raise MachineError(f"{binary} -dump-vmstate failed (status {proc.returncode}): "
                               f"{proc.stderr.strip() or exc}") from exc


# -- accelerator choice -----------------------------------------------------------------


def _host_virt_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split()) & {"vmx", "svm"}
    return set()


def _probe_key(binary: str, images: ImageSet) -> str:
    kvm = os.stat("/dev/kvm") if os.path.exists("/dev/kvm") else None
    parts = [qemu_version(binary), os.uname().release, images.kernel.ident,
             str(kvm.st_rdev if kvm else None), ",".join(sorted(_host_virt_flags()))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def choose_accel(requested: str, images: ImageSet, *, log_dir: Path) -> AccelChoice:
    """Pick the accelerator: ``tcg`` and ``kvm`` as asked; ``auto`` = KVM only when a real
    probe boot of the lab kernel reaches the root cell in time and shows VMX/SVM inside,
    else TCG.  The choice and its reason are cached per host, QEMU and kernel."""
    if requested == "tcg":
        return AccelChoice("tcg", TCG_CPU, "asked for TCG")
    kvm = AccelChoice("kvm", f"host,{KVM_CPU_FEATURES}", "")
    if requested == "kvm":
        return AccelChoice(kvm.accel, kvm.cpu, "asked for KVM")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", TCG_CPU, "no usable /dev/kvm on this host")
    if not _host_virt_flags():
        return AccelChoice("tcg", TCG_CPU, "the host CPU shows neither vmx nor svm, so KVM "
                           "could not offer nested virtualization to the root cell")
    binary = qemu_binary()
    cache = cache_dir() / "accel.json"
    key = _probe_key(binary, images)
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(cache.read_text()).get(key)
        if known:
            cpu = TCG_CPU if known["accel"] == "tcg" else known["cpu"]
            return AccelChoice(known["accel"], cpu, known["reason"] + " (cached probe)")
    choice = _probe_kvm(images, log_dir)
    with contextlib.suppress(OSError, ValueError):
        table = json.loads(cache.read_text()) if cache.exists() else {}
        table[key] = {"accel": choice.accel, "cpu": choice.cpu, "reason": choice.reason}
        cache.write_text(json.dumps(table, indent=1))
    return choice


def _probe_kvm(images: ImageSet, log_dir: Path, timeout: float = PROBE_TIMEOUT) -> AccelChoice:
    from harness.labfile import LabSpec  # the probe machine is minimal: no devices

    spec = LabSpec(name="kvm-probe", cpus=1, memory=512 * 2**20, iommu="none")
    probe = Machine(spec, images, AccelChoice("kvm", f"host,{KVM_CPU_FEATURES}", "probe"),
                    log_dir=log_dir / "kvm-probe")
    try:
        probe.launch()
        assert probe.console is not None  # set by launch()
        match = probe.console.expect(r"jhlab: cpu features: ([^\r\n]*)", timeout=timeout)
        features = set(match.group(1).split())
    except (ConsoleError, MachineError) as exc:
        LOG.info("KVM probe failed: %s", exc)
        reason = f"a KVM probe boot did not reach the root cell within {timeout:.0f} s"
        if Path("/sys/module/kvm_pvm").exists():
            reason += " (this host's /dev/kvm is PVM, which cannot boot a stock kernel)"
        return AccelChoice("tcg", TCG_CPU, reason)
    finally:
        probe.shutdown(hard=True)
    if not features & {"vmx", "svm"}:
        return AccelChoice("tcg", TCG_CPU, "KVM boots, but shows no vmx/svm inside "
                           "(enable nested virtualization: kvm_intel/kvm_amd nested=1)")
    return AccelChoice("kvm", f"host,{KVM_CPU_FEATURES}",
                       f"KVM probe boot shows {' '.join(sorted(features))} inside")
