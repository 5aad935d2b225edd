"""Linux cells, for ``jhlab bench cells``: from ``jailhouse cell linux`` to the guest's
ready line, and the round-trip time of pings from the lab's private network namespace to
the Linux cell through the e1000e the cell was given.

Method. The cells benchmark's lab has its e1000e on a tap whose host end lives in the
lab's private namespace (:func:`harness.labfile.with_lan_on_tap`; network namespaces need root). With the
hypervisor enabled and the root kernel's console messages off serial 0 (the Linux cell
owns 0x3f8), each repeat writes a marker on serial 0, then runs ``jailhouse cell linux``
with Jailhouse's linux-x86-demo built with the e1000e, the guest kernel and initramfs the
root cell carries and the console on serial 0; the figure is the time between the
marker's arrival and the ``jhlab-linux-cell ready`` line at the host, so ssh and the
host's scheduling of the command are not in it. Once the cell's NIC reports its link,
:data:`PINGS` echo requests go one at a time from the namespace; then the cell is shut
down and destroyed.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from typing import TYPE_CHECKING, Final

from harness.bench import Figure
from harness.bench.marks import begin_marker, mark
from harness.errors import JhlabError
from harness.labfile import TAP_GUEST_END

if TYPE_CHECKING:
    from harness.bench.cells import CellBench
    from harness.net import PrivateNetwork

LOG = logging.getLogger(__name__)

READY_LINE: Final = r"jhlab-linux-cell ready"
LINK_UP: Final = r"eth0: NIC Link is Up"
#: echo requests per boot
PINGS: Final = 20
#: seconds: a marker to arrive; cell linux to the ready line; the ready line to the link
MARK_TIMEOUT: Final = 30.0
READY_TIMEOUT: Final = 300.0
LINK_TIMEOUT: Final = 60.0
#: the guest kernel's gzip payload unpacks beyond gzip's factor 7 (its init_size)
DECOMP_FACTOR: Final = 10
COMMAND: Final = (
    "jailhouse cell linux /etc/jailhouse/linux-x86-demo-e1000e.cell "
    "/usr/share/jailhouse/linux/bzImage -i /usr/share/jailhouse/linux/rootfs.cpio "
    f"-k {DECOMP_FACTOR} -c {shlex.quote(f'console=ttyS0 jhlab.ip={TAP_GUEST_END}/24')}"
)


@dataclasses.dataclass(frozen=True)
class LinuxRun:
    """One boot: seconds from the marker to the ready line, each ping's round trip in
    seconds (None: no reply)."""

    ready: float
    round_trips: list[float | None]


def boot_and_ping(cells: CellBench, network: PrivateNetwork, index: int) -> LinuxRun:
    """One repeat (module docstring); the hypervisor is enabled and no cell exists."""
    name = f"cell-linux-{index}"
    since = cells.root.position
    cells.run(f"{mark(begin_marker(name))} && {COMMAND}")
    began, after = cells.root.wait_line(begin_marker(name), MARK_TIMEOUT, since=since)
    ready, _, after = cells.root.wait(READY_LINE, READY_TIMEOUT, since=after)
    cells.root.wait(LINK_UP, LINK_TIMEOUT, since=after)
    round_trips = network.ping(TAP_GUEST_END, count=PINGS, timeout=10.0)
    cells.run("jailhouse cell shutdown linux-x86-demo && jailhouse cell destroy linux-x86-demo")
    run = LinuxRun(ready - began, round_trips)
    LOG.info("Linux cell %d: ready after %.1f s, pings %s", index, run.ready, run.round_trips)
    return run


def figures(runs: list[LinuxRun]) -> list[Figure]:
    """The ready time over the boots, the round trips over every reply."""
    replies = [1000 * t for run in runs for t in run.round_trips if t is not None]
    sent = sum(len(run.round_trips) for run in runs)
    if not replies:
        raise JhlabError(f"none of {sent} pings reached the Linux cell at {TAP_GUEST_END}")
    return [
        Figure.of("jailhouse cell linux -> jhlab-linux-cell ready (serial 0)", "s",
                  [run.ready for run in runs]),
        Figure.of(f"ping namespace -> Linux cell, round trip ({sent - len(replies)} of {sent} lost)",
                  "ms", replies),
    ]
