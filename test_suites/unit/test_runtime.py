"""The state files of running labs (harness.runtime): written whole, stale ones removed,
removed only by their owner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import runtime
from harness.runtime import RunningLab


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path / "jhlab"


def record(name: str = "default", supervisor: int | None = None) -> RunningLab:
    return RunningLab(name=name, supervisor=os.getpid() if supervisor is None else supervisor,
                      qemu=12345, summary={"name": name, "ssh_port": 2222, "log_dir": "/tmp/logs",
                                           "accel": "tcg"},
                      key=Path("/keys/id_rsa"), lab=name, run_dir=Path("/tmp/jhlab-default-x"))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_registered_lab_reads_back(private_runtime_dir: Path) -> None:
    """register then read: the same record; the folder is private (0700)."""
    path = runtime.register(record())
    assert path == private_runtime_dir / "default.json"
    assert private_runtime_dir.stat().st_mode & 0o777 == 0o700
    again = runtime.read("default")
    assert again == record()
    assert again is not None and again.ssh_port == 2222 and again.log_dir == Path("/tmp/logs")
    assert runtime.running() == {"default": record()}


def test_the_file_keeps_the_jhlab_up_format() -> None:
    """Keys a state file had before (supervisor, qemu, summary, key, lab) stay, run_dir joins."""
    data = json.loads(runtime.register(record()).read_text())
    assert set(data) == {"supervisor", "qemu", "summary", "key", "lab", "run_dir"}
    older = {k: v for k, v in data.items() if k != "run_dir"}
    assert RunningLab.from_json("default", older).run_dir is None


def test_a_dead_owner_makes_the_file_stale() -> None:
    """A lab whose supervisor is gone is not up, and its file goes."""
    path = runtime.register(record(supervisor=dead_pid()))
    assert runtime.read("default") is None
    assert not path.exists()


def test_a_broken_file_is_removed(private_runtime_dir: Path) -> None:
    """An unreadable state file is not a running lab."""
    assert runtime.runtime_dir() == private_runtime_dir
    (private_runtime_dir / "broken.json").write_text("{not json")
    (private_runtime_dir / "partial.json").write_text(json.dumps({"supervisor": os.getpid()}))
    assert runtime.running() == {}
    assert list(private_runtime_dir.glob("*.json")) == []


def test_only_the_owner_unregisters() -> None:
    """unregister(supervisor=PID) leaves a lab of the same name that another process owns."""
    runtime.register(record())
    runtime.unregister("default", supervisor=os.getppid())
    assert runtime.read("default") is not None
    runtime.unregister("default", supervisor=os.getpid())
    assert runtime.read("default") is None


def test_a_lab_that_is_not_up_cannot_be_registered() -> None:
    """record_of needs a lab with a summary and a QEMU."""
    from harness.errors import MachineError
    from harness.lab import Lab

    with pytest.raises(MachineError, match="only a lab that is up"):
        runtime.record_of(Lab("default"))
