"""The Linux-cell figures of ``jhlab bench cells`` (:mod:`harness.bench.linuxcell`): the
lab it needs and how its measurements become figures."""

from __future__ import annotations

import dataclasses

import pytest

from harness.bench.linuxcell import LinuxRun, figures
from harness.errors import JhlabError
from harness.labfile import TAP_HOST_END, NetdevSpec, load_lab, with_lan_on_tap


def test_the_lab_gets_its_lan_on_a_tap_and_nothing_else_changes() -> None:
    spec = load_lab("default")
    tapped = with_lan_on_tap(spec)
    assert tapped.netdevs == (NetdevSpec(id="lan", type="tap", address=f"{TAP_HOST_END}/24"),)
    assert tapped == dataclasses.replace(spec, netdevs=tapped.netdevs)
    assert with_lan_on_tap(spec, name="nic") == dataclasses.replace(tapped, name="nic")


def test_ready_times_per_boot_and_round_trips_per_reply() -> None:
    """The ready figure has one sample per boot; the ping figure one per reply (ms),
    naming the requests without a reply."""
    runs = [LinuxRun(30.0, [0.001, None, 0.003]), LinuxRun(20.0, [0.002]), LinuxRun(40.0, [0.010])]
    ready, ping = figures(runs)
    assert (ready.min, ready.median, ready.max, ready.repeats, ready.unit) == (20.0, 30.0, 40.0, 3, "s")
    assert (ping.min, ping.median, ping.max, ping.repeats, ping.unit) == pytest.approx(
        (1.0, 2.5, 10.0, 4, "ms"))
    assert "(1 of 5 lost)" in ping.name


def test_no_reply_at_all_is_an_error() -> None:
    with pytest.raises(JhlabError, match="none of 2 pings reached the Linux cell"):
        figures([LinuxRun(30.0, [None, None])])
