"""Live progress of a test run (``--lab-progress``, which ``jhlab test`` turns on): a bar
per suite (tests done of collected, failures) and a line per lab of this session saying
what it does (booting, saving its reset point, running test X, resetting), read from
:mod:`harness.activity`, so the labs of pytest-xdist's workers are shown by their
controller.

On a terminal the display is redrawn in place (rich) and pytest's per-test letters are
left out; each failure is printed above it as it happens.  Elsewhere (a CI log) lines are
printed instead: a lab's new activity, a suite finished.  pytest's own summary (failures,
``N passed, M failed``) follows as usual.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Generator, Sequence
from typing import Any, TextIO

import pytest
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness import activity
from harness.pytest_plugin.common import session_id

#: seconds between two looks at the labs' activity files
POLL_SECONDS = 1.0
#: the terminal as it was before pytest's capture (a duplicate of file descriptor 1)
TERMINAL_KEY = pytest.StashKey[TextIO]()


def suite_of(nodeid: str) -> str:
    """The suite a test belongs to: the folder under ``test_suites/`` (``unit``, ``e2e``)."""
    parts = nodeid.split("::", 1)[0].split("/")
    if parts[0] == "test_suites" and len(parts) > 2:
        return parts[1]
    return parts[0] if len(parts) > 1 else "."


class RunProgress:
    """The live display of one run (registered on the controller, or the only process).

    Lifecycle: registered at configure → :meth:`start` at session start → counts from
    collection and reports → :meth:`stop` at session finish.

    :param config: the session's config
    :param console: where to draw (default: stdout; ``pytest_load_initial_conftests`` gives
        the terminal as it was before pytest's capture)
    """

    def __init__(self, config: pytest.Config, console: Console | None = None) -> None:
        self.config = config
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.interactive = self.console.is_terminal
        self.session = session_id(config)
        self.bars = Progress(TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[failed]}"), TimeElapsedColumn(),
                             console=self.console)
        self.tasks: dict[str, Any] = {}
        self.totals: Counter[str] = Counter()
        self.done: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.finished: set[str] = set()
        self.labs: dict[str, str] = {}
        self.lock = threading.Lock()
        self.live: Live | None = None
        self.stopping = threading.Event()
        self.poller: threading.Thread | None = None

    # -- pytest hooks -------------------------------------------------------------------

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.start()

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.collected([item.nodeid for item in session.items])

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: Sequence[str]) -> None:
        if not self.totals:  # every worker collects the same tests
            self.collected(list(ids))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.nodeid in self.finished:
            if report.failed:  # an error in teardown after the test passed
                self.note_failure(report)
            return
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self.finished.add(report.nodeid)
            self.advance(report)

    @pytest.hookimpl(wrapper=True)
    def pytest_report_teststatus(self, report: pytest.TestReport,
                                 config: pytest.Config) -> Generator[None, Any, Any]:
        """Keep the category (pytest's counts), drop the letter: the display (or its
        lines) shows the test instead."""
        status = yield
        if status:
            return (status[0], "", "")
        return status

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.stop()

    # -- the display --------------------------------------------------------------------

    def collected(self, nodeids: Sequence[str]) -> None:
        with self.lock:
            self.totals = Counter(suite_of(nodeid) for nodeid in nodeids)
            for suite, total in sorted(self.totals.items()):
                self.tasks[suite] = self.bars.add_task(suite, total=total, failed="")
        if not self.interactive:
            listed = ", ".join(f"{suite} {total}" for suite, total in sorted(self.totals.items()))
            self.console.print(f"jhlab: {sum(self.totals.values())} tests ({listed})")

    def advance(self, report: pytest.TestReport) -> None:
        suite = suite_of(report.nodeid)
        with self.lock:
            self.done[suite] += 1
            if report.failed:
                self.failed[suite] += 1
            if suite in self.tasks:
                failed = f"[red]{self.failed[suite]} failed[/]" if self.failed[suite] else ""
                self.bars.update(self.tasks[suite], advance=1, failed=failed)
        if report.failed:
            self.note_failure(report)
        if self.done[suite] == self.totals.get(suite) and not self.interactive:
            failed = f", {self.failed[suite]} failed" if self.failed[suite] else ""
            self.console.print(f"jhlab: suite {suite} done: {self.done[suite]} tests{failed}")

    def note_failure(self, report: pytest.TestReport) -> None:
        where = "" if report.when == "call" else f" (in {report.when})"
        self.console.print(f"[red]✗ {report.nodeid}{where}[/]")

    def render(self) -> Group:
        """Suite bars, then the labs and what they do."""
        labs = Table(box=None, show_header=False, pad_edge=False)
        labs.add_column(style="bold")
        labs.add_column()
        for name, doing in sorted(self.labs.items()):
            labs.add_row(f"lab {name}", doing)
        return Group(self.bars.get_renderable(), labs)

    def look_at_labs(self) -> None:
        """Read what this session's labs do; print changes when not on a terminal."""
        now = time.time()
        seen = {record.name: f"{record.doing} ({now - record.since:.0f} s)"
                for record in activity.current(self.session)}
        if not self.interactive:
            for name, record in ((r.name, r) for r in activity.current(self.session)):
                if self.labs.get(name, "").rsplit(" (", 1)[0] != record.doing:
                    self.console.print(f"jhlab: lab {name}: {record.doing}")
            for name in set(self.labs) - set(seen):
                self.console.print(f"jhlab: lab {name}: down")
        self.labs = seen

    def _poll(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            try:
                self.look_at_labs()
            except OSError as exc:  # a display problem must not end the run
                self.console.print(f"jhlab: lab activity unreadable: {exc}")
            if self.live is not None:
                self.live.update(self.render())

    def start(self) -> None:
        if self.interactive:
            self.live = Live(self.render(), console=self.console, refresh_per_second=4,
                             transient=False, redirect_stdout=False, redirect_stderr=False)
            self.live.start()
        self.poller = threading.Thread(target=self._poll, name="jhlab-progress", daemon=True)
        self.poller.start()

    def stop(self) -> None:
        """End the display (idempotent): its last state stays on the screen."""
        self.stopping.set()
        if self.poller is not None:
            self.poller.join(5)
            self.poller = None
        if self.live is not None:
            self.live.update(self.render())
            self.live.stop()
            self.live = None
