"""A lab: one object tying images, the machine, its consoles and root-cell shells.

::

    with Lab("default") as lab:          # builds/finds images, boots, waits for ready
        print(lab.summary)
        lab.run("lspci", check=True)
        data = lab.qmp.read_phys(0x3a000000, 64)

Lifecycle: ``up()`` → use → ``down()`` (idempotent; also on ``__exit__``).  A failed
``up()`` leaves nothing running and says where the logs are.

A lab somebody else owns (``jhlab up``'s supervisor, a pytest session with
``--keep-lab``) is reached with :meth:`Lab.attach`: the same channels, through the
owner's QMP relay (:mod:`harness.qmp.relay`), the lab's ssh and its transcripts::

    with Lab.attach("default") as lab:   # detaches at the end; the lab runs on
        lab.put(b"...", "/root/inmate.bin")
        lab.qmp.system_powerdown()
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import runtime
from harness.console import CELL_FAILURES, ROOT_FAILURES, SerialConsole, TranscriptConsole
from harness.errors import ConsoleError, JhlabError, LabFileError, MachineDied, MachineError, SnapshotRefused
from harness.images import ImageBuilder, ImageSet, build_payload, cache_dir
from harness.labfile import LabSpec, load_lab
from harness.machine import AccelChoice, Machine, choose_accel, types_with_migration_state
from harness.net import PrivateNetwork
from harness.progress import Step, step
from harness.protocol import CommandResult, Console
from harness.qmp import QmpSession
from harness.qmp.relay import CONSOLE_SEND_COMMAND, QmpRelay
from harness.resetpoint import PREPARE, GuestView, ResetPoint, refusal, stateless_pci_devices
from harness.runtime import RunningLab
from harness.ssh import SerialShell, SshProgram, SshShell, generate_key

LOG = logging.getLogger(__name__)

READY = r"jhlab: root cell ready"


def state_dir() -> Path:
    """Where logs of lab runs are kept (``$XDG_STATE_HOME/jhlab``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    path = Path(base) / "jhlab"
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_log_dir(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = state_dir() / "logs" / f"{name}-{stamp}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class LabSummary:
    """What ``jhlab up`` reports once the root cell is ready."""

    name: str
    accel: str
    accel_reason: str
    boot_seconds: float
    kernel: str
    cpu_features: tuple[str, ...]
    iommu_groups: int
    kvm_in_guest: bool
    reserve: str
    ssh_port: int
    pid: int
    log_dir: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def nested_virtualization(self) -> bool:
        return bool({"vmx", "svm"} & set(self.cpu_features)) and self.kvm_in_guest

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> LabSummary:
        """The inverse of :meth:`as_dict` (a state file's summary)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        known: dict[str, Any] = {k: v for k, v in value.items() if k in fields}
        known["cpu_features"] = tuple(known.get("cpu_features", ()))
        return cls(**known)


@dataclass
class _Attachment:
    """The channels of a lab this process reached with :meth:`Lab.attach`."""

    record: RunningLab
    qmp: QmpSession
    console: TranscriptConsole
    cell_console: TranscriptConsole

    def check_alive(self, lab: Lab) -> None:
        """:raise MachineDied: when the lab's owner has ended (QEMU ended with it)."""
        if not runtime.pid_alive(self.record.supervisor):
            raise MachineDied(f"{lab!r}: the lab is gone (its owner, pid {self.record.supervisor}, "
                              f"ended); logs in {self.record.log_dir}")
        panic = self.qmp.events.find("GUEST_PANICKED")
        if panic:
            raise MachineError(f"{lab!r}: the guest panicked; logs in {self.record.log_dir}")


class LabState(enum.Enum):
    DOWN = "down"
    BOOTING = "booting"
    READY = "ready"


class Lab:
    """A lab machine with its root cell; a :class:`~harness.protocol.LabChannels` (commands
    and files in the root cell, both consoles, QMP) once up.

    :param lab: built-in lab name, lab file path, or a parsed :class:`LabSpec`
    :param accel: override the lab's accelerator choice (``auto``, ``kvm``, ``tcg``)
    :param log_dir: where to keep logs (default: a new folder under the state dir)
    :param ssh_port: host port for the root cell's sshd (default: a free one)
    :param quiet: log progress only
    """

    def __init__(self, lab: str | Path | LabSpec = "default", *, accel: str | None = None,
                 log_dir: Path | None = None, ssh_port: int | None = None,
                 quiet: bool = False) -> None:
        self.spec = lab if isinstance(lab, LabSpec) else load_lab(lab)
        self.accel_request = accel or self.spec.accel
        self.log_dir = log_dir
        self.ssh_port = ssh_port
        self.quiet = quiet
        self.state = LabState.DOWN
        self.images: ImageSet | None = None
        self.machine: Machine | None = None
        self.summary: LabSummary | None = None
        self.accel: AccelChoice | None = None
        self.network: PrivateNetwork | None = None
        #: what :meth:`reset` restores (:meth:`snapshot` saves it)
        self.reset_point: ResetPoint | None = None
        #: this lab's run directory (payload, reset points, the QMP relay's ``qmp.sock``)
        self.run_dir: Path | None = None
        self._ssh: SshShell | None = None
        self._serial: SerialShell | None = None
        self._relay: QmpRelay | None = None
        self._attachment: _Attachment | None = None
        self._stack = contextlib.ExitStack()

    def __repr__(self) -> str:
        if self._attachment is not None:
            return (f"Lab({self.spec.name!r}, {self.state.value}, attached, owner pid "
                    f"{self._attachment.record.supervisor})")
        return f"Lab({self.spec.name!r}, {self.state.value})"

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.attached:
            self.detach()
        else:
            self.down()

    # -- attach -----------------------------------------------------------------------------

    @classmethod
    def attach(cls, name: str, *, timeout: float = 30.0) -> Lab:
        """A :class:`Lab` bound to lab ``name`` that another process brought up and owns
        (``jhlab up``, ``pytest --keep-lab``): its QMP (through the owner's relay), both
        consoles (transcripts; typing goes through the owner), commands and files (ssh)
        and summary.  It does not own the lab's life: :meth:`detach` (also on
        ``__exit__``) lets it go, :meth:`down` is refused unless ``stop_owner=True``.

        :param name: the lab's name (or its lab file)
        :raise MachineError: when no such lab is up, or its owner offers no QMP relay
        """
        record = runtime.read(name)
        if record is None:
            try:
                record = runtime.read(load_lab(name).name)
            except LabFileError:
                record = None
        if record is None:
            up = ", ".join(runtime.running()) or "none"
            raise MachineError(f"lab {name} is not up (labs up: {up}); start it with 'jhlab up {name}'")
        try:
            spec = load_lab(record.lab)
        except LabFileError:
            spec = LabSpec(name=record.name, source=record.lab)  # its file is gone: name only
        lab = cls(spec, log_dir=record.log_dir, ssh_port=record.ssh_port, quiet=True)
        relay = record.run_dir / "qmp.sock" if record.run_dir is not None else None
        if relay is None or not relay.exists():
            raise MachineError(f"lab {record.name} (owner pid {record.supervisor}) offers no QMP "
                               "relay: it was brought up by an older jhlab; bring it down and up again")
        qmp = QmpSession(relay, name=f"{record.name}-qmp (attached)")
        qmp.connect(timeout)

        def typist(which: str) -> Any:
            return lambda text: qmp.execute(CONSOLE_SEND_COMMAND, {"console": which, "text": text})

        logs = record.log_dir
        consoles = [TranscriptConsole(f"serial{index} ({which} console, attached)",
                                      logs / f"serial{index}.log", failures, typist=typist(which))
                    for index, which, failures in ((0, "root", ROOT_FAILURES), (1, "cell", CELL_FAILURES))]
        for console in consoles:
            console.discard()  # waits see what comes after the attach
        lab._attachment = _Attachment(record, qmp, consoles[0], consoles[1])
        lab.run_dir = record.run_dir
        lab.summary = LabSummary.from_dict(dict(record.summary))
        lab._ssh = SshShell(record.ssh_port, record.key)
        lab.state = LabState.READY
        return lab

    @property
    def attached(self) -> bool:
        """Whether this lab was reached with :meth:`attach` (someone else owns it)."""
        return self._attachment is not None

    def detach(self) -> None:
        """Let an attached lab go (it runs on); idempotent."""
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        self._serial = None
        if self._attachment is not None:
            self._attachment.qmp.close()
        self.state = LabState.DOWN

    def _refuse_attached(self, what: str) -> None:
        if self._attachment is not None:
            raise MachineError(f"{self!r}: {what} belongs to the lab's owner (pid "
                               f"{self._attachment.record.supervisor}), not to an attached lab")

    # -- channels -------------------------------------------------------------------------

    def _machine(self) -> Machine:
        self._refuse_attached("its machine")
        if self.machine is None or self.state is LabState.DOWN:
            raise MachineError(f"{self!r}: the lab is not up")
        return self.machine

    def _attached_channels(self) -> _Attachment | None:
        if self._attachment is not None and self.state is LabState.DOWN:
            raise MachineError(f"{self!r}: detached; attach again with Lab.attach()")
        return self._attachment

    @property
    def qmp(self) -> QmpSession:
        """The lab's QMP: QEMU's own socket for the owner, the owner's relay when attached."""
        attached = self._attached_channels()
        if attached is not None:
            return attached.qmp
        qmp = self._machine().qmp
        assert qmp is not None  # connected by Machine.launch()
        return qmp

    @property
    def console(self) -> SerialConsole | TranscriptConsole:
        """Serial 0: the root cell's console."""
        attached = self._attached_channels()
        if attached is not None:
            return attached.console
        console = self._machine().console
        assert console is not None  # connected by Machine.launch()
        return console

    @property
    def cell_console(self) -> SerialConsole | TranscriptConsole:
        """Serial 1: the cells' UART (0x2f8)."""
        attached = self._attached_channels()
        if attached is not None:
            return attached.cell_console
        console = self._machine().cell_console
        assert console is not None  # connected by Machine.launch()
        return console

    def _console_send(self, which: str, text: str) -> None:
        """The relay's console input: ``which`` is ``root`` or ``cell``."""
        console: Console = self.console if which == "root" else self.cell_console
        console.send(text)

    @property
    def key_path(self) -> Path:
        return cache_dir() / "labs" / self.spec.name / "id_rsa"

    def run(self, command: str, *, timeout: float = 120.0, check: bool = False,
            stdin: str | None = None) -> CommandResult:
        """Run ``command`` in the root cell (SSH, or the root console if SSH is down)."""
        self._check_running()
        if self._ssh is not None:
            try:
                return self._ssh.run(command, timeout=timeout, check=check, stdin=stdin)
            except ConsoleError as exc:
                self._check_running()
                LOG.warning("ssh failed (%s); using the root console", exc)
                self._ssh = None
        if self._serial is None:
            self._serial = SerialShell(self.console)
        return self._serial.run(command, timeout=timeout, check=check, stdin=stdin)

    def start(self, command: str) -> SshProgram:
        """Start ``command`` in the root cell on an SSH channel of its own
        (:class:`~harness.protocol.ProgramRunner`).

        :raise ConsoleError: when ssh is not connected
        """
        self._check_running()
        return self.ssh.start(command)

    def _check_running(self) -> None:
        """:raise MachineError: when the lab is not up, gone, or its guest panicked."""
        attached = self._attached_channels()
        if attached is not None:
            attached.check_alive(self)
            return
        machine = self._machine()
        machine.check_alive()
        if machine.panicked is not None:
            raise MachineError(f"{self!r}: the guest panicked; logs in {machine.log_dir}")

    def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the root cell (over ssh).

        :raise ConsoleError: when ssh is not connected
        """
        self.ssh.put(data, path, mode)

    def get(self, path: str) -> bytes:
        """Read ``path`` from the root cell (over ssh).

        :raise ConsoleError: when ssh is not connected
        """
        return self.ssh.get(path)

    @property
    def ssh(self) -> SshShell:
        if self._ssh is None:
            raise ConsoleError(f"{self!r}: ssh is not connected")
        return self._ssh

    # -- up / down ------------------------------------------------------------------------

    def up(self) -> LabSummary:
        """Build or find images, boot the machine and wait until the root cell is ready.

        First the run directories that labs of dead owners left behind are removed
        (:func:`harness.runtime.reap_run_dirs`).
        """
        if self.state is LabState.READY and self.summary is not None:
            return self.summary
        self._refuse_attached("bringing it up")
        self.state = LabState.BOOTING
        try:
            return self._up()
        except BaseException:
            self.down()
            raise

    def _up(self) -> LabSummary:
        spec = self.spec
        for stale in runtime.reap_run_dirs():
            LOG.info("removed %s, left by a lab whose owner died", stale)
        log_dir = self.log_dir or new_log_dir(spec.name)
        self.log_dir = log_dir
        self.images = ImageBuilder(quiet=self.quiet).build()
        with step("Choosing accelerator", quiet=self.quiet) as st:
            accel = choose_accel(self.accel_request, self.images, log_dir=log_dir)
            st.result = f"{accel.accel} ({accel.reason})"
        self.accel = accel
        public_key = self._lab_key()
        run_dir = runtime.new_run_dir(spec.name)
        self._stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
        self.run_dir = run_dir
        payload = build_payload(run_dir / "payload.cpio.gz", authorized_key=public_key,
                                inmates=self.images.inmates, modules=self.images.root_modules)
        taps = [n for n in spec.netdevs if n.type == "tap"]
        if taps:
            self.network = PrivateNetwork(spec.name)
            self._stack.callback(self.network.close)
        tap_fds = {n.id: self.network.tap(n.ifname, n.address or None)
                   for n in taps} if self.network else {}
        self.machine = Machine(spec, self.images, accel, log_dir=log_dir, payload=payload,
                               ssh_port=self.ssh_port, tap_fds=tap_fds)
        with step(f"Booting lab {spec.name} ({accel.accel}, {spec.cpus} CPUs, "
                  f"{spec.memory_mib} MiB)", quiet=self.quiet) as st:
            try:
                self.machine.launch()
            finally:
                _close_fds(tap_fds)  # QEMU holds its own copies
            self._start_relay(run_dir)
            features, groups, kvm = self._wait_ready(st)
            boot = time.monotonic() - self.machine.started_at
            st.result = f"root cell ready after {boot:.1f} s"
        self._ssh = SshShell(self.machine.ssh_port or 0, self.key_path)
        try:
            self._ssh.connect(timeout=60)
        except ConsoleError as exc:
            LOG.warning("%s; commands will use the root console", exc)
            self._ssh = None
        self.summary = LabSummary(
            name=spec.name, accel=accel.accel, accel_reason=accel.reason, boot_seconds=boot,
            kernel=self.images.kernel.release, cpu_features=features, iommu_groups=groups,
            kvm_in_guest=kvm, reserve=str(spec.reserve) if spec.reserve else "none",
            ssh_port=self.machine.ssh_port or 0, pid=self.machine.pid or 0,
            log_dir=str(log_dir),
        )
        self.state = LabState.READY
        return self.summary

    def _start_relay(self, run_dir: Path) -> None:
        """Serve the lab's QMP to other processes (``run_dir/qmp.sock``)."""
        relay = QmpRelay(run_dir / "qmp.sock", name=f"{self.spec.name}-qmp-relay",
                         console_send=self._console_send)
        relay.start()
        self._relay = relay
        relay.follow(self.qmp)

    def _wait_ready(self, st: Step) -> tuple[tuple[str, ...], int, bool]:
        assert self.machine is not None and self.machine.console is not None  # launched
        console = self.machine.console
        deadline = time.monotonic() + self.spec.boot_timeout
        found: dict[str, str] = {}
        patterns = {
            "features": r"jhlab: cpu features: ([^\r\n]*)\r?\n",
            "groups": r"jhlab: iommu groups: (\d+)",
            "kvm": r"jhlab: kvm: (yes|no)",
            "ready": READY,
        }
        st.note("kernel booting")
        while "ready" not in found:
            remaining = deadline - time.monotonic()
            try:
                match = console.expect(list(patterns.values()), timeout=max(remaining, 0.1))
            except ConsoleError:
                self.machine.check_alive()
                raise
            for key, pattern in patterns.items():
                if match.re.pattern == pattern:
                    found[key] = match.group(1) if match.groups() else ""
                    st.note({"features": "root cell up", "groups": "modules loaded"}.get(
                        key, "almost ready"))
        return (tuple(found.get("features", "").split()), int(found.get("groups", 0)),
                found.get("kvm") == "yes")

    def _lab_key(self) -> str:
        key = self.key_path
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not key.exists() or not key.with_suffix(".pub").exists():
            return generate_key(key)
        return key.with_suffix(".pub").read_text().strip()

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self) -> ResetPoint:
        """Save the lab's current state and make it the reset point; the guest runs on.

        Any state a test leaves can be saved: hypervisor enabled, cells running (their KVM
        users are stopped for the save and continued after it; :mod:`harness.resetpoint`
        says why).  The snapshot's files stay until :meth:`down`.

        :raise SnapshotRefused: when the state could not be restored faithfully (the
            message says what and what to do); nothing was saved, the lab runs on
        """
        self._refuse_attached("its reset point")
        machine = self._machine()
        if self.state is not LabState.READY:
            raise MachineError(f"{self!r}: snapshot needs a ready lab")
        status = self.qmp.status()
        if status != "running":
            raise SnapshotRefused(f"{self!r}: the machine is {status}, and the root cell must "
                                  "run to prepare a snapshot; let it run (QMP cont), or after a "
                                  f"panic bring the lab down and up (logs in {self.log_dir})")
        with step("Saving reset point", quiet=self.quiet) as st:
            prepared = self.run(PREPARE, timeout=60)
            if prepared.status != 0:  # it continued what it had stopped
                raise SnapshotRefused(f"{self!r}: snapshot refused: {prepared.output.strip()}")
            view = GuestView.parse(prepared.stdout)
            resume = view.resume_command()
            try:
                pci = self.qmp.pci_devices()
                stateless = stateless_pci_devices(self.spec, pci, types_with_migration_state())
                reason = refusal(view, stateless)
                if reason is not None:
                    raise SnapshotRefused(f"{self!r}: snapshot refused: {reason}")
                folder = Path(self._stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="snapshot-", dir=self.run_dir)))
                saved = machine.save_snapshot(folder)
            finally:
                if resume is not None:
                    self.run(resume, check=True, timeout=60)
            self.reset_point = ResetPoint(saved, time.strftime("%H:%M:%S"), view,
                                          _decoded_bars(pci), stateless)
            st.result = f"{saved.size // 2**20} MiB" + (
                f", {len(view.stopped)} KVM user(s) paused for it" if view.stopped else "")
        return self.reset_point

    def _put_back_devices(self, point: ResetPoint) -> None:
        """With the restored guest still stopped: write back the config headers of the
        devices QEMU does not migrate (they come back as if reset: BARs unassigned,
        decoding off), and check that QEMU decodes their BARs where they were."""
        lost = sorted(bdf for bdf, bars in _decoded_bars(self.qmp.pci_devices()).items()
                      if bdf in point.guest.pci and bars != point.bars.get(bdf, bars))
        if not lost:
            return
        LOG.info("%r: writing back the PCI config of %s (no migration state in QEMU)", self,
                 ", ".join(lost))
        for bdf in lost:
            for offset, size, value in point.config_writes(bdf):
                self.qmp.write_pci_config(bdf, offset, value, size)
        after = _decoded_bars(self.qmp.pci_devices())
        broken = [bdf for bdf in lost if after.get(bdf) != point.bars[bdf]]
        if broken:
            raise MachineError(f"{self!r}: after restoring the reset point, the BARs of "
                               f"{', '.join(broken)} stay unassigned; use a fresh lab (down, up)")

    def reset(self, point: ResetPoint | None = None) -> float:
        """Put the lab back to ``point`` (default: the reset point, taken now if there is
        none), which becomes the reset point: QEMU is replaced by one restored from the
        snapshot, far faster than a boot.  What QEMU does not restore is put back (see
        :mod:`harness.resetpoint`).  The serial transcripts go on in the same files (a
        marker line where the restored machine's output begins).

        :return: the seconds it took
        :raise MachineError: when the restore fails; the lab is down then, its logs kept
        """
        self._refuse_attached("resetting it")
        if point is None:
            point = self.reset_point or self.snapshot()
        assert self.images is not None and self.accel is not None  # the lab was up
        assert self.log_dir is not None
        started = time.monotonic()
        if self._ssh is not None:
            self._ssh.close()
        self._serial = None
        self._machine().shutdown(hard=True)
        try:
            tap_fds = {n.id: self.network.attach(n.ifname) for n in self.spec.netdevs
                       if n.type == "tap"} if self.network else {}
            self.machine = Machine(self.spec, self.images, self.accel, log_dir=self.log_dir,
                                   incoming=point.snapshot, tap_fds=tap_fds)
            with step(f"Restoring the reset point of {point.taken_at}", quiet=self.quiet) as st:
                try:
                    self.machine.launch(paused=True)
                finally:
                    _close_fds(tap_fds)
                self._put_back_devices(point)
                self.machine.resume()
                st.result = f"pid {self.machine.pid}"
            self._ssh = SshShell(self.machine.ssh_port or 0, self.key_path)
            if self._relay is not None:
                self._relay.follow(self.qmp)
            if self.summary is not None:
                self.summary = dataclasses.replace(self.summary, pid=self.machine.pid or 0,
                                                   ssh_port=self.machine.ssh_port or 0)
            resume = point.guest.resume_command()
            if resume is not None:  # the KVM users stopped for the save, stopped here too
                self.run(resume, check=True, timeout=60)
        except BaseException as exc:
            self.down()
            if isinstance(exc, JhlabError):
                raise MachineError(f"{self!r}: restoring the reset point of {point.taken_at} "
                                   f"failed, the lab is down: {exc}\nlogs in {self.log_dir}") from exc
            raise
        self.reset_point = point
        listed = runtime.read(self.spec.name)
        if listed is not None and listed.supervisor == os.getpid():
            # QEMU's pid and ssh port changed: what `jhlab status` and attachments read
            runtime.register(runtime.record_of(self))
        return time.monotonic() - started

    def down(self, *, stop_owner: bool = False) -> None:
        """Stop the machine (idempotent); logs stay in :attr:`log_dir`.

        :param stop_owner: for an attached lab, stop it through its owner (as ``jhlab
            down`` does); without it, ``down()`` of an attached lab is refused
        :raise MachineError: on an attached lab without ``stop_owner``
        """
        if self._attachment is not None:
            if not stop_owner:
                raise MachineError(
                    f"{self!r}: refusing to stop a lab this process does not own; detach() "
                    "lets it go, down(stop_owner=True) stops it through its owner")
            self.detach()
            runtime.stop(self._attachment.record)
            return
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        self._serial = None
        if self.machine is not None:
            self.machine.shutdown()
        self.reset_point = None  # its files go with the stack
        self._stack.close()
        self.network = None
        self.run_dir = None
        self.state = LabState.DOWN


def _decoded_bars(devices: list[dict[str, Any]]) -> dict[str, tuple[tuple[int, int], ...]]:
    """The BARs QEMU decodes per ``BB:DD.F``, as ``(bar, address)``."""
    return {dev["bdf"]: tuple((r["bar"], r["address"]) for r in dev.get("regions", []))
            for dev in devices}


def _close_fds(fds: dict[str, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError as exc:
            LOG.debug("closing tap fd %d: %s", fd, exc)


def describe_failure(exc: BaseException, lab: Lab) -> str:
    """One paragraph for a user: what failed and where the logs are."""
    text = str(exc) if isinstance(exc, JhlabError) else f"{type(exc).__name__}: {exc}"
    if lab.log_dir is not None:
        text += f"\nlogs: {lab.log_dir}"
    return re.sub(r"\n{3,}", "\n\n", text)
