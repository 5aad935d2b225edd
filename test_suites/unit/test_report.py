"""The HTML report of a run: a real pytest run (two xdist workers) whose tests write
their labs' logs as QEMU would (harness.fake.LabLogs), the page it leaves next to its
JUnit file opened in headless Chromium and read as a person sees it; shards merged by
jhlab report; the bench plots."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from harness.bench import Figure
from harness.cli import main
from harness.report import RunRecord
from harness.report.browser import HeadlessChromium

pytest_plugins = ["pytester"]

needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                    reason="Debian's chromium is not installed (./scripts/setup)")

#: two tests on one "lab" whose logs the tests write: one passes, one fails with a
#: line on the cells' console and a panic event
TESTS = '''
import pytest
from harness.fake import LabLogs
from harness.pytest_plugin.common import LAB_KEY
from harness.pytest_plugin.reporting import mark_lab

@pytest.fixture
def logs(request, tmp_path_factory):
    lab = LabLogs("fake-lab", tmp_path_factory.getbasetemp().parent / "lab-logs" / request.node.name)
    lab.serial(0, "Linux version 6.1 (booted before the test)\\n")
    lab.event("RESUME")
    request.node.stash.setdefault(LAB_KEY, []).append(lab)
    mark_lab(request.node, lab)
    return lab

def test_cell_says_hello(logs):
    logs.serial(0, "Created cell \\"hello\\"\\n")
    logs.serial(1, "Hello from jhlab inmate\\n")

def test_cell_panics(logs):
    logs.serial(0, "Created cell \\"rogue\\"\\n")
    logs.serial(1, "FATAL: Invalid MMIO read, addr: 0xdeadbeef\\n")
    logs.event("GUEST_PANICKED", {"action": "pause"})
    assert False, "rogue was not stopped"

def test_no_lab():
    pass
'''


def bench_json(path: Path) -> Path:
    """A bench file as jhlab bench --json writes it, with figures of every plotted group."""
    figures = [Figure.of("lab cold boot to ssh-ready (default lab)", "s", [13.1, 13.6, 14.2]),
               Figure.of("lab reset by snapshot, until a command ran", "s", [1.1, 1.2, 1.4]),
               Figure.of("jailhouse enable (qemu-x86; markers on serial 0)", "s", [0.9, 1.0, 1.3]),
               Figure.of("jailhouse cell destroy (hello)", "s", [0.2, 0.3, 0.5]),
               Figure.of("APIC timer jitter (apic-timer, 10 Hz)", "us", [80.0, 120.0, 250.0]),
               Figure.of("config parse+check", "ms", [0.4, 0.4, 0.5])]
    path.write_text(json.dumps({"machine": "test host", "taken": "2026-12-03T09:00:00",
                                "figures": [asdict(f) for f in figures]}))
    return path


@pytest.fixture
def run(pytester: pytest.Pytester, tmp_path: Path) -> Path:
    """The out/ folder of a run of TESTS with two workers, JUnit and report."""
    pytester.makepyfile(test_logs=TESTS)
    out = tmp_path / "out"
    result = pytester.runpytest_subprocess(
        "-n", "2", "-p", "no:cacheprovider", f"--junitxml={out / 'junit.xml'}",
        f"--lab-report={out / 'report.html'}", f"--lab-report-bench={bench_json(tmp_path / 'b.json')}")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([f"*jhlab report: {out / 'report.html'}*"])
    return out


def test_the_records_hold_what_each_test_showed(run: Path) -> None:
    """Excerpts start where the test began; only the failure carries a timeline."""
    record = RunRecord.read(run / "report.json")
    tests = {t.nodeid.split("::")[1]: t for t in record.tests}
    assert {t.outcome for t in tests.values()} == {"passed", "failed"}
    failed, passed = tests["test_cell_panics"], tests["test_cell_says_hello"]
    assert failed.outcome == "failed" and "rogue was not stopped" in failed.failure
    (share,) = failed.labs
    root, cells = share.excerpts
    assert root.lines == ['Created cell "rogue"']
    assert cells.lines == ["FATAL: Invalid MMIO read, addr: 0xdeadbeef"]
    assert share.timeline is not None
    assert [e.name for e in share.timeline] == ["GUEST_PANICKED"]
    assert 0 <= share.timeline[0].offset < 60
    assert passed.labs[0].timeline is None
    assert tests["test_no_lab"].labs == []
    assert {t.worker for t in tests.values()} <= {"gw0", "gw1"}


@needs_chromium
def test_the_page_shows_names_failure_excerpts_timeline_and_plots(run: Path) -> None:
    """Opened in Chromium: test names, the failure's serial lines and event timeline are
    on the page; a passed test's excerpt is folded; every plot is a decoded image."""
    with HeadlessChromium() as browser:
        page = browser.open(run / "report.html")
        shown = page.evaluate("document.body.innerText")
        plots = page.evaluate("[...document.querySelectorAll('img.plot')]"
                              ".map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        folded = page.evaluate("document.querySelectorAll('details:not([open])').length")
        (run / "report.png").write_bytes(page.screenshot())
    for name in ("test_cell_says_hello", "test_cell_panics", "test_no_lab"):
        assert name in shown
    assert "1 failed" in shown and "2 passed" in shown
    assert "FATAL: Invalid MMIO read, addr: 0xdeadbeef" in shown
    assert "rogue was not stopped" in shown
    assert "QMP event timeline" in shown and "GUEST_PANICKED" in shown and '{"action": "pause"}' in shown
    assert "Hello from jhlab inmate" not in shown  # folded until opened
    assert "booted before the test" not in shown
    assert folded == 1
    titles = [alt for alt, *_ in plots]
    assert titles == ["boot phases (s)", "lifecycle steps (s)", "timer jitter (us)"]
    assert all(complete and width > 100 and height > 50 for _, complete, width, height in plots)


def test_shards_merge_into_one_page(run: Path, tmp_path: Path) -> None:
    """jhlab report of two shards' records: every test of both, the run counted twice."""
    second = tmp_path / "shard2.json"
    shutil.copy(run / "report.json", second)
    page = tmp_path / "merged" / "report.html"
    assert main(["report", "-o", str(page), str(run / "report.json"), str(second)]) == 0
    merged = RunRecord.read(page.with_suffix(".json"))
    assert merged.runs == 2 and len(merged.tests) == 6
    assert "2 (shards)" in page.read_text()


def test_a_file_that_is_no_report_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong input names the file and writes nothing."""
    bad = tmp_path / "junit.xml"
    bad.write_text("<testsuites/>")
    page = tmp_path / "report.html"
    assert main(["report", "-o", str(page), str(bad)]) == 1
    assert "not a jhlab report file" in " ".join(capsys.readouterr().err.split())
    assert not page.exists()


def test_figures_are_grouped_by_what_they_measure() -> None:
    """Names decide the group: the benches' own names land where the report plots them."""
    from harness.report.plots import group_of

    assert group_of("lab cold boot to ssh-ready (default lab)") == "boot phases"
    assert group_of("boot phase: kernel initialisation to stage 1 (/init)") == "boot phases"
    assert group_of("lab reset by snapshot, until a command ran") == "boot phases"
    assert group_of("jailhouse cell create + load + start (hello)") == "lifecycle steps"
    assert group_of("cell start -> hello's first line on serial 1") == "lifecycle steps"
    assert group_of("APIC timer jitter, median of each start") == "timer jitter"
    assert group_of("config parse+check") is None


def test_merged_runs_keep_every_property_once() -> None:
    """Shards that differ in a property show each value; equal ones show it once."""
    from harness.report.records import merge_runs

    first = RunRecord(started=10.0, duration=100.0, properties={"shard": "1/2", "python": "3.11.7"})
    second = RunRecord(started=5.0, duration=300.0, properties={"shard": "2/2", "python": "3.11.7"})
    merged = merge_runs([first, second])
    assert merged.properties == {"shard": "1/2; 2/2", "python": "3.11.7"}
    assert (merged.started, merged.duration, merged.runs) == (5.0, 300.0, 2)
