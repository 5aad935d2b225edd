"""What the plugin's hooks and fixtures share: stash keys, the session's log folder,
the session and worker a process belongs to (pytest-xdist), making labs (each under a
name of its own), and whether a test failed so far."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import runtime
from harness.activity import ActivityClaim
from harness.lab import Lab, state_dir
from harness.labfile import LabSpec, load_lab, with_lan_on_tap

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
#: the names this process's labs claimed, by lab name (:mod:`harness.activity`)
CLAIMS_KEY = pytest.StashKey[dict[str, ActivityClaim]]()
#: this session's id (a controller and its xdist workers share it)
SESSION_KEY = pytest.StashKey[str]()

#: what a controller hands its xdist workers (``workerinput``): the log folder, the session
WORKER_LOG_ROOT = "jhlab_log_root"
WORKER_SESSION = "jhlab_session"


def worker_input(config: pytest.Config) -> dict[str, Any]:
    """What pytest-xdist's controller gave this worker (empty outside a worker)."""
    return dict(getattr(config, "workerinput", {}))


def worker_id(config: pytest.Config) -> str:
    """This process's xdist worker id (``gw0``, ...), or ``pytest`` when not distributed."""
    return str(worker_input(config).get("workerid", "pytest"))


def session_id(config: pytest.Config) -> str:
    """The test session's id: the controller's, in a worker."""
    if SESSION_KEY not in config.stash:
        given = worker_input(config).get(WORKER_SESSION)
        config.stash[SESSION_KEY] = str(given or f"{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}")
    return config.stash[SESSION_KEY]


def lab_label(config: pytest.Config, lab: str | LabSpec | None = None) -> str:
    """The name of ``lab`` (default: the session's ``--lab``)."""
    which = lab or config.getoption("--lab")
    return which.name if isinstance(which, LabSpec) else Path(str(which)).stem


def log_root(config: pytest.Config, *, create: bool = True) -> Path:
    """This session's folder for lab logs and failed tests' artefacts (an xdist worker
    uses its controller's)."""
    if LOG_ROOT_KEY not in config.stash:
        root = (worker_input(config).get(WORKER_LOG_ROOT) or config.getoption("--lab-log-dir")
                or state_dir() / "test-logs" / time.strftime("%Y%m%d-%H%M%S"))
        config.stash[LOG_ROOT_KEY] = Path(root)
    root = config.stash[LOG_ROOT_KEY]
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


def new_lab(config: pytest.Config, lab: str | LabSpec | None = None, tag: str = "") -> Lab:
    """A lab (not up yet) under a name of its own (``<lab>-<worker><tag>``, claimed in
    :mod:`harness.activity`), logging under the session's folder."""
    which = lab or config.getoption("--lab")
    spec = which if isinstance(which, LabSpec) else load_lab(which)
    claim = ActivityClaim.claim(spec.name, session=session_id(config), worker=worker_id(config),
                                tag=tag)
    config.stash.setdefault(CLAIMS_KEY, {})[claim.name] = claim
    folder = log_root(config) / f"lab-{claim.name}-{time.strftime('%H%M%S')}"
    claim.set("made", log_dir=str(folder))
    return Lab(dataclasses.replace(spec, name=claim.name), accel=config.getoption("--accel"),
               log_dir=folder, quiet=True)


def lab_doing(config: pytest.Config, lab: Lab, doing: str) -> None:
    """Say what ``lab`` (made by :func:`new_lab`) does now."""
    claim = config.stash.get(CLAIMS_KEY, {}).get(lab.spec.name)
    if claim is not None:
        claim.set(doing)


def register_lab(lab: Lab) -> None:
    """List ``lab`` (up, owned by this process) with the labs that are up, so ``jhlab
    status``, ``shell``, ``qmp`` and :meth:`Lab.attach` reach it (:meth:`Lab.reset` keeps
    the listing current).  A name someone else registered stays theirs."""
    current = runtime.read(lab.spec.name)
    if current is None or current.supervisor == os.getpid():
        runtime.register(runtime.record_of(lab))


def lab_down(config: pytest.Config, lab: Lab) -> None:
    """Stop ``lab`` (made by :func:`new_lab`), unlist it and give its name back."""
    try:
        lab.down()
    finally:
        runtime.unregister(lab.spec.name, supervisor=os.getpid())
        claim = config.stash.get(CLAIMS_KEY, {}).pop(lab.spec.name, None)
        if claim is not None:
            claim.release()


@contextlib.contextmanager
def tap_lab(config: pytest.Config, name: str) -> Iterator[Lab]:
    """The default lab as ``name`` with its ``lan`` on a tap whose host end lives in the
    lab's private network namespace (:func:`harness.labfile.with_lan_on_tap`), up with KVM
    inside, under a name of its own (:func:`new_lab`); down at the end. Skips without
    root (network namespaces) or without KVM in the lab."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    lab = new_lab(config, with_lan_on_tap(load_lab("default"), name=name))
    try:
        lab_doing(config, lab, "booting")
        summary = lab.up()
        register_lab(lab)
        if not summary.kvm_in_guest:
            pytest.skip(f"lab {lab.spec.name} shows no KVM inside")
        lab_doing(config, lab, "running tests")
        yield lab
    finally:
        lab_down(config, lab)


def failed(node: pytest.Item) -> bool:
    """Whether the test's setup or call failed (so far)."""
    return any(report.failed for report in node.stash.get(REPORTS_KEY, {}).values())
