"""The executor's interrupt routing: MSIs into cells' VMs, the cells' IOAPIC pins and the
physical IOAPIC's registers; stands where ``hypervisor/arch/x86/{apic,ioapic}.c`` deliver
and program interrupts.

Cells' VMs have a split irqchip (in-kernel local APICs; IOAPIC and PIC accesses exit to
the model, as Jailhouse intercepts them) or, where KVM lacks it, the full in-kernel
irqchip. An MSI the model sends (ivshmem doorbells) is injected with
``KVM_SIGNAL_MSI``; MSIs of passed-through devices reach the VM without an exit, through
VFIO eventfds and KVM irqfds (:mod:`~harness.hvmodel.arch.passthrough`). IPIs, INIT and
SIPI between a cell's CPUs stay inside KVM's local APICs (without Jailhouse's
``CPU %d received SIPI`` line).

**IOAPIC pins a cell owns** (its config's irqchip pin bitmap) are delivered by
:class:`~.pins.CellPins`, one per cell with a split irqchip: the redirection entries the
cell writes (the model moderates them, as Jailhouse does, and passes them on through
:meth:`InterruptRouter.ioapic_write`) become KVM routes; what asserts a pin is, once the
cell's creation is committed (:meth:`InterruptRouter.connect`), the INTx of one of the
cell's passed-through devices whose line it is (VFIO), and for every other pin the root's
line itself, taken from the root's Linux with ``jhlab_gsi``
(:mod:`~harness.hvmodel.arch.gsi`): the ACPI SCI of Jailhouse's ioapic-demo, ISA lines.
The root's Linux gets those lines back when the cell is destroyed. EOIs come from KVM
(:meth:`InterruptRouter.eoi`) and from the IOAPIC's EOI register
(:meth:`InterruptRouter.ioapic_eoi_write`).

**The physical IOAPIC** belongs to the root's Linux, which drives it (Jailhouse owns it):
reads go to the hardware, and nothing is written to it: the cells' pins are delivered as
above, and entries of the root's pins are the root's business. Debian's kernel has
``CONFIG_IO_STRICT_DEVMEM``: ``/dev/mem`` refuses the IOAPIC's range unless the kernel is
booted with ``iomem=relaxed``; an IOAPIC out of reach reads as a detached one (24 pins,
version 0x11, entries masked), with a warning.

Limit: with the full in-kernel irqchip (no split irqchip in KVM) KVM's own IOAPIC takes
the cell's IOAPIC accesses, and owned pins are not delivered.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from ...abi import IOAPIC_REDIR_MASK, IOAPIC_REDIR_TBL_START, IOAPIC_REG_DATA, IOAPIC_REG_EOI, IOAPIC_VER
from .. import HOST_PAGE_SIZE
from ..gsi import GSI_DEVICE, GsiError, GsiMap
from ..hostmem import PhysMapping
from .cells import CellTable, CellVm
from .memory import MmioWindows
from .pins import CellPins, PinSource, RootLineSource, VfioIntxSource

if TYPE_CHECKING:
    from ..passthrough import Passthrough

__all__ = ["InterruptRouter"]

LOG = logging.getLogger(__name__)

#: pins of the IOAPIC model used when the physical one cannot be mapped (QEMU's count)
DETACHED_IOAPIC_PINS: Final = 24
#: the vector field of an IOAPIC EOI register write
_EOI_VECTOR: Final = 0xFF


class InterruptRouter:
    """MSIs into cells, cells' IOAPIC pins and the IOAPIC's registers (module docstring).

    Lifecycle per cell: :meth:`cell_created` (with its VM) -> :meth:`connect` (its
    creation committed: the lines taken) -> :meth:`ioapic_write`, :meth:`eoi`,
    :meth:`device_removed` -> :meth:`release` (destroyed: the lines given back).

    :param table: the cells (their VMs and IOAPIC pins)
    :param windows: the uncached ``/dev/mem`` windows (the IOAPIC's page)
    :param passthrough: the cells' passed-through devices (their INTx)
    :param gsi_device: the ``jhlab_gsi`` module's device
    :param gsi_map: which GSI each IOAPIC pin is (default: the firmware's MADT, read on
        first use)
    """

    def __init__(self, table: CellTable, windows: MmioWindows, passthrough: Passthrough, *,
                 gsi_device: str = GSI_DEVICE, gsi_map: GsiMap | None = None) -> None:
        self.table = table
        self.windows = windows
        self.passthrough = passthrough
        self.gsi_device = gsi_device
        self._gsi_map = gsi_map
        #: IOAPICs out of reach of /dev/mem (warned about once)
        self._detached_ioapics: set[int] = set()
        self._pins: dict[int, CellPins] = {}
        self._connected: set[int] = set()

    @property
    def gsi_map(self) -> GsiMap:
        if self._gsi_map is None:
            self._gsi_map = GsiMap.from_firmware()
        return self._gsi_map

    # --- MSIs -----------------------------------------------------------------------------

    def send_msi(self, cell_id: int, address: int, data: int) -> None:
        """``KVM_SIGNAL_MSI`` into the cell's VM (the root cannot receive it)."""
        cell = self.table.cells.get(cell_id)
        if cell is None:
            LOG.debug("MSI %#x/%#x for cell %d not delivered (no VM)", address, data, cell_id)
            return
        cell.vm.signal_msi(address, data)

    # --- cells' pins ------------------------------------------------------------------------

    def cell_created(self, cell: CellVm, *, split_irqchip: bool) -> None:
        """The cell's pins (none delivered without a split irqchip, see the module
        docstring)."""
        if not cell.ioapic_pins:
            return
        if not split_irqchip:
            LOG.warning("cell %s: IOAPIC pins %s not delivered: KVM has no split irqchip",
                        cell.config.name, sorted(pin for _, pin in cell.ioapic_pins))
            return
        self._pins[cell.id] = CellPins(cell.vm, cell.router, cell.ioapic_pins, cell.config.name)

    def connect(self, cell_id: int) -> None:
        """Give the cell's pins their lines, once (after its creation): the INTx of its
        passed-through devices on them, else the root's lines. A line that cannot be
        taken is logged and not delivered."""
        pins = self._pins.get(cell_id)
        if pins is None or cell_id in self._connected:
            return
        self._connected.add(cell_id)
        with_device: set[tuple[int, int]] = set()
        for passed in self.passthrough.devices_of(cell_id):
            if passed.intx is None or passed.intx_gsi is None:
                continue
            where = self.gsi_map.pin(passed.intx_gsi)
            if where is None:  # no MADT: the PC layout, GSI = pin
                where = next(((a, p) for a, p in pins.pins if p == passed.intx_gsi), (0, passed.intx_gsi))
            if not pins.add_source(*where, VfioIntxSource(self.passthrough, passed)):
                LOG.warning("cell %s: INTx of %s (GSI %d) not delivered: the cell owns no IOAPIC "
                            "pin of that line", pins.name, passed.address.short, passed.intx_gsi)
                continue
            with_device.add(where)
        for ioapic, pin in sorted(pins.pins):
            if (ioapic, pin) in with_device:
                continue
            gsi = self.gsi_map.gsi(ioapic, pin)
            try:
                source: PinSource = RootLineSource(gsi, device=self.gsi_device)
            except GsiError as exc:
                LOG.warning("cell %s: IOAPIC %#x pin %d not delivered: %s", pins.name, ioapic, pin, exc)
                continue
            pins.add_source(ioapic, pin, source)

    def device_removed(self, cell_id: int, bdf: int) -> None:
        """The device leaves the cell: its INTx no longer asserts the cell's pin."""
        pins = self._pins.get(cell_id)
        if pins is not None:
            pins.remove_sources(lambda s: isinstance(s, VfioIntxSource) and s.passed.bdf == bdf)

    def release(self, cell_id: int) -> None:
        """The cell is destroyed: its routes go, the root gets its lines back."""
        self._connected.discard(cell_id)
        pins = self._pins.pop(cell_id, None)
        if pins is not None:
            pins.close()

    def status(self) -> dict[int, dict[str, object]]:
        """The cells' pins (:meth:`~.pins.CellPins.status`) by cell id."""
        return {cell_id: pins.status() for cell_id, pins in sorted(self._pins.items())}

    def eoi(self, cell_id: int, vector: int) -> None:
        """A level-triggered EOI of ``vector`` in the cell (``KVM_EXIT_IOAPIC_EOI``)."""
        pins = self._pins.get(cell_id)
        if pins is not None:
            pins.eoi(vector)

    # --- the IOAPIC's registers -------------------------------------------------------------

    def _ioapic(self, address: int) -> PhysMapping | None:
        mapping, _ = self.windows.window(address, IOAPIC_REG_DATA + 4)
        if mapping is None and address not in self._detached_ioapics:
            LOG.warning(
                "IOAPIC %#x not reachable through %s (CONFIG_IO_STRICT_DEVMEM: boot with "
                "iomem=relaxed); cells see a detached IOAPIC with %d pins",
                address,
                self.windows.mem_device,
                DETACHED_IOAPIC_PINS,
            )
            self._detached_ioapics.add(address)
        return mapping

    def ioapic_read(self, address: int, index: int) -> int:
        """Register ``index`` of the physical IOAPIC (index/data pair); of a detached
        IOAPIC when the hardware is out of reach."""
        mapping = self._ioapic(address)
        if mapping is None:
            return _detached_ioapic_reset(index)
        base = address & (HOST_PAGE_SIZE - 1)
        with self.windows.lock:
            mapping.write_value(base, 4, index)
            return mapping.read_value(base + IOAPIC_REG_DATA, 4)

    def ioapic_write(self, address: int, index: int, value: int) -> None:
        """Half of a redirection entry: to the cell that owns the pin (its delivery);
        nothing for the root's pins."""
        if index >= IOAPIC_REDIR_TBL_START:
            pin, high = divmod(index - IOAPIC_REDIR_TBL_START, 2)
            for pins in list(self._pins.values()):
                if pins.owns(address, pin):
                    pins.write(address, pin, bool(high), value)
                    return
        LOG.debug("IOAPIC %#x index %#x = %#x for the root: not performed", address, index, value)

    def ioapic_eoi_write(self, address: int, size: int, value: int) -> bool:
        """A write of the IOAPIC's EOI register (Jailhouse lets a cell with pins write the
        physical one): ends the vector on every cell pin of that IOAPIC. False when
        ``address`` is not the EOI register of an IOAPIC a cell has pins of."""
        owners = [pins for pins in self._pins.values()
                  if any(ioapic + IOAPIC_REG_EOI == address for ioapic, _ in pins.pins)]
        if size != 4 or not owners:
            return False
        for pins in owners:
            pins.eoi(value & _EOI_VECTOR)
        return True


def _detached_ioapic_reset(index: int) -> int:
    """Registers of an IOAPIC after reset: version 0x11 with :data:`DETACHED_IOAPIC_PINS`
    entries (QEMU's), every redirection entry masked."""
    if index == IOAPIC_VER:
        return ((DETACHED_IOAPIC_PINS - 1) << 16) | 0x11
    if index >= IOAPIC_REDIR_TBL_START and (index - IOAPIC_REDIR_TBL_START) % 2 == 0:
        return IOAPIC_REDIR_MASK
    return 0
