"""Comparing what the guest shows with what the oracle predicts: the sysfs files left
out (timing), the console matcher, the ``cell stats`` layout, and :class:`ViewComparer`."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Final

from harness.checked.oracle import Oracle
from harness.checked.report import Difference, GuestView
from harness.hvmodel.config import PciDeviceType
from harness.hvmodel.cpus import format_cpu_list, parse_cpu_list

#: the driver that holds devices of cells with the executor (Jailhouse: jailhouse-pci-stub)
CELL_PCI_DRIVERS: Final = frozenset({"vfio-pci", "jailhouse-pci-stub"})
#: whole kernel log lines (``[ time] ...``) on the root console, not the hypervisor's
KERNEL_LINE: Final = re.compile(r"\[\s*\d+\.\d+\] [^\r\n]*\r?\n")


@dataclasses.dataclass(frozen=True)
class Exclusion:
    """A sysfs file (``fnmatch`` pattern over its relative path) that is not compared.

    :param pattern: e.g. ``cells/0/statistics/vmexits_hypercall``
    :param reason: why its value depends on real time or timing
    """

    pattern: str
    reason: str

    def matches(self, path: str) -> bool:
        return fnmatch.fnmatchcase(path, self.pattern)


_PERIODIC = ("the executor's daemon refreshes the sysfs files every second while a cell "
             "runs, and every refresh costs the root CPU hypercalls: the count depends on "
             "how long the steps took")
_INMATE = ("counts of the exits a real inmate took (PM-timer polls, timer interrupts, "
           "how far it got when the file was read): real time")

#: sysfs files not compared when the guest's daemon runs the KVM executor
EXECUTOR_EXCLUSIONS: Final = (
    Exclusion("cells/0/statistics/vmexits_total", _PERIODIC),
    Exclusion("cells/0/statistics/vmexits_hypercall", _PERIODIC),
    Exclusion("cells/0/statistics/cpu*/vmexits_total", _PERIODIC),
    Exclusion("cells/0/statistics/cpu*/vmexits_hypercall", _PERIODIC),
    Exclusion("cells/[1-9]*/statistics/*", _INMATE),
    Exclusion("console", "the 2048-byte ring also holds executor text (register dumps after "
              "fatal exits), so its window differs; the oracle's lines are checked on the "
              "serial console instead"),
)


@dataclasses.dataclass(frozen=True)
class ViewComparer:
    """Compares one look at the guest (:class:`~harness.checked.report.GuestView`) with
    the oracle.

    :param arch: what the guest's daemon runs cells on (``executor`` or ``oracle``)
    :param baseline: the first look, before any step (root CPUs, PCI bindings)
    :param exclusions: sysfs files not compared
    :param cpuset_path: the executor's root cgroup (named in differences)
    """

    arch: str
    baseline: GuestView
    exclusions: tuple[Exclusion, ...]
    cpuset_path: str

    def excluded(self, path: str) -> bool:
        """Whether the sysfs file ``path`` is not compared."""
        return any(rule.matches(path) for rule in self.exclusions)

    def compare(self, view: GuestView, oracle: Oracle) -> list[Difference]:
        """Everything that differs between ``view`` and the oracle's prediction (its
        ``cell list`` is read now: a refresh, as the guest's listing does)."""
        expected_list = oracle.cell_list()
        diffs: list[Difference] = []
        if view.cell_list != expected_list:
            diffs.append(Difference("cell list", expected_list, view.cell_list))
        diffs += self.compare_tree(oracle.tree, view.sysfs)
        diffs += self.compare_cpus(view, oracle)
        diffs += self.compare_pci(view, oracle)
        daemon_expected = "running" if oracle.driver is not None else "none"
        daemon_actual = "running" if view.daemon is not None else "none"
        if daemon_expected == "running" and view.daemon is not None and view.daemon.get("arch") != self.arch:
            daemon_actual = f"running on {view.daemon.get('arch')}"
            daemon_expected = f"running on {self.arch}"
        if daemon_expected != daemon_actual:
            diffs.append(Difference("driver daemon", daemon_expected + "\n", daemon_actual + "\n"))
        return diffs

    def compare_tree(self, expected: Mapping[str, str], actual: Mapping[str, str]) -> list[Difference]:
        diffs: list[Difference] = []
        old: list[str] = []
        new: list[str] = []
        for path in sorted(set(expected) | set(actual)):
            if path == "console":
                continue
            if self.excluded(path) and path in expected and path in actual:
                continue
            if path in expected:
                old.append(f"{path}: {expected[path].rstrip(chr(10))}\n")
            if path in actual:
                new.append(f"{path}: {actual[path].rstrip(chr(10))}\n")
        if old != new:
            changed = sorted({line.split(":", 1)[0] for line in set(old) ^ set(new)})
            diffs.append(Difference("sysfs tree", "".join(old), "".join(new),
                                    note="files differing: " + ", ".join(changed)))
        if not self.excluded("console") and expected.get("console") != actual.get("console"):
            diffs.append(Difference("sysfs console", expected.get("console", "(no file)\n"),
                                    actual.get("console", "(no file)\n")))
        return diffs

    def root_cpus_expected(self, oracle: Oracle) -> str:
        """The root's CPUs the oracle predicts: the baseline less the CPUs of non-root
        cells (executor only: the oracle Arch takes no CPU from the root)."""
        baseline = self.baseline.cpus_allowed
        driver = oracle.driver
        if self.arch != "executor" or driver is None or not driver.enabled:
            return baseline
        taken = {cpu for cell_id, cell in driver.cells.items() if cell_id != 0 for cpu in cell.cpus_assigned}
        return format_cpu_list(parse_cpu_list(baseline) - taken)

    def compare_cpus(self, view: GuestView, oracle: Oracle) -> list[Difference]:
        expected = self.root_cpus_expected(oracle)
        diffs: list[Difference] = []
        if view.cpus_allowed != expected:
            diffs.append(Difference("root CPUs (Cpus_allowed_list of a new root process)",
                                    expected + "\n", view.cpus_allowed + "\n"))
        if view.cpuset is not None and view.cpuset != expected and self.arch == "executor":
            diffs.append(Difference(f"root CPUs ({self.cpuset_path}/cpuset.cpus)",
                                    expected + "\n", view.cpuset + "\n"))
        return diffs

    def compare_pci(self, view: GuestView, oracle: Oracle) -> list[Difference]:
        driver = oracle.driver
        cell_devices: set[str] = set()
        if self.arch == "executor" and driver is not None and driver.enabled:
            for cell_id, cell in driver.cells.items():
                if cell_id == 0:
                    continue
                for dev in cell.config.pci_devices:
                    if dev.type == PciDeviceType.DEVICE:
                        cell_devices.add("%04x:%02x:%02x.%x" % (dev.domain, dev.bdf >> 8,
                                                                 (dev.bdf >> 3) & 0x1F, dev.bdf & 7))
        old: list[str] = []
        new: list[str] = []
        for address in sorted(set(self.baseline.pci) | set(view.pci)):
            actual = view.pci.get(address, "(gone)")
            before = self.baseline.pci.get(address, "(absent)")
            if address in cell_devices:
                allowed = {*CELL_PCI_DRIVERS, None}
                want = actual if actual in allowed else "vfio-pci (cell device)"
            elif self.arch == "executor":
                # Back in the root: not held for a cell; Jailhouse leaves it unbound.
                ok = actual not in CELL_PCI_DRIVERS and actual in (before, None)
                want = actual if ok else f"{before or 'none'} (root device)"
            else:
                want = before
            old.append(f"{address}: {want or 'none'}\n")
            new.append(f"{address}: {actual or 'none'}\n")
        if old != new:
            return [Difference("PCI driver bindings", "".join(old), "".join(new))]
        return []


def missing_lines(wanted: Sequence[str], seen: Sequence[str]) -> list[str]:
    """The lines of ``wanted`` that are not in ``seen`` in order: the longest in-order
    matching (a wanted line matches a seen line that contains it; a longest common
    subsequence, so repeated lines such as ``Created cell "x"`` in a loop pair up right)
    leaves these out."""
    # The UART transcript is a check of delivery: the exact text is compared through the
    # console ring (sysfs ``console``). Under TCG the serial path has been seen to repeat
    # a character once in thousands of lines ("mem  50"), so runs of one character are
    # squeezed on both sides before matching.
    original = list(wanted)
    wanted = [squeeze(line) for line in wanted]
    seen = [squeeze(line) for line in seen]
    rows, cols = len(wanted), len(seen)
    best = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(rows - 1, -1, -1):
        line, here, below = wanted[i], best[i], best[i + 1]
        for j in range(cols - 1, -1, -1):
            here[j] = below[j + 1] + 1 if line in seen[j] else max(below[j], here[j + 1])
    missing: list[str] = []
    i = j = 0
    while i < rows:
        if j < cols and wanted[i] in seen[j] and best[i][j] == best[i + 1][j + 1] + 1:
            i, j = i + 1, j + 1
        elif j < cols and best[i][j + 1] >= best[i + 1][j]:
            j += 1
        else:
            missing.append(original[i])
            i += 1
    return missing


def squeeze(line: str) -> str:
    """``line`` with every run of one repeated character cut to one."""
    return _RUNS.sub(r"\1", line)


_RUNS: Final = re.compile(r"(.)\1+")


def parse_stats(text: str) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in text.splitlines()[3:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    return values


def stats_title(text: str) -> str:
    first = text.splitlines()[0] if text else ""
    match = re.fullmatch(r"Statistics for (.*) cell(, CPU \d+)?", first)
    return match.group(1) if match else ""


def render_stats(name: str, values: Mapping[str, int]) -> str:
    """``jailhouse cell stats -n -i 0``'s text (tools/jailhouse-cell-stats layout)."""
    lines = [f"Statistics for {name} cell", "", "COUNTER".ljust(30) + "%10s" % "SUM" + "%10s" % "PER SEC"]
    for counter in sorted(values, key=lambda c: (-values[c], c)):
        lines.append(counter.ljust(30) + "%10u" % values[counter])
    return "\n".join(lines) + "\n"
