"""``jhlab bench checked``'s sequence, on this host as the root cell: the same checked
steps with the guest program kept and with one program per step."""

from __future__ import annotations

from pathlib import Path

from harness.bench.checked import DEMO, sequence
from harness.fake import LocalRootCell, WithoutPrograms


def test_the_sequence_runs_both_ways_and_counts_the_programs(tmp_path: Path) -> None:
    """Both ways time every step of the demo and leave the root cell clean; the kept
    way starts one guest program for all of them, the other none (a run per step)."""
    root = LocalRootCell(tmp_path)
    kept, starts = sequence(root, **root.checked_options())
    assert len(kept) == len(DEMO) and all(seconds > 0 for seconds in kept)
    assert starts == 1
    per_step, none = sequence(WithoutPrograms(root), **root.checked_options())
    assert len(per_step) == len(DEMO) and none == 0
