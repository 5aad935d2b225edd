"""Parallel labs on one machine: names claimed per worker (harness.activity), the xdist
controller handing its log folder and session to the workers, ``jhlab status`` listing
the labs of test sessions with what they do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import activity, runtime
from harness.activity import ActivityClaim
from harness.cli import main

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    return tmp_path / "run" / "jhlab"


def test_workers_claim_distinct_names() -> None:
    """One name per worker; a second claim of a held name gets a suffix; a released
    name is free again."""
    first = ActivityClaim.claim("default", session="s1", worker="gw0")
    second = ActivityClaim.claim("default", session="s1", worker="gw1")
    again = ActivityClaim.claim("default", session="s2", worker="gw0")
    assert [first.name, second.name, again.name] == ["default-gw0", "default-gw1", "default-gw0-2"]
    assert [r.name for r in activity.current("s1")] == ["default-gw0", "default-gw1"]
    first.release()
    first.release()  # idempotent
    assert ActivityClaim.claim("default", session="s3", worker="gw0").name == "default-gw0"


def test_a_lab_brought_up_by_jhlab_up_keeps_its_name() -> None:
    """A name registered as up (``jhlab up default-gw0``) is not claimed."""
    runtime.register(runtime.RunningLab(
        name="default-gw0", supervisor=os.getpid(), qemu=1, summary={"ssh_port": 1, "log_dir": "/x"},
        key=Path("/k"), lab="default"))
    assert ActivityClaim.claim("default", session="s", worker="gw0").name == "default-gw0-2"


def test_the_claim_of_a_dead_owner_is_stale(private_runtime_dir: Path) -> None:
    """A claim whose process ended (killed: nothing released it) frees its name."""
    child = subprocess.run(
        [sys.executable, "-c", "from harness.activity import ActivityClaim; "
         "print(ActivityClaim.claim('default', session='gone', worker='gw0').name)"],
        capture_output=True, text=True, check=True, env=os.environ | {"PYTHONPATH": os.getcwd()})
    assert child.stdout.strip() == "default-gw0"
    assert (private_runtime_dir / "activity" / "default-gw0.json").exists()
    assert activity.current() == []
    assert not (private_runtime_dir / "activity" / "default-gw0.json").exists()
    assert ActivityClaim.claim("default", session="s", worker="gw0").name == "default-gw0"


def test_what_a_lab_does_is_rewritten_whole() -> None:
    """set() replaces the record; readers see the newest state and its log folder."""
    claim = ActivityClaim.claim("default", session="s", worker="pytest")
    claim.set("booting", log_dir="/logs/lab-default-pytest")
    claim.set("running test_suites/e2e/test_demos.py::test_x")
    (record,) = activity.current("s")
    assert record.doing == "running test_suites/e2e/test_demos.py::test_x"
    assert record.log_dir == "/logs/lab-default-pytest"
    assert record.worker == "pytest" and record.pid == os.getpid()


def test_status_lists_the_labs_of_test_sessions(capsys: pytest.CaptureFixture[str]) -> None:
    """A lab still booting is listed with what it does; --json names its session and worker."""
    ActivityClaim.claim("default", session="s9", worker="gw1").set("booting", log_dir="/l")
    assert main(["status", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["default-gw1"]["doing"] == "booting"
    assert listed["default-gw1"]["session"] == "s9"
    assert listed["default-gw1"]["supervisor"] == os.getpid()
    assert main(["status"]) == 0
    assert "default-gw1" in capsys.readouterr().err


def test_xdist_workers_share_the_controllers_log_folder_and_session(
        pytester: pytest.Pytester, tmp_path: Path) -> None:
    """With -n 2 every worker logs under the controller's folder (not one of its own
    made a second later) and belongs to the controller's session."""
    pytester.makepyfile(test_where="""
        import json, os
        import pytest
        from harness.pytest_plugin.common import log_root, session_id, worker_id

        @pytest.mark.parametrize("n", range(4))
        def test_where(request, n):
            config = request.config
            out = os.path.join(os.environ["WHERE_OUT"], f"{worker_id(config)}-{n}.json")
            with open(out, "w") as handle:
                json.dump({"root": str(log_root(config, create=False)),
                           "session": session_id(config)}, handle)
    """)
    out = tmp_path / "where"
    out.mkdir()
    os.environ["WHERE_OUT"] = str(out)
    try:
        result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    finally:
        del os.environ["WHERE_OUT"]
    result.assert_outcomes(passed=4)
    seen = [json.loads(path.read_text()) for path in out.glob("*.json")]
    workers = {path.name.split("-")[0] for path in out.glob("*.json")}
    assert workers <= {"gw0", "gw1"} and workers
    assert len({entry["root"] for entry in seen}) == 1
    assert len({entry["session"] for entry in seen}) == 1
