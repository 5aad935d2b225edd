"""The executor's interrupt routing: MSIs into cells' VMs and the physical IOAPIC's
registers; stands where ``hypervisor/arch/x86/{apic,ioapic}.c`` deliver and program
interrupts.

Cells' VMs have a split irqchip (in-kernel local APICs; IOAPIC and PIC accesses exit to
the model, as Jailhouse intercepts them) or, where KVM lacks it, the full in-kernel
irqchip. An MSI the model sends (ivshmem doorbells) is injected with
``KVM_SIGNAL_MSI``; MSIs of passed-through devices reach the VM without an exit, through
VFIO eventfds and KVM irqfds (:mod:`~harness.hvmodel.arch.passthrough`). IPIs, INIT and
SIPI between a cell's CPUs stay inside KVM's local APICs (without Jailhouse's
``CPU %d received SIPI`` line).

**The IOAPIC** belongs to the root's Linux, which still drives it (Jailhouse owns it):
reads always go to the hardware; redirection writes only for pins a non-root cell owns.
The index/data pair is not locked against Linux, which touches it rarely after boot.
Debian's kernel has ``CONFIG_IO_STRICT_DEVMEM``: ``/dev/mem`` refuses the IOAPIC's range
unless the kernel is booted with ``iomem=relaxed``; an IOAPIC out of reach is replaced by
a detached model (24 pins, version 0x11, entries masked, writes kept), with a warning.

**Not done here**: INTx of passed-through devices.
"""

from __future__ import annotations

import logging
from typing import Final

from ...abi import IOAPIC_REDIR_MASK, IOAPIC_REDIR_TBL_START, IOAPIC_REG_DATA, IOAPIC_VER
from .. import HOST_PAGE_SIZE
from ..hostmem import PhysMapping
from .cells import CellTable
from .memory import MmioWindows

__all__ = ["InterruptRouter"]

LOG = logging.getLogger(__name__)

#: pins of the IOAPIC model used when the physical one cannot be mapped (QEMU's count)
DETACHED_IOAPIC_PINS: Final = 24


class InterruptRouter:
    """MSIs into cells and the IOAPIC's registers (module docstring).

    :param table: the cells (their VMs and IOAPIC pins)
    :param windows: the uncached ``/dev/mem`` windows (the IOAPIC's page)
    """

    def __init__(self, table: CellTable, windows: MmioWindows) -> None:
        self.table = table
        self.windows = windows
        #: IOAPICs out of reach of /dev/mem: address -> written registers
        self._detached_ioapics: dict[int, dict[int, int]] = {}

    def send_msi(self, cell_id: int, address: int, data: int) -> None:
        """``KVM_SIGNAL_MSI`` into the cell's VM (the root cannot receive it)."""
        cell = self.table.cells.get(cell_id)
        if cell is None:
            LOG.debug("MSI %#x/%#x for cell %d not delivered (no VM)", address, data, cell_id)
            return
        cell.vm.signal_msi(address, data)

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
            self._detached_ioapics[address] = {}
        return mapping

    def ioapic_read(self, address: int, index: int) -> int:
        """Register ``index`` of the physical IOAPIC (index/data pair); of a detached
        IOAPIC model when the hardware is out of reach."""
        mapping = self._ioapic(address)
        if mapping is None:
            return self._detached_ioapics[address].get(index, _detached_ioapic_reset(index))
        base = address & (HOST_PAGE_SIZE - 1)
        with self.windows.lock:
            mapping.write_value(base, 4, index)
            return mapping.read_value(base + IOAPIC_REG_DATA, 4)

    def ioapic_write(self, address: int, index: int, value: int) -> None:
        """Write register ``index``, for redirection entries of pins a non-root cell owns."""
        pin = (index - IOAPIC_REDIR_TBL_START) // 2
        with self.table.cond:
            owned = index >= IOAPIC_REDIR_TBL_START and any(
                (address, pin) in cell.ioapic_pins for cell in self.table.cells.values()
            )
        if not owned:
            LOG.debug("IOAPIC %#x index %#x = %#x for the root: not performed", address, index, value)
            return
        mapping = self._ioapic(address)
        if mapping is None:
            self._detached_ioapics[address][index] = value & 0xFFFFFFFF
            return
        base = address & (HOST_PAGE_SIZE - 1)
        with self.windows.lock:
            mapping.write_value(base, 4, index)
            mapping.write_value(base + IOAPIC_REG_DATA, 4, value)


def _detached_ioapic_reset(index: int) -> int:
    """Registers of an IOAPIC after reset: version 0x11 with :data:`DETACHED_IOAPIC_PINS`
    entries (QEMU's), every redirection entry masked."""
    if index == IOAPIC_VER:
        return ((DETACHED_IOAPIC_PINS - 1) << 16) | 0x11
    if index >= IOAPIC_REDIR_TBL_START and (index - IOAPIC_REDIR_TBL_START) % 2 == 0:
        return IOAPIC_REDIR_MASK
    return 0
