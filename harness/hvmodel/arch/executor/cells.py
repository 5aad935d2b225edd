"""The executor's cells and their CPUs (the arch part of Jailhouse's ``struct cell`` and
``struct per_cpu``), kept in one :class:`CellTable` under one condition.

Only non-root cells are here: the root cell runs natively and has no VM. A cell enters
the table when its VM and vCPU threads exist (:meth:`.vcpu_loop.VcpuThreads.add`) and
leaves it when they are told to stop (:meth:`.vcpu_loop.VcpuThreads.remove`); the other
parts of the executor only read it.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from collections import Counter
from typing import TYPE_CHECKING

from ...abi import CpuStat
from ...errors import JhlabError

if TYPE_CHECKING:
    from ...config import CellConfig, MemoryRegion
    from ..exitstats import VcpuExitTrace
    from ..hostmem import PhysMapping
    from ..kvm import Vcpu, Vm
    from ..portio import CellPorts, IoBitmapLoop
    from ..vfio import MsiRouter
    from .cellports import CellPortsSync

__all__ = ["CellCpu", "CellSlot", "CellTable", "CellVm", "CpuState", "ExecutorStateError"]


class ExecutorStateError(JhlabError):
    """The executor was used against its lifecycle.

    :param operation: the method
    :param state: the executor's state then
    """

    def __init__(self, operation: str, state: str) -> None:
        self.operation = operation
        self.state = state
        super().__init__(f"ExecutorArch.{operation}: not allowed in state {state}")


class CpuState(enum.Enum):
    """What a cell CPU's thread does."""

    #: waits for a reset (Jailhouse: the parking page)
    PARKED = "parked"
    #: runs guest code (unless suspended)
    RUNNING = "running"
    #: the thread ends (cell destroyed)
    STOPPED = "stopped"


@dataclasses.dataclass(eq=False)
class CellSlot:
    """One memory region of a cell as a KVM memory slot."""

    slot: int
    #: the ``/dev/mem`` window behind it (None: the comm page or a VFIO BAR mapping)
    mapping: PhysMapping | None
    #: the region (DMA-flagged ones also sit in the cell's IOMMU domain)
    region: MemoryRegion | None = None


@dataclasses.dataclass(eq=False)
class CellCpu:
    """A cell CPU: its vCPU and thread, and what the thread is told to do.

    Every field below ``thread`` is guarded by the table's condition.
    """

    id: int
    cell: CellVm
    vcpu: Vcpu
    thread: threading.Thread | None = None
    state: CpuState = CpuState.PARKED
    #: held by a management operation
    suspended: bool = False
    #: reset address to apply before the next run
    pending_reset: int | None = None
    #: bumped by every park, reset and stop: an exit taken before is not delivered
    generation: int = 0
    #: the thread is inside a call into the model
    in_model: bool = False
    #: the thread has ended
    ended: bool = False
    #: CPUs the thread may run on after pinning (None: not pinned)
    affinity: frozenset[int] | None = None
    #: exits by kind (executor-side, for diagnostics; see :meth:`exit_counts`)
    exits: Counter[str] = dataclasses.field(default_factory=Counter)
    #: exits dropped because the CPU was parked or reset meanwhile
    dropped: int = 0
    #: the current run's I/O bitmap loop (its IN/OUT exits are not in :attr:`exits` yet)
    io_loop: IoBitmapLoop | None = None
    #: keeps the model in step with what the loop answers for the cell (see .cellports)
    ports_sync: CellPortsSync | None = None
    #: IN/OUT exits the I/O bitmap loops of earlier runs served (part of ``IoExit``)
    native_io: int = 0
    #: the exits KVM handles for this CPU, as Jailhouse counts them, and its failing exit
    #: (None: not traced); set and closed by the CPU's thread
    trace: VcpuExitTrace | None = None

    def exit_counts(self) -> dict[str, int]:
        """:attr:`exits` with what the I/O bitmap loop is serving (``IoExit``)."""
        counts = dict(self.exits)
        if self.io_loop is not None:
            counts["IoExit"] = counts.get("IoExit", 0) + self.io_loop.served + self.io_loop.pci_served
        return counts

    def uncounted_exits(self) -> dict[CpuStat, int]:
        """The exits the model has not counted: those KVM handled in the kernel, as
        Jailhouse counts them (:mod:`~harness.hvmodel.arch.exitstats`), and the
        configuration-port answers of the I/O bitmap loop since this CPU's last exit."""
        counts = self.trace.counts() if self.trace is not None else {}
        sync, loop = self.ports_sync, self.io_loop
        pending = sync.uncounted(loop.pci_served) if sync is not None and loop is not None else 0
        if pending:
            for stat in (CpuStat.VMEXITS_PIO, CpuStat.VMEXITS_TOTAL):
                counts[stat] = counts.get(stat, 0) + pending
        return counts

    def native_io_count(self) -> int:
        """IN/OUT exits served in machine code by the I/O bitmap loop, this run's
        included: the part of ``IoExit`` that never reached Python."""
        return self.native_io + (self.io_loop.served if self.io_loop is not None else 0)

    def held(self) -> bool:
        return self.suspended or self.cell.gate_closed

    def runnable(self) -> bool:
        return self.state is CpuState.RUNNING and not self.held()


@dataclasses.dataclass(eq=False)
class CellVm:
    """A non-root cell: its VM, CPUs and memory slots."""

    id: int
    config: CellConfig
    vm: Vm
    #: the VM's GSI routing table (devices' MSIs, IOAPIC pins); closed before the VM
    router: MsiRouter
    cpus: dict[int, CellCpu] = dataclasses.field(default_factory=dict)
    #: (virt_start, size) -> slot
    slots: dict[tuple[int, int], CellSlot] = dataclasses.field(default_factory=dict)
    #: new exits wait (a shutdown was approved; the model will suspend and park)
    gate_closed: bool = False
    #: physical (start, end) ranges of its sub-page regions (writes allowed there)
    subpage_ranges: tuple[tuple[int, int], ...] = ()
    #: (IOAPIC address, pin) pairs it owns
    ioapic_pins: frozenset[tuple[int, int]] = frozenset()
    #: what its CPUs' I/O bitmap loops share (PCI address latch, UART capture)
    ports: CellPorts | None = None


class CellTable:
    """The executor's non-root cells by id and their CPUs by CPU number.

    :attr:`cond` guards both dicts and every :class:`CellCpu` field below ``thread``;
    vCPU threads wait on it for their next order.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.cells: dict[int, CellVm] = {}
        self.cpus: dict[int, CellCpu] = {}

    def snapshot(self) -> list[CellVm]:
        """The cells now (a copy, taken under the condition)."""
        with self.cond:
            return list(self.cells.values())
