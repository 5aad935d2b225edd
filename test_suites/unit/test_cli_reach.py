"""The plumbing of ``jhlab qmp``, ``jhlab events`` and ``jhlab cp`` without a lab: the
event log read, marked and followed; copy locations; clear refusals of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harness import runtime
from harness.cli import main
from harness.qmp import EventRecorder
from harness.qmp.eventlog import count, follow_events, read_events
from harness.runtime import RunningLab
from harness.transfer import Location, TransferError, copy, parse_location


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "rt"))
    return tmp_path / "rt" / "jhlab"


def said(capsys: pytest.CaptureFixture[str]) -> str:
    """Everything printed (errors go to stderr through rich), lines joined."""
    captured = capsys.readouterr()
    return " ".join((captured.out + captured.err).split())


def logged(path: Path, *names: str) -> EventRecorder:
    recorder = EventRecorder(log_path=path)
    for index, name in enumerate(names):
        recorder.record(name, {"n": index}, 1_700_000_000.25 + index)
    return recorder


def register(tmp_path: Path, supervisor: int | None = None, run_dir: Path | None = None) -> RunningLab:
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    record = RunningLab(name="default", supervisor=supervisor or os.getpid(), qemu=1,
                        summary={"name": "default", "ssh_port": 1, "log_dir": str(logs)},
                        key=tmp_path / "key", lab="default", run_dir=run_dir)
    runtime.register(record)
    return record


# -- the event log ----------------------------------------------------------------------------


def test_the_log_is_read_from_a_mark(tmp_path: Path) -> None:
    """Indexes are line numbers; a mark is the count; since skips what came before."""
    log = tmp_path / "qmp-events.jsonl"
    assert read_events(log) == [] and count(log) == 0
    logged(log, "STOP", "RESUME", "POWERDOWN")
    assert [(e.index, e.name) for e in read_events(log)] == [(0, "STOP"), (1, "RESUME"), (2, "POWERDOWN")]
    assert [e.name for e in read_events(log, since=2)] == ["POWERDOWN"]
    assert count(log) == 3
    line = read_events(log)[1].line()
    assert line.split()[0] == "1" and "RESUME" in line and '{"n": 1}' in line
    assert read_events(log)[2].as_json() == {"index": 2, "event": "POWERDOWN", "data": {"n": 2},
                                            "timestamp": 1_700_000_002.25}


def test_a_reset_goes_on_in_the_same_log(tmp_path: Path) -> None:
    """A new QEMU (a reset) starts its own sequence numbers, the log's indexes go on."""
    log = tmp_path / "qmp-events.jsonl"
    logged(log, "STOP")
    logged(log, "RESUME")  # a second recorder, seq 0 again
    assert [(e.index, e.name) for e in read_events(log)] == [(0, "STOP"), (1, "RESUME")]


def test_following_sees_new_events_and_ends_with_the_lab(tmp_path: Path) -> None:
    """follow: what is there, then each event as it is written (a half-written line
    waits for its end), until the lab is gone; events logged just before are given."""
    log = tmp_path / "qmp-events.jsonl"
    recorder = logged(log, "STOP")
    alive = threading.Event()
    alive.set()
    seen: list[str] = []

    def follower() -> None:
        for event in follow_events(log, 0, alive.is_set):
            seen.append(event.name)

    thread = threading.Thread(target=follower)
    thread.start()
    with open(log, "a") as handle:  # half a line first
        handle.write('{"event": "RES')
        handle.flush()
        time.sleep(0.3)
        assert seen == ["STOP"]
        handle.write('UME", "data": {}, "qemu_time": 1.0}\n')
    recorder.record("SHUTDOWN", {}, 2.0)
    alive.clear()
    thread.join(10)
    assert not thread.is_alive()
    assert seen == ["STOP", "RESUME", "SHUTDOWN"]


def test_events_command_prints_marks_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """jhlab events on a registered lab: all, --since, --mark, --json; a negative mark is refused."""
    record = register(tmp_path)
    logged(record.log_dir / "qmp-events.jsonl", "STOP", "RESUME")
    assert main(["events", "--mark"]) == 0
    assert capsys.readouterr().out == "2\n"
    assert main(["events", "--since", "1", "--json"]) == 0
    assert [json.loads(line)["event"] for line in capsys.readouterr().out.splitlines()] == ["RESUME"]
    assert main(["events"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["events", "--since", "-1"]) == 1
    assert "an event index" in said(capsys)


def test_a_lab_from_a_file_is_reached_by_its_name(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A lab brought up from a lab file elsewhere is reached by the name ``jhlab status``
    shows; a name that is neither up nor a lab says which labs are up."""
    logs = tmp_path / "logs"
    logs.mkdir()
    runtime.register(RunningLab(name="tscrel", supervisor=os.getpid(), qemu=1,
                                summary={"name": "tscrel", "ssh_port": 1, "log_dir": str(logs)},
                                key=tmp_path / "key", lab=str(tmp_path / "gone.toml")))
    logged(logs / "qmp-events.jsonl", "STOP")
    assert main(["events", "tscrel", "--mark"]) == 0
    assert capsys.readouterr().out == "1\n"
    assert main(["events", "nosuch", "--mark"]) == 1
    assert "not a built-in lab" in (text := said(capsys)) and "labs up: tscrel" in text


def test_events_follow_ends_when_the_owner_dies(tmp_path: Path) -> None:
    """jhlab events -f (a real process) prints a new event, and returns once the lab's
    owner is gone."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = register(tmp_path, supervisor=owner.pid)
        log = record.log_dir / "qmp-events.jsonl"
        recorder = logged(log, "STOP")
        env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path / "rt"))
        follow = subprocess.Popen([sys.executable, "-m", "harness.cli", "events", "-f"], env=env,
                                  stdout=subprocess.PIPE, text=True)
        assert follow.stdout is not None
        assert "STOP" in follow.stdout.readline()
        recorder.record("POWERDOWN", {}, 3.0)
        assert "POWERDOWN" in follow.stdout.readline()
        owner.kill()
        owner.wait(10)
        assert follow.wait(10) == 0
    finally:
        owner.kill()


# -- jhlab qmp ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["qmp", "default", "device_del", "{not json"], "not JSON"),
    (["qmp", "device_del", "[1]"], "must be a JSON object"),
    (["qmp", "default", "device_del", '"text"'], "usage"),
    (["qmp", "a", "b", "c", "d"], "usage"),
    (["qmp", "query-status"], "not up"),
])
def test_qmp_refuses_bad_input_clearly(argv: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Malformed arguments and a lab that is not up: one line saying what to do, status 1."""
    assert main(argv) == 1
    assert message in said(capsys)


def test_qmp_on_a_lab_without_a_relay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A lab registered by an older jhlab (no relay socket) is named, with the way out."""
    register(tmp_path, run_dir=tmp_path / "gone")
    assert main(["qmp", "query-status"]) == 1
    assert "offers no QMP relay" in said(capsys)


# -- jhlab cp ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("default:/root/x", Location("default", "/root/x")),
    (":/root/x", Location("default", "/root/x")),
    ("lab2:", Location("lab2", ".")),
    ("lab2:rel/path", Location("lab2", "rel/path")),
    ("./a:b", Location(None, "./a:b")),
    ("/tmp/a:b", Location(None, "/tmp/a:b")),
    ("plain", Location(None, "plain")),
])
def test_locations(text: str, expected: Location) -> None:
    """LAB:PATH is in a lab, :PATH in the default lab, anything with a slash first is here."""
    assert parse_location(text) == expected


def test_cp_needs_one_side_in_a_lab(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both sides local, or both in labs: refused before anything is touched."""
    assert main(["cp", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert main(["cp", "default:/a", "other:/b"]) == 1
    assert said(capsys).count("one side must be in a lab") == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


class _FailingSftp:
    """An SFTP session whose upload breaks halfway (the error path only)."""

    def __init__(self) -> None:
        self.removed: list[str] = []

    def stat(self, path: str) -> Any:
        raise FileNotFoundError(path)

    def put(self, local: str, remote: str, callback: Any = None) -> None:
        raise OSError(5, "Input/output error")

    def remove(self, path: str) -> None:
        self.removed.append(path)


def test_a_failed_upload_removes_its_partial_file(tmp_path: Path) -> None:
    """When the transfer breaks, the half-written file in the lab goes and the error
    names both sides; a directory without -r is refused."""
    source = tmp_path / "inmate.bin"
    source.write_bytes(b"x" * 10)
    sftp = _FailingSftp()
    with pytest.raises(TransferError, match=r"inmate.bin to default:/root/inmate.bin: Input/output"):
        copy(Location(None, str(source)), Location("default", "/root/inmate.bin"), sftp)  # type: ignore[arg-type]
    assert sftp.removed == ["/root/inmate.bin"]
    with pytest.raises(TransferError, match="is a directory: copy it with -r"):
        copy(Location(None, str(tmp_path)), Location("default", "/root/"), sftp)  # type: ignore[arg-type]
    with pytest.raises(TransferError, match="no such file or directory on this host"):
        copy(Location(None, str(tmp_path / "missing")), Location("default", "/root/"), sftp)  # type: ignore[arg-type]
