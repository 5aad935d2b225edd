"""The report of a run on a real lab: a failing test's serial excerpt is what the root
console printed during that test, its timeline holds the QMP events QEMU sent meanwhile,
and headless Chromium shows both on the page."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.lab import Lab
from harness.report import RunRecord
from harness.report.browser import HeadlessChromium

pytestmark = [pytest.mark.lab, pytest.mark.slow]

RUN = '''
import time

def test_prints_then_fails(lab):
    lab.run("echo REPORT-MARKER-$((6 * 7)) > /dev/ttyS0", check=True)
    lab.qmp.execute("stop")
    lab.qmp.execute("cont")
    time.sleep(1)  # the events' way from QEMU to the lab's event log
    assert False, "deliberately failed after the marker"

def test_prints_and_passes(lab):
    lab.run("echo PASSING-MARKER-$((6 * 7)) > /dev/ttyS0", check=True)
'''


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (./scripts/setup)")
def test_a_failed_lab_test_shows_its_serial_lines_and_events(lab: Lab, tmp_path: Path) -> None:
    """Run two tests on one lab (this session's, attached: the report of a run is the same
    whichever process owns the lab); the failure's excerpt and timeline come from it."""
    (tmp_path / "test_on_lab.py").write_text(RUN)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path / "test_on_lab.py"), "-p", "no:cacheprovider",
         f"--rootdir={tmp_path}", f"--lab-attach={lab.spec.name}", f"--lab-log-dir={out / 'lab-logs'}",
         f"--junitxml={out / 'junit.xml'}",
         f"--lab-report={out / 'report.html'}", "-q"],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    tests = {t.nodeid.split("::")[1]: t for t in RunRecord.read(out / "report.json").tests}
    failed, passed = tests["test_prints_then_fails"], tests["test_prints_and_passes"]
    assert (failed.outcome, passed.outcome) == ("failed", "passed")
    (share,) = failed.labs
    assert share.name == lab.spec.name
    root = share.excerpts[0]
    assert "REPORT-MARKER-42" in root.lines and "PASSING-MARKER-42" not in "\n".join(root.lines)
    assert share.timeline is not None
    names = [event.name for event in share.timeline]
    assert "STOP" in names and names.index("STOP") < names.index("RESUME"), names
    assert "PASSING-MARKER-42" in passed.labs[0].excerpts[0].lines
    with HeadlessChromium() as browser:
        page = browser.open(out / "report.html")
        shown = page.evaluate("document.body.innerText")
    assert "test_prints_then_fails" in shown and "test_prints_and_passes" in shown
    assert "REPORT-MARKER-42" in shown and "deliberately failed after the marker" in shown
    assert "STOP" in shown and "RESUME" in shown
    assert "PASSING-MARKER-42" not in shown  # a passed test's excerpt is folded
