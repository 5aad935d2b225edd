"""The checked driver's comparison pieces, without any guest: diffs, exclusions, the
console matcher, the tool output the oracle predicts, expectations, effects on the oracle."""

from __future__ import annotations

import errno

import pytest

from harness.checked import (
    EXECUTOR_EXCLUSIONS,
    CheckedJailhouse,
    Difference,
    ExpectationError,
    Locks,
    Oracle,
    ValidationError,
    Violation,
)
from harness.checked.compare import KERNEL_LINE, missing_lines, parse_stats, render_stats
from harness.checked.oracle import tool_output
from harness.checked.report import check_expectation
from harness.hvmodel.config import load_source
from harness.recipes import CONFIGS


def test_difference_is_a_unified_diff_naming_both_sides() -> None:
    """A difference renders as ``--- oracle: X`` / ``+++ guest: X`` with its note."""
    diff = Difference("sysfs tree", "enabled: 1\nmem_pool_used: 47\n", "enabled: 1\nmem_pool_used: 58\n",
                      note="files differing: mem_pool_used").diff()
    assert diff.splitlines()[:3] == ["# files differing: mem_pool_used", "--- oracle: sysfs tree",
                                     "+++ guest: sysfs tree"]
    assert "-mem_pool_used: 47" in diff and "+mem_pool_used: 58" in diff
    assert "(nothing)" in Difference("stderr", "JAILHOUSE_CELL_LOAD: Operation not permitted\n", "").diff()


def test_validation_error_lists_what_differed() -> None:
    """The error's first line names the step and every thing that differed."""
    error = ValidationError("cell destroy x", [Difference("a", "1", "2"), Difference("b", "3", "4")])
    assert str(error).splitlines()[0] == "cell destroy x: the guest differs from the oracle in a, b"


def test_executor_exclusions_cover_only_timing_figures() -> None:
    """Excluded with the executor: root hypercall/total counts, non-root statistics, the
    console ring; never states, CPU lists, pools or names."""
    def excluded(path: str) -> bool:
        return any(rule.matches(path) for rule in EXECUTOR_EXCLUSIONS)

    assert excluded("cells/0/statistics/vmexits_hypercall")
    assert excluded("cells/0/statistics/cpu2/vmexits_total")
    assert excluded("cells/1/statistics/vmexits_pio")
    assert excluded("cells/12/statistics/cpu3/vmexits_mmio")
    assert excluded("console")
    for kept in ("cells/0/statistics/vmexits_pio", "cells/0/statistics/cpu0/vmexits_mmio",
                 "cells/1/state", "cells/1/cpus_failed_list", "mem_pool_used", "enabled",
                 "cells/0/cpus_assigned", "cells/1/name"):
        assert not excluded(kept), kept
    assert all(rule.reason for rule in EXECUTOR_EXCLUSIONS)


def test_console_lines_match_in_order_as_a_subsequence() -> None:
    """Lines pair up in order (repeats too); extra lines and prefixes are fine; a broken
    line is reported alone."""
    seen = ["jhlab# Created cell \"a\"", "noise", "Started cell \"a\"", "Created cell \"a\"",
            "Started cell \"a\""]
    assert missing_lines(["Created cell \"a\"", "Started cell \"a\""] * 2, seen) == []
    assert missing_lines(["Started cell \"a\"", "Created cell \"a\"", "Created cell \"a\""], seen) == [
        "Created cell \"a\""]
    broken = ["Created cell \"a\"", "Started cell \"[a\"", "Closing cell \"a\""]
    assert missing_lines(["Created cell \"a\"", "Started cell \"a\"", "Closing cell \"a\""], broken) == [
        "Started cell \"a\""]


def test_a_character_the_uart_repeated_is_tolerated() -> None:
    """A character the serial path sent twice does not make a line missing (the exact
    text is compared through the console ring); a different figure still does."""
    line = "Page pool usage after late setup: mem %s/1472, remap 65602/131072"
    wanted = [line % "50"]
    assert missing_lines(wanted, [line.replace("mem ", "mem  ") % "50"]) == []
    assert missing_lines(wanted, [line % "51"]) == wanted


def test_kernel_lines_are_taken_out_of_the_console() -> None:
    """Whole kernel lines (``[ time] ...``) between hypervisor lines are ignored."""
    text = "Created cell \"a\"\r\n[   42.208021] The Jailhouse is opening.\r\nStarted cell \"a\"\r\n"
    assert KERNEL_LINE.sub("", text) == "Created cell \"a\"\r\nStarted cell \"a\"\r\n"


def test_tool_output_is_what_jailhouse_prints() -> None:
    """perror() of the ioctl for errors, nothing on success, the device error without a
    driver."""
    assert tool_output("create", 0, None) == (0, "", "")
    assert tool_output("create", -errno.EEXIST, None) == (1, "", "JAILHOUSE_CELL_CREATE: File exists\n")
    assert tool_output("shutdown", -errno.EPERM, None) == (
        1, "", "JAILHOUSE_CELL_LOAD: Operation not permitted\n")
    assert tool_output("start", -errno.ENOENT, errno.ENOENT) == (
        1, "", "opening /dev/jailhouse: No such file or directory\n")


def test_expectations_by_name_or_number() -> None:
    """``expect`` takes 0, an errno number or name, or None."""
    check_expectation("s", 0, 0)
    check_expectation("s", "EEXIST", -errno.EEXIST)
    check_expectation("s", errno.EBUSY, -errno.EBUSY)
    check_expectation("s", None, -errno.EIO)
    with pytest.raises(ExpectationError, match="s: expected success, guest and oracle both gave EPERM"):
        check_expectation("s", 0, -errno.EPERM)


def test_stats_rendering_round_trips() -> None:
    """The stats text is the tool's layout, biggest counter first."""
    text = render_stats("apic-demo", {"vmexits_total": 5, "vmexits_pio": 2, "vmexits_mmio": 0})
    lines = text.splitlines()
    assert lines[0] == "Statistics for apic-demo cell" and lines[1] == ""
    assert lines[3].startswith("vmexits_total") and lines[3].endswith("         5")
    assert parse_stats(text) == {"vmexits_total": 5, "vmexits_pio": 2, "vmexits_mmio": 0}


def test_oracle_follows_the_daemons_life_and_effects() -> None:
    """The oracle starts a driver at enable, plays a cell locking itself and a fatal
    access, and drops the driver at disable; before any enable the device is missing."""
    oracle = Oracle({"apic-demo": "deny-first-shutdown"})
    assert oracle.run("create", lambda d: None) == (-errno.ENOENT, errno.ENOENT)
    system = load_source(CONFIGS / "qemu-x86.toml").to_bytes()
    cell = load_source(CONFIGS / "apic-demo.toml").to_bytes()
    assert oracle.run("enable", lambda d: d.enable(system)) == (0, None)
    assert oracle.run("create", lambda d: d.cell_create(cell)) == (0, None)
    assert oracle.run("start", lambda d: d.cell_start("apic-demo")) == (0, None)
    Locks("apic-demo").apply(oracle)
    assert "running/locked" in oracle.cell_list()
    Violation("apic-demo", "mmio", 0x1F0000, 4, True, 1).apply(oracle)
    assert "FATAL: Invalid MMIO/RAM write, addr: 0x00000000001f0000 size: 4" in oracle.console
    assert 'Parking CPU 3 (Cell: "apic-demo")' in oracle.console
    oracle.refresh()
    assert oracle.tree["cells/1/state"] == "failed\n"
    assert oracle.tree["cells/1/cpus_failed_list"] == "3\n"
    assert oracle.run("disable", lambda d: d.disable()) == (0, None)
    assert oracle.driver is None and oracle.module_loaded
    assert oracle.run("start", lambda d: d.cell_start(1)) == (-errno.EINVAL, None)
    assert oracle.cell_list() == ""


def test_only_known_arches() -> None:
    """The checked driver runs the guest on the executor or the oracle Arch."""
    with pytest.raises(ValueError, match="arch 'kvm'"):
        CheckedJailhouse(object(), "kvm")  # type: ignore[arg-type]
