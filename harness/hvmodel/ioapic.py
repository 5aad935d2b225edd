"""IOAPIC virtualization; models ``hypervisor/arch/x86/ioapic.c`` (the "IOAPIC" unit).

Each cell irqchip names a physical IOAPIC and a bitmap of the pins the cell owns. The
hypervisor shadows every physical IOAPIC's redirection table, intercepts the IOAPIC page
in every cell that lists it (one MMIO region per irqchip), and lets a cell touch only
its own pins. Pins move from the root at create and come back at destroy, limited to
the pins the root's *configuration* lists.

x86 only: ``pin_base`` must be 0; at most :data:`MAX_CELL_IOAPICS` irqchips per cell;
at most :data:`IOAPIC_MAX_PINS` pins per physical IOAPIC. Without interrupt remapping
(QEMU) a redirection entry is written to the hardware as the cell wrote it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from .abi import (
    IOAPIC_MAX_PINS,
    IOAPIC_REDIR_MASK,
    IOAPIC_REDIR_TBL_START,
    IOAPIC_REG_DATA,
    IOAPIC_REG_EOI,
    IOAPIC_REG_INDEX,
    IOAPIC_VER,
    PAGE_SIZE,
)
from .cell import CellIoapic, PhysIoapic
from .errors import Errno, HvError
from .mmio import MmioAccess, MmioHandler, MmioResult
from .printk import FATAL_IOAPIC
from .unit import define_unit

if TYPE_CHECKING:
    from .cell import Cell
    from .config import Irqchip
    from .unit import UnitHost

#: irqchips per cell: one page of ``struct cell_ioapic`` (48 bytes each on x86-64)
MAX_CELL_IOAPICS: Final = PAGE_SIZE // 48


def _config_bitmap(chip: Irqchip) -> int:
    value = 0
    for index, word in enumerate(chip.pin_bitmap):
        value |= word << (32 * index)
    return value


class IoapicUnit:
    """The IOAPIC unit (``DEFINE_UNIT(ioapic, "IOAPIC")``); a cell's views are
    :class:`~harness.hvmodel.cell.CellIoapic`.

    Lifecycle: a unit (:mod:`.unit`); besides its hooks the control plane calls
    :meth:`cell_reset` at cell start (``arch_cell_reset``).

    :param host: what the unit may use of its hypervisor
    """

    name = "IOAPIC"

    def __init__(self, host: UnitHost) -> None:
        self.host = host
        self.phys: dict[int, PhysIoapic] = {}

    # -- unit hooks -------------------------------------------------------------------

    def init(self) -> None:
        """Take over the root's IOAPICs."""
        self.cell_init(self.host.root)

    def shutdown(self) -> None:
        """Restore every redirection table from its shadow."""
        for phys in self.phys.values():
            for pin, entry in enumerate(phys.shadow):
                self._write_entry(phys, pin, entry)

    def mmio_count_regions(self, cell: Cell) -> int:
        """One IOAPIC page per irqchip."""
        return len(cell.config.irqchips)

    def cell_init(self, cell: Cell) -> None:
        """Claim the cell's pins (``ioapic_cell_init``).

        :raise HvError: ``ERANGE`` (too many irqchips), ``EINVAL`` (``pin_base``),
            ``EIO`` (IOAPIC with too many pins)
        """
        chips = cell.config.irqchips
        if len(chips) > MAX_CELL_IOAPICS:
            raise HvError(Errno.ERANGE, f"{len(chips)} irqchips")
        try:
            for chip in chips:
                if chip.pin_base != 0:
                    raise HvError(Errno.EINVAL, f"irqchip {chip.address:#x}: pin_base != 0")
                phys = self._get_phys(chip.address)
                bitmap = _config_bitmap(chip) & ((1 << phys.pins) - 1)
                view = CellIoapic(chip, phys, bitmap)
                cell.ioapics.append(view)
                if cell is not self.host.root:
                    for root_view in self.host.root.ioapics:
                        if root_view.address == chip.address:
                            root_view.pin_bitmap &= ~bitmap
                cell.mmio.register(chip.address, PAGE_SIZE, self._handler(cell, view))
        except HvError:
            self.cell_exit(cell)
            raise

    def cell_exit(self, cell: Cell) -> None:
        """Mask the cell's pins and give them back to the root (configured pins only)."""
        root = self.host.root
        for view in cell.ioapics:
            self._mask_pins(view)
            cell.mmio.unregister(view.address)
            if cell is root:
                continue
            for root_view in root.ioapics:
                if root_view.address == view.address:
                    root_view.pin_bitmap |= view.pin_bitmap & _config_bitmap(root_view.info)
        cell.ioapics = []

    # -- other hooks ------------------------------------------------------------------

    def cell_reset(self, cell: Cell) -> None:
        """Mask every pin the cell owns (at cell start)."""
        for view in cell.ioapics:
            self._mask_pins(view)

    # -- helpers ----------------------------------------------------------------------

    def _get_phys(self, address: int) -> PhysIoapic:
        phys = self.phys.get(address)
        if phys is not None:
            return phys
        arch = self.host.arch
        version = arch.ioapic_read(address, IOAPIC_VER)
        pins = ((version >> 16) & 0xFF) + 1
        if pins > IOAPIC_MAX_PINS:
            raise HvError(Errno.EIO, f"IOAPIC {address:#x} has {pins} pins")
        shadow = []
        for pin in range(pins):
            low = arch.ioapic_read(address, IOAPIC_REDIR_TBL_START + 2 * pin)
            high = arch.ioapic_read(address, IOAPIC_REDIR_TBL_START + 2 * pin + 1)
            shadow.append((high << 32) | low)
        phys = PhysIoapic(address, pins, shadow)
        self.phys[address] = phys
        return phys

    def _write_entry(self, phys: PhysIoapic, pin: int, entry: int) -> None:
        arch = self.host.arch
        arch.ioapic_write(phys.address, IOAPIC_REDIR_TBL_START + 2 * pin, entry & 0xFFFFFFFF)
        arch.ioapic_write(phys.address, IOAPIC_REDIR_TBL_START + 2 * pin + 1, entry >> 32)

    def _mask_pins(self, view: CellIoapic) -> None:
        phys = view.phys
        for pin in view.pins():
            entry = phys.shadow[pin] | IOAPIC_REDIR_MASK
            if entry != phys.shadow[pin]:
                phys.shadow[pin] = entry
                self._write_entry(phys, pin, entry)

    def _handler(self, cell: Cell, view: CellIoapic) -> MmioHandler:
        console = self.host.console
        arch = self.host.arch

        def fatal(access: MmioAccess) -> MmioResult:
            console.printk(
                FATAL_IOAPIC,
                "write" if access.is_write else "read",
                access.address,
                view.index_reg,
            )
            return MmioResult.ERROR

        def handler(access: MmioAccess) -> MmioResult:
            phys = view.phys
            if access.address == IOAPIC_REG_INDEX:
                if access.is_write:
                    view.index_reg = access.value & 0xFF
                else:
                    access.value = view.index_reg
                return MmioResult.HANDLED
            if access.address == IOAPIC_REG_DATA:
                index = view.index_reg
                if index < IOAPIC_REDIR_TBL_START:
                    if access.is_write:
                        return fatal(access)
                    access.value = arch.ioapic_read(phys.address, index)
                    return MmioResult.HANDLED
                if index >= IOAPIC_REDIR_TBL_START + 2 * phys.pins:
                    return fatal(access)
                pin, high = divmod(index - IOAPIC_REDIR_TBL_START, 2)
                if not view.pin_bitmap >> pin & 1:
                    if not access.is_write:
                        access.value = 0
                    return MmioResult.HANDLED
                entry = phys.shadow[pin]
                if not access.is_write:
                    access.value = (entry >> 32) if high else (entry & 0xFFFFFFFF)
                    return MmioResult.HANDLED
                value = access.value & 0xFFFFFFFF
                entry = (entry & 0xFFFFFFFF) | (value << 32) if high else ((entry & ~0xFFFFFFFF) | value)
                phys.shadow[pin] = entry
                arch.ioapic_write(phys.address, index, value)
                return MmioResult.HANDLED
            if access.address == IOAPIC_REG_EOI and access.is_write and view.pin_bitmap:
                arch.mmio_write(phys.address + IOAPIC_REG_EOI, 4, access.value)
                return MmioResult.HANDLED
            return fatal(access)

        return handler

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly snapshot of the physical shadows."""
        return {
            f"{address:#x}": {"pins": phys.pins, "shadow": list(phys.shadow)}
            for address, phys in self.phys.items()
        }


define_unit("ioapic", IoapicUnit)
