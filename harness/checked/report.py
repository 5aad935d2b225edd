"""What a checked step reports: its result and what the guest showed, or the
differences from the oracle."""

from __future__ import annotations

import dataclasses
import difflib
import errno as errno_mod
from collections.abc import Mapping, Sequence
from typing import Any

from harness.errors import JhlabError


@dataclasses.dataclass(frozen=True)
class Difference:
    """One thing the guest shows differently from the oracle.

    :param what: what was compared (``exit status``, ``sysfs tree``, ``cell list`` ...)
    :param expected: the oracle's text
    :param actual: the guest's text
    :param note: one line of explanation (optional)
    """

    what: str
    expected: str
    actual: str
    note: str = ""

    def diff(self) -> str:
        """A unified diff, oracle against guest."""
        old = self.expected.splitlines(keepends=True) or ["(nothing)\n"]
        new = self.actual.splitlines(keepends=True) or ["(nothing)\n"]
        old = [line if line.endswith("\n") else line + "\n" for line in old]
        new = [line if line.endswith("\n") else line + "\n" for line in new]
        text = "".join(difflib.unified_diff(old, new, f"oracle: {self.what}", f"guest: {self.what}", n=2))
        return (f"# {self.note}\n" if self.note else "") + text


class ValidationError(JhlabError):
    """What the guests show differs from what the oracle predicts.

    :param step: the step (``cell create apic-timer.cell``)
    :param differences: every difference found
    """

    def __init__(self, step: str, differences: Sequence[Difference]) -> None:
        self.step = step
        self.differences = tuple(differences)
        super().__init__(str(self))

    def __str__(self) -> str:
        names = ", ".join(d.what for d in self.differences)
        body = "\n".join(d.diff() for d in self.differences)
        return f"{self.step}: the guest differs from the oracle in {names}\n{body}"


class ExpectationError(JhlabError):
    """Guest and oracle agree, but not with what the test meant to provoke.

    :param step: the step
    :param expected: what the test expected (``EEXIST``, ``success``)
    :param got: what happened
    """

    def __init__(self, step: str, expected: str, got: str) -> None:
        self.step = step
        self.expected = expected
        self.got = got
        super().__init__(f"{step}: expected {expected}, guest and oracle both gave {got}")


def errno_name(code: int) -> str:
    return "success" if code == 0 else errno_mod.errorcode.get(abs(code), f"errno {abs(code)}")


@dataclasses.dataclass(frozen=True)
class GuestView:
    """Everything one look at the root cell gathers (see the module docstring)."""

    #: ``jailhouse cell list``: stdout (stderr appended when not empty)
    cell_list: str
    #: the sysfs tree, ``{relative path: text}``
    sysfs: dict[str, str]
    #: ``Cpus_allowed_list`` of a fresh root process
    cpus_allowed: str
    #: ``cpuset.cpus`` of the executor's root group, None when there is none
    cpuset: str | None
    #: PCI functions and their drivers (None: unbound)
    pci: dict[str, str | None]
    #: the daemon's ``state`` reply, None when no daemon runs
    daemon: dict[str, Any] | None
    #: the daemon's process figures (``fds``, ``threads``, ``rss_kib``), when asked for
    resources: dict[str, int] | None

    @classmethod
    def from_wire(cls, value: Mapping[str, Any]) -> GuestView:
        """Parse a look of the guest program (:mod:`harness.guest.checked`)."""
        return cls(
            cell_list=str(value["cell_list"]),
            sysfs={str(k): str(v) for k, v in value["sysfs"].items()},
            cpus_allowed=str(value["cpus_allowed"]),
            cpuset=value.get("cpuset"),
            pci={str(k): v for k, v in value["pci"].items()},
            daemon=value.get("daemon"),
            resources=value.get("resources"),
        )


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One checked step.

    :param step: its description
    :param status: the command's exit status (guest and oracle agree)
    :param stdout: its output
    :param stderr: its error output
    :param code: the ioctl's result the oracle computed (0 or -errno; 0 without ioctl)
    :param view: what the guest showed afterwards
    """

    step: str
    status: int
    stdout: str
    stderr: str
    code: int
    view: GuestView

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def errno(self) -> str:
        """``success`` or the errno name (``EEXIST``)."""
        return errno_name(self.code)


def check_expectation(step: str, expect: int | str | None, code: int) -> None:
    """Raise :class:`ExpectationError` unless ``code`` is what ``expect`` asks for (0 or
    ``"success"``, an errno number or name; None accepts anything)."""
    if expect is None:
        return
    if isinstance(expect, str):
        wanted = 0 if expect in ("0", "success") else int(getattr(errno_mod, expect))
    else:
        wanted = abs(expect)
    if abs(code) != wanted:
        raise ExpectationError(step, errno_name(wanted), errno_name(code))
