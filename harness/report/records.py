"""What the report knows of a run: one record per test, with what its labs showed.

A test that used a lab gets, per lab, the lines both serial consoles printed while it ran
(an *excerpt*: from the test's start to its end, cut to its last lines) and, when it
failed, the QMP events its lab logged meanwhile (the *timeline*, times relative to the
test's start).  Marks taken when the test got the lab say where "while it ran" begins:
byte offsets in the serial transcripts, the event log's length.

Records travel as JSON: from a pytest-xdist worker to its controller on the test
report (a plain attribute, which xdist serialises with the report), and from a run to
``report.json`` next to the HTML page, which :func:`merge_runs` reads back to merge the
shards of a CI pipeline into one page.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.qmp.eventlog import EVENT_LOG, count, read_events

#: the serial transcripts in a lab's log folder, and what each console is
CONSOLES = {"serial0.log": "serial 0 (root console, hypervisor)", "serial1.log": "serial 1 (cells)"}
#: lines kept of an excerpt: a failed test's, a passed one's (its last lines)
FAILED_LINES = 300
PASSED_LINES = 60
#: events kept of a failed test's timeline (its last events)
TIMELINE_EVENTS = 200
#: the report file format; bump on an incompatible change
FORMAT = 1


@dataclass(frozen=True)
class LabMark:
    """Where a test's share of a lab's logs begins.

    :param name: the lab's name
    :param log_dir: its log folder
    :param offsets: byte offset per transcript (file name -> size at the mark)
    :param events: the event log's length at the mark
    :param at: when (seconds since the epoch)
    """

    name: str
    log_dir: str
    offsets: Mapping[str, int]
    events: int
    at: float

    @classmethod
    def take(cls, name: str, log_dir: Path | None) -> LabMark:
        """Mark a lab's logs now (a lab without logs yet: everything counts)."""
        offsets: dict[str, int] = {}
        if log_dir is not None:
            for console in CONSOLES:
                try:
                    offsets[console] = (log_dir / console).stat().st_size
                except FileNotFoundError:
                    offsets[console] = 0
        events = count(log_dir / EVENT_LOG) if log_dir is not None else 0
        return cls(name, str(log_dir or ""), offsets, events, time.time())


@dataclass(frozen=True)
class Excerpt:
    """The lines a console printed during a test.

    :param console: which console (:data:`CONSOLES`'s description)
    :param lines: its last lines (``\\r`` removed)
    :param dropped: how many lines before them were left out
    """

    console: str
    lines: Sequence[str]
    dropped: int = 0


@dataclass(frozen=True)
class TimelineEvent:
    """A QMP event of a failed test's timeline.

    :param index: its index in the lab's event log
    :param offset: seconds after the test began
    :param name: the event
    :param data: its data
    """

    index: int
    offset: float
    name: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class LabShare:
    """What one lab showed during one test."""

    name: str
    log_dir: str
    excerpts: Sequence[Excerpt]
    timeline: Sequence[TimelineEvent] | None = None

    @classmethod
    def since(cls, mark: LabMark, *, with_timeline: bool) -> LabShare:
        """The lab's logs from ``mark`` to now (a timeline only when asked)."""
        folder = Path(mark.log_dir)
        keep = FAILED_LINES if with_timeline else PASSED_LINES
        excerpts = []
        for console, what in CONSOLES.items():
            try:
                with open(folder / console, "rb") as handle:
                    handle.seek(mark.offsets.get(console, 0))
                    text = handle.read().decode(errors="replace").replace("\r", "")
            except FileNotFoundError:
                continue
            lines = text.splitlines()
            excerpts.append(Excerpt(what, lines[-keep:], max(len(lines) - keep, 0)))
        timeline = None
        if with_timeline:
            events = read_events(folder / EVENT_LOG, mark.events)[-TIMELINE_EVENTS:]
            timeline = [TimelineEvent(e.index, e.qemu_time - mark.at, e.name, dict(e.data))
                        for e in events]
        return cls(mark.name, mark.log_dir, excerpts, timeline)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> LabShare:
        timeline = value.get("timeline")
        return cls(str(value["name"]), str(value.get("log_dir", "")),
                   [Excerpt(str(e["console"]), list(e["lines"]), int(e.get("dropped", 0)))
                    for e in value.get("excerpts", [])],
                   None if timeline is None else [
                       TimelineEvent(int(t["index"]), float(t["offset"]), str(t["name"]),
                                     dict(t.get("data") or {})) for t in timeline])


@dataclass
class TestRecord:
    """One test of the run.

    :param nodeid: pytest's id
    :param outcome: ``passed``, ``failed``, ``error`` (setup or teardown failed),
        ``skipped``
    :param duration: seconds, all phases
    :param worker: the xdist worker that ran it (``gw0``), or ``""``
    :param failure: pytest's failure text
    :param labs: what each lab it used showed
    """

    __test__ = False  # not a test class, whatever pytest thinks of its name

    nodeid: str
    outcome: str = "passed"
    duration: float = 0.0
    worker: str = ""
    failure: str = ""
    labs: list[LabShare] = field(default_factory=list)

    def add_phase(self, when: str, outcome: str, duration: float, failure: str,
                  labs: Iterable[LabShare]) -> None:
        """Fold one phase's report in: a failed setup or teardown is an error, a failed
        call a failure; a skip counts unless something failed."""
        self.duration += duration
        if outcome == "failed":
            self.outcome = "failed" if when == "call" else ("error" if self.outcome != "failed"
                                                            else "failed")
            self.failure = f"{self.failure}\n\n{failure}".strip() if self.failure else failure
        elif outcome == "skipped" and self.outcome == "passed":
            self.outcome = "skipped"
            self.failure = failure
        shares = list(labs)
        if shares:
            self.labs = shares

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> TestRecord:
        return cls(str(value["nodeid"]), str(value["outcome"]), float(value["duration"]),
                   str(value.get("worker", "")), str(value.get("failure", "")),
                   [LabShare.from_json(lab) for lab in value.get("labs", [])])


@dataclass
class RunRecord:
    """A whole run (or the shards of one, merged).

    :param started: when (seconds since the epoch)
    :param duration: wall seconds
    :param tests: one record per test, in the order they finished
    :param properties: about the run (labs, accelerator, host, shard), name -> text
    :param runs: how many runs were merged into this one
    """

    started: float
    duration: float = 0.0
    tests: list[TestRecord] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)
    runs: int = 1

    def counts(self) -> dict[str, int]:
        """Tests per outcome."""
        totals = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        for test in self.tests:
            totals[test.outcome] = totals.get(test.outcome, 0) + 1
        return totals

    def write(self, path: Path) -> None:
        """Save as JSON (atomically)."""
        value = {"format": FORMAT, "started": self.started, "duration": self.duration,
                 "properties": self.properties, "runs": self.runs,
                 "tests": [asdict(test) for test in self.tests]}
        staged = path.with_name(f".{path.name}.tmp")
        staged.write_text(json.dumps(value, indent=1))
        staged.replace(path)

    @classmethod
    def read(cls, path: Path) -> RunRecord:
        """:raise ValueError: when ``path`` is not a report file this jhlab writes"""
        try:
            value = json.loads(path.read_text())
            if value.get("format") != FORMAT:
                raise ValueError(f"format {value.get('format')!r}, this jhlab reads {FORMAT}")
            return cls(float(value["started"]), float(value["duration"]),
                       [TestRecord.from_json(test) for test in value["tests"]],
                       {str(k): str(v) for k, v in value.get("properties", {}).items()},
                       int(value.get("runs", 1)))
        except (OSError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: not a jhlab report file ({exc})") from exc


def merge_runs(runs: Sequence[RunRecord]) -> RunRecord:
    """Shards of one pipeline as one run: every test, the earliest start, the longest
    shard's duration (they ran side by side), properties that differ joined."""
    if not runs:
        raise ValueError("no runs to merge")
    merged = RunRecord(started=min(r.started for r in runs),
                       duration=max(r.duration for r in runs), runs=sum(r.runs for r in runs))
    for run in runs:
        merged.tests.extend(run.tests)
        for name, text in run.properties.items():
            known = merged.properties.get(name)
            if known is None:
                merged.properties[name] = text
            elif text not in known.split("; "):
                merged.properties[name] = f"{known}; {text}"
    return merged
