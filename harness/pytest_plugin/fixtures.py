"""The plugin's fixtures (each builds on the one before): the session ``lab``, extra labs
from ``lab_factory``, the ``root_shell``, the ``inmates``, the checked ``jailhouse`` driver,
its ``oracle`` and the ``cell_factory``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness.checked import CheckedJailhouse, Effect, Oracle, ValidationError
from harness.lab import Lab, LabState
from harness.labfile import LabSpec
from harness.protocol import CommandResult, LabChannels
from harness.pytest_plugin.common import (
    DIRTY_KEY,
    KEPT_KEY,
    LAB_KEY,
    failed,
    lab_doing,
    lab_down,
    new_lab,
    register_lab,
)
from harness.pytest_plugin.reporting import mark_lab

LOG = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest,
        record_testsuite_property: Callable[[str, object], None]) -> Iterator[Lab]:
    """The session's shared lab, booted once, with a reset point saved right after boot;
    with ``--lab-attach NAME``, the running lab NAME instead (not reset, left up)."""
    attach = request.config.getoption("--lab-attach")
    if attach:
        with Lab.attach(attach) as attached:
            for name, value in _provenance(attached).items():
                record_testsuite_property(name, value)
            yield attached
        return
    config = request.config
    shared = new_lab(config)
    keep = False
    try:
        lab_doing(config, shared, "booting")
        summary = shared.up()
        register_lab(shared)
        for name, value in _provenance(shared).items():
            record_testsuite_property(name, value)
        lab_doing(config, shared, "saving its reset point")
        shared.snapshot()
        lab_doing(config, shared, "idle")
        LOG.info("lab %s up (%s, %.1f s), reset point saved", summary.name, summary.accel,
                 summary.boot_seconds)
        yield shared
        keep = bool(config.getoption("--keep-lab")) and shared.state is LabState.READY
    finally:
        if keep:
            config.stash[KEPT_KEY] = shared
            lab_doing(config, shared, "kept up (--keep-lab)")
        else:
            lab_doing(config, shared, "going down")
            lab_down(config, shared)


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
    lab_doing(request.config, shared, f"running {node.nodeid}")
    mark_lab(node, shared)
    yield
    broke = failed(node)
    dirty = node.get_closest_marker("dirty") is not None or node.stash.get(DIRTY_KEY, False)
    if (broke or dirty) and shared.attached:
        LOG.warning("%s left lab %s changed; an attached lab is not reset (its owner may reset or "
                    "restart it)", node.nodeid, shared.spec.name)
    elif (broke or dirty) and shared.state is LabState.READY:
        lab_doing(request.config, shared, f"resetting after {node.nodeid}")
        seconds = shared.reset()  # which lists the lab's new QEMU and ssh port
        LOG.info("lab %s reset after %s (%.1f s)", shared.spec.name,
                 "a failure" if broke else "a dirty test", seconds)
    lab_doing(request.config, shared, "idle")


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Lab]]:
    """Boot extra labs (owned by the test, stopped at teardown)."""
    made: list[Lab] = []

    def make(lab: str | LabSpec | None = None, *, up: bool = True, **kwargs: Any) -> Lab:
        new = new_lab(request.config, lab, tag=f"-extra{len(made)}")
        for key, value in kwargs.items():
            setattr(new, key, value)
        made.append(new)
        request.node.stash.setdefault(LAB_KEY, []).append(new)
        mark_lab(request.node, new)
        if up:
            lab_doing(request.config, new, f"booting for {request.node.nodeid}")
            new.up()
            register_lab(new)
        lab_doing(request.config, new, f"running {request.node.nodeid}")
        return new

    yield make
    for extra in made:
        lab_down(request.config, extra)


class RootShell:
    """Commands and files in the lab's root cell (a lab runs them over ssh, with the root
    console as fallback).

    :param lab: the lab (any :class:`~harness.protocol.LabChannels`)
    """

    def __init__(self, lab: LabChannels) -> None:
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
        self.lab.put(data, path, mode)

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
    ``--hv-arch`` (default: the executor; parametrize or override it to pin it)."""
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
    the hypervisor disabled (after a failure the lab is reset instead). Cells on the
    executor need KVM inside the lab: without, the test is skipped."""
    if jailhouse_arch == "executor" and not (lab.summary and lab.summary.kvm_in_guest):
        pytest.skip(f"lab {lab.spec.name} shows no KVM inside, so cells cannot run on the "
                    "executor (--hv-arch oracle runs the bookkeeping-only variant)")
    checked = CheckedJailhouse(lab, jailhouse_arch, test_device=jailhouse_test_device)
    yield checked
    node = request.node
    if failed(node):
        node.stash[DIRTY_KEY] = True  # the reset puts everything back
        checked.close()
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
    if failed(request.node):
        return  # the lab is reset
    try:
        factory.destroy_all()
    except ValidationError as exc:
        LOG.warning("cell_factory teardown: %s", exc)
        request.node.stash[DIRTY_KEY] = True
