"""IOMMU unit; models ``hypervisor/arch/x86/vtd.c`` / ``amd_iommu.c`` (bookkeeping part).

What the control plane needs of the IOMMU: the unit's name and boot line, its MMIO
count (the root's view of each unit's register page), a DMA domain per cell (domain id
= cell id) and the DMA mappings, kept in each cell's IOMMU
:class:`~harness.hvmodel.paging.AddressSpace` by the control plane. Programming a real
IOMMU is the :class:`~harness.hvmodel.arch.Arch`'s business (VFIO in the executor).
Interrupt remapping is not modelled: MSIs are written as the cell wrote them, which is
Jailhouse's own path on QEMU without IR.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .unit import define_unit

if TYPE_CHECKING:
    from .cell import Cell
    from .config import SystemConfig
    from .printk import Console
    from .unit import UnitHost



class IommuUnit:
    """VT-d (or AMD IOMMU) as a unit.

    :param system: the system config (its IOMMU units)
    :param console: for the boot lines
    :param vendor: ``intel`` or ``amd``
    """

    def __init__(self, system: SystemConfig, console: Console, vendor: str) -> None:
        self.units = list(system.active_iommu_units)
        self.console = console
        self.vendor = vendor
        self.name = "AMD IOMMU" if vendor == "amd" else "VT-d"
        #: cell id -> DMA domain id
        self.domains: dict[int, int] = {}
        self.root_id = system.root_cell.id

    def init(self) -> None:
        """Report the units and open the root's domain."""
        if self.vendor != "amd":
            for unit in self.units:
                self.console.printk("DMAR unit @0x%x/0x%x\n", unit.base, unit.size)
        self.domains[self.root_id] = self.root_id

    def shutdown(self) -> None:
        """Nothing to hand back in the model."""

    def mmio_count_regions(self, cell: Cell) -> int:
        """The root's view of each unit's registers."""
        return len(self.units) if cell.id == self.root_id else 0

    def cell_init(self, cell: Cell) -> None:
        """Open the cell's DMA domain."""
        if self.units:
            self.domains[cell.id] = cell.id

    def cell_exit(self, cell: Cell) -> None:
        """Close the cell's DMA domain."""
        self.domains.pop(cell.id, None)


def _link(host: UnitHost) -> IommuUnit:
    return IommuUnit(host.system, host.console, host.params.vendor)


define_unit("iommu", _link)
