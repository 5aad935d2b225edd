"""A lab's QMP event log (``qmp-events.jsonl`` in its log folder), read by other
processes: ``jhlab events``, from the start, from a mark, or followed live.

The owner's :class:`~harness.qmp.EventRecorder` appends one JSON line per event for the
lab's whole life (a reset's new QEMU goes on in the same file), so an event's *index*
(its line number, from 0) names it for good, and the number of events so far is a mark:
``jhlab events --since MARK`` prints what came after it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

#: The log's name in a lab's log folder.
EVENT_LOG = "qmp-events.jsonl"
#: Seconds between two looks at a followed log.
FOLLOW_POLL = 0.1


@dataclass(frozen=True)
class LoggedEvent:
    """One line of the event log."""

    #: its line number in the log (from 0)
    index: int
    name: str
    data: Mapping[str, Any]
    #: QEMU's timestamp (seconds since the epoch)
    qemu_time: float

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "event": self.name, "data": dict(self.data),
                "timestamp": self.qemu_time}

    def line(self) -> str:
        """One human-readable line: index, local time, name, data."""
        stamp = datetime.fromtimestamp(self.qemu_time).strftime("%H:%M:%S.%f")
        data = f"  {json.dumps(dict(self.data), sort_keys=True)}" if self.data else ""
        return f"{self.index:>5}  {stamp}  {self.name}{data}"


def _parse(index: int, line: bytes) -> LoggedEvent:
    try:
        value = json.loads(line)
        return LoggedEvent(index, str(value["event"]), dict(value.get("data") or {}),
                           float(value.get("qemu_time", 0.0)))
    except (ValueError, KeyError, TypeError):
        return LoggedEvent(index, "(unreadable line)", {"text": line.decode(errors="replace")}, 0.0)


def read_events(path: Path, since: int = 0) -> list[LoggedEvent]:
    """The events logged in ``path`` from index ``since`` on (none if there is no log yet)."""
    return list(_scan(path, since, follow=None))


def count(path: Path) -> int:
    """How many events ``path`` holds (a mark for ``since``)."""
    try:
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.endswith(b"\n"))
    except FileNotFoundError:
        return 0


def follow_events(path: Path, since: int, alive: Callable[[], bool]) -> Iterator[LoggedEvent]:
    """The events in ``path`` from index ``since`` on, then each new one as it is
    logged, until ``alive()`` says the lab has ended (what was logged before is still
    given)."""
    return _scan(path, since, follow=alive)


def _scan(path: Path, since: int, follow: Callable[[], bool] | None) -> Iterator[LoggedEvent]:
    index = 0
    offset = 0
    partial = b""
    ended = False
    while True:
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        lines = (partial + chunk).split(b"\n")
        partial = lines.pop()  # a line being written has no newline yet
        for line in lines:
            if index >= since and line.strip():
                yield _parse(index, line)
            index += 1
        if follow is None or ended:
            return
        if not chunk:
            ended = not follow()  # one more look: what it logged before it ended
            if not ended:
                time.sleep(FOLLOW_POLL)
