"""The QMP event recorder: history, matching, waiting, the JSON-lines log."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from harness.errors import QmpError
from harness.qmp import EventRecorder


def test_history_match_and_log(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    recorder = EventRecorder(log_path=log)
    recorder.record("DEVICE_DELETED", {"device": "edu", "path": "/x"}, 1.0)
    recorder.record("DEVICE_DELETED", {"device": "nic"}, 2.0)
    assert [e.data["device"] for e in recorder.find("DEVICE_DELETED")] == ["edu", "nic"]
    assert len(recorder.find("DEVICE_DELETED", {"device": "nic"})) == 1
    assert recorder.find("DEVICE_DELETED", {"device": "nic"}, since=2) == []
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["DEVICE_DELETED"] * 2
    assert lines[0]["data"] == {"device": "edu", "path": "/x"}


def test_wait_for_new_and_past_events() -> None:
    recorder = EventRecorder()
    recorder.record("STOP", {}, 0.0)
    assert recorder.wait_for("STOP", timeout=0.1, since=0).name == "STOP"
    threading.Timer(0.2, recorder.record, args=("RESUME", {}, 0.0)).start()
    assert recorder.wait_for("RESUME", timeout=5).seq == 1


def test_wait_for_times_out_with_recent_events() -> None:
    recorder = EventRecorder()
    recorder.record("STOP", {}, 0.0)
    started = time.monotonic()
    with pytest.raises(QmpError, match=r"GUEST_PANICKED.*last events: STOP"):
        recorder.wait_for("GUEST_PANICKED", timeout=0.3)
    assert time.monotonic() - started < 2


def test_nested_match_and_subscribers() -> None:
    recorder = EventRecorder()
    seen: list[str] = []
    recorder.subscribe(lambda event: seen.append(event.name))
    def broken(event: object) -> None:
        raise ZeroDivisionError("a broken subscriber")

    recorder.subscribe(broken)  # a broken subscriber is logged, not fatal
    recorder.record("MIGRATION", {"status": "completed", "info": {"a": 1}}, 0.0)
    assert recorder.find("MIGRATION", {"info": {"a": 1}})
    assert not recorder.find("MIGRATION", {"info": {"a": 2}})
    assert seen == ["MIGRATION"]
