"""Cells' hypercalls reach the hypervisor model: the lab's root kernel has KVM with
``CONFIG_KVM_XEN`` (Debian's kernel, KVM rebuilt by ``harness.kbuild``), so a cell's
VMMCALL/VMCALL exits to the executor instead of being answered inside KVM.

The expectations are Jailhouse's (``inmates/lib/printk.c``, ``hypervisor/control.c``): an
inmate whose cell may use the virtual console (``JAILHOUSE_CELL_VIRTUAL_CONSOLE_PERMITTED``)
and whose command line says ``con-virtual`` prints every character with
``JAILHOUSE_HC_DEBUG_CONSOLE_PUTC``; the hypervisor puts it into its console, which
``jailhouse console`` prints and the system config's debug UART (serial 0) shows; every
such call is one hypercall exit of the cell's CPU in ``jailhouse cell stats``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from harness.checked import CheckedJailhouse
from harness.lab import Lab
from harness.pytest_plugin import RootShell

pytestmark = [pytest.mark.lab, pytest.mark.kvm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "harness" / "configs"
CELLS = REPO / "images" / "inmates" / "cells"
#: the command line's address in x86 inmates (Jailhouse's ``-a 0x1000``)
CMDLINE = 0x1000
#: seconds until hello has printed everything (cell start to its last line, nested KVM
#: under TCG; hello itself waits 1 s on the PM timer)
HELLO_DONE = 180.0
#: lines of hello (images/inmates/demos/hello.c) in the hypervisor console, in this order
HELLO_LINES = [r'Hello from jhlab inmate "hello"!',
               r"comm region: JHCOMM rev 2, state 0, 1 CPU\(s\), PM timer 0x608, .*",
               r'cmdline: "con-virtual"',
               r"hello: PASSED"]


def test_root_kernel_has_kvm_xen(root_shell: RootShell) -> None:
    """The root cell runs Debian's kernel with the rebuilt KVM: its config says
    CONFIG_KVM_XEN=y and the loaded kvm module is the rebuilt one (out of tree, not
    signed by Debian), whose interface KVM_CAP_XEN_HVM reports the hypercall intercept."""
    release = root_shell("uname -r").strip()
    assert "CONFIG_KVM_XEN=y" in root_shell(f"cat /boot/config-{release}").splitlines()
    assert root_shell("modinfo -F intree kvm").strip() == ""  # Debian's says Y
    flags = int(root_shell.python(
        "from harness.hvmodel.arch.kvm import Cap, Kvm\n"
        "print(Kvm().check_extension(Cap.XEN_HVM))\n").strip())
    assert flags & (1 << 1), f"KVM_CAP_XEN_HVM = {flags:#x} lacks KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL"


def _console(root_shell: RootShell) -> str:
    return root_shell("jailhouse console").replace("\r", "")


def test_debug_console_putc_reaches_the_hypervisor_console(
        jailhouse: CheckedJailhouse, inmates: Path, lab: Lab, root_shell: RootShell) -> None:
    """hello with ``con-virtual`` prints through DEBUG_CONSOLE_PUTC: its lines appear in
    ``jailhouse console`` and on the debug UART (serial 0), not on its own UART (serial 1),
    and ``cell stats`` counts at least one hypercall exit per character printed."""
    jh = jailhouse
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(CELLS / "hello.toml")
    jh.cell_load("hello", inmates / "hello.bin", strings=[("con-virtual", CMDLINE)])
    lab.cell_console.discard()
    serial0 = lab.console.transcript.stat().st_size
    serial1 = lab.cell_console.transcript.stat().st_size
    jh.cell_start("hello")

    deadline = time.monotonic() + HELLO_DONE
    console = _console(root_shell)
    while "hello: PASSED" not in console and "hello: FAILED" not in console:
        assert time.monotonic() < deadline, f"hello did not finish; hypervisor console:\n{console}"
        time.sleep(2)
        console = _console(root_shell)
    lines = console.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Hello from jhlab inmate"))
    end = next(i for i, line in enumerate(lines) if line.startswith("hello: "))
    printed = lines[start:end + 1]
    rest = iter(printed)
    for pattern in HELLO_LINES:  # in this order, PM timer lines between them
        assert any(re.fullmatch(pattern, line) for line in rest), (pattern, printed)

    with open(lab.console.transcript, "rb") as handle:
        handle.seek(serial0)
        uart = handle.read().decode("utf-8", "replace").replace("\r", "")
    assert 'Hello from jhlab inmate "hello"!' in uart and "hello: PASSED" in uart
    with open(lab.cell_console.transcript, "rb") as handle:
        handle.seek(serial1)
        cell_uart = handle.read().decode("utf-8", "replace")
    assert "Hello from jhlab inmate" not in cell_uart  # (earlier tests' cells printed there)

    stats = jh.stats("hello")
    print(f"hello printed {sum(len(line) + 1 for line in printed)} characters; cell stats: {stats}")
    characters = sum(len(line) + 1 for line in printed)  # each with its newline
    assert stats["vmexits_hypercall"] >= characters, stats
    assert stats["vmexits_total"] >= stats["vmexits_hypercall"], stats

    jh.cell_shutdown("hello")
    jh.cell_destroy("hello")
    jh.disable()
