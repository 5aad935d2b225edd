"""pytest plugin of jhlab (entry point ``pytest11``).

Options (group ``jhlab``): ``--lab`` (built-in name or lab file), ``--accel``,
``--lab-log-dir`` (where each lab run and each failed test's artefacts go), ``--keep-lab``
(leave the session lab running at the end: pytest prints how to reach it and waits,
because QEMU dies with the process that started it; Ctrl-C or ``jhlab down`` ends it),
``--hv-arch`` (what the guest's hypervisor daemon runs cells on for tests that do not
need KVM: ``oracle``, the default, or ``executor``).

Fixtures (each builds on the one before):

* ``lab`` (session): one booted lab shared by the whole session; a reset point is saved
  right after boot, and the lab is put back to it (``Lab.reset``, ~1 s with the reconnection) after every
  test that failed or is marked ``dirty`` (also at run time:
  ``request.node.add_marker("dirty")``). The session's JUnit report gets the lab's
  name, accelerator, kernel and QEMU version as properties.
* ``lab_factory`` (function): boots extra labs for tests that break theirs (panics,
  killed QEMU); every lab it made is stopped at teardown.
* ``root_shell``: commands and files in the lab's root cell (:class:`RootShell`).
* ``inmates`` (session): jhlab's demo inmates, built once (``DIR/<demo>.bin``).
* ``jailhouse_arch``: ``executor`` for tests marked ``kvm``, else ``--hv-arch``.
* ``jailhouse_test_device``: whether the guest's hypervisor and the oracle have
  ``CONFIG_TEST_DEVICE`` (False; a test sets it with
  ``@pytest.mark.parametrize("jailhouse_test_device", [True])``).
* ``jailhouse``: a :class:`~harness.checked.CheckedJailhouse` on the session lab (every
  step compared with the oracle); at teardown the cells left are destroyed and the
  hypervisor disabled, or, after a failure, the lab is reset.
* ``cell_factory``: creates (and loads, starts) cells through ``jailhouse`` and destroys
  the ones still there at teardown.
* ``oracle``: the ``jailhouse`` fixture's host-side :class:`~harness.checked.Oracle`.

Markers: ``lab`` (boots a real VM; ``lab("name")``: needs that lab, skipped on another),
``kvm`` (needs KVM inside the lab: skipped when the lab shows none; its cells run on the
executor), ``dirty`` (the test changes the lab: reset afterwards), ``slow``.
When a test that used a lab fails, its report gets the tails of both serial consoles
and the QMP event log, and the files are copied to ``<lab-log-dir>/failed/<test>/``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness.checked import CheckedJailhouse, Effect, Oracle, ValidationError
from harness.lab import Lab, LabState, state_dir
from harness.labfile import LabSpec
from harness.protocol import CommandResult

LOG = logging.getLogger(__name__)

LAB_KEY = pytest.StashKey[list[Lab]]()
REPORTS_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("jhlab", "jhlab lab machines")
    group.addoption("--lab", default="default", help="lab to boot (built-in name or TOML file)")
    group.addoption("--accel", default=None, choices=["auto", "kvm", "tcg"],
                    help="override the lab's accelerator")
    group.addoption("--lab-log-dir", default=None, type=Path,
                    help="folder for lab logs and failed tests' artefacts")
    group.addoption("--keep-lab", action="store_true",
                    help="leave the session lab running at the end (pytest waits; Ctrl-C ends it)")
    group.addoption("--hv-arch", default="oracle", choices=["oracle", "executor"],
                    help="the guest daemon's arch for tests not marked kvm (default: oracle)")


def pytest_configure(config: pytest.Config) -> None:
    for line in ("lab(name=None): boots a real lab VM (QEMU); with a name, needs that lab",
                 "kvm: needs KVM inside the lab VM (cells then run on the executor)",
                 "dirty: leaves the lab changed; it is reset by snapshot afterwards",
                 "slow: takes more than a few seconds"):
        config.addinivalue_line("markers", line)


def _lab_label(config: pytest.Config, lab: str | LabSpec | None = None) -> str:
    which = lab or config.getoption("--lab")
    return which.name if isinstance(which, LabSpec) else Path(str(which)).stem


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``lab("name")`` when the session's lab is another one."""
    label = _lab_label(config)
    for item in items:
        marker = item.get_closest_marker("lab")
        if marker is None:
            continue
        wanted = marker.args[0] if marker.args else marker.kwargs.get("name")
        if wanted and wanted != label:
            item.add_marker(pytest.mark.skip(reason=f"needs lab {wanted!r} (run with --lab {wanted})"))


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
    label = _lab_label(config, lab)
    folder = log_root(config) / f"lab-{label}{tag}-{time.strftime('%H%M%S')}"
    return Lab(which, accel=config.getoption("--accel"), log_dir=folder, quiet=True)


#: the session lab left running by ``--keep-lab``
KEPT_KEY = pytest.StashKey[Lab]()
#: set on a test whose lab must be reset afterwards (cleanup failed, fixture said so)
DIRTY_KEY = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest,
        record_testsuite_property: Callable[[str, object], None]) -> Iterator[Lab]:
    """The session's shared lab, booted once, with a reset point saved right after boot."""
    shared = _new_lab(request.config)
    keep = False
    try:
        summary = shared.up()
        for name, value in _provenance(shared).items():
            record_testsuite_property(name, value)
        shared.snapshot()
        LOG.info("lab %s up (%s, %.1f s), reset point saved", summary.name, summary.accel,
                 summary.boot_seconds)
        yield shared
        keep = bool(request.config.getoption("--keep-lab")) and shared.state is LabState.READY
    finally:
        if keep:
            request.config.stash[KEPT_KEY] = shared
        else:
            shared.down()


def _provenance(lab: Lab) -> dict[str, str]:
    """The JUnit properties of a session lab: name, accelerator, kernel, QEMU version."""
    summary = lab.summary
    assert summary is not None  # up
    props = {"lab": summary.name, "accel": f"{summary.accel} ({summary.accel_reason})",
             "kernel": summary.kernel, "kvm_in_lab": "yes" if summary.kvm_in_guest else "no"}
    try:
        version = lab.qmp.execute("query-version")
        qemu = version["qemu"]
        package = str(version.get("package", "")).strip()
        props["qemu"] = f"{qemu['major']}.{qemu['minor']}.{qemu['micro']} {package}".strip()
    except Exception as exc:  # provenance is best effort
        LOG.warning("QEMU version unknown: %s", exc)
        props["qemu"] = "unknown"
    return props


@pytest.fixture(autouse=True)
def _track_lab_use(request: pytest.FixtureRequest) -> Iterator[None]:
    """Remember which labs a test used (for its failure report); skip ``kvm`` tests on a
    lab without KVM inside; reset the lab after a test that failed or is dirty.

    Autouse, so it is set up before and torn down after the test's other fixtures: the
    reset comes after ``jailhouse``'s cleanup.
    """
    if "lab" not in request.fixturenames:
        yield
        return
    shared: Lab = request.getfixturevalue("lab")
    node = request.node
    node.stash.setdefault(LAB_KEY, []).append(shared)
    if node.get_closest_marker("kvm") is not None and not (shared.summary and shared.summary.kvm_in_guest):
        pytest.skip(f"lab {shared.spec.name} shows no KVM inside")
    yield
    failed = _failed(node)
    dirty = node.get_closest_marker("dirty") is not None or node.stash.get(DIRTY_KEY, False)
    if (failed or dirty) and shared.state is LabState.READY:
        seconds = shared.reset()
        LOG.info("lab %s reset after %s (%.1f s)", shared.spec.name,
                 "a failure" if failed else "a dirty test", seconds)


def _failed(node: pytest.Item) -> bool:
    """Whether the test's setup or call failed (so far)."""
    return any(report.failed for report in node.stash.get(REPORTS_KEY, {}).values())


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


# -- --keep-lab ------------------------------------------------------------------------


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
    run_dir = kept.machine.run_dir
    lines = [
        f"ssh:      ssh -p {summary.ssh_port} -i {kept.key_path} -o StrictHostKeyChecking=no "
        "root@127.0.0.1",
        f"QMP:      {run_dir / 'qmp.sock' if run_dir else '?'}",
        f"consoles: {kept.log_dir}/serial0.log (root, hypervisor), {kept.log_dir}/serial1.log (cells)",
        f"QEMU pid: {summary.pid}; logs in {summary.log_dir}",
    ]
    if _register_kept(kept):
        lines.append(f"jhlab:    jhlab shell {summary.name} | jhlab run {summary.name} -- CMD | "
                     f"jhlab down {summary.name}")
    lines.append("QEMU dies with this pytest process, so it waits now: Ctrl-C (or jhlab down) "
                 "ends the lab.")
    return lines


def _register_kept(kept: Lab) -> bool:
    """Register the kept lab the way ``jhlab up`` does (so ``jhlab shell``, ``run`` and
    ``down`` find it), unless a lab of that name is up already."""
    from harness.cli import read_state, state_file

    assert kept.summary is not None and kept.machine is not None  # up
    if read_state(kept.summary.name) is not None:
        return False
    state = {"supervisor": os.getpid(), "qemu": kept.machine.pid, "summary": kept.summary.as_dict(),
             "key": str(kept.key_path), "lab": kept.spec.source}
    state_file(kept.summary.name).write_text(json.dumps(state, indent=1))
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
        from harness.cli import read_state, state_file

        state = read_state(kept.spec.name)
        if state is not None and state.get("supervisor") == os.getpid():
            state_file(kept.spec.name).unlink(missing_ok=True)
        kept.down()


# -- the root shell, the checked driver, cells --------------------------------------------


class RootShell:
    """Commands and files in the lab's root cell (ssh, the root console as fallback).

    :param lab: the lab
    """

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def run(self, command: str, *, timeout: float = 120.0, check: bool = True,
            stdin: str | None = None) -> CommandResult:
        """Run ``command`` (``sh -c``); a non-zero status raises unless ``check=False``."""
        return self.lab.run(command, timeout=timeout, check=check, stdin=stdin)

    def __call__(self, command: str, *, timeout: float = 120.0) -> str:
        """Run ``command`` (checked) and return its stdout."""
        return self.run(command, timeout=timeout).stdout

    def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the root cell."""
        self.lab.ssh.put(data, path, mode)

    def python(self, script: str, *, timeout: float = 120.0) -> str:
        """Run a Python script with the guest's ``harness.hvmodel`` importable; its stdout."""
        return self.run("PYTHONPATH=/opt/jhlab/lib python3 -", stdin=script, timeout=timeout).stdout


@pytest.fixture
def root_shell(lab: Lab) -> RootShell:
    """The session lab's root cell."""
    return RootShell(lab)


@pytest.fixture(scope="session")
def inmates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """jhlab's demo inmates built once per session (``make -C images/inmates O=DIR``):
    ``DIR/<demo>.bin``."""
    from harness.errors import ImageError
    from harness.recipes import build_inmates

    build = tmp_path_factory.mktemp("inmates")
    try:
        build_inmates(build, timeout=600)
    except ImageError as exc:
        pytest.fail(str(exc))
    return build


@pytest.fixture
def jailhouse_arch(request: pytest.FixtureRequest) -> str:
    """What the guest's daemon runs cells on: the executor for ``kvm`` tests, else
    ``--hv-arch`` (override in a module to pin it)."""
    if request.node.get_closest_marker("kvm") is not None:
        return "executor"
    return str(request.config.getoption("--hv-arch"))


@pytest.fixture
def jailhouse_test_device() -> bool:
    """Whether the ``jailhouse`` fixture's hypervisor (guest daemon and oracle) is built
    with ``CONFIG_TEST_DEVICE``: no (as Jailhouse by default); parametrize it to turn it on."""
    return False


@pytest.fixture
def jailhouse(lab: Lab, jailhouse_arch: str, jailhouse_test_device: bool,
              request: pytest.FixtureRequest) -> Iterator[CheckedJailhouse]:
    """A checked driver on the session lab; at teardown the cells left are destroyed and
    the hypervisor disabled (after a failure the lab is reset instead)."""
    checked = CheckedJailhouse(lab, jailhouse_arch, test_device=jailhouse_test_device)
    yield checked
    node = request.node
    if _failed(node):
        node.stash[DIRTY_KEY] = True  # the reset puts everything back
        return
    problems = checked.cleanup()
    if problems:
        LOG.warning("%s: the lab is reset: %s", node.nodeid, "; ".join(problems))
        node.stash[DIRTY_KEY] = True


@pytest.fixture
def oracle(jailhouse: CheckedJailhouse) -> Oracle:
    """The host-side oracle the ``jailhouse`` fixture keeps in step with the guest."""
    return jailhouse.oracle


class CellFactory:
    """Creates cells through a checked driver; :meth:`destroy_all` destroys the ones left.

    :param jailhouse: the checked driver
    """

    def __init__(self, jailhouse: CheckedJailhouse) -> None:
        self.jailhouse = jailhouse
        self.made: list[str] = []

    def __call__(self, config: Any, image: Any = None, *, address: int = 0,
                 strings: Sequence[tuple[str, int]] = (), start: bool = False,
                 effects: Sequence[Effect] = ()) -> str:
        """Create a cell, load ``image`` and ``strings`` if given, start it if asked.

        :return: the cell's name
        """
        self.jailhouse.cell_create(config)
        driver = self.jailhouse.oracle.driver
        assert driver is not None  # a cell was created: enabled
        name = driver.cells[max(driver.cells)].name
        self.made.append(name)
        if image is not None or strings:
            self.jailhouse.cell_load(name, image, address, strings=strings)
        if start:
            self.jailhouse.cell_start(name, effects=effects)
        return name

    def destroy_all(self) -> None:
        """Destroy (checked) the cells made here that still exist; a cell that refuses
        its first shutdown is asked again."""
        for name in reversed(self.made):
            driver = self.jailhouse.oracle.driver
            if driver is None or not driver.enabled or all(c.name != name for c in driver.cells.values()):
                continue
            if self.jailhouse.cell_destroy(name, expect=None).errno == "EPERM":
                self.jailhouse.cell_destroy(name)
        self.made.clear()


@pytest.fixture
def cell_factory(jailhouse: CheckedJailhouse, request: pytest.FixtureRequest) -> Iterator[CellFactory]:
    """Make cells through the checked driver; the ones left are destroyed at teardown."""
    factory = CellFactory(jailhouse)
    yield factory
    if _failed(request.node):
        return  # the lab is reset
    try:
        factory.destroy_all()
    except ValidationError as exc:
        LOG.warning("cell_factory teardown: %s", exc)
        request.node.stash[DIRTY_KEY] = True
