"""Which labs are up: one state file per running lab in the per-user runtime directory.

A lab brought up by ``jhlab up`` (its supervisor process owns QEMU) or kept by
``pytest --keep-lab`` (the pytest process owns it) is registered here, so ``jhlab
status``, ``shell``, ``run``, ``down`` and later attachments find it::

    $XDG_RUNTIME_DIR/jhlab/<lab>.json     (else /tmp/jhlab-<uid>/, mode 0700)

A state file whose owner process is gone is stale: :func:`read` removes it. Files are
replaced atomically, so a reader sees a whole record or none.

Run directories (``/tmp/jhlab-<label>-XXXXXXXX``, mode 0700: QEMU's sockets, the initrd
copy, the lab's payload, its QMP relay socket) are made by :func:`new_run_dir`, which
writes an owner file naming the process (pid and start time) whose death makes the
directory stale. The owner removes it when it ends normally; after a SIGKILL,
:func:`reap_run_dirs` (run by every ``Lab.up()``, so by ``jhlab up``) removes the
directories of dead owners and never one whose owner lives.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.lab import Lab

__all__ = ["OWNER_FILE", "RUN_DIR_PREFIX", "RunningLab", "connect_unix", "new_run_dir", "pid_alive", "read",
           "reap_run_dirs", "record_of", "register", "run_dir_owner_alive", "running", "runtime_dir",
           "state_file", "stop", "unregister"]

LOG = logging.getLogger(__name__)

#: Every run directory's name starts with this (in the system's temporary folder).
RUN_DIR_PREFIX = "jhlab-"
#: The file in a run directory that names its owner: ``{"pid": ..., "start": ...}``.
OWNER_FILE = "owner.json"
#: A run directory without an owner file (made by older jhlab code) is reaped only when
#: it holds QEMU's QMP socket, no live process's command line names it, and it is older
#: than this (seconds): its launch is long over.
LEGACY_GRACE = 600.0
#: How long :func:`stop` waits for an owner to end after SIGTERM (seconds).
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class RunningLab:
    """The state file of one running lab.

    :param name: the lab's name
    :param supervisor: the process that owns QEMU (QEMU dies with it)
    :param qemu: QEMU's process
    :param summary: the lab's readiness summary (:meth:`harness.lab.LabSummary.as_dict`)
    :param key: the lab's private ssh key
    :param lab: the lab file or built-in name it was brought up from
    :param run_dir: the lab's run directory (its QMP relay socket ``qmp.sock``), when known
    """

    name: str
    supervisor: int
    qemu: int
    summary: Mapping[str, Any]
    key: Path
    lab: str
    run_dir: Path | None = None

    @property
    def ssh_port(self) -> int:
        return int(self.summary["ssh_port"])

    @property
    def log_dir(self) -> Path:
        return Path(self.summary["log_dir"])

    def as_json(self) -> dict[str, Any]:
        """The state file's content."""
        return {"supervisor": self.supervisor, "qemu": self.qemu, "summary": dict(self.summary),
                "key": str(self.key), "lab": self.lab,
                "run_dir": str(self.run_dir) if self.run_dir is not None else None}

    @classmethod
    def from_json(cls, name: str, value: Mapping[str, Any]) -> RunningLab:
        """Parse a state file's content.

        :raise ValueError: when a field is missing or malformed
        """
        try:
            run_dir = value.get("run_dir")
            return cls(name=name, supervisor=int(value["supervisor"]), qemu=int(value["qemu"]),
                       summary=dict(value["summary"]), key=Path(value["key"]), lab=str(value["lab"]),
                       run_dir=Path(run_dir) if run_dir else None)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"state of lab {name}: {exc!r}") from exc


def runtime_dir() -> Path:
    """Per-user directory of running labs' state files (mode 0700, created on demand)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "jhlab" if base else Path(f"/tmp/jhlab-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def state_file(name: str) -> Path:
    """Where lab ``name``'s state file is."""
    return runtime_dir() / f"{name}.json"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (someone else's counts; a zombie, killed but not yet
    reaped by its parent, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # exists, but /proc tells no more
    return state not in ("Z", "X")


def read(name: str) -> RunningLab | None:
    """Running lab ``name``, or None (a stale or unreadable state file is removed)."""
    path = state_file(name)
    try:
        record = RunningLab.from_json(name, json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return None
    if not pid_alive(record.supervisor):
        path.unlink(missing_ok=True)
        return None
    return record


def running() -> dict[str, RunningLab]:
    """Every lab that is up, by name."""
    found = {}
    for path in sorted(runtime_dir().glob("*.json")):
        record = read(path.stem)
        if record is not None:
            found[path.stem] = record
    return found


def register(record: RunningLab) -> Path:
    """Write ``record``'s state file (atomically); return its path."""
    path = state_file(record.name)
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staged.write_text(json.dumps(record.as_json(), indent=1))
    os.replace(staged, path)
    return path


def stop(record: RunningLab, *, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop a running lab through its owner: SIGTERM, then SIGKILL after ``timeout``
    (QEMU dies with its owner); its state file goes. Return False when it had to be killed."""
    pid = record.supervisor
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    graceful = not pid_alive(pid)
    if not graceful:
        LOG.warning("owner %d of lab %s did not stop in %.0f s; killing it", pid, record.name, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    unregister(record.name, supervisor=pid)
    return graceful


def unregister(name: str, *, supervisor: int | None = None) -> None:
    """Remove lab ``name``'s state file; with ``supervisor``, only when that process owns
    it (a lab of the same name registered by someone else stays)."""
    if supervisor is not None:
        current = read(name)
        if current is None or current.supervisor != supervisor:
            return
    state_file(name).unlink(missing_ok=True)


def record_of(lab: Lab, supervisor: int | None = None) -> RunningLab:
    """The state of ``lab`` (which is up), owned by ``supervisor`` (default: this process).

    :raise MachineError: when the lab is not up
    """
    from harness.errors import MachineError

    if lab.summary is None or lab.machine is None or lab.machine.pid is None:
        raise MachineError(f"{lab!r}: only a lab that is up can be registered")
    return RunningLab(name=lab.spec.name, supervisor=os.getpid() if supervisor is None else supervisor,
                      qemu=lab.machine.pid, summary=lab.summary.as_dict(), key=lab.key_path,
                      lab=lab.spec.source, run_dir=lab.run_dir)


# -- run directories -------------------------------------------------------------------------


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/PID/stat`` field 22),
    or None when it does not exist: with the pid, it names one process even after the
    pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after its end
    return int(stat.rsplit(")", 1)[1].split()[19])


def connect_unix(path: Path, timeout: float) -> socket.socket:
    """A blocking stream socket connected to the server at ``path`` (QEMU's QMP, serial and
    qtest sockets in a run directory), waiting up to ``timeout`` seconds while nobody
    accepts there yet.

    QEMU creates a socket's file (bind) a moment before it listens on it, and serves one
    client at a time: until it listens a connect is refused, and under load that moment
    is long enough to be hit, so the existence of the file does not mean ready.

    :raise OSError: the last connect error, when the deadline has passed
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(deadline - time.monotonic(), 0.1))
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)
            continue
        sock.settimeout(None)
        return sock


def new_run_dir(label: str, base: Path | None = None) -> Path:
    """Make a run directory (mode 0700) owned by this process: its owner file records
    this process's pid and start time.

    :param label: part of the name (``jhlab-<label>-XXXXXXXX``), e.g. the lab's name
    :param base: where (default: the system's temporary folder)
    """
    path = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{label}-", dir=base))
    pid = os.getpid()
    (path / OWNER_FILE).write_text(json.dumps({"pid": pid, "start": process_start(pid)}))
    return path


def run_dir_owner_alive(path: Path) -> bool | None:
    """Whether the owner of run directory ``path`` still runs (the same process: pid and
    start time); None when the directory has no readable owner file."""
    try:
        owner = json.loads((path / OWNER_FILE).read_text())
        pid, start = int(owner["pid"]), owner.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not pid_alive(pid):
        return False
    now = process_start(pid)  # None: /proc tells no more, trust the pid
    return now is None or start is None or int(start) == now


def _named_by_a_process(path: Path) -> bool:
    """Whether a live process's command line mentions ``path`` (QEMU names its sockets)."""
    needle = str(path).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def _stale(path: Path, now: float) -> bool:
    alive = run_dir_owner_alive(path)
    if alive is not None:
        return not alive
    if not (path / "qmp.sock").exists():
        return False  # not a run directory we can judge: leave it
    try:
        age = now - path.stat().st_mtime
    except OSError:
        return False
    return age > LEGACY_GRACE and not _named_by_a_process(path)


def reap_run_dirs(base: Path | None = None) -> list[Path]:
    """Remove the run directories of dead owners (this user's ``jhlab-*`` folders in
    ``base``, default the system's temporary folder); return what was removed.

    A directory whose owner lives, or that cannot be judged, stays.
    """
    folder = Path(base or tempfile.gettempdir())
    uid = os.getuid()
    now = time.time()
    reaped = []
    for path in sorted(folder.glob(f"{RUN_DIR_PREFIX}*")):
        try:
            info = path.lstat()
        except OSError:
            continue
        if not path.is_dir() or path.is_symlink() or info.st_uid != uid:
            continue
        if _stale(path, now):
            shutil.rmtree(path, ignore_errors=True)
            LOG.info("removed the stale run directory %s", path)
            reaped.append(path)
    return reaped
