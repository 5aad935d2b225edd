"""Helpers of the inmate tests: where the sources are, and how to run their Makefile."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

INMATES_DIR = Path(__file__).resolve().parents[2] / "images" / "inmates"
BUILD_TIMEOUT = 300.0

#: the Makefile's demo list, parsed so that a new demo is covered without test edits
DEMOS: list[str] = [demo for line in re.findall(
    r"^DEMOS [:+]= (.+)$", (INMATES_DIR / "Makefile").read_text(), re.MULTILINE)
    for demo in line.split()]


def make(out_dir: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    """Run the inmates Makefile into ``out_dir``; raise with its output on failure."""
    result = subprocess.run(
        ["make", "-C", str(INMATES_DIR), f"O={out_dir}", *targets],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"make {' '.join(targets)} failed ({result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}")
    return result
