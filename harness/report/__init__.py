"""The HTML report of a test run, and the plots of benchmark figures.

* :mod:`~harness.report.records`: what a run's tests showed (serial excerpts, QMP event
  timelines of failed tests), as JSON that merges across shards;
* :mod:`~harness.report.plots`: matplotlib charts of bench JSON figures (boot phases,
  lifecycle steps, timer jitter) and of their trend over a history of bench runs;
* :mod:`~harness.report.html`: the page.

The pytest plugin writes the report with ``--lab-report FILE`` (``jhlab test --junit F``
puts it next to the JUnit file); ``jhlab report`` renders one from the ``report.json``
files of several runs (the shards of a CI pipeline).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from harness.report.html import render
from harness.report.plots import BenchFile
from harness.report.records import RunRecord, merge_runs

__all__ = ["BenchFile", "RunRecord", "keep_in_history", "load_bench", "merge_runs", "render",
           "write_report"]


def load_bench(path: Path | None) -> tuple[BenchFile | None, list[BenchFile]]:
    """A bench JSON file, or a history folder (``jhlab bench --history DIR``: its newest
    file, and all of them for the trend).

    :raise ValueError: when ``path`` is neither, or a file in it is not a bench file
    """
    if path is None:
        return None, []
    if path.is_dir():
        history = [BenchFile.read(p) for p in sorted(path.glob("*.json"))]
        if not history:
            raise ValueError(f"{path}: no bench JSON files in it (jhlab bench --history {path})")
        return max(history, key=lambda b: b.taken), history
    if not path.exists():
        raise ValueError(f"{path}: no such bench file or history folder")
    return BenchFile.read(path), []


def write_report(run: RunRecord, page: Path, *, bench: Path | None = None) -> Path:
    """Write ``page`` (HTML) and the run's records beside it (``<page>.json``'s name with
    the page's stem: ``report.html`` -> ``report.json``); return the page's path."""
    page.parent.mkdir(parents=True, exist_ok=True)
    run.write(page.with_suffix(".json"))
    latest, history = load_bench(bench)
    page.write_text(render(run, bench=latest, history=history), encoding="utf-8")
    return page


def keep_in_history(folder: Path, value: Mapping[str, object], names: list[str]) -> tuple[Path, Path]:
    """``jhlab bench --history DIR``: keep a bench run's JSON as a dated file in
    ``folder`` (``YYYYmmdd-HHMMSS-<benchmarks>.json``, with its time as ``taken``) and draw
    the trend of every file there (``trend.html``: the newest figures, then each group's
    medians over time).

    :return: the new file and the trend page
    """
    import json
    from datetime import datetime

    from harness.report.html import trend_page

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now().replace(microsecond=0)
    stem = f"{now.strftime('%Y%m%d-%H%M%S')}-{'-'.join(names) or 'all'}"
    kept = folder / f"{stem}.json"
    for index in range(2, 100):  # two runs in one second keep both
        if not kept.exists():
            break
        kept = folder / f"{stem}-{index}.json"
    kept.write_text(json.dumps(dict(value) | {"taken": now.isoformat()}, indent=1))
    latest, history = load_bench(folder)
    page = folder / "trend.html"
    page.write_text(trend_page(latest, history), encoding="utf-8")
    return kept, page
