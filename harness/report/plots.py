"""Plots of benchmark figures (matplotlib, rendered to PNG without a display).

A bench JSON file (``jhlab bench --json F``; ``--history DIR`` keeps one per run) holds
``{"machine": ..., "figures": [{"name", "unit", "min", "median", "max", "repeats",
...}]}``.  Its figures are grouped by what they measure, from their names:

* **boot phases**: a lab's boot and reset (names with ``boot`` or ``reset``);
* **lifecycle steps**: the Jailhouse lifecycle through the ``jailhouse`` command (names
  that begin with ``jailhouse`` or ``cell``);
* **timer jitter**: names with ``jitter``.

Each group is one bar chart per unit (median, with the min-max range as a whisker);
:func:`trend_charts` draws the medians of a series of files over time.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

#: the groups, in the order a report shows them
GROUPS = ("boot phases", "lifecycle steps", "timer jitter")


@dataclass(frozen=True)
class BenchFile:
    """One bench JSON file.

    :param path: where it is
    :param machine: the machine it was measured on
    :param figures: its figures (as written)
    :param taken: when (the file's date stamp, else its modification time)
    """

    path: Path
    machine: str
    figures: Sequence[Mapping[str, Any]]
    taken: datetime

    @classmethod
    def read(cls, path: Path) -> BenchFile:
        """:raise ValueError: when ``path`` is not a bench JSON file"""
        try:
            value = json.loads(path.read_text())
            figures = [dict(f) for f in value["figures"]]
            for figure in figures:
                float(figure["median"]), float(figure["min"]), float(figure["max"])
                str(figure["name"]), str(figure["unit"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a bench JSON file ({exc})") from exc
        stamp = value.get("taken")
        taken = (datetime.fromisoformat(stamp) if isinstance(stamp, str)
                 else datetime.fromtimestamp(path.stat().st_mtime))
        return cls(path, str(value.get("machine", "")), figures, taken)


def group_of(name: str) -> str | None:
    """Which group a figure belongs to (None: not plotted)."""
    lowered = name.lower()
    if "jitter" in lowered:
        return "timer jitter"
    if lowered.startswith(("jailhouse", "cell")):
        return "lifecycle steps"
    if "boot" in lowered or "reset" in lowered:
        return "boot phases"
    return None


def grouped(figures: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The plotted figures by group (groups without figures left out)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for figure in figures:
        group = group_of(str(figure["name"]))
        if group is not None:
            groups.setdefault(group, []).append(figure)
    return {group: groups[group] for group in GROUPS if group in groups}


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return buffer.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def bar_charts(group: str, figures: Sequence[Mapping[str, Any]]) -> list[tuple[str, bytes]]:
    """One chart per unit of a group's figures: median bars, min-max whiskers.

    :return: (title, PNG) pairs
    """
    plt = _pyplot()
    charts = []
    units = sorted({str(f["unit"]) for f in figures})
    for unit in units:
        chosen = [f for f in figures if f["unit"] == unit]
        medians = [float(f["median"]) for f in chosen]
        low = [m - float(f["min"]) for m, f in zip(medians, chosen, strict=True)]
        high = [float(f["max"]) - m for m, f in zip(medians, chosen, strict=True)]
        fig, ax = plt.subplots(figsize=(9, 0.5 * len(chosen) + 1.2))
        rows = list(range(len(chosen)))
        ax.barh(rows, medians, xerr=[low, high], color="#4c72b0", ecolor="#333333", capsize=4)
        ax.set_yticks(rows, [_short(str(f["name"])) for f in chosen])
        ax.invert_yaxis()
        spread = max(float(f["max"]) for f in chosen) - min(float(f["min"]) for f in chosen)
        typical = max(abs(m) for m in medians) or 1.0
        if spread > 50 * typical:  # outliers orders of magnitude out: keep the medians visible
            ax.set_xscale("symlog", linthresh=typical)
            unit = f"{unit}, symmetric log scale"
        ax.set_xlabel(f"{unit} (median; whiskers: min to max)")
        title = f"{group} ({chosen[0]['unit']})"
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        charts.append((title, _png(fig)))
        plt.close(fig)
    return charts


def trend_charts(files: Sequence[BenchFile]) -> list[tuple[str, bytes]]:
    """The medians of every figure over a series of bench files, one chart per group and
    unit (figures outside the groups in a chart of their own per unit), min-max bands.

    :return: (title, PNG) pairs
    """
    plt = _pyplot()
    ordered = sorted(files, key=lambda f: f.taken)
    series: dict[tuple[str, str], dict[str, list[tuple[datetime, float, float, float]]]] = {}
    for bench in ordered:
        for figure in bench.figures:
            key = (group_of(str(figure["name"])) or "other figures", str(figure["unit"]))
            series.setdefault(key, {}).setdefault(str(figure["name"]), []).append(
                (bench.taken, float(figure["min"]), float(figure["median"]), float(figure["max"])))
    charts = []
    for (group, unit), lines in sorted(series.items(), key=lambda kv: (
            GROUPS.index(kv[0][0]) if kv[0][0] in GROUPS else len(GROUPS), kv[0][1])):
        fig, ax = plt.subplots(figsize=(9, 4))
        for name, points in sorted(lines.items()):
            when = [p[0] for p in points]
            ax.plot(when, [p[2] for p in points], marker="o", label=_short(name, 50))
            ax.fill_between(when, [p[1] for p in points], [p[3] for p in points], alpha=0.15)
        title = f"{group} ({unit}) over time"
        ax.set_title(title)
        ax.set_ylabel(f"{unit} (median; band: min to max)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.autofmt_xdate()
        charts.append((title, _png(fig)))
        plt.close(fig)
    return charts
