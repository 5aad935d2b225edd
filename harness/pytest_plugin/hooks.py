"""The plugin's hooks: options, markers, collection, failure reports with the labs'
artefacts, and holding a lab kept with ``--keep-lab``."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from harness import runtime
from harness.lab import Lab
from harness.pytest_plugin import reporting
from harness.pytest_plugin.common import (
    KEPT_KEY,
    LAB_KEY,
    REPORTS_KEY,
    WORKER_LOG_ROOT,
    WORKER_SESSION,
    lab_down,
    lab_label,
    log_root,
    session_id,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("jhlab", "jhlab lab machines")
    group.addoption("--lab", default="default", help="lab to boot (built-in name or TOML file)")
    group.addoption("--accel", default=None, choices=["auto", "kvm", "tcg"],
                    help="override the lab's accelerator")
    group.addoption("--lab-log-dir", default=None, type=Path,
                    help="folder for lab logs and failed tests' artefacts")
    group.addoption("--lab-attach", default=None, metavar="NAME",
                    help="use the running lab NAME (jhlab up NAME) as the session lab instead of "
                    "booting one; it is not reset and stays up")
    group.addoption("--keep-lab", action="store_true",
                    help="leave the session lab running at the end (pytest waits; Ctrl-C ends it)")
    group.addoption("--hv-arch", default="executor", choices=["executor", "oracle"],
                    help="what the guest daemon runs cells on in lifecycle tests that do not "
                    "choose: executor (KVM in the lab, the default) or oracle (bookkeeping "
                    "only: fast, nothing executes)")
    group.addoption("--lab-progress", action="store_true",
                    help="live progress: a bar per suite and what each lab does (jhlab test)")
    reporting.addoptions(group)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser,
                                  args: list[str]) -> Any:
    """With ``--lab-progress``: keep a handle on the terminal before pytest's capture
    takes file descriptor 1 over, so the display can draw while a test runs (the
    display's thread writes there, never into a test's captured output)."""
    if getattr(early_config.known_args_namespace, "lab_progress", False):
        from harness.pytest_plugin.progress import TERMINAL_KEY

        early_config.stash[TERMINAL_KEY] = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1,
                                                     encoding="utf-8", errors="replace")
    return (yield)


def pytest_configure(config: pytest.Config) -> None:
    for line in ("lab(name=None): boots a real lab VM (QEMU); with a name, needs that lab",
                 "kvm: needs KVM inside the lab VM (cells then run on the executor)",
                 "dirty: leaves the lab changed; it is reset by snapshot afterwards",
                 "slow: takes more than a few seconds"):
        config.addinivalue_line("markers", line)
    # the controller (or the only process) draws; a verbose run prints a line per test
    if (config.getoption("--lab-progress") and not hasattr(config, "workerinput")
            and config.getoption("verbose") <= 0):
        from harness.pytest_plugin.progress import TERMINAL_KEY, RunProgress

        terminal = config.stash.get(TERMINAL_KEY, None)
        console = Console(file=terminal, highlight=False, soft_wrap=True) if terminal is not None else None
        config.pluginmanager.register(RunProgress(config, console), "jhlab-progress")
    reporting.configure(config)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist's controller starts worker ``node``: hand it the session's log folder
    and id, so the workers' labs log side by side and show up as one session."""
    node.workerinput[WORKER_LOG_ROOT] = str(log_root(node.config, create=False))
    node.workerinput[WORKER_SESSION] = session_id(node.config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``lab("name")`` when the session's lab is another one."""
    label = config.getoption("--lab-attach") or lab_label(config)
    for item in items:
        marker = item.get_closest_marker("lab")
        if marker is None:
            continue
        wanted = marker.args[0] if marker.args else marker.kwargs.get("name")
        if wanted and wanted != label:
            item.add_marker(pytest.mark.skip(reason=f"needs lab {wanted!r} (run with --lab {wanted})"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    item.stash.setdefault(REPORTS_KEY, {})[report.when] = report
    labs = item.stash.get(LAB_KEY, [])
    if report.when == "call" and report.failed:
        for lab in labs:
            _attach_artifacts(item, report, lab)
    reporting.attach_lab_shares(item, report, labs)
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


# -- --keep-lab ----------------------------------------------------------------------------


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    kept = config.stash.get(KEPT_KEY, None)
    if kept is None or kept.summary is None:
        return
    terminalreporter.section(f"jhlab: lab {kept.summary.name} kept up (--keep-lab)")
    for line in _reach_lines(kept):
        terminalreporter.write_line(line)


def _reach_lines(kept: Lab) -> list[str]:
    """How to reach a kept lab."""
    summary = kept.summary
    assert summary is not None and kept.machine is not None  # up
    run_dir = kept.run_dir
    lines = [
        f"ssh:      ssh -p {summary.ssh_port} -i {kept.key_path} -o StrictHostKeyChecking=no "
        "root@127.0.0.1",
        f"QMP:      {run_dir / 'qmp.sock' if run_dir else '?'} (a relay: any number of clients)",
        f"consoles: {kept.log_dir}/serial0.log (root, hypervisor), {kept.log_dir}/serial1.log (cells)",
        f"QEMU pid: {summary.pid}; logs in {summary.log_dir}",
    ]
    if _register_kept(kept):
        lines.append(f"jhlab:    jhlab shell {summary.name} | jhlab run {summary.name} -- CMD | "
                     f"jhlab qmp {summary.name} CMD | jhlab down {summary.name}")
    lines.append("QEMU dies with this pytest process, so it waits now: Ctrl-C (or jhlab down) "
                 "ends the lab.")
    return lines


def _register_kept(kept: Lab) -> bool:
    """Register the kept lab the way ``jhlab up`` does (so ``jhlab shell``, ``run`` and
    ``down`` find it), unless someone else registered a lab of that name."""
    current = runtime.read(kept.spec.name)
    if current is not None:
        return current.supervisor == os.getpid()
    runtime.register(runtime.record_of(kept))
    return True


def pytest_unconfigure(config: pytest.Config) -> None:
    """With ``--keep-lab``: hold the lab until Ctrl-C, SIGTERM (``jhlab down``) or QEMU
    ends, then stop it."""
    kept = config.stash.get(KEPT_KEY, None)
    if kept is None:
        return
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop and kept.machine is not None and kept.machine.alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        lab_down(config, kept)
