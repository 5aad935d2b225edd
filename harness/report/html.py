"""The report page: one self-contained HTML file per run (no script, no file beside it:
plots are embedded PNGs), readable in any browser and as a CI artefact.

Top to bottom: the run (when, how long, counts, labs, shards merged), every failed test
opened up (pytest's failure text, then per lab the serial excerpts and the QMP event
timeline), a table of all tests, the passed tests' serial excerpts (folded), and the
benchmark plots when a bench JSON file was given.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from datetime import datetime

from harness.report.plots import BenchFile, bar_charts, grouped, trend_charts
from harness.report.records import LabShare, RunRecord, TestRecord

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { margin-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
td { overflow-wrap: anywhere; } th { white-space: nowrap; }
h3, summary { overflow-wrap: anywhere; }
pre { background: #f6f6f6; border: 1px solid #ddd; padding: 0.5em; overflow-x: auto;
      max-height: 40em; font-size: 85%; }
.passed { color: #1a7f37; } .failed, .error { color: #c62828; } .skipped { color: #8a6d00; }
.test { border-left: 4px solid #c62828; padding-left: 1em; margin: 1.5em 0; }
.lab { margin-left: 1em; }
.note { color: #666; font-size: 90%; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
"""

#: outcomes in the order the summary names them
OUTCOMES = ("failed", "error", "passed", "skipped")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _anchor(nodeid: str) -> str:
    return "t-" + "".join(c if c.isalnum() else "-" for c in nodeid)


def _excerpts(share: LabShare) -> str:
    parts = []
    for excerpt in share.excerpts:
        if not excerpt.lines:
            parts.append(f"<p class='note'>{_e(excerpt.console)}: nothing printed during the test</p>")
            continue
        dropped = (f" (its last {len(excerpt.lines)} lines; {excerpt.dropped} before them left out)"
                   if excerpt.dropped else "")
        parts.append(f"<h5>{_e(excerpt.console)}{_e(dropped)}</h5>"
                     f"<pre class='serial'>{_e(chr(10).join(excerpt.lines))}</pre>")
    return "\n".join(parts)


def _timeline(share: LabShare) -> str:
    if share.timeline is None:
        return ""
    if not share.timeline:
        return "<p class='note'>QMP events: none while the test ran</p>"
    rows = "\n".join(
        f"<tr><td>{event.index}</td><td>+{event.offset:.3f} s</td><td>{_e(event.name)}</td>"
        f"<td>{_e(json.dumps(dict(event.data), sort_keys=True)) if event.data else ''}</td></tr>"
        for event in share.timeline)
    return ("<h5>QMP event timeline</h5><table class='timeline'><tr><th>#</th>"
            "<th>after the test began</th><th>event</th><th>data</th></tr>"
            f"{rows}</table>")


def _lab_block(share: LabShare) -> str:
    return (f"<div class='lab'><h4>lab {_e(share.name)}</h4>"
            f"<p class='note'>logs: {_e(share.log_dir)}</p>{_timeline(share)}{_excerpts(share)}</div>")


def _failed_test(test: TestRecord) -> str:
    labs = "".join(_lab_block(share) for share in test.labs)
    return (f"<div class='test' id='{_anchor(test.nodeid)}'>"
            f"<h3 class='{test.outcome}'>{_e(test.outcome.upper())} {_e(test.nodeid)}</h3>"
            f"<p class='note'>{test.duration:.1f} s{f', worker {_e(test.worker)}' if test.worker else ''}"
            f"</p><pre class='failure'>{_e(test.failure)}</pre>{labs}</div>")


def _summary(run: RunRecord) -> str:
    counts = run.counts()
    said = ", ".join(f"<span class='{o}'>{counts[o]} {o}</span>" for o in OUTCOMES if counts.get(o))
    started = datetime.fromtimestamp(run.started).strftime("%Y-%m-%d %H:%M:%S")
    rows = [("started", started), ("duration", f"{run.duration:.0f} s"),
            ("tests", f"{len(run.tests)}")]
    if run.runs > 1:
        rows.append(("runs merged", f"{run.runs} (shards)"))
    rows += sorted(run.properties.items())
    table = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<p class='counts'>{said or 'no tests'}</p><table class='run'>{table}</table>"


def _all_tests(tests: Sequence[TestRecord]) -> str:
    rows = []
    for test in sorted(tests, key=lambda t: (OUTCOMES.index(t.outcome)
                                             if t.outcome in OUTCOMES else 9, t.nodeid)):
        name = (f"<a href='#{_anchor(test.nodeid)}'>{_e(test.nodeid)}</a>"
                if test.outcome in ("failed", "error") or test.labs else _e(test.nodeid))
        labs = ", ".join(share.name for share in test.labs)
        rows.append(f"<tr><td class='{test.outcome}'>{_e(test.outcome)}</td><td>{name}</td>"
                    f"<td>{test.duration:.2f} s</td><td>{_e(test.worker)}</td><td>{_e(labs)}</td></tr>")
    return ("<table class='tests'><tr><th>outcome</th><th>test</th><th>duration</th>"
            f"<th>worker</th><th>labs</th></tr>{''.join(rows)}</table>")


def _passed_excerpts(tests: Sequence[TestRecord]) -> str:
    blocks = []
    for test in tests:
        if test.outcome in ("failed", "error") or not test.labs:
            continue
        inner = "".join(f"<div class='lab'><h4>lab {_e(s.name)}</h4>{_excerpts(s)}</div>"
                        for s in test.labs)
        blocks.append(f"<details id='{_anchor(test.nodeid)}'><summary class='{test.outcome}'>"
                      f"{_e(test.nodeid)}</summary>{inner}</details>")
    return "\n".join(blocks) or "<p class='note'>no other test used a lab</p>"


def _img(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode()
    return f"<figure><img class='plot' alt='{_e(title)}' src='data:image/png;base64,{data}'></figure>"


def bench_section(bench: BenchFile | None, history: Sequence[BenchFile] = ()) -> str:
    """The plots of a bench file's figures (and of a history's trend)."""
    if bench is None and not history:
        return ("<p class='note'>no benchmark figures given (jhlab test --bench FILE|DIR, "
                "from jhlab bench --json FILE or --history DIR)</p>")
    parts = []
    if bench is not None:
        parts.append(f"<p class='note'>{_e(bench.path.name)}, {_e(bench.taken.isoformat(' ', 'seconds'))}, "
                     f"machine {_e(bench.machine)}</p>")
        groups = grouped(bench.figures)
        if not groups:
            parts.append("<p class='note'>the file has no boot, lifecycle or jitter figures</p>")
        for group, figures in groups.items():
            parts.append(f"<h3>{_e(group)}</h3>")
            parts += [_img(title, png) for title, png in bar_charts(group, figures)]
    if len(history) > 1:
        parts.append(f"<h3>trend over {len(history)} runs</h3>")
        parts += [_img(title, png) for title, png in trend_charts(history)]
    return "\n".join(parts)


def render(run: RunRecord, *, bench: BenchFile | None = None,
           history: Sequence[BenchFile] = (), title: str = "jhlab test report") -> str:
    """The whole page."""
    failed = [t for t in run.tests if t.outcome in ("failed", "error")]
    failures = ("".join(_failed_test(t) for t in sorted(failed, key=lambda t: t.nodeid))
                or "<p class='passed'>none</p>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{_e(title)}</h1>
{_summary(run)}
<h2 id="failed">Failed tests</h2>
{failures}
<h2 id="tests">All tests</h2>
{_all_tests(run.tests)}
<h2 id="serial">Serial excerpts of the other tests</h2>
{_passed_excerpts(run.tests)}
<h2 id="bench">Benchmarks</h2>
{bench_section(bench, history)}
</body></html>
"""


def trend_page(latest: BenchFile | None, history: Sequence[BenchFile]) -> str:
    """The page of a bench history folder: its newest figures and their trend."""
    files = "".join(f"<li>{_e(b.path.name)} ({_e(b.machine)})</li>"
                    for b in sorted(history, key=lambda b: b.taken))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>jhlab bench history</title>
<style>{_STYLE}</style></head>
<body>
<h1>jhlab bench history</h1>
<p>{len(history)} runs</p><ul>{files}</ul>
{bench_section(latest, history if len(history) > 1 else ())}
</body></html>
"""
