"""The checked driver itself: :class:`CheckedJailhouse` (one guest round trip per step)
and :class:`Batch` (many steps in one)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from harness.checked.channel import GuestChannel
from harness.checked.compare import (
    EXECUTOR_EXCLUSIONS,
    KERNEL_LINE,
    Exclusion,
    ViewComparer,
    missing_lines,
    parse_stats,
    render_stats,
    stats_title,
)
from harness.checked.effects import Effect
from harness.checked.oracle import Oracle, tool_output
from harness.checked.report import Difference, GuestView, StepResult, ValidationError, check_expectation
from harness.console import ConsoleFailure
from harness.errors import ConsoleTimeout, JhlabError
from harness.guest.checked import Request
from harness.hvmodel.config import load_source
from harness.hvmodel.daemon import host_from_wire
from harness.hvmodel.driver import CellRef, Driver, HostInfo, Image
from harness.protocol import LabChannels

LOG = logging.getLogger(__name__)

#: where the guest tools live in the lab (``bin/jailhouse``, ``lib/harness/hvmodel``)
GUEST_TOOLS: Final = "/opt/jhlab"
#: the guest driver's run directory
GUEST_RUN_DIR: Final = "/run/jailhouse"
#: where configs and images are uploaded
GUEST_FILES: Final = "/tmp/jhlab-checked"
#: the executor's cgroup for the root cell's tasks (``arch/cpuset.py``)
ROOT_CPUSET: Final = "/sys/fs/cgroup/jailhouse-root"
#: how apic-demo-like inmates answer (the oracle plays them; the guest's oracle Arch too)
DEFAULT_RESPONDERS: Final[Mapping[str, str]] = {
    "apic-demo": "deny-first-shutdown",
    "apic-timer": "deny-first-shutdown",
}
#: seconds one guest command may take (enable under nested TCG is the slowest)
STEP_TIMEOUT: Final = 300.0
#: seconds the oracle's console lines may take to reach the serial port
CONSOLE_TIMEOUT: Final = 60.0
#: seconds the guest may take to show an inmate's declared effects
SETTLE_TIMEOUT: Final = 120.0
#: seconds between looks while the guest settles (a look costs ~0.1 s of a running guest program)
SETTLE_POLL: Final = 0.25
#: inmate output that ends :meth:`CheckedJailhouse.expect_inmate` as a failure
INMATE_FAILURES: Final = (r"FATAL:[^\r\n]*", r"\bFAILED\b[^\r\n]*", r"EXCEPTION on CPU[^\r\n]*")
#: the guest half (:mod:`harness.guest.checked`), run as ``python3 -m``
GUEST_PROGRAM: Final = "harness.guest.checked"


ConfigSource = bytes | str | os.PathLike[str] | Any
ImageSource = bytes | str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class Plan:
    """One ``jailhouse`` command and what it does to the oracle's driver."""

    step: str
    argv: list[str]
    kind: str
    operation: Callable[[Driver], object]
    expect: int | str | None
    images: tuple[Image, ...] = ()
    cell: CellRef | None = None


class Batch:
    """Steps collected and run in one guest program: for loops of many steps (stress),
    where one round trip per step would cost more than the steps.

    Differences from single steps: the commands run inside the guest program through the
    same ``harness.hvmodel.tool.main`` the ``jailhouse`` script calls (one interpreter
    instead of one per command; the daemon and its socket are the real ones); the guest
    is looked at after every command (``observe_each``, the default) or once at the end;
    loaded bytes are not read back (the cells run on meanwhile); effects are not
    supported; the console lines of all steps are checked at the end. The first step that
    differs raises :class:`ValidationError` naming its place in the batch.

    ::

        with jh.batch(observe_each=False) as batch:
            for _ in range(20):
                batch.cell_create(config)
                batch.cell_destroy("hello")
                batch.look()                 # compare the whole view here
        results = batch.results

    :param jailhouse: the checked driver
    :param observe_each: look after every command (else after :meth:`look` points, or
        once at the end when there are none)
    """

    def __init__(self, jailhouse: CheckedJailhouse, *, observe_each: bool = True) -> None:
        self.jailhouse = jailhouse
        self.observe_each = observe_each
        self.plans: list[Plan] = []
        self.looks: list[bool] = []
        self.results: list[StepResult] = []

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self.run()

    def run(self) -> list[StepResult]:
        """Run what was collected (done by the ``with`` block's end)."""
        plans, self.plans = self.plans, []
        looks, self.looks = self.looks, []
        self.results += self.jailhouse._run_batch(plans, looks)
        return self.results

    def look(self) -> None:
        """Compare the whole view after the step collected last."""
        if self.looks:
            self.looks[-1] = True

    def _add(self, plan: Plan) -> None:
        self.plans.append(plan)
        self.looks.append(self.observe_each)

    def enable(self, sysconfig: ConfigSource, *, expect: int | str | None = 0) -> None:
        self._add(self.jailhouse._plan_enable(sysconfig, expect))

    def disable(self, *, expect: int | str | None = 0) -> None:
        self._add(Plan("disable", ["disable"], "disable", lambda d: d.disable(), expect))

    def cell_create(self, config: ConfigSource, *, expect: int | str | None = 0) -> None:
        self._add(self.jailhouse._plan_create(config, expect))

    def cell_load(self, cell: CellRef, image: ImageSource | None = None, address: int = 0, *,
                  strings: Iterable[tuple[str, int]] = (), expect: int | str | None = 0) -> None:
        pairs = [(image, address)] if image is not None else []
        self._add(self.jailhouse._plan_load(cell, pairs, strings, expect))

    def cell_start(self, cell: CellRef, *, expect: int | str | None = 0) -> None:
        self._add(self.jailhouse._plan_cell("start", cell, expect))

    def cell_shutdown(self, cell: CellRef, *, expect: int | str | None = 0) -> None:
        self._add(self.jailhouse._plan_cell("shutdown", cell, expect))

    def cell_destroy(self, cell: CellRef, *, expect: int | str | None = 0) -> None:
        self._add(self.jailhouse._plan_cell("destroy", cell, expect))


class CheckedJailhouse:
    """The ``jailhouse`` command in a lab, checked step by step against the oracle.

    :param lab: the booted lab (any :class:`~harness.protocol.LabChannels`)
    :param arch: what the guest's daemon runs cells on: ``executor`` (KVM) or ``oracle``
    :param responders: how cells answer hypervisor messages, cell name -> policy
        (``approve``, ``deny-first-shutdown``, ``deny``, ``silent``); the host oracle uses
        them with either arch (it plays the inmates), the guest's daemon only with the
        oracle Arch (default: :data:`DEFAULT_RESPONDERS`)
    :param env: more environment for the guest's ``jailhouse`` commands (e.g.
        ``{"JHLAB_FAULT": "destroy-leaks-pages"}``; the daemon ``enable`` starts inherits it)
    :param daemon_args: more options for that daemon (``JAILHOUSE_DAEMON_ARGS``)
    :param tools: where the guest tools are (``bin/``, ``lib/``)
    :param run_dir: the guest driver's run directory
    :param files: where configs and images are uploaded in the guest
    :param pci_root: the guest's PCI device folder
    :param cpuset: the executor's root cgroup
    :param exclusions: sysfs files not compared (default: :data:`EXECUTOR_EXCLUSIONS` with
        the executor, none with the oracle Arch)
    :param kernel_console_level: the guest kernel's console log level while the checked
        driver runs (restored by :meth:`cleanup`; None: left alone). The hypervisor's
        debug UART is the root's console (qemu-x86: 0x3f8), and kernel messages printed
        there interleave with the hypervisor's lines character by character; the default
        1 lets only emergencies (panics) through.
    :param test_device: run the guest's hypervisor (daemon ``--test-device``) and the
        oracle with ``CONFIG_TEST_DEVICE``: cells with the ``TEST_DEVICE`` flag get the
        test page after their comm region (``mmio-access``)
    :raise JhlabError: when a driver daemon already runs in the guest
    """

    def __init__(self, lab: LabChannels, arch: str = "executor", *,
                 responders: Mapping[str, str] | None = None,
                 env: Mapping[str, str] | None = None, daemon_args: Sequence[str] = (),
                 tools: str = GUEST_TOOLS, run_dir: str = GUEST_RUN_DIR,
                 files: str = GUEST_FILES, pci_root: str = "/sys/bus/pci/devices",
                 cpuset: str = ROOT_CPUSET,
                 exclusions: Sequence[Exclusion] | None = None,
                 kernel_console_level: int | None = 1, test_device: bool = False) -> None:
        if arch not in ("executor", "oracle"):
            raise ValueError(f"arch {arch!r}: expected executor or oracle")
        self.lab = lab
        self.arch = arch
        self.responders = dict(DEFAULT_RESPONDERS if responders is None else responders)
        self.tools = tools
        self.run_dir = run_dir
        self.files = files
        self.pci_root = pci_root
        self.cpuset_path = cpuset
        self.exclusions = tuple((EXECUTOR_EXCLUSIONS if arch == "executor" else ())
                                if exclusions is None else exclusions)
        args = list(daemon_args)
        if arch == "oracle":
            args += [f"--responder={name}={policy}" for name, policy in sorted(self.responders.items())]
        if test_device:
            args.append("--test-device")
        self.env = {"JAILHOUSE_ARCH": arch, "JAILHOUSE_DAEMON_ARGS": shlex.join(args),
                    **dict(env or {})}
        self.oracle = Oracle(self.responders, test_device=test_device)
        self.steps: list[StepResult] = []
        #: set when :meth:`cleanup` could not leave the lab as it found it
        self.dirty = False
        self._uploaded: dict[str, str] = {}
        #: serial 0 transcript size when the last step began
        self._last_mark = 0
        #: the guest program, kept running between steps
        self.channel = GuestChannel(lab, f"{self._prefix()} python3 -m {GUEST_PROGRAM}")
        level = None if kernel_console_level is None else str(kernel_console_level)
        data = self._run_guest([], printk=level)
        #: the kernel console level before (restored at cleanup)
        self.saved_console_level: str | None = data["printk"]
        baseline = GuestView.from_wire(data["view"])
        if baseline.daemon is not None:
            self.channel.close()
            raise JhlabError(f"a jailhouse daemon (pid {baseline.daemon.get('pid')}) already runs "
                             f"in the lab; the checked driver needs a disabled hypervisor")
        self.baseline = baseline
        self.comparer = ViewComparer(arch, baseline, self.exclusions, cpuset)
        self.oracle.module_loaded = "enabled" in baseline.sysfs
        self.oracle.refresh()

    def __repr__(self) -> str:
        state = "enabled" if self.oracle.enabled else "disabled"
        return f"CheckedJailhouse({self.arch}, {state}, {len(self.steps)} steps)"

    # -- the guest ----------------------------------------------------------------------

    def _prefix(self) -> str:
        return (f"PATH={shlex.quote(self.tools)}/bin:$PATH "
                f"PYTHONPATH={shlex.quote(self.tools)}/lib")

    def _run_guest(self, commands: Sequence[Sequence[str]], *, looks: Sequence[bool] = (),
                   final_look: bool = True, in_process: bool = False, resources: bool = False,
                   printk: str | None = None, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        """Run ``jailhouse`` commands in the guest, looking at it after the commands
        ``looks`` flags and at the end (``final_look``); the guest program's reply
        (:class:`harness.guest.checked.Reply`).

        :param printk: first set the kernel's console log level (``/proc/sys/kernel/printk``)
        """
        flags = list(looks) or [False] * len(commands)
        request: Request = {
            "run_dir": self.run_dir, "env": self.env, "timeout": timeout, "in_process": in_process,
            "commands": [{"argv": list(c), "look": flag} for c, flag in zip(commands, flags, strict=True)],
            "looks": final_look or any(flags), "final_look": final_look, "resources": resources,
            "cpuset": self.cpuset_path, "pci": self.pci_root, "printk": printk,
        }
        return self.channel.request(request, timeout * max(1, len(commands)) + 60)

    def _guest(self, commands: Sequence[Sequence[str]], *, observe: bool = True,
               resources: bool = False, timeout: float = STEP_TIMEOUT
               ) -> tuple[list[dict[str, Any]], GuestView | None]:
        """Run ``jailhouse`` commands in the guest, then (optionally) look at it."""
        data = self._run_guest(commands, final_look=observe, resources=resources, timeout=timeout)
        view = GuestView.from_wire(data["view"]) if observe else None
        return list(data["commands"]), view

    def upload(self, data: bytes, name: str) -> str:
        """Put ``data`` into the guest (once per content); return its path there."""
        digest = hashlib.sha256(data).hexdigest()[:12]
        path = self._uploaded.get(digest)
        if path is not None:
            return path
        if not self._uploaded:
            self.lab.run(f"mkdir -p {shlex.quote(self.files)}", check=True, timeout=60)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "file"
        path = f"{self.files}/{digest}-{safe}"
        self.lab.put(data, path)
        self._uploaded[digest] = path
        return path

    @staticmethod
    def _config(source: ConfigSource) -> tuple[bytes, str]:
        """A config as bytes and a short name."""
        if isinstance(source, bytes):
            return source, "config.cell"
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.suffix == ".toml":
                return load_source(path).to_bytes(), path.stem + ".cell"
            return path.read_bytes(), path.name
        to_bytes = getattr(source, "to_bytes", None)
        if callable(to_bytes):
            name = getattr(source, "name", "config")
            return bytes(to_bytes()), f"{name}.cell"
        raise TypeError(f"not a config: {source!r}")

    @staticmethod
    def _image(source: ImageSource) -> tuple[bytes, str]:
        if isinstance(source, bytes):
            return source, "image.bin"
        path = Path(source)
        return path.read_bytes(), path.name

    # -- the console ----------------------------------------------------------------------

    def _console_mark(self) -> int:
        return self.lab.console.mark()

    def _console_since(self, mark: int) -> str:
        """The root console since ``mark``, without the kernel's log lines."""
        return KERNEL_LINE.sub("", self.lab.console.since(mark))

    def _check_console(self, expected: str, mark: int, timeout: float) -> Difference | None:
        """Every line of ``expected`` must appear, in order, in the console since ``mark``."""
        wanted = [line for line in expected.replace("\r", "").split("\n") if line.strip()]
        if not wanted:
            return None
        deadline = time.monotonic() + timeout
        while True:
            seen = self._console_since(mark)
            missing = missing_lines(wanted, seen.split("\n"))
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not missing:
            return None
        return Difference(
            "hypervisor console", "\n".join(wanted) + "\n", seen,
            note=f"{len(missing)} line(s) of the oracle never reached the guest's console "
                 f"within {timeout:.0f} s, first: {missing[0]!r}")

    def _check_loaded(self, cell: CellRef, images: Sequence[Image]) -> list[Difference]:
        """After a load: physical memory over QMP must hold what the oracle wrote there
        (later images win where they overlap, e.g. a ``-s`` string over the image's
        command-line page)."""
        driver, arch = self.oracle.driver, self.oracle.arch
        if self.arch != "executor" or driver is None or arch is None:
            return []
        config = driver.find_cell(cell).config
        diffs = []
        for image in images:
            region = next((m for m in config.memory_regions
                           if m.virt_start <= image.target < m.virt_start + m.size), None)
            if region is None:
                continue
            phys = region.phys_start + (image.target - region.virt_start)
            expected = arch.phys_read(phys, len(image.data))
            data = self.lab.qmp.read_phys(phys, len(image.data))
            if data != expected:
                first = next(i for i, (a, b) in enumerate(zip(data, expected, strict=True)) if a != b)
                diffs.append(Difference(
                    f"loaded bytes at {phys:#x} (QMP)", expected[first:first + 32].hex() + "\n",
                    data[first:first + 32].hex() + "\n",
                    note=f"{len(image.data)} bytes, first difference at offset {first:#x}"))
        return diffs

    # -- steps --------------------------------------------------------------------------

    def _outcome(self, plan: Plan, done: Mapping[str, Any], host: HostInfo) -> tuple[int, list[Difference]]:
        """Apply ``plan`` to the oracle; compare the command's exit status and output."""
        code, open_errno = self.oracle.run(plan.kind, plan.operation, host)
        predicted = tool_output(plan.kind, code, open_errno)
        command = "jailhouse " + " ".join(plan.argv)
        diffs = [
            Difference(f"{what} of {command}", want, got)
            for what, want, got in (("exit status", f"{predicted[0]}\n", f"{done['status']}\n"),
                                    ("stdout", predicted[1], str(done["stdout"])),
                                    ("stderr", predicted[2], str(done["stderr"])))
            if want != got
        ]
        return code, diffs

    def _host(self, plan: Plan, view: GuestView | None) -> HostInfo:
        """The machine an ``enable`` that started a daemon runs on (as the daemon says)."""
        if plan.kind == "enable" and view is not None and view.daemon is not None \
                and isinstance(view.daemon.get("host"), dict):
            return host_from_wire(view.daemon["host"])
        return self.oracle.host

    def _step(self, plan: Plan, *, effects: Sequence[Effect] = (),
              settle_timeout: float = SETTLE_TIMEOUT) -> StepResult:
        mark = self._last_mark = self._console_mark()
        oracle_mark = len(self.oracle.console)
        started = time.monotonic()
        commands, view = self._guest([plan.argv])
        assert view is not None  # observe=True
        guest_done = time.monotonic()
        done = commands[0]
        code, diffs = self._outcome(plan, done, self._host(plan, view))
        for effect in effects:
            effect.apply(self.oracle)
        view_diffs = self.comparer.compare(view, self.oracle)
        if view_diffs and effects:
            view, view_diffs = self._settle(settle_timeout)
        diffs += view_diffs
        if code == 0 and plan.images and plan.cell is not None:
            diffs += self._check_loaded(plan.cell, plan.images)
        console_diff = self._check_console(self.oracle.console[oracle_mark:], mark,
                                           CONSOLE_TIMEOUT if not diffs else 2.0)
        if console_diff is not None:
            diffs.append(console_diff)
        result = StepResult(plan.step, int(done["status"]), str(done["stdout"]), str(done["stderr"]),
                            code, view)
        self.steps.append(result)
        LOG.info("checked %s: %s (command %.1f s, guest round trip %.1f s, step %.1f s)", plan.step,
                 result.errno, done.get("seconds", 0.0), guest_done - started, time.monotonic() - started)
        if diffs:
            raise ValidationError(plan.step, diffs)
        check_expectation(plan.step, plan.expect, code)
        return result

    def _settle(self, timeout: float) -> tuple[GuestView, list[Difference]]:
        """Look until the guest agrees with the oracle (an inmate's effects take time)."""
        deadline = time.monotonic() + timeout
        while True:
            view = self._guest([])[1]
            assert view is not None  # observe=True
            diffs = self.comparer.compare(view, self.oracle)
            if not diffs or time.monotonic() > deadline:
                return view, diffs
            time.sleep(SETTLE_POLL)

    def _run_batch(self, plans: Sequence[Plan], looks: Sequence[bool]) -> list[StepResult]:
        """Run ``plans`` in one guest program (the tool in-process, see :class:`Batch`),
        looking at the guest after the steps ``looks`` flags (else once at the end)."""
        if not plans:
            return []
        mark = self._last_mark = self._console_mark()
        oracle_mark = len(self.oracle.console)
        data = self._run_guest([plan.argv for plan in plans], looks=looks, final_look=not any(looks),
                               in_process=True)
        results: list[StepResult] = []
        final = GuestView.from_wire(data["view"]) if data.get("view") else None
        for index, (plan, done) in enumerate(zip(plans, data["commands"], strict=True)):
            view = GuestView.from_wire(done["view"]) if done.get("view") else None
            step = f"{plan.step} (batch step {index + 1} of {len(plans)})"
            code, diffs = self._outcome(plan, done, self._host(plan, view or final))
            if view is not None:
                diffs += self.comparer.compare(view, self.oracle)
            if diffs:
                raise ValidationError(step, diffs)
            check_expectation(step, plan.expect, code)
            result = StepResult(step, int(done["status"]), str(done["stdout"]), str(done["stderr"]),
                                code, view or final)  # type: ignore[arg-type]
            results.append(result)
        self.steps += results
        if final is not None:
            diffs = self.comparer.compare(final, self.oracle)
            if diffs:
                raise ValidationError(f"after a batch of {len(plans)} steps", diffs)
        console_diff = self._check_console(self.oracle.console[oracle_mark:], mark, CONSOLE_TIMEOUT)
        if console_diff is not None:
            raise ValidationError(f"a batch of {len(plans)} steps", [console_diff])
        return results

    def batch(self, *, observe_each: bool = True) -> Batch:
        """Collect steps and run them in one go (see :class:`Batch`)."""
        return Batch(self, observe_each=observe_each)

    # -- the commands ---------------------------------------------------------------------

    def _plan_enable(self, sysconfig: ConfigSource, expect: int | str | None) -> Plan:
        data, name = self._config(sysconfig)
        return Plan(f"enable {name}", ["enable", self.upload(data, name)], "enable",
                     lambda d: d.enable(data), expect)

    def _plan_create(self, config: ConfigSource, expect: int | str | None) -> Plan:
        data, name = self._config(config)
        return Plan(f"cell create {name}", ["cell", "create", self.upload(data, name)], "create",
                     lambda d: d.cell_create(data), expect)

    def _plan_load(self, cell: CellRef, pairs: Sequence[tuple[ImageSource, int]],
                   strings: Iterable[tuple[str, int]], expect: int | str | None) -> Plan:
        argv = ["cell", "load", *_cell_args(cell)]
        loaded: list[Image] = []
        for source, target in pairs:
            data, name = self._image(source)
            argv += [self.upload(data, name), "-a", hex(target)]
            loaded.append(Image(data, target))
        for text, target in strings:
            argv += ["-s", text, "-a", hex(target)]
            loaded.append(Image(os.fsencode(text) + b"\0", target))
        wire = tuple(img for img in loaded if img.data)
        ref = _driver_ref(cell)
        return Plan(f"cell load {cell}", argv, "load", lambda d: d.cell_load(ref, wire), expect,
                     images=wire, cell=ref)

    def _plan_cell(self, verb: str, cell: CellRef, expect: int | str | None) -> Plan:
        ref = _driver_ref(cell)
        operation: Callable[[Driver], object] = {
            "start": lambda d: d.cell_start(ref),
            "shutdown": lambda d: d.cell_shutdown(ref),
            "destroy": lambda d: d.cell_destroy(ref),
        }[verb]
        return Plan(f"cell {verb} {cell}", ["cell", verb, *_cell_args(cell)], verb, operation, expect)

    def enable(self, sysconfig: ConfigSource, *, expect: int | str | None = 0) -> StepResult:
        """``jailhouse enable SYSCONFIG`` (a ``.cell`` file, a TOML source, bytes or a
        config object).

        :param expect: what the step is meant to give: 0 (success, the default), an errno
            (``"EEXIST"`` or ``errno.EEXIST``), or None (anything the oracle agrees with)
        :raise ValidationError: when the guest differs from the oracle
        :raise ExpectationError: when both agree on something else than ``expect``
        """
        return self._step(self._plan_enable(sysconfig, expect))

    def disable(self, *, expect: int | str | None = 0) -> StepResult:
        """``jailhouse disable``."""
        return self._step(Plan("disable", ["disable"], "disable", lambda d: d.disable(), expect))

    def cell_create(self, config: ConfigSource, *, expect: int | str | None = 0) -> StepResult:
        """``jailhouse cell create CELLCONFIG``."""
        return self._step(self._plan_create(config, expect))

    def cell_load(self, cell: CellRef, image: ImageSource | None = None, address: int = 0, *,
                  strings: Iterable[tuple[str, int]] = (),
                  images: Iterable[tuple[ImageSource, int]] = (),
                  expect: int | str | None = 0) -> StepResult:
        """``jailhouse cell load CELL IMAGE -a ADDRESS [IMAGE -a ADDR]... [-s STRING -a ADDR]...``.

        :param image: the main image (path or bytes), loaded at ``address``
        :param strings: ``(text, address)`` pairs, passed with ``-s`` (the NUL is added)
        :param images: further ``(image, address)`` pairs
        """
        pairs = ([(image, address)] if image is not None else []) + list(images)
        return self._step(self._plan_load(cell, pairs, strings, expect))

    def cell_start(self, cell: CellRef, *, effects: Sequence[Effect] = (),
                   settle_timeout: float = SETTLE_TIMEOUT,
                   expect: int | str | None = 0) -> StepResult:
        """``jailhouse cell start CELL``; ``effects``: what the inmate does on its own once
        started (the guest is then given ``settle_timeout`` seconds to show it)."""
        return self._step(self._plan_cell("start", cell, expect), effects=effects,
                          settle_timeout=settle_timeout)

    def cell_shutdown(self, cell: CellRef, *, expect: int | str | None = 0) -> StepResult:
        """``jailhouse cell shutdown CELL``."""
        return self._step(self._plan_cell("shutdown", cell, expect))

    def cell_destroy(self, cell: CellRef, *, expect: int | str | None = 0) -> StepResult:
        """``jailhouse cell destroy CELL``."""
        return self._step(self._plan_cell("destroy", cell, expect))

    def settle(self, *effects: Effect, timeout: float = SETTLE_TIMEOUT) -> GuestView:
        """An inmate did something on its own since the last step: apply ``effects`` to
        the oracle and wait until the guest shows the same (console lines included).

        :raise ValidationError: when it does not within ``timeout`` seconds
        """
        oracle_mark = len(self.oracle.console)
        for effect in effects:
            effect.apply(self.oracle)
        view, diffs = self._settle(timeout)
        # The inmate may have acted before this call: search the console from the start
        # of the last step.
        console_diff = self._check_console(self.oracle.console[oracle_mark:], self._last_mark,
                                           CONSOLE_TIMEOUT)
        if console_diff is not None:
            diffs.append(console_diff)
        if diffs:
            raise ValidationError("settle " + ", ".join(map(repr, effects)), diffs)
        return view

    def stats(self, cell: CellRef) -> dict[str, int]:
        """``jailhouse cell stats CELL -n -i 0``: the counters; checked against the oracle
        (the values unless excluded, see :data:`EXECUTOR_EXCLUSIONS`)."""
        argv = ["cell", "stats", *_cell_args(cell), "-n", "-i", "0"]
        commands, _ = self._guest([argv], observe=False)
        done = commands[0]
        self.oracle.refresh()  # the stats tool refreshes once, then reads
        step = f"cell stats {cell}"
        driver = self.oracle.driver
        diffs: list[Difference] = []
        if driver is None or not driver.enabled:
            raise JhlabError(f"{step}: the hypervisor is not enabled")
        target = driver.find_cell(_driver_ref(cell))
        values = {path.rsplit("/", 1)[1]: int(text)
                  for path, text in self.oracle.tree.items()
                  if path.startswith(f"cells/{target.id}/statistics/") and path.count("/") == 3}
        excluded = self.comparer.excluded(f"cells/{target.id}/statistics/vmexits_total")
        got = parse_stats(done["stdout"])
        if excluded:
            # A real inmate's counts: compare the layout and the counter names only.
            expected_text = render_stats(target.name, dict.fromkeys(values, 0))
            actual_text = render_stats(stats_title(done["stdout"]) or "?", dict.fromkeys(got, 0))
        else:
            expected_text = render_stats(target.name, values)
            actual_text = done["stdout"]
        if done["status"] != 0 or done["stderr"] or expected_text != actual_text:
            diffs.append(Difference(
                f"jailhouse {' '.join(argv)}", expected_text, actual_text + done["stderr"],
                note="counter names only (values excluded: a real inmate's)" if excluded else ""))
        if diffs:
            raise ValidationError(step, diffs)
        return parse_stats(done["stdout"])

    def look(self, *, resources: bool = False) -> GuestView:
        """Look at the guest and compare it with the oracle (no command).

        :param resources: also read the daemon's fds, threads and RSS from ``/proc``
        """
        view = self._guest([], resources=resources)[1]
        assert view is not None
        diffs = self.comparer.compare(view, self.oracle)
        if diffs:
            raise ValidationError("look", diffs)
        return view

    def daemon_resources(self, settle_timeout: float = SETTLE_TIMEOUT) -> dict[str, int]:
        """The guest daemon's open fds, threads and RSS (KiB), from ``/proc/<pid>``, once
        no vCPU thread of a destroyed cell is still on its way out (the executor's
        ``zombies``: a destroy that met a thread inside the model leaves it to a reaper,
        which ends with it), at most ``settle_timeout`` seconds later."""
        deadline = time.monotonic() + settle_timeout
        while True:
            view = self.look(resources=True)
            if view.resources is None or view.daemon is None:
                raise JhlabError("no driver daemon runs in the guest")
            executor = view.daemon.get("executor") or {}
            if not executor.get("zombies") or time.monotonic() > deadline:
                return dict(view.resources)
            time.sleep(0.5)

    # -- inmate output --------------------------------------------------------------------

    def expect_inmate(self, pattern: str, timeout: float = 60.0, *,
                      failures: Sequence[str] = INMATE_FAILURES, fatal_ok: bool = False) -> re.Match[str]:
        """Wait for ``pattern`` on the cell console (serial 1); fail at once on one of
        ``failures`` there, or on a new ``FATAL:`` line of the hypervisor (serial 0,
        unless ``fatal_ok``).

        :raise ConsoleTimeout: when it does not appear within ``timeout`` seconds
        :raise ConsoleFailure: when a failure pattern appears first
        """
        mark = self._console_mark()
        deadline = time.monotonic() + timeout
        console = self.lab.cell_console
        while True:
            remaining = deadline - time.monotonic()
            try:
                return console.expect(pattern, timeout=max(0.1, min(1.0, remaining)), failures=failures)
            except ConsoleTimeout:
                if remaining <= 1.0:
                    raise ConsoleTimeout(console.name, pattern, timeout, console.tail()) from None
            if not fatal_ok:
                fatal = re.search(r"FATAL:[^\n]*", self._console_since(mark))
                if fatal:
                    raise ConsoleFailure("serial0 (hypervisor console)", fatal.group(0),
                                         self._console_since(mark)[-2000:])

    # -- cleanup --------------------------------------------------------------------------

    def cleanup(self, timeout: float = STEP_TIMEOUT) -> list[str]:
        """Leave the lab as found: destroy the cells left (a cell that refuses is asked
        twice), disable, make sure the daemon ended, remove the uploaded files. Unchecked:
        a test that failed may have left anything.

        :return: what could not be cleaned (empty: clean); :attr:`dirty` is set then
        """
        problems: list[str] = []
        cells = shlex.quote(f"{self.run_dir}/sys/devices/jailhouse/cells")
        socket = shlex.quote(f"{self.run_dir}/driver.sock")
        try:
            listed = self.lab.run(f"ls {cells} 2>/dev/null; [ -e {socket} ] && echo driver.sock; true",
                                  timeout=60, check=True).stdout.split()
            left = sorted(int(name) for name in listed if name.isdigit() and name != "0")
            if "driver.sock" in listed:
                commands = [["cell", "destroy", str(c)] for c in left for _ in range(2)]
                self._guest([*commands, ["disable"]], observe=False, timeout=timeout)
            view = self._guest([])[1]
            assert view is not None  # observe=True
            if view.daemon is not None:
                pid = int(view.daemon["pid"])
                self.lab.run(f"kill -TERM {pid}; for i in $(seq 100); do [ -d /proc/{pid} ] || break; "
                             "sleep 0.1; done", timeout=60)
                problems.append(f"the daemon (pid {pid}) did not disable and had to be killed")
            if view.cpuset is not None and view.cpuset != self.baseline.cpus_allowed:
                problems.append(f"the root cpuset is {view.cpuset}, not {self.baseline.cpus_allowed}")
            restore = []  # one command: each costs a round trip
            if self._uploaded:
                restore.append(f"rm -rf {shlex.quote(self.files)}")
            if self.saved_console_level is not None:
                restore.append(f"echo {shlex.quote(self.saved_console_level)} > /proc/sys/kernel/printk")
            if restore:
                self.lab.run("; ".join(restore), timeout=60, check=True)
                self._uploaded.clear()
        except (JhlabError, ValueError, KeyError) as exc:
            problems.append(f"cleanup failed: {exc}")
        self.close()
        self.oracle._end()
        self.dirty = bool(problems)
        return problems

    def close(self) -> None:
        """End the guest program (:meth:`cleanup` does; after a failure, call this
        instead when the lab is not reset)."""
        self.channel.close()


def _cell_args(cell: CellRef) -> list[str]:
    """The tool's cell argument: an id, or ``--name NAME``."""
    return [str(cell)] if isinstance(cell, int) else ["--name", cell]


def _driver_ref(cell: CellRef) -> CellRef:
    """What the daemon looks the cell up by (the tool truncates names to 31 bytes)."""
    if isinstance(cell, int):
        return cell
    return os.fsdecode(os.fsencode(cell)[:31])
