"""Config objects of ``include/jailhouse/cell-config.h`` and ``include/jailhouse/console.h``:
the cell descriptor (:class:`CellConfig`) and the structs it holds; the system config
that embeds a root cell is :mod:`.system`'s.

Every struct of the binary format is a frozen, keyword-only dataclass validated in
``__post_init__`` against the range of its C type; the flags and type codes, and the byte
layout the ``to_bytes`` methods pack, are :mod:`harness.hvmodel.abi`'s. Fields hold plain
integers (an enum member is an integer too), so values the enums do not know survive a
round trip unchanged.

Byte-exact round trip: ``to_bytes()`` of a parsed object returns the bytes it was parsed
from. Where the C layout has bytes that carry no field, or a union, the model keeps them
raw: :attr:`CacheRegion.padding`, the upper bits of the PCI device's MSI bit-field byte
(:attr:`PciDevice.msi_reserved_bits`), and in :mod:`.system` the IOMMU union, the x86
platform padding and the 28 bytes of the arch union that only ARM uses. The cell name is text up to
its NUL; any bytes after the NUL inside the 32-byte field are kept in
:attr:`CellConfig.name_padding` (empty when they are all zero, as in every compiled config).
A name must be UTF-8 and at most 31 bytes long.

Validation errors raise :class:`~harness.hvmodel.errors.ConfigError` with ``field`` set to
``Class.field`` (the checks are :mod:`.fields`').
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from .. import abi
from ..abi import (
    Architecture,
    CacheType,
    CellFlags,
    ConsoleFlags,
    ConsoleType,
    MemFlags,
    PciDeviceType,
    ShmemProtocol,
    VirtioDevice,
)
from ..cpus import cpus_from_bitmap
from ..errors import ConfigError
from .fields import U8, U16, U32, U64, bits_to_set, check_bytes, check_tuple, check_uints, fail, validate

# --- ivshmem protocol names ----------------------------------------------------------------


def shmem_protocol_name(value: int) -> str:
    """Name an ivshmem protocol value: ``UNDEFINED``, ``VIRTIO_BACK_BLOCK``, ``CUSTOM+0x12``.

    :param value: the ``shmem_protocol`` field
    :return: a name :func:`shmem_protocol_value` turns back into ``value``
    """
    if value in (ShmemProtocol.UNDEFINED, ShmemProtocol.VETH):
        return ShmemProtocol(value).name
    for base in (ShmemProtocol.VIRTIO_BACK, ShmemProtocol.VIRTIO_FRONT, ShmemProtocol.CUSTOM):
        if value >= base:
            rest = value - base
            if base != ShmemProtocol.CUSTOM and rest in VirtioDevice._value2member_map_:
                return f"{base.name}_{VirtioDevice(rest).name}"
            return f"{base.name}+{rest:#x}" if rest else base.name
    return f"{value:#06x}"


def shmem_protocol_value(name: str) -> int:
    """Inverse of :func:`shmem_protocol_name`.

    :raise KeyError: when the name is not one of the forms the namer produces
    """
    if name.lower().startswith("0x"):
        return int(name, 16)
    base_name, plus, rest = name.partition("+")
    if plus:
        return int(ShmemProtocol[base_name]) + int(rest, 0)
    if base_name in ShmemProtocol.__members__:
        return int(ShmemProtocol[base_name])
    for base in (ShmemProtocol.VIRTIO_FRONT, ShmemProtocol.VIRTIO_BACK):
        prefix = base.name + "_"
        if base_name.startswith(prefix):
            return int(base) + int(VirtioDevice[base_name[len(prefix):]])
    raise KeyError(name)


_MEM_COMM: Final = abi.MEM_COMM_REGION


# --- structs -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryRegion:
    """``struct jailhouse_memory`` (32 bytes).

    :param phys_start: host-physical start (ignored for the comm region)
    :param virt_start: guest-physical start inside the cell
    :param size: length in bytes; a zero-size entry is an empty placeholder
    :param flags: :class:`MemFlags` bits
    """

    phys_start: int = 0
    virt_start: int = 0
    size: int = 0
    flags: int = 0

    _SPEC = (("phys_start", U64), ("virt_start", U64), ("size", U64), ("flags", U64))

    def __post_init__(self) -> None:
        validate(self, self._SPEC)

    @property
    def is_subpage(self) -> bool:
        """Whether ``virt_start`` or ``size`` is not 4K-aligned (MMIO-dispatched region)."""
        return bool((self.virt_start | self.size) & (abi.PAGE_SIZE - 1))

    @property
    def phys_end(self) -> int:
        """First host-physical address after the region (exclusive end)."""
        return self.phys_start + self.size

    @property
    def virt_end(self) -> int:
        """First guest-physical address after the region (exclusive end)."""
        return self.virt_start + self.size

    @property
    def mem_flags(self) -> MemFlags:
        """:attr:`flags` as :class:`MemFlags` (unknown bits kept)."""
        return MemFlags(self.flags)

    @property
    def is_ram(self) -> bool:
        """pyjailhouse's ``is_ram``: exactly R|W|X|DMA among R/W/X/DMA/IO/COMM/ROOTSHARED."""
        mask = (
            MemFlags.READ | MemFlags.WRITE | MemFlags.EXECUTE | MemFlags.DMA | MemFlags.IO
            | MemFlags.COMM_REGION | MemFlags.ROOTSHARED
        )
        want = MemFlags.READ | MemFlags.WRITE | MemFlags.EXECUTE | MemFlags.DMA
        return self.flags & mask == want

    @property
    def is_comm_region(self) -> bool:
        """Whether this entry maps the cell's communication region."""
        return bool(self.flags & _MEM_COMM)

    def phys_overlaps(self, other: MemoryRegion) -> bool:
        """Whether both regions are non-empty and share a host-physical byte."""
        if not self.size or not other.size:
            return False
        return self.phys_start < other.phys_start + other.size and (
            other.phys_start < self.phys_start + self.size
        )

    def virt_overlaps(self, other: MemoryRegion) -> bool:
        """Whether both regions are non-empty and share a guest-physical byte."""
        if not self.size or not other.size:
            return False
        return self.virt_start < other.virt_start + other.size and (
            other.virt_start < self.virt_start + self.size
        )

    def to_bytes(self) -> bytes:
        """The 32-byte ``struct jailhouse_memory``."""
        return abi.MEMORY.pack(self.phys_start, self.virt_start, self.size, self.flags)


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheRegion:
    """``struct jailhouse_cache`` (12 bytes, Intel CAT).

    :param start: first bit of the capacity bitmask
    :param size: number of bits
    :param type: :class:`CacheType`
    :param flags: :class:`CacheFlags`
    :param padding: the unused byte at offset 9, kept for exactness
    """

    start: int = 0
    size: int = 0
    type: int = CacheType.L3
    flags: int = 0
    padding: int = 0

    _SPEC = (("start", U32), ("size", U32), ("type", U8), ("flags", U16), ("padding", U8))

    def __post_init__(self) -> None:
        validate(self, self._SPEC)

    def to_bytes(self) -> bytes:
        """The 12-byte ``struct jailhouse_cache``."""
        return abi.CACHE.pack(self.start, self.size, self.type, self.padding, self.flags)


@dataclass(frozen=True, kw_only=True, slots=True)
class Irqchip:
    """``struct jailhouse_irqchip`` (32 bytes; an IOAPIC on x86).

    :param address: MMIO base
    :param id: x86: (IOMMU unit index << 16) | IOAPIC source BDF
    :param pin_base: first pin of the bitmap (must be 0 on x86)
    :param pin_bitmap: four u32 words, bit n = pin ``pin_base + n``
    """

    address: int = 0
    id: int = 0
    pin_base: int = 0
    pin_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)

    _SPEC = (("address", U64), ("id", U32), ("pin_base", U32))

    def __post_init__(self) -> None:
        check_tuple(self, "pin_bitmap", int, 4)
        validate(self, self._SPEC, ("pin_bitmap",))

    @property
    def pins(self) -> frozenset[int]:
        """The pin numbers this cell may use."""
        return bits_to_set(self.pin_bitmap, 32, self.pin_base)

    def to_bytes(self) -> bytes:
        """The 32-byte ``struct jailhouse_irqchip``."""
        return abi.IRQCHIP.pack(self.address, self.id, self.pin_base, *self.pin_bitmap)


@dataclass(frozen=True, kw_only=True, slots=True)
class PioRegion:
    """``struct jailhouse_pio`` (4 bytes): a whitelisted port range.

    :param base: first port
    :param length: number of ports
    """

    base: int = 0
    length: int = 0

    _SPEC = (("base", U16), ("length", U16))

    def __post_init__(self) -> None:
        validate(self, self._SPEC)

    @property
    def end(self) -> int:
        """First port after the range (exclusive)."""
        return self.base + self.length

    def overlaps(self, other: PioRegion) -> bool:
        """Whether both ranges are non-empty and share a port."""
        return bool(self.length and other.length) and (
            self.base < other.base + other.length and other.base < self.base + self.length
        )

    def to_bytes(self) -> bytes:
        """The 4-byte ``struct jailhouse_pio``."""
        return abi.PIO.pack(self.base, self.length)


@dataclass(frozen=True, kw_only=True, slots=True)
class PciDevice:
    """``struct jailhouse_pci_device`` (56 bytes).

    :param type: :class:`PciDeviceType`
    :param iommu: index into the system's ``iommu_units``
    :param domain: PCI segment
    :param bdf: ``bus << 8 | dev << 3 | fn``
    :param bar_mask: six u32 BAR size masks
    :param caps_start: index of the first capability in the cell's ``pci_caps``
    :param num_caps: number of capabilities
    :param num_msi_vectors: MSI vectors
    :param msi_64bits: MSI capability is 64-bit (bit 0 of byte 35)
    :param msi_maskable: MSI capability supports per-vector masking (bit 1 of byte 35)
    :param num_msix_vectors: MSI-X vectors
    :param msix_region_size: size of the MSI-X table region
    :param msix_address: physical address of the MSI-X table (0 = none)
    :param shmem_regions_start: ivshmem: index of the first memory region of the link
    :param shmem_dev_id: ivshmem: this peer's ID
    :param shmem_peers: ivshmem: maximum number of peers
    :param shmem_protocol: ivshmem: protocol (see :class:`ShmemProtocol`)
    :param msi_reserved_bits: bits 2..7 of byte 35 (unused by Jailhouse), kept for exactness
    """

    type: int = PciDeviceType.DEVICE
    iommu: int = 0
    domain: int = 0
    bdf: int = 0
    bar_mask: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)
    caps_start: int = 0
    num_caps: int = 0
    num_msi_vectors: int = 0
    msi_64bits: bool = False
    msi_maskable: bool = False
    num_msix_vectors: int = 0
    msix_region_size: int = 0
    msix_address: int = 0
    shmem_regions_start: int = 0
    shmem_dev_id: int = 0
    shmem_peers: int = 0
    shmem_protocol: int = 0
    msi_reserved_bits: int = 0

    _SPEC = (
        ("type", U8), ("iommu", U8), ("domain", U16), ("bdf", U16), ("caps_start", U16),
        ("num_caps", U16), ("num_msi_vectors", U8), ("num_msix_vectors", U16),
        ("msix_region_size", U16), ("msix_address", U64), ("shmem_regions_start", U32),
        ("shmem_dev_id", U8), ("shmem_peers", U8), ("shmem_protocol", U16),
        ("msi_reserved_bits", U8),
    )

    def __post_init__(self) -> None:
        check_tuple(self, "bar_mask", int, 6)
        if not isinstance(self.msi_64bits, bool) or not isinstance(self.msi_maskable, bool):
            raise fail(self, "msi_64bits", "msi_64bits and msi_maskable must be bool")
        validate(self, self._SPEC, ("bar_mask",))
        if self.msi_reserved_bits & 0x03:
            raise fail(self, "msi_reserved_bits", "bits 0 and 1 are msi_64bits/msi_maskable")

    @property
    def bus(self) -> int:
        """Bus number."""
        return self.bdf >> 8

    @property
    def dev(self) -> int:
        """Device (slot) number."""
        return (self.bdf >> 3) & 0x1F

    @property
    def fn(self) -> int:
        """Function number."""
        return self.bdf & 0x7

    @property
    def bdf_str(self) -> str:
        """``bus:dev.fn`` as lspci prints it, e.g. ``00:1b.0``."""
        return format_bdf(self.bdf)

    @property
    def is_ivshmem(self) -> bool:
        """Whether this is a virtual ivshmem device."""
        return self.type == PciDeviceType.IVSHMEM

    def to_bytes(self) -> bytes:
        """The 56-byte ``struct jailhouse_pci_device``."""
        bits = self.msi_reserved_bits | int(self.msi_64bits) | int(self.msi_maskable) << 1
        return abi.PCI_DEVICE.pack(
            self.type, self.iommu, self.domain, self.bdf, *self.bar_mask, self.caps_start,
            self.num_caps, self.num_msi_vectors, bits, self.num_msix_vectors,
            self.msix_region_size, self.msix_address, self.shmem_regions_start,
            self.shmem_dev_id, self.shmem_peers, self.shmem_protocol,
        )


def format_bdf(bdf: int) -> str:
    """Format a 16-bit BDF as ``bb:dd.f``."""
    return f"{bdf >> 8:02x}:{(bdf >> 3) & 0x1f:02x}.{bdf & 7:x}"


@dataclass(frozen=True, kw_only=True, slots=True)
class PciCapability:
    """``struct jailhouse_pci_capability`` (8 bytes).

    :param id: capability ID (:class:`PciCapId`), extended ones ORed with 0x8000
    :param start: offset in config space
    :param len: length in bytes
    :param flags: :class:`PciCapFlags`
    """

    id: int = 0
    start: int = 0
    len: int = 0
    flags: int = 0

    _SPEC = (("id", U16), ("start", U16), ("len", U16), ("flags", U16))

    def __post_init__(self) -> None:
        validate(self, self._SPEC)

    def to_bytes(self) -> bytes:
        """The 8-byte ``struct jailhouse_pci_capability``."""
        return abi.PCI_CAP.pack(self.id, self.start, self.len, self.flags)


@dataclass(frozen=True, kw_only=True, slots=True)
class Console:
    """``struct jailhouse_console`` (32 bytes).

    :param address: PIO port or MMIO physical address
    :param size: MMIO size
    :param type: :class:`ConsoleType`
    :param flags: :class:`ConsoleFlags`
    :param divider: UART divider (0 = leave the UART as it is)
    :param gate_nr: clock gate number
    :param clock_reg: clock gate register (0 = none)
    """

    address: int = 0
    size: int = 0
    type: int = ConsoleType.NONE
    flags: int = 0
    divider: int = 0
    gate_nr: int = 0
    clock_reg: int = 0

    _SPEC = (
        ("address", U64), ("size", U32), ("type", U16), ("flags", U16), ("divider", U32),
        ("gate_nr", U32), ("clock_reg", U64),
    )

    def __post_init__(self) -> None:
        validate(self, self._SPEC)

    @property
    def is_mmio(self) -> bool:
        """Whether the console is accessed through MMIO (else PIO)."""
        return bool(self.flags & ConsoleFlags.ACCESS_MMIO)

    def astuple(self) -> tuple[int, int, int, int, int, int, int]:
        """The fields in ``struct jailhouse_console`` order."""
        return (
            self.address, self.size, self.type, self.flags, self.divider, self.gate_nr,
            self.clock_reg,
        )

    def to_bytes(self) -> bytes:
        """The 32-byte ``struct jailhouse_console``."""
        return abi.CONSOLE.pack(*self.astuple())


def encode_name(name: str, padding: bytes = b"") -> bytes:
    """The 32-byte name field: UTF-8 text, NUL, then ``padding``, then zeros.

    :raise ConfigError: when the name is too long, not text, or contains NUL
    """
    if not isinstance(name, str):
        raise ConfigError(f"expected a string, got {name!r}", field="CellConfig.name")
    raw = name.encode("utf-8")
    if b"\0" in raw:
        raise ConfigError("a cell name cannot contain NUL", field="CellConfig.name")
    if len(raw) > abi.CELL_NAME_MAXLEN:
        raise ConfigError(
            f"name {name!r} is {len(raw)} bytes, at most {abi.CELL_NAME_MAXLEN} fit",
            field="CellConfig.name",
        )
    if not isinstance(padding, bytes) or len(raw) + 1 + len(padding) > abi.NAME_FIELD_SIZE:
        raise ConfigError(
            "name padding does not fit the 32-byte name field", field="CellConfig.name_padding"
        )
    return (raw + b"\0" + padding).ljust(abi.NAME_FIELD_SIZE, b"\0")


@dataclass(frozen=True, kw_only=True, slots=True)
class CellConfig:
    """``struct jailhouse_cell_desc`` (132 bytes) plus its arrays: one cell configuration.

    As the root cell of a :class:`SystemConfig` the descriptor is usually all zero except
    name and counts (signature, revision and architecture are not checked there).

    :param signature: 5 bytes, ``b"JHCLL"`` for a cell config
    :param architecture: :class:`Architecture`
    :param revision: :data:`CONFIG_REVISION`
    :param name: the cell name (at most 31 bytes of UTF-8)
    :param id: cell ID (overwritten by the driver)
    :param flags: :class:`CellFlags`
    :param cpu_set: the raw CPU bitmap, bit n = CPU n; its length is ``cpu_set_size``
    :param memory_regions: the memory regions, in file order
    :param cache_regions: the CAT regions
    :param irqchips: the IOAPICs
    :param pio_regions: the whitelisted port ranges
    :param pci_devices: the PCI devices
    :param pci_caps: the capability entries the devices point into
    :param stream_ids: stream IDs (u32, ARM SMMU)
    :param vpci_irq_base: first vPCI interrupt (ARM)
    :param cpu_reset_address: start address of the cell's CPUs
    :param msg_reply_timeout: reply timeout in hypervisor polling loops (0 = forever)
    :param console: the inmate console
    :param name_padding: bytes after the name's NUL, when they are not all zero
    """

    signature: bytes = abi.CELL_SIGNATURE
    architecture: int = Architecture.X86
    revision: int = abi.CONFIG_REVISION
    name: str
    id: int = 0
    flags: int = 0
    cpu_set: bytes = bytes(8)
    memory_regions: tuple[MemoryRegion, ...] = ()
    cache_regions: tuple[CacheRegion, ...] = ()
    irqchips: tuple[Irqchip, ...] = ()
    pio_regions: tuple[PioRegion, ...] = ()
    pci_devices: tuple[PciDevice, ...] = ()
    pci_caps: tuple[PciCapability, ...] = ()
    stream_ids: tuple[int, ...] = ()
    vpci_irq_base: int = 0
    cpu_reset_address: int = 0
    msg_reply_timeout: int = 0
    console: Console = field(default_factory=Console)
    name_padding: bytes = b""

    _SPEC = (
        ("architecture", U8), ("revision", U16), ("id", U32), ("flags", U32),
        ("vpci_irq_base", U32), ("cpu_reset_address", U64), ("msg_reply_timeout", U64),
    )

    def __post_init__(self) -> None:
        check_bytes(self, "signature", 5)
        check_uints(self, self._SPEC)
        encode_name(self.name, self.name_padding)
        if not isinstance(self.cpu_set, bytes) or not (
            0 < len(self.cpu_set) <= abi.MAX_CPU_SET_SIZE
        ):
            raise fail(
                self, "cpu_set", f"expected 1..{abi.MAX_CPU_SET_SIZE} bytes of CPU bitmap"
            )
        check_tuple(self, "memory_regions", MemoryRegion)
        check_tuple(self, "cache_regions", CacheRegion)
        check_tuple(self, "irqchips", Irqchip)
        check_tuple(self, "pio_regions", PioRegion)
        check_tuple(self, "pci_devices", PciDevice)
        check_tuple(self, "pci_caps", PciCapability)
        check_tuple(self, "stream_ids", int)
        for sid in self.stream_ids:
            if sid < 0 or sid >> 32:
                raise fail(self, "stream_ids", f"expected u32 stream IDs, got {sid!r}")
        if not isinstance(self.console, Console):
            raise fail(self, "console", f"expected a Console, got {self.console!r}")

    @property
    def cpu_set_size(self) -> int:
        """Size of the CPU bitmap in bytes."""
        return len(self.cpu_set)

    @property
    def cpus(self) -> frozenset[int]:
        """The CPU numbers in the CPU set."""
        return cpus_from_bitmap(self.cpu_set)

    @property
    def cell_flags(self) -> CellFlags:
        """:attr:`flags` as :class:`CellFlags`."""
        return CellFlags(self.flags)

    @property
    def size(self) -> int:
        """Size of the binary config: 132 bytes of descriptor plus the arrays."""
        return (
            abi.CELL_DESC_SIZE + len(self.cpu_set)
            + abi.MEMORY.size * len(self.memory_regions)
            + abi.CACHE.size * len(self.cache_regions)
            + abi.IRQCHIP.size * len(self.irqchips)
            + abi.PIO.size * len(self.pio_regions)
            + abi.PCI_DEVICE.size * len(self.pci_devices)
            + abi.PCI_CAP.size * len(self.pci_caps)
            + abi.STREAM_ID.size * len(self.stream_ids)
        )

    def caps_of(self, device: PciDevice) -> tuple[PciCapability, ...]:
        """The capability entries of ``device`` (``caps_start`` .. ``+num_caps``).

        :raise ConfigError: when the range runs past this cell's ``pci_caps``
        """
        end = device.caps_start + device.num_caps
        if end > len(self.pci_caps):
            raise ConfigError(
                f"device {device.bdf_str} uses capabilities {device.caps_start}..{end - 1}, "
                f"cell {self.name!r} has {len(self.pci_caps)}",
                field="PciDevice.caps_start",
            )
        return self.pci_caps[device.caps_start:end]

    def shmem_regions_of(self, device: PciDevice) -> tuple[MemoryRegion, ...]:
        """The memory regions of an ivshmem device: state table, R/W, one output per peer.

        :raise ConfigError: when the range runs past this cell's memory regions
        """
        start = device.shmem_regions_start
        end = start + 2 + device.shmem_peers
        if end > len(self.memory_regions):
            raise ConfigError(
                f"ivshmem {device.bdf_str} needs memory regions {start}..{end - 1}, "
                f"cell {self.name!r} has {len(self.memory_regions)}",
                field="PciDevice.shmem_regions_start",
            )
        return self.memory_regions[start:end]

    def desc_bytes(self) -> bytes:
        """The 132-byte descriptor alone."""
        return abi.CELL_DESC.pack(
            self.signature, self.architecture, self.revision,
            encode_name(self.name, self.name_padding), self.id, self.flags, len(self.cpu_set),
            len(self.memory_regions), len(self.cache_regions), len(self.irqchips),
            len(self.pio_regions), len(self.pci_devices), len(self.pci_caps),
            len(self.stream_ids), self.vpci_irq_base, self.cpu_reset_address,
            self.msg_reply_timeout, *self.console.astuple(),
        )

    def to_bytes(self) -> bytes:
        """The binary cell config: descriptor, CPU set and arrays in file order."""
        parts = [self.desc_bytes(), self.cpu_set]
        parts.extend(region.to_bytes() for region in self.memory_regions)
        parts.extend(cache.to_bytes() for cache in self.cache_regions)
        parts.extend(chip.to_bytes() for chip in self.irqchips)
        parts.extend(pio.to_bytes() for pio in self.pio_regions)
        parts.extend(dev.to_bytes() for dev in self.pci_devices)
        parts.extend(cap.to_bytes() for cap in self.pci_caps)
        parts.extend(abi.STREAM_ID.pack(sid) for sid in self.stream_ids)
        return b"".join(parts)
