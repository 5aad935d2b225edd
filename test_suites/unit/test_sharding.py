"""Sharding across CI runners: durations written from a run's records in pytest-split's
format cut a suite into shards that together run every test once; jhlab test --shard
asks for it; the stored durations file is one pytest-split reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import DURATIONS, main
from harness.recipes import find_recipes
from harness.report.records import RunRecord, TestRecord

pytest_plugins = ["pytester"]


def test_the_stored_durations_are_pytest_splits_format() -> None:
    """ci/test-durations.json maps test ids of this tree's suites to seconds."""
    stored = json.loads((find_recipes().root / DURATIONS).read_text())
    assert stored and all(isinstance(v, float | int) and v >= 0 for v in stored.values())
    assert all(k.startswith("test_suites/") and "::" in k for k in stored)


def test_durations_from_records_cut_shards_that_cover_every_test_once(
        pytester: pytest.Pytester, tmp_path: Path) -> None:
    """A slow test and many quick ones in two shards: the slow one alone in one shard,
    the rest in the other, nothing run twice or left out."""
    pytester.makepyfile(test_many="""
        import pytest
        @pytest.mark.parametrize("n", range(6))
        def test_quick(n):
            pass
        def test_slow():
            pass
    """)
    run = RunRecord(started=0.0, tests=[TestRecord(f"test_many.py::test_quick[{n}]", duration=1.0)
                                        for n in range(6)])
    run.tests.append(TestRecord("test_many.py::test_slow", duration=60.0))
    records = tmp_path / "report.json"
    run.write(records)
    durations = tmp_path / "durations.json"
    assert main(["report", "-o", str(tmp_path / "report.html"), "--durations", str(durations),
                 str(records)]) == 0
    ran = []
    for group in (1, 2):
        result = pytester.runpytest("-p", "no:cacheprovider", "-v", "--splits=2", f"--group={group}",
                                    "--splitting-algorithm=least_duration",
                                    f"--durations-path={durations}")
        ran.append({line.split(" ")[0] for line in result.outlines if " PASSED" in line})
    assert ran[0].isdisjoint(ran[1])
    assert len(ran[0] | ran[1]) == 7
    assert {"test_many.py::test_slow"} in ran


@pytest.mark.parametrize("shard", ["0/2", "3/2", "x", "1/2/3"])
def test_a_bad_shard_is_refused(shard: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--shard I/N with I from 1 to N, else one line saying how."""
    assert main(["test", "unit", "--shard", shard]) == 1
    assert "--shard" in capsys.readouterr().err
