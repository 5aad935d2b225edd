"""The HTML report of a run (``--lab-report FILE``, ``--lab-report-bench FILE|DIR``).

Where a test runs (the only process, or a pytest-xdist worker), its labs' logs are marked
when it gets them (:func:`mark_lab`), and its report carries what they showed since
(:func:`attach_lab_shares`: serial excerpts, and for a failure the QMP event timeline)
as the attribute ``jhlab_labs``, which xdist sends to the controller with the report.
The controller (or the only process) collects every test's phases
(:class:`ReportCollector`) and writes the page and its ``report.json`` at the end.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from harness.lab import Lab
from harness.report import load_bench, write_report
from harness.report.records import LabMark, LabShare, RunRecord, TestRecord

#: where each lab a test uses was marked when the test got it, by lab name
MARKS_KEY = pytest.StashKey[dict[str, LabMark]]()
#: the report attribute that carries a phase's lab shares (JSON-able, for xdist)
SHARES_ATTRIBUTE = "jhlab_labs"


def mark_lab(item: pytest.Item, lab: Lab) -> None:
    """Remember where ``lab``'s logs stand as ``item`` gets it."""
    item.stash.setdefault(MARKS_KEY, {})[lab.spec.name] = LabMark.take(lab.spec.name, lab.log_dir)


def attach_lab_shares(item: pytest.Item, report: pytest.TestReport, labs: list[Lab]) -> None:
    """Put what ``labs`` showed during ``item`` on its report (the call's, or a failed
    setup's or teardown's), with the event timeline when it failed."""
    if not item.config.getoption("--lab-report") or not labs:
        return
    if report.when != "call" and not report.failed:
        return
    marks = item.stash.get(MARKS_KEY, {})
    shares = []
    for lab in labs:
        mark = marks.get(lab.spec.name) or LabMark(lab.spec.name, str(lab.log_dir or ""), {}, 0, 0.0)
        if mark.log_dir:
            shares.append(asdict(LabShare.since(mark, with_timeline=report.failed)))
    setattr(report, SHARES_ATTRIBUTE, shares)


class ReportCollector:
    """Gathers the run's tests from their reports and writes the page at the end.

    :param config: the session's config (``--lab-report`` set)
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.page = Path(config.getoption("--lab-report"))
        bench = config.getoption("--lab-report-bench")
        self.bench = Path(bench) if bench else None
        if self.bench is not None:
            try:
                load_bench(self.bench)
            except ValueError as exc:
                raise pytest.UsageError(f"--lab-report-bench: {exc}") from exc
        self.run = RunRecord(started=time.time())
        self.tests: dict[str, TestRecord] = {}
        self.started = time.monotonic()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        test = self.tests.get(report.nodeid)
        if test is None:
            test = self.tests[report.nodeid] = TestRecord(report.nodeid)
            node = getattr(report, "node", None)  # xdist: the worker it came from
            test.worker = str(getattr(getattr(node, "gateway", None), "id", "") or "")
        failure = ""
        if report.failed:
            failure = report.longreprtext
        elif report.skipped and isinstance(report.longrepr, tuple):
            failure = str(report.longrepr[2])
        shares = [LabShare.from_json(value) for value in getattr(report, SHARES_ATTRIBUTE, None) or []]
        test.add_phase(report.when or "call", report.outcome, report.duration, failure, shares)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.run.duration = time.monotonic() - self.started
        self.run.tests = list(self.tests.values())
        option = self.config.option
        self.run.properties = {
            "host": f"{platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
            "command": " ".join(["pytest", *self.config.invocation_params.args]),
            "python": sys.version.split()[0],
            "pytest status": str(int(exitstatus)),
        }
        workers = getattr(option, "numprocesses", None)
        if workers:
            self.run.properties["xdist workers"] = str(workers)
        if getattr(option, "splits", None):
            self.run.properties["shard"] = f"{option.group}/{option.splits}"
        labs = sorted({share.name for test in self.run.tests for share in test.labs})
        if labs:
            self.run.properties["labs"] = ", ".join(labs)
        write_report(self.run, self.page, bench=self.bench)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.write_sep("-", f"jhlab report: {self.page.resolve()}")


def addoptions(group: Any) -> None:
    """The report's options (in the plugin's ``jhlab`` group)."""
    group.addoption("--lab-report", default=None, metavar="FILE",
                    help="write the HTML report of the run here (and its records as FILE.json)")
    group.addoption("--lab-report-bench", default=None, metavar="FILE|DIR",
                    help="plot these bench figures in the report (a jhlab bench --json file, or a "
                    "--history folder: its newest file and the trend)")


def configure(config: pytest.Config) -> None:
    """Register the collector on the controller (or the only process)."""
    if config.getoption("--lab-report") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(ReportCollector(config), "jhlab-report")
