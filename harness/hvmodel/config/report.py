"""What a config-set check found, and the text ``tools/jailhouse-config-check`` prints for it.

A :class:`CheckReport` lists the config set that was read and one :class:`CheckSection` per
check, in printing order; :func:`render_check` turns it into the tool's standard output:

* ``Reading configuration set:``, the architecture, the root cell and each non-root cell
  (``NAME (FILE)``);
* per check its title and a colon, then `` None`` and a newline when nothing was found, or
  else every finding after a blank line, and a blank line after the last one. One quirk
  of the tool is kept: its MMCONFIG check does not reset the "found" state of the check
  before it, so after a hypervisor overlap it prints an empty block instead of ``None``
  (:attr:`CheckSection.quirk_found`);
* a check that ended the tool with an exception (an ARM GIC version it does not know)
  leaves its title without a newline as the last output (:attr:`CheckSection.error`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: :attr:`CheckSection.origin` of the checks of ``jailhouse-config-check`` (master)...
JAILHOUSE: Final = "jailhouse"
#: ...of the two CPU checks its next branch adds...
NEXT: Final = "next"
#: ...and of jhlab's own checks.
JHLAB: Final = "jhlab"


@dataclass(frozen=True, kw_only=True, slots=True)
class Finding:
    """One problem found by a check.

    :param title: the check's title (as printed)
    :param cell: the cell the finding is about (``""`` for the set as a whole)
    :param details: the text printed for it, without the blank line before it
    :param code: a short stable identifier of the kind of problem
    """

    title: str
    cell: str
    details: str
    code: str


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckSection:
    """One check as printed: its title, its findings, and whose check it is.

    :param origin: :data:`JAILHOUSE`, :data:`NEXT` or :data:`JHLAB`
    :param quirk_found: print an empty block instead of ``None`` even without findings
        (the MMCONFIG check inherits the hypervisor check's "found" state in the tool)
    :param error: the exception line that ended the tool in this check (``""``: none)
    """

    title: str
    findings: tuple[Finding, ...]
    origin: str = JAILHOUSE
    quirk_found: bool = False
    error: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckReport:
    """The result of a check of a config set: what was read and what each check found.

    :param arch: architecture label (``x86``)
    :param root: (name, source) of the root cell
    :param cells: (name, source) of each non-root cell, in the order given
    :param sections: the checks in printing order (the last one may have ended in an error)
    """

    arch: str
    root: tuple[str, str]
    cells: tuple[tuple[str, str], ...]
    sections: tuple[CheckSection, ...]

    @property
    def findings(self) -> tuple[Finding, ...]:
        """All findings, in printing order."""
        return tuple(f for section in self.sections for f in section.findings)

    @property
    def error(self) -> str:
        """The exception line that ended the checks early (``""``: they all ran)."""
        return next((section.error for section in self.sections if section.error), "")

    @property
    def ok(self) -> bool:
        """Whether every check ran and none found anything."""
        return not self.error and not any(section.findings for section in self.sections)

    @property
    def exit_status(self) -> int:
        """1 when anything was found or a check failed, else 0 (as the tool exits)."""
        return 0 if self.ok else 1

    def titles(self) -> tuple[str, ...]:
        """The titles of the checks that ran."""
        return tuple(section.title for section in self.sections)


#: The first line the tool prints, before it reads anything.
READING: Final = "Reading configuration set:\n"


def root_lines(arch: str, name: str, source: str) -> str:
    """The lines the tool prints once the system config was read."""
    return f"  Architecture:  {arch}\n  Root cell:     {name} ({source})\n"


def cell_line(name: str, source: str) -> str:
    """The line the tool prints for each non-root cell it read."""
    return f"  Non-root cell: {name} ({source})\n"


def render_header(report: CheckReport) -> str:
    """The ``Reading configuration set:`` block."""
    return READING + root_lines(report.arch, *report.root) + "".join(
        cell_line(name, source) for name, source in report.cells)


def render_sections(sections: tuple[CheckSection, ...]) -> str:
    """The checks' part of the output."""
    out = []
    for section in sections:
        out.append(f"{section.title}:")
        if section.error:
            break
        for finding in section.findings:
            out.append("\n\n" + finding.details)
        out.append("\n\n" if section.findings or section.quirk_found else " None\n")
    return "".join(out)


def render_check(report: CheckReport) -> str:
    """Everything the tool prints on standard output for this report."""
    return render_header(report) + render_sections(report.sections)
