"""Virtual inter-cell shared-memory device; models ``hypervisor/ivshmem.c`` and
``hypervisor/arch/x86/ivshmem.c`` (ivshmem v2, vendor 0x110a, device 0x4106).

Each IVSHMEM entry of a cell config is one endpoint of a *link*, keyed by the BDF: the
first peer creates the link (one page of the mem pool) and zeroes the state table
(``peers`` u32 entries); a ``shmem_dev_id`` already present on the link gives ``EBUSY``.
The endpoint is a virtual PCI device: its config space (0x80 bytes) is emulated, BAR0
holds the registers (ID, max peers, interrupt control, doorbell, state) and BAR1 the
MSI-X table (16 vectors at most, plus PBA at 0x100); both are MMIO regions of the cell
while COMMAND.MEM is set. Interrupts go out as MSIs through :meth:`Arch.send_msi
<harness.hvmodel.arch.Arch.send_msi>`; x86 has no INTx for ivshmem.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .abi import (
    IVSHMEM_DEVICE_ID,
    IVSHMEM_MAX_PEERS,
    IVSHMEM_MSIX_VECTORS,
    IVSHMEM_VENDOR_ID,
    MSI_ADDRESS_WINDOW,
    PCI_CMD_INTX_OFF,
    PCI_CMD_MASTER,
    PCI_CMD_MEM,
    PCI_MSIX_DWORD_ENABLE,
    PCI_MSIX_DWORD_FMASK,
    PCI_MSIX_VECTOR_MASKED,
)
from .cell import IvshmemEndpoint, IvshmemLink
from .errors import Errno, HvError
from .mmio import MmioAccess, MmioHandler, MmioResult
from .printk import FATAL_IVSHMEM_MSIX, MSG_ADD_VPCI, bdf_params

if TYPE_CHECKING:
    from .cell import Cell, PciDeviceState
    from .unit import UnitHost

#: whether an MSI address may target the given cell (the PCI unit's check)
MsiTargetCheck = Callable[["Cell", int], bool]

#: config dwords 0x00 and 0x2C: device and vendor ID (the subsystem IDs repeat them)
IVSHMEM_VENDOR_DEVICE: Final = (IVSHMEM_DEVICE_ID << 16) | IVSHMEM_VENDOR_ID
#: emulated config space size; reads beyond return all ones
IVSHMEM_CFG_SIZE: Final = 0x80
#: bytes of BAR1 the hypervisor serves (16 vectors, PBA at 0x100)
IVSHMEM_MSIX_REGION: Final = 0x200
IVSHMEM_MSIX_PBA: Final = 0x100
#: register offsets in BAR0
REG_ID: Final = 0x00
REG_MAX_PEERS: Final = 0x04
REG_INT_CTRL: Final = 0x08
REG_DOORBELL: Final = 0x0C
REG_STATE: Final = 0x10
_COMMAND_BITS: Final = PCI_CMD_MEM | PCI_CMD_MASTER | PCI_CMD_INTX_OFF
_MSIX_CTRL_BITS: Final = PCI_MSIX_DWORD_ENABLE | PCI_MSIX_DWORD_FMASK
_U32: Final = struct.Struct("<I")


class Ivshmem:
    """The ivshmem links of one hypervisor, driven per device by the PCI unit (not a unit
    of its own, as in Jailhouse). The device state is
    :class:`~harness.hvmodel.cell.IvshmemEndpoint` and :class:`~harness.hvmodel.cell.IvshmemLink`.

    :param host: what it may use of its hypervisor
    :param msi_target_ok: the PCI unit's check of an MSI address against a cell
    """

    def __init__(self, host: UnitHost, msi_target_ok: MsiTargetCheck) -> None:
        self.host = host
        self.msi_target_ok = msi_target_ok
        self.links: dict[tuple[int, int], IvshmemLink] = {}

    # -- device lifecycle -------------------------------------------------------------

    def init(self, cell: Cell, device: PciDeviceState) -> None:
        """Attach the device to its link (``ivshmem_init``).

        :raise HvError: ``EINVAL`` for bad regions, vectors or id; ``EBUSY`` when the id is
            taken on the link; ``ENOMEM`` for a new link
        """
        host = self.host
        info = device.info
        host.console.printk(MSG_ADD_VPCI, *bdf_params(info.bdf), cell.name)
        regions = cell.config.memory_regions
        start = info.shmem_regions_start
        if start + 2 + info.shmem_peers > len(regions) or info.num_msix_vectors > IVSHMEM_MSIX_VECTORS:
            raise HvError(Errno.EINVAL, f"ivshmem {info.bdf_str}: regions or vectors")
        if info.shmem_dev_id >= IVSHMEM_MAX_PEERS:
            raise HvError(Errno.EINVAL, f"ivshmem {info.bdf_str}: id {info.shmem_dev_id}")
        key = (info.domain, info.bdf)
        link = self.links.get(key)
        if link is not None:
            if info.shmem_dev_id in link.endpoints:
                raise HvError(Errno.EBUSY, f"ivshmem {info.bdf_str}: id {info.shmem_dev_id} taken")
        else:
            host.mem_pool.alloc(1)
            link = IvshmemLink(info.bdf, regions[start].phys_start, info.shmem_peers)
            host.arch.phys_write(link.state_table, bytes(4 * info.shmem_peers))
            self.links[key] = link
        endpoint = IvshmemEndpoint(device, cell, link, regions[start : start + 2 + info.shmem_peers])
        link.endpoints[endpoint.id] = endpoint
        device.ivshmem = endpoint
        device.cell = cell
        self.reset(device)

    def exit(self, device: PciDeviceState) -> None:
        """Leave the link: state 0 (peers told if it changed); last one frees it."""
        endpoint = device.ivshmem
        if endpoint is None:
            return
        self._unregister_bars(endpoint)
        self._set_state(endpoint, 0)
        link = endpoint.link
        link.endpoints.pop(endpoint.id, None)
        if not link.endpoints:
            del self.links[(device.info.domain, link.bdf)]
            self.host.mem_pool.free(1)
        device.cell = None

    def reset(self, device: PciDeviceState) -> None:
        """Back to the power-on state (``ivshmem_reset``); the state becomes 0."""
        endpoint = device.ivshmem
        if endpoint is None:
            return
        self._unregister_bars(endpoint)
        device.bar = [0] * 6
        endpoint.command = 0
        endpoint.int_ctrl = 0
        endpoint.one_shot = 0
        endpoint.int_line = 0
        endpoint.msix_ctrl = 0
        for vector in endpoint.vectors:
            vector[:] = [0, 0, 0, PCI_MSIX_VECTOR_MASKED]
        self._set_state(endpoint, 0)

    # -- config space -----------------------------------------------------------------

    def _cfg_dword(self, endpoint: IvshmemEndpoint, reg: int) -> int:
        info = endpoint.device.info
        msix = info.num_msix_vectors > 0
        regions = endpoint.regions
        if reg == 0x00 or reg == 0x2C:
            return IVSHMEM_VENDOR_DEVICE
        if reg == 0x04:
            return (0x0010 << 16) | endpoint.command
        if reg == 0x08:
            return (0xFF << 24) | (info.shmem_protocol << 8)
        if 0x10 <= reg <= 0x24:
            return endpoint.device.bar[(reg - 0x10) // 4]
        if reg == 0x34:
            return 0x40
        if reg == 0x3C:
            pin = 0 if msix else ((info.bdf >> 3) & 3) + 1
            return (pin << 8) | endpoint.int_line
        if reg == 0x40:
            return 0x09 | ((0x60 if msix else 0) << 8) | (0x20 << 16) | (endpoint.one_shot << 24)
        if reg == 0x44:
            return regions[0].size & 0xFFFFFFFF
        if reg in (0x48, 0x4C):
            return (regions[1].size >> (32 if reg == 0x4C else 0)) & 0xFFFFFFFF
        if reg in (0x50, 0x54):
            return (regions[2].size >> (32 if reg == 0x54 else 0)) & 0xFFFFFFFF
        if reg in (0x58, 0x5C):
            return (regions[0].virt_start >> (32 if reg == 0x5C else 0)) & 0xFFFFFFFF
        if msix and reg == 0x60:
            return 0x11 | (((info.num_msix_vectors - 1) << 16) | endpoint.msix_ctrl)
        if msix and reg == 0x64:
            return 0x00000001
        if msix and reg == 0x68:
            return 0x00000001 | IVSHMEM_MSIX_PBA
        return 0

    def cfg_read(self, device: PciDeviceState, reg: int, size: int) -> int:
        """Read the emulated config space."""
        mask = (1 << (8 * size)) - 1
        endpoint = device.ivshmem
        if endpoint is None or reg >= IVSHMEM_CFG_SIZE:
            return mask
        return (self._cfg_dword(endpoint, reg & ~3) >> ((reg % 4) * 8)) & mask

    def cfg_write(self, device: PciDeviceState, dword: int, mask: int, value: int) -> None:
        """Write the emulated config space; only the modelled bits stick.

        :param dword: the dword offset
        :param mask: the written bytes' mask, shifted into the dword
        :param value: the value, shifted into the dword
        """
        endpoint = device.ivshmem
        if endpoint is None:
            return
        if dword == 0x04:
            writable = mask & _COMMAND_BITS
            endpoint.command = (endpoint.command & ~writable) | (value & writable)
            self._update_bars(endpoint)
        elif dword == 0x3C:
            if mask & 0xFF:
                endpoint.int_line = value & 0xFF
        elif dword == 0x40:
            if mask & 0x01000000:
                endpoint.one_shot = (value >> 24) & 1
        elif dword == 0x60 and device.info.num_msix_vectors:
            writable = mask & _MSIX_CTRL_BITS
            endpoint.msix_ctrl = (endpoint.msix_ctrl & ~writable) | (value & writable)

    def bar_written(self, device: PciDeviceState) -> None:
        """A BAR shadow changed: move the registered regions."""
        if device.ivshmem is not None:
            self._update_bars(device.ivshmem)

    # -- BARs ---------------------------------------------------------------------------

    def _unregister_bars(self, endpoint: IvshmemEndpoint) -> None:
        for n, start in enumerate(endpoint.bar_regions):
            if start is not None:
                endpoint.cell.mmio.unregister(start)
                endpoint.bar_regions[n] = None

    def _update_bars(self, endpoint: IvshmemEndpoint) -> None:
        self._unregister_bars(endpoint)
        if not endpoint.command & PCI_CMD_MEM:
            return
        device = endpoint.device
        mmio = endpoint.cell.mmio
        bar0 = device.bar[0] & ~0xF
        size0 = ((~device.info.bar_mask[0]) & 0xFFFFFFFF) + 1
        if mmio.register(bar0, size0, self._register_handler(endpoint)):
            endpoint.bar_regions[0] = bar0
        if device.info.num_msix_vectors:
            bar1 = device.bar[1] & ~0xF
            if mmio.register(bar1, IVSHMEM_MSIX_REGION, self._msix_handler(endpoint)):
                endpoint.bar_regions[1] = bar1

    def _register_handler(self, endpoint: IvshmemEndpoint) -> MmioHandler:
        def handler(access: MmioAccess) -> MmioResult:
            offset = access.address
            if not access.is_write:
                if offset == REG_ID:
                    access.value = endpoint.id
                elif offset == REG_MAX_PEERS:
                    access.value = endpoint.link.peers
                elif offset == REG_INT_CTRL:
                    access.value = endpoint.int_ctrl
                elif offset == REG_STATE:
                    access.value = endpoint.state
                else:
                    access.value = 0
                return MmioResult.HANDLED
            value = access.value & 0xFFFFFFFF
            if offset == REG_INT_CTRL:
                endpoint.int_ctrl = value & 1
            elif offset == REG_DOORBELL:
                vector, target = value & 0xFFFF, value >> 16
                peer = endpoint.link.endpoints.get(target)
                if target < IVSHMEM_MAX_PEERS and peer is not None:
                    self.trigger(peer, vector)
            elif offset == REG_STATE:
                self._set_state(endpoint, value)
            return MmioResult.HANDLED

        return handler

    def _msix_handler(self, endpoint: IvshmemEndpoint) -> MmioHandler:
        console = self.host.console
        msi_target_ok = self.msi_target_ok

        def handler(access: MmioAccess) -> MmioResult:
            offset = access.address
            index, dword = divmod(offset, 16)
            dword //= 4
            if offset >= IVSHMEM_MSIX_PBA or index >= len(endpoint.vectors):
                if not access.is_write:
                    access.value = 0
                return MmioResult.HANDLED
            vector = endpoint.vectors[index]
            if not access.is_write:
                access.value = vector[dword]
                return MmioResult.HANDLED
            vector[dword] = access.value & 0xFFFFFFFF
            if (
                endpoint.msix_ctrl & PCI_MSIX_DWORD_ENABLE
                and not vector[3] & PCI_MSIX_VECTOR_MASKED
                and vector[0] >> 20 == MSI_ADDRESS_WINDOW
                and not msi_target_ok(endpoint.cell, vector[0])
            ):
                console.write(FATAL_IVSHMEM_MSIX)
                return MmioResult.ERROR
            return MmioResult.HANDLED

        return handler

    # -- state and interrupts -------------------------------------------------------------

    def _set_state(self, endpoint: IvshmemEndpoint, value: int) -> None:
        changed = value != endpoint.state
        endpoint.state = value
        if endpoint.id < endpoint.link.peers:
            self.host.arch.phys_write(
                endpoint.link.state_table + 4 * endpoint.id, _U32.pack(value & 0xFFFFFFFF)
            )
        if changed:
            for peer in endpoint.link.endpoints.values():
                if peer is not endpoint:
                    self.trigger(peer, 0)

    def trigger(self, endpoint: IvshmemEndpoint, vector: int) -> bool:
        """Raise ``vector`` at ``endpoint`` if everything allows it.

        :return: whether an MSI was sent
        """
        if not endpoint.int_ctrl & 1 or vector >= len(endpoint.vectors):
            return False
        if not endpoint.msix_ctrl & PCI_MSIX_DWORD_ENABLE or endpoint.msix_ctrl & PCI_MSIX_DWORD_FMASK:
            return False
        entry = endpoint.vectors[vector]
        if entry[3] & PCI_MSIX_VECTOR_MASKED or not endpoint.command & PCI_CMD_MASTER:
            return False
        self.host.arch.send_msi(endpoint.cell.id, entry[0] | (entry[1] << 32), entry[2])
        if endpoint.one_shot:
            endpoint.int_ctrl = 0
        return True

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly snapshot of the links."""
        return {
            f"{domain:04x}:{bdf:04x}": {
                "peers": link.peers,
                "state_table": link.state_table,
                "endpoints": {str(ep_id): ep.cell.name for ep_id, ep in sorted(link.endpoints.items())},
            }
            for (domain, bdf), link in sorted(self.links.items())
        }
