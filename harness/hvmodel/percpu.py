"""Per-CPU state; models ``include/jailhouse/percpu.h`` (public part) and ``cpu_set``.

Each logical CPU of the system has a :class:`PerCpu`: the cell that owns it, whether it
failed (``panic_park``), its statistics counters, its shutdown state, and the model's
view of what it executes (parked in the hypervisor, suspended, running guest code).
CPU sets (config bitmaps and Linux's text forms) are :mod:`harness.hvmodel.cpus`'s.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from .abi import NUM_CPU_STATS, CpuStat

if TYPE_CHECKING:
    from .cell import Cell


class ShutdownState(enum.IntEnum):
    """``per_cpu.shutdown_state`` (besides a stored negative errno)."""

    NONE = 0
    STARTED = 1


class PerCpu:
    """One logical CPU as the hypervisor sees it.

    Lifecycle: created at enable for every CPU of the root; owned by the root, moved to
    a cell at create (parked, stats cleared), started at cell start, parked again at
    set-loadable, given back at destroy (stats cleared, ``failed`` cleared).

    :param cpu_id: logical CPU number (APIC id on the lab machine)
    :param cell: the owning cell
    """

    __slots__ = ("cell", "cpu_id", "failed", "parked", "shutdown_state", "stats", "suspended")

    def __init__(self, cpu_id: int, cell: Cell) -> None:
        self.cpu_id = cpu_id
        #: the owning cell
        self.cell = cell
        #: set by panic_park, cleared by start, set-loadable and destroy
        self.failed = False
        #: statistics counters, indexed by :class:`~harness.hvmodel.abi.CpuStat`
        self.stats = [0] * NUM_CPU_STATS
        #: ``ShutdownState`` value, or a negative errno stored for a later call
        self.shutdown_state = int(ShutdownState.NONE)
        #: waiting for a reset (wait-for-SIPI in the parking page)
        self.parked = False
        #: held in the hypervisor by a management operation
        self.suspended = False

    def count(self, stat: CpuStat, count: int = 1) -> None:
        """Add ``count`` to one counter (u32 wrap-around, as in Jailhouse)."""
        self.stats[stat] = (self.stats[stat] + count) & 0xFFFFFFFF

    def clear_stats(self) -> None:
        """Zero all counters (CPU moved between cells)."""
        self.stats = [0] * NUM_CPU_STATS

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly snapshot."""
        return {
            "cpu": self.cpu_id,
            "cell": self.cell.id,
            "failed": self.failed,
            "parked": self.parked,
            "suspended": self.suspended,
            "stats": {stat.sysfs_name: self.stats[stat] for stat in CpuStat},
        }


class ExitResult:
    """What one intercepted access came to, for the executor's run loop.

    :param handled: False when the access was fatal: the ``FATAL:`` line is printed and
        the CPU is parked (``panic_park``) before this is returned
    :param value: the value a read returns; None for writes and for accesses whose
        instruction is only skipped (the guest register stays as it was)
    """

    __slots__ = ("handled", "value")

    def __init__(self, handled: bool, value: int | None = None) -> None:
        self.handled = handled
        self.value = value

    def __repr__(self) -> str:
        return f"ExitResult(handled={self.handled}, value={self.value!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExitResult):
            return NotImplemented
        return (self.handled, self.value) == (other.handled, other.value)

    def __hash__(self) -> int:
        return hash((self.handled, self.value))


#: a handled write, or a read whose instruction is only skipped
EXIT_DONE = ExitResult(True)
#: a fatal access (already printed and parked)
EXIT_FAILED = ExitResult(False)
