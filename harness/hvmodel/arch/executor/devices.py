"""The physical devices cells reach through the hypervisor: MMIO registers, PCI config
space and which cell owns a device; stands where ``hypervisor/arch/x86/pci.c``
(``arch_pci_add_device``, ``arch_pci_remove_device``, config-space access) is, with the
executor's **root hardware policy**.

The root cell runs natively (Linux drives its devices and its IOAPIC pins itself), so
the executor does not let the model's shadow bookkeeping write root-owned hardware: PCI
config writes reach a device only while a non-root cell owns it (and right after it was
taken from one), MSI-X table and MSI-X table writes only inside a non-root cell's device, MMIO
writes otherwise only inside a non-root cell's sub-page region (a cell's IOAPIC EOI
register writes are :mod:`.interrupts`' business). Reads always
go to the hardware (failed reads return all ones).

**PCI passthrough** (:mod:`~harness.hvmodel.arch.passthrough`): a physical endpoint of a
non-root cell is claimed for ``vfio-pci`` at ``pci_add_device`` and released at
``pci_remove_device``; its BARs become KVM slots on VFIO's own mappings, the cell's DMA
regions its IOMMU domain, its MSI and MSI-X vectors VFIO eventfds routed into the cell's
VM; config space and MSI-X table accesses the model lets through go to VFIO or to the
shadows there. A configured device the machine lacks is not passed through (Jailhouse's
driver skips it too); its config space reads all ones.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...abi import PCI_TYPE_DEVICE
from .cells import CellTable
from .memory import CellMemory, MmioWindows

if TYPE_CHECKING:
    from ...config import PciDevice
    from ..passthrough import Passthrough

__all__ = ["DeviceAccess"]

LOG = logging.getLogger(__name__)


class DeviceAccess:
    """MMIO and PCI config space of physical devices under the root hardware policy, and
    the devices' owners (module docstring).

    :param table: the cells (sub-page regions, IOAPIC pins, VMs)
    :param windows: the uncached ``/dev/mem`` windows
    :param memory: the cells' memory (DMA regions for a device's IOMMU domain)
    :param passthrough: the VFIO side of cells' devices
    :param pci_sysfs: where PCI devices' config files are (``/sys/bus/pci/devices``)
    :param pci_domain: gives the PCI domain of the devices (the system config's)
    """

    def __init__(
        self,
        table: CellTable,
        windows: MmioWindows,
        memory: CellMemory,
        passthrough: Passthrough,
        *,
        pci_sysfs: str,
        pci_domain: Callable[[], int],
    ) -> None:
        self.table = table
        self.windows = windows
        self.memory = memory
        self.passthrough = passthrough
        self.pci_sysfs = pci_sysfs
        self._pci_domain = pci_domain
        self._pci_fds: dict[int, int] = {}
        #: BDF -> owning non-root cell id; -1: just taken from a cell (writes still allowed)
        self._device_owner: dict[int, int] = {}
        self._msix_ranges: dict[int, tuple[int, int]] = {}

    def close(self) -> None:
        """Close the config-space files; idempotent."""
        for fd in self._pci_fds.values():
            os.close(fd)
        self._pci_fds.clear()

    # --- MMIO ------------------------------------------------------------------------------

    def mmio_read(self, address: int, size: int) -> int:
        """One uncached read of host-physical MMIO; all ones when it cannot be mapped. The
        MSI-X table of a passed-through device is its shadow."""
        passed = self.passthrough.msix_device(address, size)
        if passed is not None:
            return self.passthrough.msix_read(passed, address, size)
        mapping, offset = self.windows.window(address, size)
        if mapping is None:
            return (1 << (8 * size)) - 1
        return mapping.read_value(offset, size)

    def mmio_write(self, address: int, size: int, value: int) -> None:
        """One uncached write of host-physical MMIO inside a non-root cell's sub-page
        region or device MSI-X table (root hardware policy); else dropped. The MSI-X table
        of a passed-through device is its shadow."""
        passed = self.passthrough.msix_device(address, size)
        if passed is not None:
            self.passthrough.msix_write(passed, address, size, value)
            return
        if not self._cell_mmio(address, size):
            LOG.debug("MMIO write %#x+%d = %#x for the root: not performed", address, size, value)
            return
        mapping, offset = self.windows.window(address, size)
        if mapping is not None:
            mapping.write_value(offset, size, value)

    def _cell_mmio(self, address: int, size: int) -> bool:
        end = address + size
        for cell in self.table.snapshot():
            if any(start <= address and end <= stop for start, stop in cell.subpage_ranges):
                return True
        for bdf, (start, length) in self._msix_ranges.items():
            if bdf in self._device_owner and start <= address and end <= start + length:
                return True
        return False

    # --- PCI config space --------------------------------------------------------------------

    def _pci_fd(self, bdf: int) -> int | None:
        fd = self._pci_fds.get(bdf)
        if fd is not None:
            return fd
        domain = self._pci_domain()
        name = f"{domain:04x}:{bdf >> 8:02x}:{(bdf >> 3) & 0x1F:02x}.{bdf & 7:x}"
        try:
            fd = os.open(os.path.join(self.pci_sysfs, name, "config"), os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            LOG.debug("PCI %s: no config space: %s", name, exc)
            return None
        self._pci_fds[bdf] = fd
        return fd

    def pci_read_config(self, bdf: int, reg: int, size: int) -> int:
        """Read the device's config space (sysfs, or VFIO for a passed-through device);
        all ones for an absent device."""
        passed = self.passthrough.device(bdf)
        if passed is not None:
            return self.passthrough.config_read(passed, reg, size)
        fd = self._pci_fd(bdf)
        if fd is None:
            return (1 << (8 * size)) - 1
        data = os.pread(fd, size, reg)
        if len(data) != size:
            return (1 << (8 * size)) - 1
        return int.from_bytes(data, "little")

    def pci_write_config(self, bdf: int, reg: int, size: int, value: int) -> None:
        """Write the config space of a device a non-root cell owns (root policy), through
        VFIO for a passed-through one."""
        passed = self.passthrough.device(bdf)
        if passed is not None:
            self.passthrough.config_write(passed, reg, size, value)
            return
        if bdf not in self._device_owner:
            LOG.debug("PCI %04x reg %#x = %#x for the root: not performed", bdf, reg, value)
            return
        fd = self._pci_fd(bdf)
        if fd is not None:
            os.pwrite(fd, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"), reg)

    # --- owners ---------------------------------------------------------------------------

    def pci_add_device(self, cell_id: int, device: PciDevice, *, root: bool) -> None:
        """Record the owner; a physical endpoint of a non-root cell is passed through
        (``arch_pci_add_device``: claimed for ``vfio-pci``, in the cell's IOMMU domain),
        unless the machine has no such device (then, as with Jailhouse, the cell owns a
        device whose config space reads all ones).

        :param root: ``cell_id`` is the root cell (it gets the device back)
        :raise HvError: the VFIO step that failed, naming the device
        """
        if root:
            self._device_owner.pop(device.bdf, None)
            return
        cell = self.table.cells.get(cell_id)
        physical = cell is not None and int(device.type) == PCI_TYPE_DEVICE
        if physical and not self.passthrough.present(device.bdf):
            # A configured device the machine lacks: Jailhouse's hypervisor adds it without
            # looking (config reads then return all ones) and its driver skips it
            # (jailhouse_pci_claim_release finds no Linux device): nothing to pass through.
            LOG.info("PCI %04x: no such device; in cell %d without passthrough", device.bdf, cell_id)
        elif physical and cell is not None:
            self.passthrough.attach(cell_id, cell.router, device)
            try:
                self.memory.dma_map_existing(cell_id, cell)
            except BaseException:
                self.passthrough.detach(device.bdf)
                raise
        self._device_owner[device.bdf] = cell_id
        if device.msix_address:
            self._msix_ranges[device.bdf] = (device.msix_address, device.msix_region_size)

    def pci_remove_device(self, cell_id: int, device: PciDevice, *, root: bool) -> None:
        """Forget the owner; writes stay allowed until the root gets the device back. A
        passed-through device is closed (``vfio-pci`` lets it go at the operation's end)."""
        self.passthrough.detach(device.bdf)
        if not root and device.bdf in self._device_owner:
            self._device_owner[device.bdf] = -1
