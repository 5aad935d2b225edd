"""jhlab test's live progress (--lab-progress): suites counted from the collection, each
failure named as it happens, and what this session's labs do (their activity files),
here in the line mode of a CI log (pytest's stdout is a pipe)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.pytest_plugin.progress import suite_of

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))


def test_suite_is_the_folder_under_test_suites() -> None:
    assert suite_of("test_suites/e2e/test_demos.py::test_smp") == "e2e"
    assert suite_of("test_suites/unit/sub/test_x.py::t") == "unit"
    assert suite_of("tests/test_x.py::t") == "tests"
    assert suite_of("test_x.py::t") == "."


def test_lines_name_the_tests_failures_and_what_a_lab_does(pytester: pytest.Pytester) -> None:
    """A lab claimed by a test of the session shows its activities; a failure is named
    when it happens; pytest's summary line still closes the run."""
    pytester.makepyfile(test_labs="""
        import time
        from harness.activity import ActivityClaim
        from harness.pytest_plugin.common import session_id

        def test_a_lab_boots_then_runs(request):
            claim = ActivityClaim.claim("default", session=session_id(request.config), worker="pytest")
            claim.set("booting")
            time.sleep(2.5)
            claim.set("running test_labs.py::test_a_lab_boots_then_runs")
            time.sleep(2.5)
            claim.release()
            time.sleep(2.5)

        def test_fails():
            assert False

        def test_passes():
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "--lab-progress",
                                           "-o", "console_output_style=classic")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "jhlab: 3 tests (. 3)",
        "jhlab: lab default-pytest: booting",
        "jhlab: lab default-pytest: running test_labs.py::test_a_lab_boots_then_runs",
        "jhlab: lab default-pytest: down",
        "*test_labs.py::test_fails",
        "jhlab: suite . done: 3 tests, 1 failed",
        "*1 failed, 2 passed*",
    ])


def test_workers_labs_show_in_the_controllers_lines(pytester: pytest.Pytester) -> None:
    """Under xdist the controller counts what workers collected and shows their labs."""
    pytester.makepyfile(test_worker_labs="""
        import time
        from harness.activity import ActivityClaim
        from harness.pytest_plugin.common import session_id, worker_id

        def test_lab(request):
            claim = ActivityClaim.claim("default", session=session_id(request.config),
                                        worker=worker_id(request.config))
            claim.set("saving its reset point")
            time.sleep(3)
            claim.release()

        def test_other():
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "--lab-progress", "-n", "2",
                                           "-o", "console_output_style=classic")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["jhlab: 2 tests (. 2)", "jhlab: lab default-gw?: saving its reset point"])
