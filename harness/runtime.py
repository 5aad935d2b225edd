"""Which labs are up: one state file per running lab in the per-user runtime directory.

A lab brought up by ``jhlab up`` (its supervisor process owns QEMU) or kept by
``pytest --keep-lab`` (the pytest process owns it) is registered here, so ``jhlab
status``, ``shell``, ``run``, ``down`` and later attachments find it::

    $XDG_RUNTIME_DIR/jhlab/<lab>.json     (else /tmp/jhlab-<uid>/, mode 0700)

A state file whose owner process is gone is stale: :func:`read` removes it. Files are
replaced atomically, so a reader sees a whole record or none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.lab import Lab

__all__ = ["RunningLab", "pid_alive", "read", "record_of", "register", "running", "runtime_dir",
           "state_file", "unregister"]


@dataclass(frozen=True)
class RunningLab:
    """The state file of one running lab.

    :param name: the lab's name
    :param supervisor: the process that owns QEMU (QEMU dies with it)
    :param qemu: QEMU's process
    :param summary: the lab's readiness summary (:meth:`harness.lab.LabSummary.as_dict`)
    :param key: the lab's private ssh key
    :param lab: the lab file or built-in name it was brought up from
    :param run_dir: QEMU's run directory (QMP and serial sockets), when known
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
    """Whether process ``pid`` exists (someone else's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                      lab=lab.spec.source, run_dir=lab.machine.run_dir)
