"""Create/load/start/destroy 20 times through the ``jailhouse`` command and its daemon on
the KVM executor: every step is still checked against the oracle, and the daemon leaks
nothing (open fds, threads, RSS from ``/proc/<pid>``, measured before and after).

The cycles run as one :class:`~harness.checked.Batch` (one guest round trip for all 80
steps: the tool runs in-process there, the daemon is the real one behind its socket;
every result is compared, the whole view after each create, start and destroy). The cell
is jhlab's hello inmate with a passive comm region, so a destroy never waits for the
inmate to be ready for messages: each cell is destroyed while its inmate still prints.
Two cycles warm the daemon up (imports, caches) before the measurement.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from harness.checked import CheckedJailhouse
from harness.hvmodel.config import CellConfig, CellFlags, load_source
from harness.recipes import CONFIGS, find_recipes

pytestmark = [pytest.mark.lab, pytest.mark.kvm, pytest.mark.slow]

CELLS = find_recipes().cells
CYCLES = 20
WARM_UP = 2
#: RSS growth tolerated over the 20 cycles (allocator noise, not per-cycle growth)
RSS_SLACK_KIB = 4096


def passive_hello() -> CellConfig:
    config = load_source(CELLS / "hello.toml")
    assert isinstance(config, CellConfig)
    return dataclasses.replace(config, flags=config.flags | CellFlags.PASSIVE_COMMREG)


def cycles(jh: CheckedJailhouse, config: CellConfig, image: Path, count: int) -> None:
    """``count`` cycles, every command's result checked, the whole view after each
    create/start/destroy."""
    with jh.batch(observe_each=False) as batch:
        for _ in range(count):
            batch.cell_create(config)
            batch.look()
            batch.cell_load("hello", image)
            batch.cell_start("hello")
            batch.look()
            batch.cell_destroy("hello")
            batch.look()


def test_twenty_cycles_leak_nothing(jailhouse: CheckedJailhouse, inmates: Path) -> None:
    """20 checked create/load/start/destroy cycles: the daemon's fds and threads are the
    same afterwards, its RSS grew by less than 4 MiB, every CPU is back in the root."""
    jh = jailhouse
    config = passive_hello()
    image = inmates / "hello.bin"
    jh.enable(CONFIGS / "qemu-x86.toml")
    cycles(jh, config, image, WARM_UP)
    before = jh.daemon_resources()
    cycles(jh, config, image, CYCLES)
    after = jh.daemon_resources()
    print(f"daemon before {before}\ndaemon after  {after}")
    assert after["fds"] == before["fds"], (before, after)
    assert after["threads"] == before["threads"], (before, after)
    assert after["rss_kib"] - before["rss_kib"] < RSS_SLACK_KIB, (before, after)
    view = jh.look()
    assert view.cpus_allowed == "0-3" and "hello" not in view.cell_list
    jh.disable()
