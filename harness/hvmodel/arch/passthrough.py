"""PCI passthrough of the executor: a cell's physical PCI devices through VFIO; stands
where ``hypervisor/arch/x86/vtd.c`` (``iommu_add_pci_device``, the cell's DMA mappings,
interrupt remapping of MSI and MSI-X) and the Linux driver's ``jailhouse-pci-stub`` claim
(``driver/pci.c``) are.

:class:`Passthrough` keeps, per non-root cell, one VFIO container (the cell's IOMMU
domain), the KVM GSI routes of its devices' vectors (:class:`~.vfio.MsiRouter`) and, per
device, what the cell programmed into its MSI and MSI-X capabilities and MSI-X table:

* **Claim and release.** :meth:`Passthrough.attach` binds the device to ``vfio-pci``
  (:class:`~.vfio.PciStub`), opens its group in the cell's container and the device;
  :meth:`Passthrough.detach` closes them; :meth:`Passthrough.release_detached` then
  unbinds it, leaving it without a driver as Jailhouse does, or, with ``rebind``, giving
  it back to the driver it had. The release waits for the end of the management
  operation, as Jailhouse's driver releases its stub only after the hypercall: the
  control plane still writes the device's command register after taking it from the
  cell, which must not reach a root driver that already probed it again.
* **BARs** are mapped into the cell from the VFIO region mmap
  (:meth:`Passthrough.bar_backing`): the cell's memory region over a BAR becomes a KVM
  slot on the device's own mapping, so no ``/dev/mem`` access to claimed MMIO is needed
  (Debian's kernel has ``CONFIG_IO_STRICT_DEVMEM``).
* **DMA**: the cell's DMA-flagged memory goes into the container at its ``virt_start``
  (:meth:`Passthrough.dma_map`): the device sees the cell's guest-physical addresses.
* **Config space** of a claimed device is read and written through VFIO, except the MSI
  and MSI-X capabilities, which are shadowed here: the control plane
  (:mod:`harness.hvmodel.pci`) has already moderated the cell's access and only writes
  what Jailhouse would write to the hardware (address and data of enabled, valid
  vectors; the control words). Jailhouse then programs an interrupt remapping entry; here
  the shadow becomes VFIO interrupts (one eventfd per vector) routed to the cell's VM
  through KVM GSI routes and irqfds, so a device interrupt reaches the vCPU named in the
  cell's MSI address without an exit. A vector masked in the MSI-X table keeps its
  eventfd but loses its route; KVM delivers what was signalled meanwhile when the route
  comes back, as a pending bit would.
* **The MSI-X table** of a claimed device is likewise a shadow (:meth:`Passthrough.
  msix_access`): the hardware table belongs to the host, which VFIO programs.
* **INTx**: a device with an interrupt pin gets VFIO's INTx signalled on its own eventfd
  (:attr:`PassedDevice.intx`) while neither MSI nor MSI-X is on (VFIO, like the PCI
  spec, has one of them at a time; the eventfd stays across the switches). VFIO masks
  INTx after each interrupt, at the device (PCI 2.3 INTx disable), until
  :meth:`Passthrough.intx_unmask`: the executor's IOAPIC pin of the line
  (:mod:`~harness.hvmodel.arch.executor.pins`) delivers it to the cell and unmasks at the
  cell's EOI, so the root's Linux never sees it and a level-triggered line cannot storm.
  The line's GSI is the root Linux's IRQ of the device (sysfs ``irq``, ACPI's routing,
  read once VFIO enabled the device).

Limits: bridges are not claimed (their config space is still moderated by the control
plane).

Lifecycle: one instance per executor; :meth:`attach` / :meth:`detach` per device (the
executor calls them from ``pci_add_device`` / ``pci_remove_device``);
:meth:`shutdown` detaches what is left. A cell's GSI routing table
(:class:`~.vfio.MsiRouter`) belongs to its VM and is lent to :meth:`attach`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Final

from ..abi import (
    MEM_READ,
    MEM_WRITE,
    PCI_BAR_64BIT,
    PCI_BAR_IO,
    PCI_CAP_MSI,
    PCI_CAP_MSIX,
    PCI_CFG_BAR,
    PCI_CFG_CAPS,
    PCI_CFG_SPACE_SIZE,
    PCI_CFG_STATUS,
    PCI_MSI_CTRL_64BIT,
    PCI_MSI_CTRL_ENABLE,
    PCI_MSI_CTRL_MME_MASK,
    PCI_MSI_CTRL_MME_SHIFT,
    PCI_MSIX_CTRL_ENABLE,
    PCI_MSIX_CTRL_FMASK,
    PCI_MSIX_CTRL_TABLE_SIZE,
    PCI_MSIX_VECTOR_MASKED,
    PCI_MSIX_VECTOR_SIZE,
    PCI_STS_CAPS,
)
from ..errors import Errno, HvError
from .vfio import (
    Container,
    Device,
    DmaMapping,
    EventFd,
    MsiRouter,
    PciAddress,
    PciIrq,
    PciRegion,
    PciStub,
    RoutedVector,
    VfioError,
)
from .vfio.structs import IrqInfoFlags

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from ..config import MemoryRegion, PciDevice

__all__ = ["PassedDevice", "Passthrough"]

LOG = logging.getLogger(__name__)

#: size of the MSI capability this module shadows (64-bit with per-vector masking)
MSI_CAP_SHADOW: Final = 24
#: size of the MSI-X capability
MSIX_CAP_SIZE: Final = 12


@dataclasses.dataclass(eq=False)
class PassedDevice:
    """A physical PCI function a cell owns through VFIO.

    :param bdf: Jailhouse's BDF (bus << 8 | devfn)
    :param address: the PCI address
    :param cell_id: the owning cell
    :param device: the open VFIO device
    :param group: its IOMMU group number
    """

    bdf: int
    address: PciAddress
    cell_id: int
    device: Device
    group: int
    #: memory BARs: index -> (host-physical start, size)
    bars: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    #: offset of the MSI / MSI-X capability in config space (None: absent)
    msi_cap: int | None = None
    msix_cap: int | None = None
    #: the MSI capability's bytes as the cell programmed them (from offset 0 of the cap)
    msi: bytearray = dataclasses.field(default_factory=lambda: bytearray(MSI_CAP_SHADOW))
    #: MSI-X control word as the cell programmed it
    msix_ctrl: int = 0
    #: MSI-X table: host-physical start and the entries (address lo, hi, data, control)
    msix_table: int = 0
    msix_entries: list[list[int]] = dataclasses.field(default_factory=list)
    #: eventfds of the enabled MSI / MSI-X vectors and their routes into the cell's VM
    msi_fds: list[EventFd] = dataclasses.field(default_factory=list)
    msi_routes: list[RoutedVector] = dataclasses.field(default_factory=list)
    msix_fds: list[EventFd] = dataclasses.field(default_factory=list)
    msix_routes: dict[int, RoutedVector] = dataclasses.field(default_factory=dict)
    #: INTx: its eventfd (None: no interrupt pin), the root's IRQ = GSI of the line, and
    #: whether VFIO signals it now (MSI and MSI-X off)
    intx: EventFd | None = None
    intx_gsi: int | None = None
    intx_on: bool = False

    @property
    def msi_64bit(self) -> bool:
        return bool(int.from_bytes(self.msi[2:4], "little") & PCI_MSI_CTRL_64BIT)

    @property
    def msi_size(self) -> int:
        """Bytes of the MSI capability up to the end of its data register."""
        return 14 if self.msi_64bit else 10

    def in_msi(self, reg: int) -> bool:
        return self.msi_cap is not None and self.msi_cap <= reg < self.msi_cap + self.msi_size

    def in_msix_ctrl(self, reg: int) -> bool:
        return self.msix_cap is not None and self.msix_cap + 2 <= reg < self.msix_cap + 4

    def in_msix_table(self, address: int, size: int) -> bool:
        end = self.msix_table + len(self.msix_entries) * PCI_MSIX_VECTOR_SIZE
        return bool(self.msix_entries) and self.msix_table <= address and address + size <= end


@dataclasses.dataclass(eq=False)
class _CellDevices:
    """What one cell owns through VFIO: its container (IOMMU domain), devices and DMA
    mappings, and the GSI routing table of its VM (lent, not owned)."""

    container: Container
    router: MsiRouter
    devices: dict[int, PassedDevice] = dataclasses.field(default_factory=dict)
    #: (virt_start, size) -> DMA mapping
    dma: dict[tuple[int, int], DmaMapping] = dataclasses.field(default_factory=dict)


class Passthrough:
    """The executor's VFIO side (module docstring).

    :param stub: claims and releases devices (default: a :class:`~.vfio.PciStub` on
        ``/sys``)
    :param rebind: give a released device back to the driver it had before the claim
        (Jailhouse leaves it unbound: the default)
    :param domain: the PCI domain of the BDFs (the system config's ``pci_domain``)
    """

    def __init__(self, stub: PciStub | None = None, *, rebind: bool = False, domain: int = 0) -> None:
        self.stub = stub or PciStub()
        self.rebind = rebind
        self.domain = domain
        self._cells: dict[int, _CellDevices] = {}
        self._devices: dict[int, PassedDevice] = {}
        #: detached devices still bound to vfio-pci (see :meth:`release_detached`)
        self._detached: list[PciAddress] = []

    def __repr__(self) -> str:
        return f"Passthrough(devices={[d.address.short for d in self._devices.values()]})"

    def device(self, bdf: int) -> PassedDevice | None:
        """The passed-through device at ``bdf``, if a cell owns one there."""
        return self._devices.get(bdf)

    def present(self, bdf: int) -> bool:
        """Whether the machine has a device at ``bdf`` (in :attr:`domain`) to pass through."""
        return self.stub.exists(self._address(bdf))

    def devices_of(self, cell_id: int) -> list[PassedDevice]:
        cell = self._cells.get(cell_id)
        return list(cell.devices.values()) if cell is not None else []

    # -- claim and release -------------------------------------------------------------

    def attach(self, cell_id: int, router: MsiRouter, info: PciDevice) -> PassedDevice:
        """Claim ``info`` for the cell: ``vfio-pci``, its group in the cell's container, the
        device opened, its BARs and interrupt capabilities read, its INTx signalled.

        :param router: the GSI routing table of the cell's VM (for its MSIs)
        :raise HvError: a :class:`~.vfio.VfioError` naming the device and the step (the
            claim is undone)
        """
        if info.bdf in self._devices:
            raise HvError(Errno.EBUSY, f"{self._address(info.bdf).short}: already passed through")
        address = self._address(info.bdf)
        claim = self.stub.claim(address)
        cell = self._cells.get(cell_id)
        new_cell = cell is None
        try:
            if cell is None:
                cell = _CellDevices(Container(), router)
            device = cell.container.group(claim.group).device(address)
            passed = PassedDevice(info.bdf, address, cell_id, device, claim.group)
            try:
                self._probe(passed)
                self._intx_setup(passed)
            except BaseException:
                self._intx_close(passed)
                device.close()
                raise
        except BaseException:
            if new_cell and cell is not None:
                cell.container.close()
            elif cell is not None:
                self._close_group_if_unused(cell, claim.group)
            self._release(address)
            raise
        if new_cell:
            self._cells[cell_id] = cell
        cell.devices[info.bdf] = passed
        self._devices[info.bdf] = passed
        LOG.info(
            "%s: passed through to cell %d (group %d, BARs %s, MSI %s, MSI-X %s, INTx %s)",
            address.short,
            cell_id,
            claim.group,
            {i: f"{start:#x}+{size:#x}" for i, (start, size) in passed.bars.items()},
            "yes" if passed.msi_cap is not None else "no",
            len(passed.msix_entries) or "no",
            f"GSI {passed.intx_gsi}" if passed.intx is not None else "no",
        )
        return passed

    def detach(self, bdf: int) -> None:
        """Interrupts off, device and group closed (the container with the cell's last
        device); the device stays bound to ``vfio-pci`` until :meth:`release_detached`.
        Cannot fail (problems are logged)."""
        passed = self._devices.pop(bdf, None)
        if passed is None:
            return
        cell = self._cells[passed.cell_id]
        del cell.devices[bdf]
        self._irqs_off(cell, passed)
        passed.device.close()
        if cell.devices:
            self._close_group_if_unused(cell, passed.group)
        else:
            cell.container.close()
            cell.dma.clear()
            del self._cells[passed.cell_id]
        self._detached.append(passed.address)

    def release_detached(self) -> None:
        """Unbind ``vfio-pci`` from the detached devices (and rebind their drivers with
        ``rebind``); problems are logged."""
        while self._detached:
            address = self._detached.pop(0)
            try:
                self._release(address)
            except VfioError as exc:
                LOG.error("%s", exc)

    def shutdown(self) -> None:
        """Detach and release every device left."""
        for bdf in list(self._devices):
            self.detach(bdf)
        self.release_detached()

    def _address(self, bdf: int) -> PciAddress:
        return PciAddress.from_bdf(bdf, self.domain)

    def _release(self, address: PciAddress) -> None:
        if address in self.stub.claims:
            self.stub.release(address, rebind=self.rebind)

    @staticmethod
    def _close_group_if_unused(cell: _CellDevices, group: int) -> None:
        if all(other.group != group for other in cell.devices.values()):
            opened = cell.container.groups.get(group)
            if opened is not None:
                opened.close()

    def _probe(self, passed: PassedDevice) -> None:
        """Read the memory BARs and the MSI / MSI-X capabilities through VFIO."""
        device = passed.device
        index = 0
        while index < 6:
            low = device.config_read(PCI_CFG_BAR + 4 * index, 4)
            if low & PCI_BAR_IO:
                index += 1
                continue
            address = low & ~0xF
            wide = bool(low & PCI_BAR_64BIT) and index < 5
            if wide:
                address |= device.config_read(PCI_CFG_BAR + 4 * (index + 1), 4) << 32
            size = device.region_info(index).size
            if size and address:
                passed.bars[index] = (address, size)
            index += 2 if wide else 1
        if not device.config_read(PCI_CFG_STATUS, 2) & PCI_STS_CAPS:
            return
        pointer = device.config_read(PCI_CFG_CAPS, 1) & ~3
        seen: set[int] = set()
        while pointer and pointer not in seen:
            seen.add(pointer)
            cap_id = device.config_read(pointer, 1)
            if cap_id == PCI_CAP_MSI and passed.msi_cap is None:
                passed.msi_cap = pointer
                length = min(MSI_CAP_SHADOW, PCI_CFG_SPACE_SIZE - pointer)
                passed.msi[:length] = device.read(PciRegion.CONFIG, pointer, length)
                ctrl = int.from_bytes(passed.msi[2:4], "little")
                ctrl &= ~(PCI_MSI_CTRL_ENABLE | PCI_MSI_CTRL_MME_MASK)
                passed.msi[2:4] = ctrl.to_bytes(2, "little")
            elif cap_id == PCI_CAP_MSIX and passed.msix_cap is None:
                passed.msix_cap = pointer
                ctrl = device.config_read(pointer + 2, 2)
                table = device.config_read(pointer + 4, 4)
                bar = passed.bars.get(table & 7)
                if bar is not None:
                    passed.msix_table = bar[0] + (table & ~7)
                    vectors = (ctrl & PCI_MSIX_CTRL_TABLE_SIZE) + 1
                    passed.msix_entries = [[0, 0, 0, PCI_MSIX_VECTOR_MASKED] for _ in range(vectors)]
                passed.msix_ctrl = ctrl & PCI_MSIX_CTRL_TABLE_SIZE
            pointer = device.config_read(pointer + 1, 1) & ~3

    # -- memory -------------------------------------------------------------------------

    def bar_backing(self, cell_id: int, phys: int, size: int) -> tuple[WriteableBuffer, int] | None:
        """The device mapping behind ``phys``+``size`` when it lies in a BAR of one of the
        cell's devices: ``(mmap, offset)`` for a KVM slot; None otherwise (or when VFIO does
        not let that part of the BAR be mapped)."""
        for passed in self.devices_of(cell_id):
            for index, (start, length) in passed.bars.items():
                if start <= phys and phys + size <= start + length:
                    mapping = passed.device.mmap_region(index)
                    area = mapping.area_at(phys - start, size)
                    if area is None:
                        LOG.warning(
                            "%s: BAR%d %#x+%#x cannot be mapped (VFIO sparse areas)",
                            passed.address.short, index, phys, size,
                        )
                        return None
                    return area.mmap, phys - start - area.offset
        return None

    def dma_map(self, cell_id: int, region: MemoryRegion, buffer: WriteableBuffer, offset: int) -> None:
        """Put a DMA-flagged region of the cell into its IOMMU domain at ``virt_start``
        (nothing when the cell has no passed-through device).

        :raise HvError: the container's refusal, naming the region
        """
        cell = self._cells.get(cell_id)
        key = (region.virt_start, region.size)
        if cell is None or key in cell.dma:
            return
        flags = int(region.flags)
        try:
            cell.dma[key] = cell.container.dma_map(
                region.virt_start, buffer, region.size, offset=offset,
                read=bool(flags & MEM_READ), write=bool(flags & MEM_WRITE),
            )
        except VfioError as exc:
            raise VfioError(
                exc.who, f"{exc.text} (DMA region {region.phys_start:#x}->{region.virt_start:#x})",
                os_errno=exc.os_errno, code=exc.errno,
            ) from exc

    def dma_unmap(self, cell_id: int, region: MemoryRegion) -> None:
        """Take a region out of the cell's IOMMU domain (before its memory goes)."""
        cell = self._cells.get(cell_id)
        if cell is None:
            return
        mapping = cell.dma.pop((region.virt_start, region.size), None)
        if mapping is not None:
            try:
                cell.container.dma_unmap(mapping)
            except VfioError as exc:
                LOG.warning("%s", exc)

    def has_domain(self, cell_id: int) -> bool:
        """Whether the cell has an IOMMU domain (a passed-through device)."""
        return cell_id in self._cells

    # -- config space -------------------------------------------------------------------

    def config_read(self, passed: PassedDevice, reg: int, size: int) -> int:
        """A config read: the MSI capability and the MSI-X control word from the shadow,
        the rest through VFIO."""
        if passed.in_msi(reg):
            offset = reg - (passed.msi_cap or 0)
            return int.from_bytes(passed.msi[offset:offset + size], "little")
        if passed.in_msix_ctrl(reg):
            shift = (reg - (passed.msix_cap or 0) - 2) * 8
            return (passed.msix_ctrl >> shift) & ((1 << (8 * size)) - 1)
        return passed.device.config_read(reg, size)

    def config_write(self, passed: PassedDevice, reg: int, size: int, value: int) -> None:
        """A config write the control plane let through: into the shadow (and the
        interrupts reconciled) for the MSI and MSI-X capabilities, else through VFIO."""
        if passed.in_msi(reg):
            offset = reg - (passed.msi_cap or 0)
            old = bytes(passed.msi[:4])
            passed.msi[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            if offset < 4:  # capability ID and next are read-only, of the control only enable and MME
                writable = PCI_MSI_CTRL_ENABLE | PCI_MSI_CTRL_MME_MASK
                old_ctrl = int.from_bytes(old[2:4], "little")
                new_ctrl = int.from_bytes(passed.msi[2:4], "little")
                ctrl = (old_ctrl & ~writable) | (new_ctrl & writable)
                passed.msi[:4] = old[:2] + ctrl.to_bytes(2, "little")
            self._update_msi(passed)
            return
        if passed.in_msix_ctrl(reg):
            shift = (reg - (passed.msix_cap or 0) - 2) * 8
            mask = ((1 << (8 * size)) - 1) << shift
            written = ((value << shift) & mask) | (passed.msix_ctrl & ~mask)
            passed.msix_ctrl = (passed.msix_ctrl & PCI_MSIX_CTRL_TABLE_SIZE) | (
                written & (PCI_MSIX_CTRL_ENABLE | PCI_MSIX_CTRL_FMASK)
            )
            self._update_msix(passed)
            return
        passed.device.config_write(reg, size, value)

    # -- MSI-X table ----------------------------------------------------------------------

    def msix_device(self, address: int, size: int) -> PassedDevice | None:
        """The passed-through device whose MSI-X table holds ``address``+``size``."""
        for passed in self._devices.values():
            if passed.in_msix_table(address, size):
                return passed
        return None

    def msix_read(self, passed: PassedDevice, address: int, size: int) -> int:
        """Read the shadow table (the host owns the real one)."""
        index, offset = divmod(address - passed.msix_table, PCI_MSIX_VECTOR_SIZE)
        entry = b"".join(word.to_bytes(4, "little") for word in passed.msix_entries[index])
        return int.from_bytes(entry[offset:offset + size], "little")

    def msix_write(self, passed: PassedDevice, address: int, size: int, value: int) -> None:
        """Write the shadow table and reconcile that vector's route."""
        index, offset = divmod(address - passed.msix_table, PCI_MSIX_VECTOR_SIZE)
        entry = bytearray(b"".join(word.to_bytes(4, "little") for word in passed.msix_entries[index]))
        entry[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        passed.msix_entries[index] = [int.from_bytes(entry[n:n + 4], "little") for n in range(0, 16, 4)]
        self._update_msix(passed, index)

    # -- interrupts ---------------------------------------------------------------------

    def _router(self, passed: PassedDevice) -> MsiRouter:
        return self._cells[passed.cell_id].router

    def _update_msi(self, passed: PassedDevice) -> None:
        """MSI as the shadow says: VFIO vectors on or off, routes to the cell's VM."""
        ctrl = int.from_bytes(passed.msi[2:4], "little")
        router = self._router(passed)
        if not ctrl & PCI_MSI_CTRL_ENABLE:
            self._msi_off(router, passed)
            self._intx_set(passed, on=not passed.msix_fds)
            return
        address = int.from_bytes(passed.msi[4:8], "little")
        if passed.msi_64bit:
            address |= int.from_bytes(passed.msi[8:12], "little") << 32
            data = int.from_bytes(passed.msi[12:14], "little")
        else:
            data = int.from_bytes(passed.msi[8:10], "little")
        available = passed.device.irqs.info(PciIrq.MSI).count
        count = min(1 << ((ctrl & PCI_MSI_CTRL_MME_MASK) >> PCI_MSI_CTRL_MME_SHIFT), max(available, 1))
        if len(passed.msi_fds) != count:
            self._msi_off(router, passed)
            self._intx_set(passed, on=False)
            passed.msi_fds = passed.device.irqs.enable_msi(count)
        for vector in range(count):
            # Multiple messages: the low data bits number the vector.
            vector_data = (data & ~(count - 1)) | vector
            if vector < len(passed.msi_routes):
                passed.msi_routes[vector] = router.update(passed.msi_routes[vector], address, vector_data)
            else:
                passed.msi_routes.append(router.route(passed.msi_fds[vector], address, vector_data))

    @staticmethod
    def _msi_off(router: MsiRouter, passed: PassedDevice) -> None:
        for route in passed.msi_routes:
            router.unroute(route)
        passed.msi_routes.clear()
        if passed.msi_fds:
            passed.msi_fds = []
            passed.device.irqs.disable(PciIrq.MSI)

    def _update_msix(self, passed: PassedDevice, only: int | None = None) -> None:
        """MSI-X as the shadow says: all table vectors enabled in VFIO while MSI-X is on;
        a vector is routed while neither it nor the function is masked."""
        router = self._router(passed)
        if not passed.msix_ctrl & PCI_MSIX_CTRL_ENABLE or not passed.msix_entries:
            self._msix_off(router, passed)
            self._intx_set(passed, on=not passed.msi_fds)
            return
        if not passed.msix_fds:
            self._intx_set(passed, on=False)
            passed.msix_fds = passed.device.irqs.enable_msix(len(passed.msix_entries))
        masked_all = bool(passed.msix_ctrl & PCI_MSIX_CTRL_FMASK)
        indexes = range(len(passed.msix_entries)) if only is None else (only,)
        for index in indexes:
            low, high, data, control = passed.msix_entries[index]
            route = passed.msix_routes.get(index)
            if masked_all or control & PCI_MSIX_VECTOR_MASKED:
                if route is not None:
                    router.unroute(route)
                    del passed.msix_routes[index]
            elif route is None:
                passed.msix_routes[index] = router.route(passed.msix_fds[index], high << 32 | low, data)
            elif (route.address, route.data) != (high << 32 | low, data):
                passed.msix_routes[index] = router.update(route, high << 32 | low, data)

    @staticmethod
    def _msix_off(router: MsiRouter, passed: PassedDevice) -> None:
        for route in passed.msix_routes.values():
            router.unroute(route)
        passed.msix_routes.clear()
        if passed.msix_fds:
            passed.msix_fds = []
            passed.device.irqs.disable(PciIrq.MSIX)

    # -- INTx -------------------------------------------------------------------------

    def _intx_setup(self, passed: PassedDevice) -> None:
        """An eventfd for the device's INTx (when it has an interrupt pin VFIO can
        signal), its GSI, and INTx on."""
        info = passed.device.irqs.info(PciIrq.INTX)
        if info.count < 1 or IrqInfoFlags.EVENTFD not in info.flags:
            return
        passed.intx_gsi = self.stub.irq_of(passed.address)
        if passed.intx_gsi is None:
            LOG.warning("%s: INTx without an IRQ in the root's Linux: not delivered",
                        passed.address.short)
            return
        passed.intx = EventFd()
        try:
            self._intx_set(passed, on=True)
        except VfioError as exc:
            # e.g. a device without PCI 2.3 INTx masking on a line a root driver holds
            LOG.warning("%s: INTx not available, not delivered: %s", passed.address.short, exc)
            passed.intx.close()
            passed.intx = None

    @staticmethod
    def _intx_set(passed: PassedDevice, *, on: bool) -> None:
        """VFIO signals INTx (``on``) or not; a device has INTx or MSI/MSI-X, one at a time."""
        if passed.intx is None or passed.intx_on == on:
            return
        if on:
            passed.device.irqs.enable_intx(passed.intx)
        else:
            passed.device.irqs.disable(PciIrq.INTX)
        passed.intx_on = on

    @staticmethod
    def _intx_close(passed: PassedDevice) -> None:
        if passed.intx is not None:
            try:
                Passthrough._intx_set(passed, on=False)
            finally:
                passed.intx.close()
                passed.intx = None

    def intx_unmask(self, passed: PassedDevice) -> None:
        """Let the device's INTx interrupt again (after the cell's EOI); VFIO signals at
        once when the device still asserts it. Nothing while INTx is off or the device
        was detached."""
        if passed.intx_on and self._devices.get(passed.bdf) is passed:
            passed.device.irqs.unmask_intx()

    def _irqs_off(self, cell: _CellDevices, passed: PassedDevice) -> None:
        try:
            self._msi_off(cell.router, passed)
            self._msix_off(cell.router, passed)
            self._intx_close(passed)
        except HvError as exc:
            LOG.warning("%s: turning interrupts off: %s", passed.address.short, exc)
