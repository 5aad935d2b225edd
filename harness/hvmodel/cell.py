"""Cell state; models ``include/jailhouse/cell.h`` (``struct cell``) and the per-cell
structures it points to: ``struct pci_device`` (``pci.h``), ``struct ivshmem_endpoint``
and ``struct ivshmem_link`` (``ivshmem.h``), ``struct cell_ioapic`` (x86 ``asm/cell.h``).

A :class:`Cell` is what the hypervisor keeps per partition: its id and config copy, the
comm page (whose ``cell_state`` *is* the cell's state, as in Jailhouse: the cell itself
writes it), the CPUs it owns now, the loadable flag, its guest mappings, its MMIO
table, its I/O-port pass-through map, its PCI devices and the per-unit parts (IOAPIC
pins, CAT class of service, the 0xCF8 address shadow).

The structures a cell points to and that point back at their cell live here with it
(C declares them ahead; Python keeps mutually referring classes in one module). The
units that manage them (:mod:`.pci`, :mod:`.ivshmem`, :mod:`.ioapic`) import them.

Lifecycle: built by ``cell_create`` (state SHUT_DOWN), RUNNING after ``cell_start``,
possibly RUNNING_LOCKED/FAILED/FAILED_COMM_REV by the cell's own doing, SHUT_DOWN again
through set-loadable, gone after ``cell_destroy``. The root cell lives from enable to
disable and is never managed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .abi import (
    PCI_CAP_MSI,
    PCI_CAP_MSIX,
    PCI_MSIX_VECTOR_MASKED,
    PCI_TYPE_BRIDGE,
    CellState,
    CommOffset,
    comm_read_u32,
    comm_write_u32,
    state_text,
)
from .mmio import MmioTable
from .paging import AddressSpace

if TYPE_CHECKING:
    from .config import CellConfig, Irqchip, MemoryRegion, PciCapability, PciDevice, PioRegion

__all__ = ["Cell", "CellIoapic", "IvshmemEndpoint", "IvshmemLink", "PciDeviceState", "PhysIoapic"]


class Cell:
    """One cell (``struct cell``).

    :param cell_id: runtime id (root = 0; others as the driver assigned them)
    :param config: the parsed configuration (the hypervisor's copy)
    :param raw_config: the configuration bytes as read from the root
    :param comm_page: the 4 KiB comm page (from the Arch)
    :param mmio: the MMIO region table
    :param ept: the guest-physical mappings
    :param iommu: the DMA mappings, when an IOMMU with its own tables is present
    """

    def __init__(
        self,
        cell_id: int,
        config: CellConfig,
        raw_config: bytes,
        comm_page: memoryview,
        mmio: MmioTable,
        ept: AddressSpace,
        iommu: AddressSpace | None,
        cpus: frozenset[int] | None = None,
    ) -> None:
        self.id = cell_id
        self.config = config
        self.raw_config = raw_config
        self.name = config.name
        self.comm_page = comm_page
        self.mmio = mmio
        self.ept = ept
        self.iommu = iommu
        #: CPUs the cell owns now (the root's set shrinks and grows)
        self.cpus: set[int] = set(config.cpus if cpus is None else cpus)
        #: its LOADABLE regions are mapped into the root (between set-loadable and start)
        self.loadable = False
        #: pages of ``struct cell`` plus the config copy, charged to the mem pool
        self.data_pages = 0
        #: extra pages of a large CPU set (``cpu_set_size`` > 8)
        self.cpu_set_pages = 0
        #: pages of the MMIO table
        self.mmio_pages = 0
        #: ports passed through (1) or trapped (0); built by ``pio.cell_init``
        self.pio_open = bytearray(0x10000)
        #: the configured whitelist as ``(start, end)`` port ranges (filled on demand)
        self.pio_ranges: list[tuple[int, int]] | None = None
        #: root only: what the root regains per destroyed cell whitelist (a cache)
        self.pio_give_back: dict[tuple[PioRegion, ...], list[tuple[int, int]]] = {}
        #: the 0xCF8 register shadow (``pci_addr_port_val``)
        self.pci_addr_port_val = 0
        #: PCI devices in config order; None where the device is not (or no more) owned
        self.pci_devices: list[PciDeviceState | None] = []
        #: config index of each BDF
        self.pci_index: dict[int, int] = {}
        #: the cell's IOAPIC views
        self.ioapics: list[CellIoapic] = []
        #: the memory regions as (region, sub-page?, taken from the root?), non-empty only
        self.regions: tuple[tuple[MemoryRegion, bool, bool], ...] = ()
        #: CAT class of service, None when CAT is absent or unused
        self.cat_cos: int | None = None

    # -- the comm region --------------------------------------------------------------

    @property
    def state(self) -> int:
        """Raw ``cell_state`` from the comm region (may hold a value the cell made up)."""
        return comm_read_u32(self.comm_page, CommOffset.CELL_STATE)

    @state.setter
    def state(self, value: int) -> None:
        comm_write_u32(self.comm_page, CommOffset.CELL_STATE, value)

    @property
    def state_text(self) -> str:
        """The driver's text for the state (``running``, ``shut down`` ...)."""
        return state_text(self.state)

    def is_locked(self) -> bool:
        """Whether the cell set RUNNING_LOCKED."""
        return self.state == CellState.RUNNING_LOCKED

    # -- PCI ------------------------------------------------------------------------------

    def assigned_device(self, bdf: int) -> PciDeviceState | None:
        """The device the cell owns at ``bdf`` (``pci_get_assigned_device``)."""
        index = self.pci_index.get(bdf)
        if index is None:
            return None
        return self.pci_devices[index]

    def owned_devices(self) -> list[PciDeviceState]:
        """The devices the cell owns now, in config order."""
        return [dev for dev in self.pci_devices if dev is not None]

    def __repr__(self) -> str:
        return f"Cell(id={self.id}, name={self.name!r}, state={self.state_text!r})"

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly snapshot of what the hypervisor keeps for the cell."""
        open_ranges: list[list[int]] = []
        data = self.pio_open
        port = data.find(1)
        while port != -1:
            end = data.find(0, port)
            end = 0x10000 if end == -1 else end
            open_ranges.append([port, end - port])
            port = data.find(1, end)
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "state_text": self.state_text,
            "cpus": sorted(self.cpus),
            "loadable": self.loadable,
            "memory": self.ept.to_list(),
            "dma": self.iommu.to_list() if self.iommu is not None else None,
            "mmio": [[start, size] for start, size in self.mmio.regions()],
            "pio_open": open_ranges,
            "pci": [dev.to_dict() for dev in self.owned_devices()],
            "ioapic_pins": {f"{chip.address:#x}": sorted(chip.pins()) for chip in self.ioapics},
            "cat_cos": self.cat_cos,
            "comm": bytes(self.comm_page[:76]).hex(),
        }


# --- struct pci_device (pci.h) ----------------------------------------------------------


class PciDeviceState:
    """A PCI device as the hypervisor tracks it (``struct pci_device``).

    :param info: the device entry of the owning cell's config
    :param caps: its capability entries (from the same config)
    """

    def __init__(self, info: PciDevice, caps: tuple[PciCapability, ...]) -> None:
        self.info = info
        self.caps = caps
        #: the owner, or None while not assigned
        self.cell: Cell | None = None
        #: BAR shadows
        self.bar = [0] * 6
        #: MSI capability shadow: control/next dword, address low, address high, data
        self.msi = [0, 0, 0, 0]
        #: MSI-X capability shadow (first dword)
        self.msix_ctrl = 0
        #: MSI-X vector shadows: address low, address high, data, control
        self.msix_vectors = [[0, 0, 0, PCI_MSIX_VECTOR_MASKED] for _ in range(info.num_msix_vectors)]
        #: the virtual device, for IVSHMEM
        self.ivshmem: IvshmemEndpoint | None = None
        #: the MSI and MSI-X capabilities, if configured
        self.msi_cap = next((cap for cap in caps if cap.id == PCI_CAP_MSI), None)
        self.msix_cap = next((cap for cap in caps if cap.id == PCI_CAP_MSIX), None)

    @property
    def bdf(self) -> int:
        """Bus/device/function."""
        return self.info.bdf

    @property
    def is_bridge(self) -> bool:
        """Type BRIDGE."""
        return self.info.type == PCI_TYPE_BRIDGE

    def find_cap(self, reg: int) -> PciCapability | None:
        """The configured capability covering config offset ``reg``."""
        for cap in self.caps:
            if cap.start <= reg < cap.start + cap.len:
                return cap
        return None

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly snapshot."""
        out: dict[str, object] = {
            "bdf": self.info.bdf_str,
            "type": int(self.info.type),
            "bar": list(self.bar),
            "msi": list(self.msi),
            "msix_ctrl": self.msix_ctrl,
            "msix_vectors": [list(vector) for vector in self.msix_vectors],
        }
        if self.ivshmem is not None:
            out["ivshmem"] = self.ivshmem.to_dict()
        return out


# --- struct ivshmem_link, struct ivshmem_endpoint (ivshmem.h) ---------------------------


class IvshmemLink:
    """All endpoints sharing one BDF (``struct ivshmem_link``).

    :param bdf: the devices' BDF
    :param state_table: host-physical address of the state table
    :param peers: number of peers of the link
    """

    def __init__(self, bdf: int, state_table: int, peers: int) -> None:
        self.bdf = bdf
        self.state_table = state_table
        self.peers = peers
        self.endpoints: dict[int, IvshmemEndpoint] = {}


class IvshmemEndpoint:
    """One cell's ivshmem device (``struct ivshmem_endpoint``).

    :param device: the PCI device it backs
    :param cell: the owning cell
    :param link: the link it joined
    :param regions: state table, R/W section, one output section per peer
    """

    def __init__(
        self,
        device: PciDeviceState,
        cell: Cell,
        link: IvshmemLink,
        regions: tuple[MemoryRegion, ...],
    ) -> None:
        self.device = device
        self.cell = cell
        self.link = link
        self.id = device.info.shmem_dev_id
        self.regions = regions
        self.state = 0
        self.int_ctrl = 0
        self.one_shot = 0
        self.command = 0
        self.int_line = 0
        self.msix_ctrl = 0
        self.vectors = [[0, 0, 0, PCI_MSIX_VECTOR_MASKED] for _ in range(device.info.num_msix_vectors)]
        #: where BAR0/BAR1 are registered now (None = not registered)
        self.bar_regions: list[int | None] = [None, None]

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly snapshot."""
        return {
            "id": self.id,
            "link": f"{self.link.bdf:#06x}",
            "state": self.state,
            "int_ctrl": self.int_ctrl,
            "command": self.command,
            "msix_ctrl": self.msix_ctrl,
        }


# --- struct cell_ioapic (asm/cell.h) ---------------------------------------------------


class PhysIoapic:
    """A physical IOAPIC: its pin count and the shadow of its redirection table.

    :param address: MMIO base
    :param pins: number of redirection entries
    :param shadow: the 64-bit redirection entries as read at first use
    """

    __slots__ = ("address", "pins", "shadow")

    def __init__(self, address: int, pins: int, shadow: list[int]) -> None:
        self.address = address
        self.pins = pins
        self.shadow = shadow


class CellIoapic:
    """A cell's view of one IOAPIC (``struct cell_ioapic``).

    :param info: the irqchip entry of the cell config
    :param phys: the physical IOAPIC behind it
    :param pin_bitmap: the pins the cell owns now (bit n = pin n)
    """

    __slots__ = ("index_reg", "info", "phys", "pin_bitmap")

    def __init__(self, info: Irqchip, phys: PhysIoapic, pin_bitmap: int) -> None:
        self.info = info
        self.phys = phys
        self.pin_bitmap = pin_bitmap
        #: the shadow of the index register
        self.index_reg = 0

    @property
    def address(self) -> int:
        """MMIO base of the IOAPIC."""
        return self.phys.address

    def pins(self) -> list[int]:
        """Owned pin numbers."""
        value = self.pin_bitmap
        return [n for n in range(value.bit_length()) if value >> n & 1]
