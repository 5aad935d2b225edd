"""The I/O bitmap loop's checks on real ports, in the lab VM's root cell.

``test_suites/unit/io_bitmap_checks.py`` holds checks that need ``ioperm``, which this
project's hosts may refuse (a PVM host does: ENOSYS), so the unit suite skips them there.
The lab's root cell always allows it (root, Debian's kernel with
``CONFIG_X86_IOPL_IOPERM``) and has KVM inside: the checks run there, unchanged, as a
program sent to the guest's Python (the guest's ``harness.hvmodel``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.kvm]

CHECKS = Path(__file__).resolve().parents[1] / "unit" / "io_bitmap_checks.py"
#: the checks the module runs, by name (a check dropped from it fails this test)
EXPECTED = {"check_auto_backend_is_native", "check_open_ports_are_served_and_the_rest_come_back",
            "check_a_kick_ends_the_loop_with_an_interrupt_exit"}
RESULT_TAG = "IO-BITMAP-CHECKS "


def test_io_bitmap_loop_checks_pass_in_the_root_cell(lab: Lab) -> None:
    """In the root cell ``ioperm`` works, the automatic port backend is the native one,
    the loop serves the open port without exits to Python and hands the rest back, and a
    kick ends it."""
    result = lab.run("PYTHONPATH=/opt/jhlab/lib python3 -", stdin=CHECKS.read_text(), timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_TAG)]
    assert result.status == 0 and lines, f"the checks did not run ({result.status}):\n{result.output}"
    outcomes: dict[str, str] = json.loads(lines[-1][len(RESULT_TAG):])
    assert set(outcomes) == EXPECTED
    failed = {name: text for name, text in outcomes.items() if text != "passed"}
    assert not failed, "\n".join(f"{name}:\n{text}" for name, text in failed.items())
