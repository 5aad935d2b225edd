"""What the labs of test sessions are doing, for ``jhlab status`` and ``jhlab test``.

Every lab the pytest plugin makes claims a name no other live lab holds, from its lab
file's name and the pytest worker that owns it (``default-gw0``, ``default-gw1`` under
pytest-xdist, ``default-pytest`` without it; ``default-gw0-2`` when another session
holds ``default-gw0`` already), so parallel labs on one machine get distinct run
directories, log folders, QEMU names and state files.  The claim is a file::

    <runtime dir>/activity/<name>.json    {"name", "lab", "pid", "start", "session",
                                           "worker", "doing", "since", "log_dir"}

created exclusively (``O_EXCL``), rewritten atomically when the lab starts doing
something else (booting, saving its reset point, running a test, resetting), removed
when the lab is down.  A file whose owner process is gone (pid and start time, as for
run directories) is stale: readers remove it, and its name is free again.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from harness import runtime

__all__ = ["ActivityClaim", "LabActivity", "activity_dir", "current"]

#: How many suffixed names (``-2``, ``-3``, ...) a claim tries before it gives up.
MAX_SUFFIX = 100


@dataclass(frozen=True)
class LabActivity:
    """One claimed lab and what it is doing.

    :param name: the lab's claimed name (``default-gw0``)
    :param lab: the lab file's name (``default``)
    :param pid: the process that owns the lab (a pytest process or xdist worker)
    :param start: that process's start time (clock ticks since boot), None if unknown
    :param session: the test session (shared by a controller and its workers)
    :param worker: the xdist worker id (``gw0``), ``pytest`` without xdist
    :param doing: what the lab does now (``booting``, ``running test_suites/...::test_x``)
    :param since: when it started doing that (seconds since the epoch)
    :param log_dir: the lab's log folder
    """

    name: str
    lab: str
    pid: int
    start: int | None
    session: str
    worker: str
    doing: str
    since: float
    log_dir: str = ""

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> LabActivity:
        """:raise ValueError: when a field is missing or malformed"""
        try:
            start = value.get("start")
            return cls(name=str(value["name"]), lab=str(value["lab"]), pid=int(value["pid"]),
                       start=None if start is None else int(start), session=str(value["session"]),
                       worker=str(value["worker"]), doing=str(value["doing"]),
                       since=float(value["since"]), log_dir=str(value.get("log_dir", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"lab activity record {dict(value)!r}: {exc!r}") from exc

    def owner_alive(self) -> bool:
        """Whether the owning process still runs (the same process: pid and start time)."""
        if not runtime.pid_alive(self.pid):
            return False
        now = runtime.process_start(self.pid)
        return now is None or self.start is None or now == self.start


def activity_dir() -> Path:
    """The folder of activity files (in the per-user runtime directory, created on demand)."""
    path = runtime.runtime_dir() / "activity"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _read(path: Path) -> LabActivity | None:
    """The record in ``path``; None (and the file removed) when it is stale or unreadable."""
    try:
        record = LabActivity.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # a claim being written is empty for an instant: judge it by its age
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > 60:
                path.unlink(missing_ok=True)
        return None
    if not record.owner_alive():
        path.unlink(missing_ok=True)
        return None
    return record


def current(session: str | None = None) -> list[LabActivity]:
    """Claimed labs whose owners live (of one ``session`` if given), by name."""
    found = []
    for path in sorted(activity_dir().glob("*.json")):
        record = _read(path)
        if record is not None and (session is None or record.session == session):
            found.append(record)
    return found


class ActivityClaim:
    """A lab name claimed by this process, and the file that says what the lab does.

    Lifecycle: :meth:`claim` → :meth:`set` (any number of times) → :meth:`release`
    (idempotent).

    :param record: the claimed record (made by :meth:`claim`)
    """

    def __init__(self, record: LabActivity) -> None:
        self.record = record
        self.released = False

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def path(self) -> Path:
        return activity_dir() / f"{self.record.name}.json"

    @classmethod
    def claim(cls, lab: str, *, session: str, worker: str, tag: str = "",
              doing: str = "claimed") -> ActivityClaim:
        """Claim ``<lab>-<worker><tag>`` (or that name with ``-2``, ``-3``, ... when a live
        lab holds it: an activity file or a lab brought up with ``jhlab up``).

        :raise RuntimeError: when :data:`MAX_SUFFIX` names are all taken
        """
        base = f"{lab}-{worker}{tag}"
        pid = os.getpid()
        for index in range(1, MAX_SUFFIX + 1):
            name = base if index == 1 else f"{base}-{index}"
            if runtime.read(name) is not None:
                continue
            record = LabActivity(name=name, lab=lab, pid=pid, start=runtime.process_start(pid),
                                 session=session, worker=worker, doing=doing, since=time.time())
            path = activity_dir() / f"{name}.json"
            _read(path)  # removes a stale claim of this name
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(asdict(record), handle)
            return cls(record)
        raise RuntimeError(f"no free lab name {base}[-N] up to -{MAX_SUFFIX}: "
                           f"see 'jhlab status' and {activity_dir()}")

    def set(self, doing: str, *, log_dir: str | None = None) -> None:
        """Say what the lab does now (and where it logs); written atomically."""
        if self.released:
            return
        self.record = replace(self.record, doing=doing, since=time.time(),
                              log_dir=self.record.log_dir if log_dir is None else log_dir)
        staged = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        staged.write_text(json.dumps(asdict(self.record)))
        os.replace(staged, self.path)

    def release(self) -> None:
        """Give the name back (the lab is down); idempotent."""
        if not self.released:
            self.released = True
            self.path.unlink(missing_ok=True)
