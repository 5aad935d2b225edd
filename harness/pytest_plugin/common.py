"""What the plugin's hooks and fixtures share: stash keys, the session's log folder,
making labs, and whether a test failed so far."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.lab import Lab, state_dir
from harness.labfile import LabSpec

#: the labs a test used (their artefacts go into its failure report)
LAB_KEY = pytest.StashKey[list[Lab]]()
#: a test's reports so far, by phase (setup, call, teardown)
REPORTS_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()
#: this session's folder for lab logs and failed tests' artefacts
LOG_ROOT_KEY = pytest.StashKey[Path]()
#: the session lab left running by ``--keep-lab``
KEPT_KEY = pytest.StashKey[Lab]()
#: set on a test whose lab must be reset afterwards (cleanup failed, fixture said so)
DIRTY_KEY = pytest.StashKey[bool]()


def lab_label(config: pytest.Config, lab: str | LabSpec | None = None) -> str:
    """The name of ``lab`` (default: the session's ``--lab``)."""
    which = lab or config.getoption("--lab")
    return which.name if isinstance(which, LabSpec) else Path(str(which)).stem


def log_root(config: pytest.Config) -> Path:
    """This session's folder for lab logs and failed tests' artefacts."""
    if LOG_ROOT_KEY not in config.stash:
        root = config.getoption("--lab-log-dir") or state_dir() / "test-logs" / time.strftime(
            "%Y%m%d-%H%M%S")
        config.stash[LOG_ROOT_KEY] = Path(root)
    root = config.stash[LOG_ROOT_KEY]
    root.mkdir(parents=True, exist_ok=True)
    return root



def new_lab(config: pytest.Config, lab: str | LabSpec | None = None, tag: str = "") -> Lab:
    """A lab (not up yet) logging under the session's folder."""
    which = lab or config.getoption("--lab")
    label = lab_label(config, lab)
    folder = log_root(config) / f"lab-{label}{tag}-{time.strftime('%H%M%S')}"
    return Lab(which, accel=config.getoption("--accel"), log_dir=folder, quiet=True)


def failed(node: pytest.Item) -> bool:
    """Whether the test's setup or call failed (so far)."""
    return any(report.failed for report in node.stash.get(REPORTS_KEY, {}).values())
