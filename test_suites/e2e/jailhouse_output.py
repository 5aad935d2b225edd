"""What Jailhouse itself prints and shows for the lifecycle steps, restated from its
sources, so that the lifecycle suites compare the lab with Jailhouse and not hvmodel with
itself. Nothing here comes from ``harness.hvmodel``: a model that drifts from Jailhouse
fails against these, whatever the checked driver's oracle (the same model) predicts.

Sources (Jailhouse master e57d1eff; ``shared/reference/jailhouse-x86.md`` §3, §6.3, §6.4):

* ``tools/jailhouse.c`` ``cell_list()``: a header ``"%-8s%-24s%-18s%-24s%-24s\\n"`` (ID,
  Name, State, Assigned CPUs, Failed CPUs) and a row ``"%-8d%-24s%-18s%-24s%-24s\\n"`` per
  cell, in the order of the ID directories, none at all without cells;
* ``driver/sysfs.c``: ``name`` ``"%s\\n"``, ``state`` (``state_show``: running,
  running/locked, shut down, failed, Comm ABI mismatch), ``cpus_assigned`` and
  ``cpus_failed`` as ``"%*pb\\n"`` (a hex mask), their ``_list`` files as ``"%*pbl\\n"``
  (ranges); ``enabled`` ``"%d\\n"``;
* ``hypervisor/control.c`` (``cell_create``, ``cell_set_loadable``, ``cell_start``,
  ``cell_destroy``, ``hypervisor_disable``), ``paging.c`` (``paging_dump_stats``) and
  ``setup.c``: the console lines.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterable, Sequence
from typing import Final

from harness.protocol import Console

#: driver/sysfs.c state_show()
RUNNING: Final = "running"
RUNNING_LOCKED: Final = "running/locked"
SHUT_DOWN: Final = "shut down"
FAILED: Final = "failed"

#: the x86 ``vmexits_*`` counters of driver/sysfs.c (and ``jailhouse cell stats``)
COUNTERS: Final = frozenset(f"vmexits_{name}" for name in (
    "total", "mmio", "management", "hypercall", "pio", "xapic", "cr", "cpuid", "xsetbv",
    "exception", "msr_other", "msr_x2apic_icr"))

#: whole kernel log lines on the root console (the hypervisor's debug UART is shared)
_KERNEL_LINE: Final = re.compile(r"\[\s*\d+\.\d+\] [^\n]*\n")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One cell as ``cell list`` and sysfs show it.

    :param id: its ID (the root cell is 0)
    :param name: its name
    :param state: one of the ``state_show`` strings
    :param cpus: its CPUs
    :param failed: its failed CPUs
    """

    id: int
    name: str
    state: str
    cpus: frozenset[int]
    failed: frozenset[int] = frozenset()


def cell(id: int, name: str, state: str, cpus: Iterable[int], failed: Iterable[int] = ()) -> Cell:
    return Cell(id, name, state, frozenset(cpus), frozenset(failed))


def hex_mask(cpus: Iterable[int], nr_cpus: int) -> str:
    """``%*pb`` of a CPU mask: hex digits for ``nr_cpus`` bits, most significant first,
    comma-separated every 32 bits (Linux's ``bitmap_print_to_pagebuf``)."""
    value = sum(1 << cpu for cpu in cpus)
    digits = f"{value:0{(nr_cpus + 3) // 4}x}"
    groups: list[str] = []
    while digits:
        groups.insert(0, digits[-8:])
        digits = digits[:-8]
    return ",".join(groups)


def range_list(cpus: Iterable[int]) -> str:
    """``%*pbl`` of a CPU mask: ascending ranges, ``0-2,5``; empty for no CPU."""
    parts: list[str] = []
    ordered = sorted(set(cpus))
    start = 0
    while start < len(ordered):
        end = start
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        first, last = ordered[start], ordered[end]
        parts.append(str(first) if first == last else f"{first}-{last}")
        start = end + 1
    return ",".join(parts)


def cell_list(*cells: Cell) -> str:
    """``jailhouse cell list`` with these cells (nothing without cells)."""
    if not cells:
        return ""
    row = "%-8s%-24s%-18s%-24s%-24s\n"
    text = row % ("ID", "Name", "State", "Assigned CPUs", "Failed CPUs")
    for each in sorted(cells, key=lambda c: str(c.id)):  # alphasort of the ID directories
        text += "%-8d%-24s%-18s%-24s%-24s\n" % (each.id, each.name, each.state,
                                                range_list(each.cpus), range_list(each.failed))
    return text


def sysfs_cell(each: Cell, nr_cpus: int) -> dict[str, str]:
    """The files of ``cells/<id>/`` (statistics aside), by path relative to the tree."""
    base = f"cells/{each.id}/"
    return {
        base + "name": each.name + "\n",
        base + "state": each.state + "\n",
        base + "cpus_assigned": hex_mask(each.cpus, nr_cpus) + "\n",
        base + "cpus_assigned_list": range_list(each.cpus) + "\n",
        base + "cpus_failed": hex_mask(each.failed, nr_cpus) + "\n",
        base + "cpus_failed_list": range_list(each.failed) + "\n",
    }


def sysfs_cells(tree: dict[str, str]) -> dict[str, str]:
    """The cell files of a sysfs tree that :func:`sysfs_cell` describes."""
    return {path: text for path, text in tree.items()
            if path.startswith("cells/") and "/statistics" not in path}


# -- console lines --------------------------------------------------------------------------
#
# The patterns match the root console's transcript (serial 0). Under TCG on a loaded host
# its serial path has been seen to repeat a character now and then (``to cell  "QEMU-VM"``);
# the literal parts therefore let every character repeat (:func:`lit`), as the checked
# driver's console matcher squeezes such runs.


def lit(text: str) -> str:
    """A pattern for ``text`` in which each character may appear repeated."""
    return "".join(re.escape(char) + "+" for char in text)


def _pool(when: str) -> str:
    """A page-pool line (paging.c), with the figures as groups: mem used, mem total,
    remap used, remap total."""
    return lit(f"Page pool usage {when}: mem ") + r"(\d+)/(\d+)" + lit(", remap ") + r"(\d+)/(\d+)"


def enabled_lines(root: str, devices: Sequence[str], virtual: Sequence[str]) -> list[str]:
    """What ``jailhouse enable`` prints (setup.c, pci.c): patterns, in order.

    :param root: the root cell's name
    :param devices: the root config's physical PCI devices (``00:02.0``)
    :param virtual: its ivshmem devices
    """
    lines = [lit("Initializing Jailhouse hypervisor v") + r"\S+.*" + lit(" on CPU ") + r"\d+",
             lit("Code location: 0x") + "[0-9a-f]+", _pool("after early setup"),
             lit("Initializing processors:")]
    lines += [lit(f'Adding PCI device {bdf} to cell "{root}"') for bdf in devices]
    lines += [lit(f'Adding virtual PCI device {bdf} to cell "{root}"') for bdf in virtual]
    return [*lines, _pool("after late setup"), lit("Activating hypervisor")]


def created_lines(name: str) -> list[str]:
    return [lit(f'Created cell "{name}"'), _pool("after cell creation")]


def loadable_lines(name: str) -> list[str]:
    return [lit(f'Cell "{name}" can be loaded')]


def started_lines(name: str) -> list[str]:
    return [lit(f'Started cell "{name}"')]


def destroyed_lines(name: str) -> list[str]:
    return [lit(f'Closing cell "{name}"'), _pool("after cell destruction")]


def disabled_lines() -> list[str]:
    """What the first CPU to leave prints at ``jailhouse disable``."""
    return [lit("Shutting down hypervisor")]


def releasing_lines(cpus: Iterable[int]) -> list[str]:
    """Each root CPU's `` Releasing CPU N`` after :func:`disabled_lines`, in the order the
    CPUs leave (any: match them with ``ordered=False``)."""
    return ["^" + lit(f" Releasing CPU {cpu}") + "$" for cpu in sorted(cpus)]


def pool_usage(console_text: str, when: str) -> tuple[int, int]:
    """The last ``Page pool usage <when>`` line's mem figures (used, total)."""
    found = re.findall(_pool(when), console_text)
    assert found, f"no 'Page pool usage {when}' line in:\n{console_text[-2000:]}"
    return int(found[-1][0]), int(found[-1][1])


def console_text(console: Console, mark: int) -> str:
    """The root console since ``mark``: CRs and kernel log lines left out."""
    return _KERNEL_LINE.sub("", console.since(mark).replace("\r", ""))


def expect_lines(console: Console, mark: int, patterns: Sequence[str], timeout: float = 60.0,
                 *, ordered: bool = True) -> str:
    """Wait until every pattern (a regular expression over one line) has matched a line
    of the root console since ``mark``, in order unless ``ordered`` is false; return the
    text.

    :raise AssertionError: naming the first missing pattern after ``timeout`` seconds
    """
    deadline = time.monotonic() + timeout
    while True:
        text = console_text(console, mark)
        missing = _missing(text, patterns, ordered)
        if missing is None:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{missing!r} not on the root console within {timeout:.0f} s "
                                 f"({'in order ' if ordered else ''}after the lines before it); "
                                 f"it shows:\n{text[-3000:]}")
        time.sleep(0.2)


def _missing(text: str, patterns: Sequence[str], ordered: bool) -> str | None:
    position = 0
    for pattern in patterns:
        found = re.compile(pattern, re.MULTILINE).search(text, position if ordered else 0)
        if found is None:
            return pattern
        if ordered:
            position = found.end()
    return None
