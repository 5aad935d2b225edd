"""Hypervisor units; models ``include/jailhouse/unit.h`` (``DEFINE_UNIT``).

A unit is a subsystem with five hooks. The hypervisor runs ``init`` forward at enable
and ``shutdown`` in reverse at disable; ``cell_init`` forward at cell creation and
``cell_exit`` in reverse at destruction. When a ``cell_init`` fails, only the units
before it are unwound, in reverse order, and the error propagates.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from .errors import HvError

if TYPE_CHECKING:
    from .cell import Cell


class Unit(Protocol):
    """The hook set of one unit (``struct unit``)."""

    #: the name printed as ``Initializing unit: <name>``
    name: str

    def init(self) -> None:
        """Bring the unit up at enable (the root cell exists, unconfigured).

        :raise HvError: the enable fails with this errno
        """

    def shutdown(self) -> None:
        """Hand the hardware back at disable; cannot fail."""

    def mmio_count_regions(self, cell: Cell) -> int:
        """MMIO regions this unit will register for ``cell`` (sizes the cell's table)."""
        ...

    def cell_init(self, cell: Cell) -> None:
        """Set the unit up for a new cell.

        :raise HvError: the creation fails with this errno
        :see: :meth:`cell_exit`
        """

    def cell_exit(self, cell: Cell) -> None:
        """Tear down what :meth:`cell_init` did; cannot fail."""


class UnitRegistry:
    """Units in link order, with Jailhouse's iteration rules.

    :param units: the units, in the order ``init`` and ``cell_init`` run
    """

    def __init__(self, units: list[Unit]) -> None:
        self.units: tuple[Unit, ...] = tuple(units)

    def __iter__(self) -> Iterator[Unit]:
        return iter(self.units)

    def names(self) -> list[str]:
        """Unit names in link order."""
        return [unit.name for unit in self.units]

    def mmio_count_regions(self, cell: Cell) -> int:
        """Sum of the units' MMIO region counts for ``cell``."""
        return sum(unit.mmio_count_regions(cell) for unit in self.units)

    def cell_init(self, cell: Cell) -> None:
        """``cell_init`` of every unit in order; on failure unwind the earlier ones.

        :raise HvError: the failing unit's error, after the unwind
        """
        done: list[Unit] = []
        for unit in self.units:
            try:
                unit.cell_init(cell)
            except HvError:
                for earlier in reversed(done):
                    earlier.cell_exit(cell)
                raise
            done.append(unit)

    def cell_exit(self, cell: Cell) -> None:
        """``cell_exit`` of every unit in reverse order."""
        for unit in reversed(self.units):
            unit.cell_exit(cell)

    def shutdown(self) -> None:
        """``shutdown`` of every unit in reverse order."""
        for unit in reversed(self.units):
            unit.shutdown()
