"""Which path serves a cell's whitelisted port I/O, as the executor reports it.

Jailhouse lets a cell's whitelisted ports through without an exit (the CPU's I/O
bitmap). KVM cannot, so the executor serves them in its I/O bitmap loop, machine code
that never returns to Python for them (``harness.hvmodel.arch.portio``), unless the
daemon runs with ``--no-native-pio``. The pio-loop inmate writes and reads back its
UART's scratch register (whitelisted) as fast as it can and prints how many port exits
it made; the daemon's executor status (``jailhouse`` state request) counts per CPU the
IN/OUT exits (``IoExit``) and those the loop served (``native_pio``). With the loop on,
the inmate's exits must all have been served there; with it off, none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.checked import CheckedJailhouse
from harness.lab import Lab
from harness.recipes import CONFIGS, find_recipes

pytestmark = [pytest.mark.lab, pytest.mark.kvm, pytest.mark.slow]

CELLS = find_recipes().cells
#: pio-loop.toml's CPU
PIO_CPU = "2"
#: how long pio-loop runs (its ``ms=``)
LOOP_MS = 300
#: pio-loop's summary line: its port exits (pairs and PM-timer reads)
SUMMARY = r"pio-loop: (\d+) exits in \d+ us, 0 mismatches: PASSED"


def cpu_status(jh: CheckedJailhouse) -> tuple[dict[str, Any], dict[str, Any]]:
    """The executor's status and its entry for pio-loop's CPU, from the daemon."""
    view = jh.look()
    assert view.daemon is not None and view.daemon.get("executor") is not None, view.daemon
    status: dict[str, Any] = view.daemon["executor"]
    return status, status["cpus"][PIO_CPU]


@pytest.mark.parametrize("native", [True, False], ids=["io-bitmap-loop", "no-native-pio"])
def test_whitelisted_pio_is_served_where_the_daemon_says(lab: Lab, inmates: Path, native: bool) -> None:
    """With the I/O bitmap loop (the default) every port exit pio-loop made was served in
    machine code; with ``--no-native-pio`` every one came to Python."""
    jh = CheckedJailhouse(lab, "executor", daemon_args=() if native else ("--no-native-pio",))
    try:
        jh.enable(CONFIGS / "qemu-x86.toml")
        jh.cell_create(CELLS / "pio-loop.toml")
        jh.cell_load("pio-loop", inmates / "pio-loop.bin", strings=[(f"ms={LOOP_MS}", 0x1000)])
        lab.cell_console.discard()
        jh.cell_start("pio-loop")
        made = int(jh.expect_inmate(SUMMARY, timeout=180).group(1))
        status, cpu = cpu_status(jh)
        print(f"pio-loop made {made} port exits; executor: ports {status['ports']}, "
              f"native_pio {status['native_pio']}, CPU {PIO_CPU}: {cpu}")
        io_exits, served = cpu["exits"].get("IoExit", 0), cpu["native_pio"]
        assert io_exits >= made  # the console lines are port exits too
        if native:
            assert (status["ports"], status["native_pio"]) == ("native", True)
            # Every exit of the loop, the summary's console bytes included, was served there;
            # only the first console line may have come before the loop ran.
            assert served >= made and io_exits - served < 100
        else:
            assert status["native_pio"] is False
            assert served == 0
        jh.cell_destroy("pio-loop")
        jh.disable()
    finally:
        problems = jh.cleanup()
    assert not problems, problems
