"""pytest plugin of jhlab (entry point ``pytest11``).

Options (group ``jhlab``): ``--lab`` (built-in name or lab file), ``--accel``,
``--lab-log-dir`` (where each lab run and each failed test's artefacts go).

Fixtures:

* ``lab`` (session): one booted lab shared by the whole session; tests must leave it
  as they found it.  Only created when a test asks for it.
* ``lab_factory`` (function): boots extra labs for tests that break theirs (panics,
  killed QEMU); every lab it made is stopped at teardown.

Markers: ``lab`` (boots a real VM), ``kvm`` (needs KVM inside the lab), ``slow``.
When a test that used a lab fails, its report gets the tails of both serial consoles
and the QMP event log, and the files are copied to ``<lab-log-dir>/failed/<test>/``.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.lab import Lab, state_dir
from harness.labfile import LabSpec

LAB_KEY = pytest.StashKey[list[Lab]]()
REPORTS_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("jhlab", "jhlab lab machines")
    group.addoption("--lab", default="default", help="lab to boot (built-in name or TOML file)")
    group.addoption("--accel", default=None, choices=["auto", "kvm", "tcg"],
                    help="override the lab's accelerator")
    group.addoption("--lab-log-dir", default=None, type=Path,
                    help="folder for lab logs and failed tests' artefacts")


def pytest_configure(config: pytest.Config) -> None:
    for line in ("lab: boots a real lab VM (QEMU)", "kvm: needs KVM inside the lab VM",
                 "slow: takes more than a few seconds"):
        config.addinivalue_line("markers", line)


LOG_ROOT_KEY = pytest.StashKey[Path]()


def log_root(config: pytest.Config) -> Path:
    """This session's folder for lab logs and failed tests' artefacts."""
    if LOG_ROOT_KEY not in config.stash:
        root = config.getoption("--lab-log-dir") or state_dir() / "test-logs" / time.strftime(
            "%Y%m%d-%H%M%S")
        config.stash[LOG_ROOT_KEY] = Path(root)
    root = config.stash[LOG_ROOT_KEY]
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    item.stash.setdefault(REPORTS_KEY, {})[report.when] = report
    if report.when == "call" and report.failed:
        for lab in item.stash.get(LAB_KEY, []):
            _attach_artifacts(item, report, lab)
    return report


def _attach_artifacts(item: pytest.Item, report: pytest.TestReport, lab: Lab) -> None:
    if lab.log_dir is None:
        return
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)[-120:]
    dest = log_root(item.config) / "failed" / safe / lab.spec.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("serial0.log", "serial1.log", "qmp-events.jsonl", "qemu.log",
                 "qemu-cmdline.txt"):
        source = lab.log_dir / name
        if source.exists():
            shutil.copy2(source, dest / name)
            text = source.read_text(errors="replace").replace("\r", "")
            tail = "\n".join(text.splitlines()[-40:])
            report.sections.append((f"lab {lab.spec.name}: {name} (tail)", tail))
    report.sections.append((f"lab {lab.spec.name}: artefacts", str(dest)))


def _new_lab(config: pytest.Config, lab: str | LabSpec | None = None, tag: str = "") -> Lab:
    which = lab or config.getoption("--lab")
    label = which.name if isinstance(which, LabSpec) else Path(str(which)).stem
    folder = log_root(config) / f"lab-{label}{tag}-{time.strftime('%H%M%S')}"
    return Lab(which, accel=config.getoption("--accel"), log_dir=folder, quiet=True)


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The session's shared lab, booted once."""
    shared = _new_lab(request.config)
    try:
        shared.up()
        yield shared
    finally:
        shared.down()


@pytest.fixture(autouse=True)
def _track_lab_use(request: pytest.FixtureRequest) -> None:
    """Remember which labs a test used, for its failure report."""
    if "lab" in request.fixturenames:
        request.node.stash.setdefault(LAB_KEY, []).append(request.getfixturevalue("lab"))


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Lab]]:
    """Boot extra labs (owned by the test, stopped at teardown)."""
    made: list[Lab] = []

    def make(lab: str | LabSpec | None = None, *, up: bool = True, **kwargs: Any) -> Lab:
        new = _new_lab(request.config, lab, tag=f"-extra{len(made)}")
        for key, value in kwargs.items():
            setattr(new, key, value)
        made.append(new)
        request.node.stash.setdefault(LAB_KEY, []).append(new)
        if up:
            new.up()
        return new

    yield make
    for extra in made:
        extra.down()
