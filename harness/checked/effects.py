"""Effects: what inmates do on their own (lock their cell, commit violations), applied
to the oracle so that it predicts what the guest will show."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Protocol

from harness.hvmodel.abi import CellState, CommOffset, comm_write_u32

if TYPE_CHECKING:
    from harness.checked.oracle import Oracle


class Effect(Protocol):
    """Something a cell does by itself; :meth:`apply` makes the oracle do the same."""

    def apply(self, oracle: Oracle) -> None:
        """Change the oracle's state accordingly."""


@dataclasses.dataclass(frozen=True)
class SetsState:
    """The inmate writes its comm region's ``cell_state`` (e.g. RUNNING_LOCKED).

    :param cell: the cell's name
    :param state: the new state
    """

    cell: str
    state: CellState

    def apply(self, oracle: Oracle) -> None:
        cell = oracle.hv_cell(self.cell)
        comm_write_u32(cell.comm_page, CommOffset.CELL_STATE, int(self.state))


def Locks(cell: str) -> SetsState:
    """apic-demo's effect: the cell locks itself (RUNNING_LOCKED) once calibrated."""
    return SetsState(cell, CellState.RUNNING_LOCKED)


@dataclasses.dataclass(frozen=True)
class Violation:
    """The inmate commits an access the hypervisor must stop: the oracle takes the same
    exit on the cell's CPU (``handle_mmio`` / ``handle_pio``), so it prints the same
    ``FATAL`` line, parks the CPU and fails the cell.

    :param cell: the cell's name
    :param kind: ``mmio`` or ``pio``
    :param address: guest-physical address (mmio) or port (pio)
    :param size: access size in bytes
    :param write: a write (else a read)
    :param value: the value written
    :param cpu: the CPU that commits it (default: the cell's first)
    """

    cell: str
    kind: str
    address: int
    size: int = 4
    write: bool = True
    value: int = 0
    cpu: int | None = None

    def apply(self, oracle: Oracle) -> None:
        hv = oracle.hv
        cpu = self.cpu if self.cpu is not None else min(oracle.hv_cell(self.cell).cpus)
        if self.kind == "mmio":
            hv.handle_mmio(cpu, self.address, self.size, self.write, self.value)
        elif self.kind == "pio":
            hv.handle_pio(cpu, self.address, self.size, self.write, self.value)
        else:
            raise ValueError(f"Violation kind {self.kind!r}: expected mmio or pio")
