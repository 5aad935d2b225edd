"""Labs in parallel on one machine: pytest -n 2 boots one real lab per xdist worker, and
while both run, each test sees them both in ``jhlab status`` under names of their own,
with run directories, ssh ports, QEMUs and log folders that do not clash."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.slow]

#: each worker's test waits (with a deadline) until both labs are up, writes what it saw,
#: and keeps its lab up until the other worker has written too
WORKER_TESTS = '''
import json, os, subprocess, sys, time
from harness.pytest_plugin.common import session_id

def test_both_labs_up(lab, request):
    session = session_id(request.config)
    deadline = time.monotonic() + 240
    while True:
        status = json.loads(subprocess.run(
            [sys.executable, "-m", "harness.cli", "status", "--json"],
            capture_output=True, text=True, check=True).stdout)
        ours = {name: entry for name, entry in status.items()
                if entry.get("session") == session and "qemu" in entry}
        if len(ours) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(2)
    seen = {"name": lab.spec.name, "run_dir": str(lab.run_dir), "ssh_port": lab.summary.ssh_port,
            "log_dir": str(lab.log_dir), "qemu": lab.machine.pid, "status": ours,
            "worker": os.environ.get("PYTEST_XDIST_WORKER")}
    with open(os.path.join(os.environ["SEEN_DIR"], f"{lab.spec.name}.json"), "w") as out:
        json.dump(seen, out)
    assert len(ours) >= 2, f"jhlab status listed {sorted(status)}"
    # keep this lab up until the other worker has seen it too
    while len(os.listdir(os.environ["SEEN_DIR"])) < 2 and time.monotonic() < deadline:
        time.sleep(1)
'''


#: seconds for the whole two-worker run: within the suite's per-test timeout (600 s), so a
#: stuck run fails with its output; each worker waits at most 240 s for the other's lab
RUN_TIMEOUT = 480.0


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _keep(logs: Path, stdout: str, stderr: str) -> Path:
    """Keep the whole output of the two-worker run beside its labs' logs."""
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / "two-worker-run.txt"
    path.write_text(f"{stdout}\n--- stderr ---\n{stderr}")
    return path


def test_two_workers_boot_two_labs_that_do_not_clash(tmp_path: Path) -> None:
    """Two workers, two labs: distinct names (default-gw0, default-gw1), run directories,
    ssh ports, QEMU processes and log folders (under one session folder); jhlab status
    lists both, each running a test, while they run."""
    (tmp_path / "test_both.py").write_text(WORKER_TESTS)
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir()
    logs = tmp_path / "logs"
    env = os.environ | {"SEEN_DIR": str(seen_dir)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", str(tmp_path / "test_both.py"), "-n", "2", "--dist",
             "each", "-p", "no:cacheprovider", f"--lab-log-dir={logs}", f"--rootdir={tmp_path}", "-q"],
            capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:  # say what the run printed, before pytest-timeout
        output = _keep(logs, _text(exc.stdout), _text(exc.stderr))
        pytest.fail(f"the two-worker run did not end in {RUN_TIMEOUT:.0f} s; all it printed is "
                    f"in {output}:\n{_text(exc.stdout)[-4000:]}{_text(exc.stderr)[-2000:]}")
    if done.returncode != 0:
        output = _keep(logs, done.stdout, done.stderr)
        pytest.fail(f"the two-worker run failed; all it printed is in {output}:\n"
                    f"{done.stdout[-4000:]}{done.stderr[-2000:]}")
    seen = [json.loads(path.read_text()) for path in seen_dir.glob("*.json")]
    by_lab = {entry["name"]: entry for entry in seen}
    # default-gw0 and default-gw1, suffixed (-2) if another session holds those names
    assert len(by_lab) == 2
    for name, entry in by_lab.items():
        assert re.fullmatch(rf"default-{entry['worker']}(-\d+)?", name), name
    for field in ("run_dir", "ssh_port", "log_dir", "qemu"):
        assert len({entry[field] for entry in by_lab.values()}) == 2, field
    assert all(Path(entry["log_dir"]).parent == logs for entry in by_lab.values())
    for entry in by_lab.values():
        listed = entry["status"]
        assert sorted(listed) == sorted(by_lab)
        assert listed[entry["name"]]["doing"].startswith("running ")
        assert listed[entry["name"]]["ssh_port"] == entry["ssh_port"]
        assert listed[entry["name"]]["worker"] == entry["worker"]
    assert len({listed["session"] for entry in by_lab.values() for listed in entry["status"].values()}) == 1
