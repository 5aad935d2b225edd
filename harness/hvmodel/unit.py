"""Hypervisor units; models ``include/jailhouse/unit.h`` (``DEFINE_UNIT``).

A unit is a subsystem with five hooks. The hypervisor runs ``init`` forward at enable
and ``shutdown`` in reverse at disable; ``cell_init`` forward at cell creation and
``cell_exit`` in reverse at destruction. When a ``cell_init`` fails, only the units
before it are unwound, in reverse order, and the error propagates.

Units define themselves: a unit module calls :func:`define_unit` when it is imported, as
``DEFINE_UNIT`` puts a ``struct unit`` into a linker section; :data:`LINK_ORDER` is the
order Jailhouse's x86 link gives them, written down once. Each hypervisor builds its own
instances (:meth:`UnitRegistry.link`), so two hypervisors never share unit state.

A unit sees the hypervisor only through :class:`UnitHost`: the system config, the build
parameters, the console, the machine (the :class:`~harness.hvmodel.arch.Arch`), the
root cell and the page pools, which is what Jailhouse's units reach as globals. No unit
imports the control plane.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

from .errors import HvError

if TYPE_CHECKING:
    from .arch import Arch
    from .cell import Cell
    from .config import SystemConfig
    from .paging import PagePool
    from .params import HvParams
    from .printk import Console

__all__ = ["LINK_ORDER", "Unit", "UnitFactory", "UnitHost", "UnitRegistry", "define_unit"]


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


class UnitHost(Protocol):
    """What a unit may use of the hypervisor it serves (the globals of Jailhouse's units).

    The :class:`~harness.hvmodel.core.HypervisorCore` provides it; :attr:`root` exists
    from enable on (units are built before, and look it up when they run).
    """

    @property
    def system(self) -> SystemConfig:
        """The system configuration."""
        ...

    @property
    def params(self) -> HvParams:
        """Build options and machine facts."""
        ...

    @property
    def console(self) -> Console:
        """The hypervisor console (``printk``)."""
        ...

    @property
    def arch(self) -> Arch:
        """The machine: every hardware access goes through it."""
        ...

    @property
    def root(self) -> Cell:
        """The root cell (``root_cell``)."""
        ...

    @property
    def mem_pool(self) -> PagePool:
        """Hypervisor memory (``mem_pool``)."""
        ...

    @property
    def remap_pool(self) -> PagePool:
        """Hypervisor address space for device mappings (``remap_pool``)."""
        ...


#: builds a unit for one hypervisor, or None when that build or machine has none (a
#: ``CONFIG_*`` option off, a unit of the other CPU vendor)
UnitFactory = Callable[[UnitHost], "Unit | None"]

#: Jailhouse's x86 link order of the units: ``init`` and ``cell_init`` run in this order,
#: ``shutdown`` and ``cell_exit`` in reverse. Each key is the unit's module in
#: :mod:`harness.hvmodel` (the IOMMU unit is VT-d or the AMD IOMMU).
LINK_ORDER: Final = ("iommu", "ioapic", "testdev", "cat", "pci")

_DEFINED: dict[str, UnitFactory] = {}

_U = TypeVar("_U")


def define_unit(key: str, factory: UnitFactory) -> None:
    """Add a unit to the units every hypervisor builds (``DEFINE_UNIT``).

    :param key: the unit's place in :data:`LINK_ORDER`
    :param factory: builds the unit for one hypervisor (see :data:`UnitFactory`)
    :raise ValueError: for a key not in :data:`LINK_ORDER`, or one defined twice
    """
    if key not in LINK_ORDER:
        raise ValueError(f"unit {key!r}: not in the link order {LINK_ORDER}; add it there")
    known = _DEFINED.get(key)
    if known is not None and known is not factory:
        raise ValueError(f"unit {key!r} is defined twice")
    _DEFINED[key] = factory


class UnitRegistry:
    """One hypervisor's units in link order, with Jailhouse's iteration rules.

    :param units: the units, in the order ``init`` and ``cell_init`` run
    """

    def __init__(self, units: Iterable[Unit]) -> None:
        self.units: tuple[Unit, ...] = tuple(units)

    @classmethod
    def link(cls, host: UnitHost) -> UnitRegistry:
        """Build every defined unit for ``host``, in :data:`LINK_ORDER`.

        :raise LookupError: when a unit of the link order was never defined (its module
            was not imported)
        """
        missing = [key for key in LINK_ORDER if key not in _DEFINED]
        if missing:
            modules = ", ".join(f"harness.hvmodel.{key}" for key in missing)
            raise LookupError(f"units not defined: import {modules} before building a hypervisor")
        built = (_DEFINED[key](host) for key in LINK_ORDER)
        return cls(unit for unit in built if unit is not None)

    def __iter__(self) -> Iterator[Unit]:
        return iter(self.units)

    def names(self) -> list[str]:
        """Unit names in link order."""
        return [unit.name for unit in self.units]

    def find(self, kind: type[_U]) -> _U | None:
        """The unit of class ``kind``, or None when this hypervisor has none."""
        for unit in self.units:
            if isinstance(unit, kind):
                return unit
        return None

    def require(self, kind: type[_U]) -> _U:
        """The unit of class ``kind``.

        :raise LookupError: when this hypervisor has none
        """
        unit = self.find(kind)
        if unit is None:
            raise LookupError(f"no {kind.__name__} unit among {self.names()}")
        return unit

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
