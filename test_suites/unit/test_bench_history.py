"""jhlab bench --history DIR: each run kept as a dated JSON file, the trend of all of
them drawn in DIR/trend.html (matplotlib PNGs embedded)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from harness.bench import main as bench_main
from harness.report import load_bench


def test_two_runs_leave_two_dated_files_and_their_trend(tmp_path: Path) -> None:
    """Two real runs of the config benchmark: two files (in the same second too), each
    with its time; the page
    shows the newest figures and one trend chart whose PNG decodes."""
    history = tmp_path / "history"
    for _ in range(2):
        assert bench_main(["config", "--repeats", "1", "--history", str(history)]) == 0
    kept = sorted(history.glob("*-config*.json"))
    assert len(kept) == 2
    assert all(re.fullmatch(r"\d{8}-\d{6}-config(-2)?\.json", p.name) for p in kept)
    latest, files = load_bench(history)
    assert latest is not None and latest.path in kept and len(files) == len(kept)
    assert json.loads(kept[-1].read_text())["figures"][0]["name"].startswith("config")
    page = (history / "trend.html").read_text()
    assert f"{len(kept)} runs" in page
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert pngs and all(base64.b64decode(p).startswith(b"\x89PNG") for p in pngs)
    assert "other figures (ms) over time" in page
