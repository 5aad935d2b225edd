"""PCI support; models ``hypervisor/pci.c``, ``include/jailhouse/pci.h`` and the x86
parts of ``hypervisor/arch/x86/pci.c`` (the "PCI" unit).

* **Ownership.** Every cell lists PCI devices; a physical device (DEVICE or BRIDGE)
  moves from the root to the cell at create and goes back at destroy *only if the root's
  config lists the same BDF*. A device the root does not list is simply added. IVSHMEM
  devices are virtual (:mod:`harness.hvmodel.ivshmem`).
* **Config-space moderation** (:meth:`PciUnit.cfg_read`, :meth:`PciUnit.cfg_write`),
  the same for port I/O (0xCF8/0xCFC) and MMCONFIG: BARs are shadows, the header is
  writable only where the tables below allow, capabilities only where the config marks
  them writable; MSI address/data are shadows, remapped on every change.
* **MSI-X tables**: one MMIO region per device with ``msix_address``; vector address and
  data are shadows, the vector control dword goes to the hardware.

Every hardware access goes through the :class:`~harness.hvmodel.arch.Arch` of the unit's
:class:`~harness.hvmodel.unit.UnitHost`. The unit owns the hypervisor's ivshmem links
(:class:`~harness.hvmodel.ivshmem.Ivshmem`) and drives them per device, as ``pci.c``
calls ``ivshmem.c``. The device state it keeps (``struct pci_device``) is
:class:`~harness.hvmodel.cell.PciDeviceState`.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final

from .abi import (
    MSI_ADDRESS_WINDOW,
    PAGE_SIZE,
    PCI_CAP_MSI,
    PCI_CAP_MSIX,
    PCI_CFG_BAR,
    PCI_CFG_BAR_END,
    PCI_CFG_COMMAND,
    PCI_CFG_ROMBAR,
    PCI_CMD_INTX_OFF,
    PCI_CONFIG_HEADER_SIZE,
    PCI_MSI_DWORD_ENABLE,
    PCI_MSIX_DWORD_ENABLE,
    PCI_MSIX_VECTOR_CTRL,
    PCI_MSIX_VECTOR_MASKED,
    PCI_MSIX_VECTOR_SIZE,
    PCI_TYPE_IVSHMEM,
    PciCapFlags,
)
from .cell import PciDeviceState
from .errors import HvError
from .ivshmem import Ivshmem
from .mmio import MmioAccess, MmioHandler, MmioResult
from .paging import pages
from .printk import FATAL_MSIX, FATAL_PCI_MMCONFIG, MSG_ADD_PCI, MSG_REMOVE_PCI, bdf_params
from .unit import define_unit

if TYPE_CHECKING:
    from .cell import Cell
    from .config import PciCapability
    from .unit import UnitHost


class Access(enum.Enum):
    """Moderation verdicts (``enum pci_access``)."""

    REJECT = "reject"
    PERFORM = "perform"
    DONE = "done"


class Rule(enum.Enum):
    """Header write rules."""

    ALLOW = "allow"
    RDONLY = "rdonly"


#: Header write rules for endpoints (DEVICE, IVSHMEM): dword -> (rule, writable mask).
#: Anything not listed is denied (the write is rejected, the CPU parked).
ENDPOINT_WRITE_RULES: Final[dict[int, tuple[Rule, int]]] = {
    0x04: (Rule.ALLOW, 0xFFFFFFFF),  # command, status
    0x0C: (Rule.ALLOW, 0xFFFFFFFF),  # cache line size, latency timer, header type, BIST
    0x30: (Rule.RDONLY, 0xFFFFFFFF),  # expansion ROM base: ignored
    0x3C: (Rule.ALLOW, 0x000000FF),  # interrupt line
}
#: Header write rules for bridges.
BRIDGE_WRITE_RULES: Final[dict[int, tuple[Rule, int]]] = {
    0x04: (Rule.ALLOW, 0xFFFFFFFF),  # command, status
    0x0C: (Rule.ALLOW, 0xFFFFFFFF),  # cache line size, latency timer, header type, BIST
    0x1C: (Rule.RDONLY, 0x0000FFFF),  # I/O base and limit: ignored
    0x20: (Rule.RDONLY, 0xFFFFFFFF),  # memory base and limit
    0x24: (Rule.RDONLY, 0xFFFFFFFF),  # prefetchable base and limit
    0x28: (Rule.RDONLY, 0xFFFFFFFF),  # prefetchable base, upper 32 bits
    0x2C: (Rule.RDONLY, 0xFFFFFFFF),  # prefetchable limit, upper 32 bits
    0x30: (Rule.RDONLY, 0xFFFFFFFF),  # I/O base and limit, upper 16 bits
    0x3C: (Rule.ALLOW, 0xFFFF00FF),  # interrupt line, bridge control
}


def byte_mask(size: int) -> int:
    """``BYTE_MASK(size)``: all ones over ``size`` bytes."""
    return (1 << (8 * size)) - 1


class PciUnit:
    """The PCI unit (``DEFINE_UNIT(pci, "PCI")``).

    Lifecycle: a unit (:mod:`.unit`); besides its hooks the control plane calls
    :meth:`cell_reset` at cell start and :meth:`config_commit` after every change, the
    port handler :meth:`cfg_read` and :meth:`cfg_write`.

    :param host: what the unit may use of its hypervisor
    """

    name = "PCI"

    def __init__(self, host: UnitHost) -> None:
        self.host = host
        system = host.system
        self.mmcfg_start = system.pci_mmconfig_base
        self.mmcfg_size = system.mmconfig_size if self.mmcfg_start else 0
        self.end_bus = system.pci_mmconfig_end_bus
        #: the ivshmem links, driven per device by this unit
        self.ivshmem = Ivshmem(host, self.msi_target_ok)

    # -- unit hooks -------------------------------------------------------------------

    def init(self) -> None:
        """Map MMCONFIG into the hypervisor and take over the root's devices."""
        if self.mmcfg_start:
            self.host.remap_pool.alloc(self.mmcfg_size // PAGE_SIZE)
        self.cell_init(self.host.root)

    def shutdown(self) -> None:
        """Hand the root's devices back to Linux with their MSI/MSI-X as Linux set them."""
        for device in self.host.root.owned_devices():
            if device.ivshmem is not None:
                continue
            for cap in device.caps:
                if cap.id == PCI_CAP_MSI:
                    self._restore_msi(device, cap)
                elif cap.id == PCI_CAP_MSIX:
                    self._write_msix_vectors(device)
                    self.host.arch.pci_write_config(device.bdf, cap.start, 4, device.msix_ctrl)

    def mmio_count_regions(self, cell: Cell) -> int:
        """MMCONFIG, two per IVSHMEM device, one per MSI-X table."""
        count = 1 if self.mmcfg_start else 0
        for dev in cell.config.pci_devices:
            if dev.type == PCI_TYPE_IVSHMEM:
                count += 2
            elif dev.msix_address:
                count += 1
        return count

    def cell_init(self, cell: Cell) -> None:
        """Take the cell's devices (``pci_cell_init``).

        :raise HvError: from ivshmem setup or device assignment; the devices taken so far
            are given back first
        """
        config = cell.config
        host = self.host
        cell.pci_devices = [None] * len(config.pci_devices)
        cell.pci_index = {dev.bdf: n for n, dev in enumerate(config.pci_devices)}
        if self.mmcfg_start:
            cell.mmio.register(self.mmcfg_start, self.mmcfg_size, self._mmconfig_handler(cell))
        try:
            for index, info in enumerate(config.pci_devices):
                device = PciDeviceState(info, config.caps_of(info))
                if info.type == PCI_TYPE_IVSHMEM:
                    self.ivshmem.init(cell, device)
                else:
                    if cell is not host.root:
                        root_device = host.root.assigned_device(info.bdf)
                        if root_device is not None and root_device.info.domain == info.domain:
                            self._remove_physical(root_device)
                            host.root.pci_devices[host.root.pci_index[info.bdf]] = None
                    self._add_physical(cell, device)
                cell.pci_devices[index] = device
        except HvError:
            self.cell_exit(cell)
            raise

    def cell_exit(self, cell: Cell) -> None:
        """Release the cell's devices; physical ones go back to the root if it lists them."""
        host = self.host
        root = host.root
        for index, device in enumerate(cell.pci_devices):
            if device is None:
                continue
            cell.pci_devices[index] = None
            if device.ivshmem is not None:
                self.ivshmem.exit(device)
                continue
            self._remove_physical(device)
            if cell is root:
                continue
            root_index = root.pci_index.get(device.bdf)
            if root_index is None:
                continue
            root_info = root.config.pci_devices[root_index]
            if root_info.domain != device.info.domain:
                continue
            root_device = PciDeviceState(root_info, root.config.caps_of(root_info))
            try:
                self._add_physical(root, root_device)
            except HvError:
                host.console.printk("WARNING: Failed to re-assign PCI device to root cell\n")
                continue
            root.pci_devices[root_index] = root_device
        if self.mmcfg_start:
            cell.mmio.unregister(self.mmcfg_start)

    # -- other hooks ------------------------------------------------------------------

    def cell_reset(self, cell: Cell) -> None:
        """Reset every device of the cell (``pci_cell_reset``)."""
        for device in cell.owned_devices():
            if device.ivshmem is not None:
                self.ivshmem.reset(device)
            else:
                self._reset_device(device)

    def config_commit(self, cell: Cell | None) -> None:
        """Re-program MSI/MSI-X of the root's devices (``pci_config_commit``)."""
        if cell is None:
            return
        for device in self.host.root.pci_devices:
            if device is None or (device.msi_cap is None and device.msix_cap is None):
                continue
            if device.msi_cap is not None and device.msi[0] & PCI_MSI_DWORD_ENABLE:
                self._update_msi(device)
            if device.msix_cap is not None and device.msix_ctrl & PCI_MSIX_DWORD_ENABLE:
                self._write_msix_vectors(device)

    # -- physical devices ---------------------------------------------------------------

    def _add_physical(self, cell: Cell, device: PciDeviceState) -> None:
        """``pci_add_physical_device``: announce, shadow BARs, assign, intercept, reset."""
        host = self.host
        info = device.info
        host.console.printk(MSG_ADD_PCI, *bdf_params(info.bdf), cell.name)
        # All six BARs from the hardware, whatever bar_mask says (the mask only limits what
        # a cell's BAR writes change), and before the arch step, which may reset the device.
        for n in range(len(device.bar)):
            device.bar[n] = host.arch.pci_read_config(info.bdf, PCI_CFG_BAR + 4 * n, 4)
        host.arch.pci_add_device(cell.id, info)
        if info.msix_address:
            try:
                host.remap_pool.alloc(pages(info.msix_region_size))
            except HvError:
                host.arch.pci_remove_device(cell.id, info)
                raise
            cell.mmio.register(info.msix_address, info.msix_region_size, self._msix_handler(device))
        device.cell = cell
        if cell is host.root:
            # The root keeps using its devices: take over their MSI state as Linux set it.
            self._save_msi(device)
        else:
            self._reset_device(device)

    def _save_msi(self, device: PciDeviceState) -> None:
        """``pci_save_msi``/``pci_save_msix``: shadows from the hardware."""
        arch = self.host.arch
        for cap in device.caps:
            if cap.id == PCI_CAP_MSI:
                dwords = 4 if device.info.msi_64bits else 3
                for n in range(dwords):
                    device.msi[n] = arch.pci_read_config(device.bdf, cap.start + 4 * n, 4)
            elif cap.id == PCI_CAP_MSIX:
                device.msix_ctrl = arch.pci_read_config(device.bdf, cap.start, 4)
                base = device.info.msix_address
                if base:
                    for index, vector in enumerate(device.msix_vectors):
                        for n in range(4):
                            vector[n] = arch.mmio_read(base + index * PCI_MSIX_VECTOR_SIZE + 4 * n, 4)

    def _remove_physical(self, device: PciDeviceState) -> None:
        """``pci_remove_physical_device``."""
        host = self.host
        cell = device.cell
        if cell is None:
            return
        info = device.info
        host.console.printk(MSG_REMOVE_PCI, *bdf_params(info.bdf), cell.name)
        host.arch.pci_remove_device(cell.id, info)
        host.arch.pci_write_config(info.bdf, PCI_CFG_COMMAND, 2, PCI_CMD_INTX_OFF)
        if info.msix_address:
            host.remap_pool.free(pages(info.msix_region_size))
            cell.mmio.unregister(info.msix_address)
        device.cell = None

    def _reset_device(self, device: PciDeviceState) -> None:
        """MSI and MSI-X off, vectors masked, COMMAND = INTX_OFF."""
        arch = self.host.arch
        bdf = device.bdf
        for cap in device.caps:
            if cap.id == PCI_CAP_MSI:
                device.msi[0] &= ~PCI_MSI_DWORD_ENABLE
                arch.pci_write_config(bdf, cap.start + 2, 2, device.msi[0] >> 16)
            elif cap.id == PCI_CAP_MSIX:
                device.msix_ctrl = 0
                base = device.info.msix_address
                for index, vector in enumerate(device.msix_vectors):
                    vector[3] |= PCI_MSIX_VECTOR_MASKED
                    if base:
                        arch.mmio_write(base + index * PCI_MSIX_VECTOR_SIZE + 12, 4, vector[3])
                arch.pci_write_config(bdf, cap.start + 2, 2, 0)
        arch.pci_write_config(bdf, PCI_CFG_COMMAND, 2, PCI_CMD_INTX_OFF)

    # -- MSI / MSI-X --------------------------------------------------------------------

    def msi_target_ok(self, cell: Cell, address: int) -> bool:
        """Whether an MSI address is valid and targets only CPUs of ``cell``.

        Only ``0xfeexxxxx`` is valid; physical destination mode names one APIC id,
        logical (flat) mode a bitmap of them. The root's MSIs are filtered to its CPUs,
        a non-root cell's outside its CPUs are invalid.
        """
        if address >> 20 != MSI_ADDRESS_WINDOW:
            return False
        dest = (address >> 12) & 0xFF
        targets = {n for n in range(8) if dest >> n & 1} if address & (1 << 2) else {dest}
        if cell is self.host.root:
            return True
        return targets <= cell.cpus

    def _update_msi(self, device: PciDeviceState) -> bool:
        """``arch_pci_update_msi``: check, then write address and data (no IR: as is)."""
        cell = device.cell
        if cell is None:
            return True
        cap = device.msi_cap
        if cap is None:
            return True
        if not device.msi[0] & PCI_MSI_DWORD_ENABLE:
            return True
        if not self.msi_target_ok(cell, device.msi[1]):
            return False
        arch = self.host.arch
        dwords = 4 if device.info.msi_64bits else 3
        for n in range(1, dwords):
            arch.pci_write_config(device.bdf, cap.start + 4 * n, 4, device.msi[n])
        return True

    def _restore_msi(self, device: PciDeviceState, cap: PciCapability) -> None:
        arch = self.host.arch
        dwords = 4 if device.info.msi_64bits else 3
        for n in range(1, dwords):
            arch.pci_write_config(device.bdf, cap.start + 4 * n, 4, device.msi[n])

    def _update_msix_vector(self, device: PciDeviceState, index: int) -> bool:
        """``arch_pci_update_msix_vector``: check an enabled vector, write it."""
        cell = device.cell
        vector = device.msix_vectors[index]
        if (
            cell is not None
            and device.msix_ctrl & PCI_MSIX_DWORD_ENABLE
            and not vector[3] & PCI_MSIX_VECTOR_MASKED
            and not self.msi_target_ok(cell, vector[0])
        ):
            return False
        if device.info.msix_address:
            base = device.info.msix_address + index * PCI_MSIX_VECTOR_SIZE
            for n in range(3):
                self.host.arch.mmio_write(base + 4 * n, 4, vector[n])
        return True

    def _write_msix_vectors(self, device: PciDeviceState) -> None:
        if not device.info.msix_address or not device.msix_ctrl & PCI_MSIX_DWORD_ENABLE:
            return
        for index in range(len(device.msix_vectors)):
            self._update_msix_vector(device, index)

    # -- config space moderation -----------------------------------------------------------

    def cfg_read(self, cell: Cell, bdf: int, reg: int, size: int) -> int:
        """A cell reads config space (``pci_cfg_read_moderate`` + the access)."""
        device = cell.assigned_device(bdf)
        mask = byte_mask(size)
        if device is None:
            return mask
        if device.ivshmem is not None:
            return self.ivshmem.cfg_read(device, reg, size)
        shift = (reg % 4) * 8
        if reg < PCI_CONFIG_HEADER_SIZE:
            if not device.is_bridge:
                if PCI_CFG_BAR <= reg <= PCI_CFG_BAR_END:
                    return (device.bar[(reg - PCI_CFG_BAR) // 4] >> shift) & mask
                if PCI_CFG_ROMBAR <= reg < PCI_CFG_ROMBAR + 4:
                    return 0
            return self.host.arch.pci_read_config(bdf, reg, size)
        cap = device.find_cap(reg)
        if cap is not None and cap.id == PCI_CAP_MSI:
            offset = reg - cap.start
            limit = 14 if device.info.msi_64bits else 10
            if 4 <= offset < limit:
                return (device.msi[offset // 4] >> shift) & mask
        return self.host.arch.pci_read_config(bdf, reg, size)

    def cfg_write(self, cell: Cell, bdf: int, reg: int, size: int, value: int) -> bool:
        """A cell writes config space (``pci_cfg_write_moderate`` + the access).

        :return: False when the write is rejected (the caller prints FATAL and parks)
        """
        device = cell.assigned_device(bdf)
        if device is None:
            return False
        access = self._write_moderate(device, reg, size, value)
        if access is Access.REJECT:
            return False
        if access is Access.PERFORM:
            self.host.arch.pci_write_config(bdf, reg, size, value & byte_mask(size))
        return True

    def _write_moderate(self, device: PciDeviceState, reg: int, size: int, value: int) -> Access:
        shift = (reg % 4) * 8
        mask = byte_mask(size) << shift
        value = (value & byte_mask(size)) << shift
        dword = reg & ~3
        if not device.is_bridge and PCI_CFG_BAR <= reg <= PCI_CFG_BAR_END:
            index = (dword - PCI_CFG_BAR) // 4
            # Only bits under the config's size mask change; the others keep the shadow.
            mask &= device.info.bar_mask[index]
            device.bar[index] = (device.bar[index] & ~mask) | (value & mask)
            if device.ivshmem is not None:
                self.ivshmem.bar_written(device)
            return Access.DONE
        if reg < PCI_CONFIG_HEADER_SIZE:
            rules = BRIDGE_WRITE_RULES if device.is_bridge else ENDPOINT_WRITE_RULES
            rule = rules.get(dword)
            if rule is None or rule[1] & mask != mask:
                return Access.REJECT
            if rule[0] is Rule.RDONLY:
                return Access.DONE
            if device.ivshmem is not None:
                self.ivshmem.cfg_write(device, dword, mask, value)
                return Access.DONE
            return Access.PERFORM
        if device.ivshmem is not None:
            self.ivshmem.cfg_write(device, dword, mask, value)
            return Access.DONE
        cap = device.find_cap(reg)
        if cap is None or not cap.flags & PciCapFlags.WRITE:
            return Access.REJECT
        offset = reg - cap.start
        if cap.id == PCI_CAP_MSI and offset < (14 if device.info.msi_64bits else 10):
            n = offset // 4
            device.msi[n] = (device.msi[n] & ~mask) | value
            if not self._update_msi(device):
                return Access.REJECT
            return Access.DONE if offset >= 4 else Access.PERFORM
        if cap.id == PCI_CAP_MSIX and offset < 4:
            device.msix_ctrl = (device.msix_ctrl & ~mask) | value
            for index in range(len(device.msix_vectors)):
                if not self._update_msix_vector(device, index):
                    return Access.REJECT
        return Access.PERFORM

    # -- MMIO handlers ----------------------------------------------------------------------

    def _mmconfig_handler(self, cell: Cell) -> MmioHandler:
        console = self.host.console

        def handler(access: MmioAccess) -> MmioResult:
            bdf = access.address >> 12
            reg = access.address & 0xFFF
            if access.size > 4:
                console.printk(
                    FATAL_PCI_MMCONFIG,
                    "write" if access.is_write else "read",
                    *bdf_params(bdf),
                    reg,
                    access.size,
                )
                return MmioResult.ERROR
            if access.is_write:
                if not self.cfg_write(cell, bdf, reg, access.size, access.value):
                    console.printk(FATAL_PCI_MMCONFIG, "write", *bdf_params(bdf), reg, access.size)
                    return MmioResult.ERROR
            else:
                access.value = self.cfg_read(cell, bdf, reg, access.size)
            return MmioResult.HANDLED

        return handler

    def _msix_handler(self, device: PciDeviceState) -> MmioHandler:
        console = self.host.console
        arch = self.host.arch

        def invalid() -> MmioResult:
            console.printk(FATAL_MSIX, *bdf_params(device.bdf))
            return MmioResult.ERROR

        def handler(access: MmioAccess) -> MmioResult:
            if access.address & 3 or access.size != 4:
                return invalid()
            index, offset = divmod(access.address, PCI_MSIX_VECTOR_SIZE)
            dword = offset // 4
            phys = device.info.msix_address + access.address
            if access.is_write:
                if index >= len(device.msix_vectors):
                    return invalid()
                value = access.value & 0xFFFFFFFF
                if dword == PCI_MSIX_VECTOR_CTRL:
                    device.msix_vectors[index][3] = value
                    arch.mmio_write(phys, 4, value)
                    if not self._update_msix_vector(device, index):
                        return invalid()
                else:
                    device.msix_vectors[index][dword] = value
                    if not self._update_msix_vector(device, index):
                        return invalid()
            elif index >= len(device.msix_vectors) or dword == PCI_MSIX_VECTOR_CTRL:
                access.value = arch.mmio_read(phys, 4)
            else:
                access.value = device.msix_vectors[index][dword]
            return MmioResult.HANDLED

        return handler


define_unit("pci", PciUnit)
