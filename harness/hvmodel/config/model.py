"""Config objects of ``include/jailhouse/cell-config.h`` and ``include/jailhouse/console.h``.

Every struct of the binary format is a frozen, keyword-only dataclass validated in
``__post_init__`` against the range of its C type; the flags and type codes, and the byte
layout the ``to_bytes`` methods pack, are :mod:`harness.hvmodel.abi`'s. Fields hold plain
integers (an enum member is an integer too), so values the enums do not know survive a
round trip unchanged.

Byte-exact round trip: ``to_bytes()`` of a parsed object returns the bytes it was parsed
from. Where the C layout has bytes that carry no field, or a union, the model keeps them
raw: :attr:`CacheRegion.padding`, the upper bits of the PCI device's MSI bit-field byte
(:attr:`PciDevice.msi_reserved_bits`), the IOMMU union (:attr:`IommuUnit.union`), the x86
platform padding and the 28 bytes of the arch union that only ARM uses
(:attr:`X86Platform.padding`, :attr:`X86Platform.remainder`). The cell name is text up to
its NUL; any bytes after the NUL inside the 32-byte field are kept in
:attr:`CellConfig.name_padding` (empty when they are all zero, as in every compiled config).
A name must be UTF-8 and at most 31 bytes long.

Validation errors raise :class:`~harness.hvmodel.errors.ConfigError` with ``field`` set to
``Class.field``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol

from .. import abi
from ..abi import (
    ApicMode,
    Architecture,
    CacheType,
    CellFlags,
    ConsoleFlags,
    ConsoleType,
    IommuType,
    MemFlags,
    PciDeviceType,
    ShmemProtocol,
    SysFlags,
    VirtioDevice,
)
from ..cpus import cpus_from_bitmap
from ..errors import ConfigError

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


# --- validation helpers --------------------------------------------------------------------

_MEM_COMM: Final = abi.MEM_COMM_REGION

_U8: Final = 8
_U16: Final = 16
_U32: Final = 32
_U64: Final = 64


def _fail(obj: object, name: str, message: str) -> ConfigError:
    return ConfigError(message, field=f"{type(obj).__name__}.{name}")


def _check_uints(obj: object, spec: tuple[tuple[str, int], ...]) -> None:
    """Check that each named attribute is an int that fits its C unsigned type."""
    for name, bits in spec:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 0 or value >> bits:
            raise _fail(obj, name, f"expected an integer in 0..{(1 << bits) - 1:#x}, got {value!r}")


def _validate(
    obj: _Packable, spec: tuple[tuple[str, int], ...], words: tuple[str, ...] = ()
) -> None:
    """Range-check every field by packing the struct (fast, in C); explain failures.

    :func:`struct.pack` refuses exactly what does not fit the C types (negative, too large,
    not an integer), so packing is the check; only on failure are the fields inspected one
    by one to name the offending one.
    """
    try:
        obj.to_bytes()
    except (struct.error, TypeError, OverflowError, ValueError):
        _check_uints(obj, spec)
        for name in words:
            for word in getattr(obj, name):
                if not isinstance(word, int) or word < 0 or word >> 32:
                    raise _fail(obj, name, f"expected u32 words, got {word!r}") from None
        raise ConfigError(
            f"invalid field values in {obj!r}", field=type(obj).__name__
        ) from None


class _Packable(Protocol):
    def to_bytes(self) -> bytes: ...


def _check_bytes(obj: object, name: str, size: int) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bytes) or len(value) != size:
        raise _fail(obj, name, f"expected {size} bytes, got {value!r}")


def _check_tuple(obj: object, name: str, kind: type, length: int | None = None) -> None:
    value = getattr(obj, name)
    if not isinstance(value, tuple):
        raise _fail(obj, name, f"expected a tuple of {kind.__name__}, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise _fail(obj, name, f"expected exactly {length} entries, got {len(value)}")
    if all(type(item) is kind for item in value):
        return
    for item in value:
        if not isinstance(item, kind):
            raise _fail(obj, name, f"expected {kind.__name__} entries, got {item!r}")


def _bits_to_set(words: Iterable[int], width: int, base: int = 0) -> frozenset[int]:
    found = []
    for index, word in enumerate(words):
        while word:
            low = word & -word
            found.append(base + index * width + low.bit_length() - 1)
            word ^= low
    return frozenset(found)


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

    _SPEC = (("phys_start", _U64), ("virt_start", _U64), ("size", _U64), ("flags", _U64))

    def __post_init__(self) -> None:
        _validate(self, self._SPEC)

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

    _SPEC = (("start", _U32), ("size", _U32), ("type", _U8), ("flags", _U16), ("padding", _U8))

    def __post_init__(self) -> None:
        _validate(self, self._SPEC)

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

    _SPEC = (("address", _U64), ("id", _U32), ("pin_base", _U32))

    def __post_init__(self) -> None:
        _check_tuple(self, "pin_bitmap", int, 4)
        _validate(self, self._SPEC, ("pin_bitmap",))

    @property
    def pins(self) -> frozenset[int]:
        """The pin numbers this cell may use."""
        return _bits_to_set(self.pin_bitmap, 32, self.pin_base)

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

    _SPEC = (("base", _U16), ("length", _U16))

    def __post_init__(self) -> None:
        _validate(self, self._SPEC)

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
        ("type", _U8), ("iommu", _U8), ("domain", _U16), ("bdf", _U16), ("caps_start", _U16),
        ("num_caps", _U16), ("num_msi_vectors", _U8), ("num_msix_vectors", _U16),
        ("msix_region_size", _U16), ("msix_address", _U64), ("shmem_regions_start", _U32),
        ("shmem_dev_id", _U8), ("shmem_peers", _U8), ("shmem_protocol", _U16),
        ("msi_reserved_bits", _U8),
    )

    def __post_init__(self) -> None:
        _check_tuple(self, "bar_mask", int, 6)
        if not isinstance(self.msi_64bits, bool) or not isinstance(self.msi_maskable, bool):
            raise _fail(self, "msi_64bits", "msi_64bits and msi_maskable must be bool")
        _validate(self, self._SPEC, ("bar_mask",))
        if self.msi_reserved_bits & 0x03:
            raise _fail(self, "msi_reserved_bits", "bits 0 and 1 are msi_64bits/msi_maskable")

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

    _SPEC = (("id", _U16), ("start", _U16), ("len", _U16), ("flags", _U16))

    def __post_init__(self) -> None:
        _validate(self, self._SPEC)

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
        ("address", _U64), ("size", _U32), ("type", _U16), ("flags", _U16), ("divider", _U32),
        ("gate_nr", _U32), ("clock_reg", _U64),
    )

    def __post_init__(self) -> None:
        _validate(self, self._SPEC)

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


@dataclass(frozen=True, kw_only=True, slots=True)
class IommuUnit:
    """``struct jailhouse_iommu`` (28 bytes).

    The 12 bytes after ``size`` are a union (AMD: bdf, base_cap, msi_cap, features; TI PVU:
    tlb_base, tlb_size); :attr:`union` keeps them raw and the ``amd_*``/``tipvu_*``
    properties read the two views. Build typed units with :meth:`amd` and :meth:`pvu`.

    :param type: :class:`IommuType`
    :param base: MMIO base of the unit
    :param size: MMIO size
    :param union: the raw 12-byte union
    """

    type: int = IommuType.UNUSED
    base: int = 0
    size: int = 0
    union: bytes = bytes(12)

    _SPEC = (("type", _U32), ("base", _U64), ("size", _U32))

    def __post_init__(self) -> None:
        _check_bytes(self, "union", 12)
        _validate(self, self._SPEC)

    @classmethod
    def amd(
        cls, *, base: int, size: int, bdf: int = 0, base_cap: int = 0, msi_cap: int = 0,
        features: int = 0,
    ) -> IommuUnit:
        """Build an AMD unit from the fields of the AMD view of the union.

        :raise ConfigError: when a field does not fit its C type
        """
        for name, value, bits in (
            ("amd_bdf", bdf, 16), ("amd_base_cap", base_cap, 8), ("amd_msi_cap", msi_cap, 8),
            ("amd_features", features, 32),
        ):
            if not isinstance(value, int) or value < 0 or value >> bits:
                raise ConfigError(f"expected u{bits}, got {value!r}", field=f"IommuUnit.{name}")
        union = abi.IOMMU_AMD.pack(bdf, base_cap, msi_cap, features)
        return cls(type=IommuType.AMD, base=base, size=size, union=union)

    @classmethod
    def pvu(cls, *, base: int, size: int, tlb_base: int = 0, tlb_size: int = 0) -> IommuUnit:
        """Build a TI PVU unit from the fields of the PVU view of the union.

        :raise ConfigError: when a field does not fit its C type
        """
        for name, value, bits in (
            ("tipvu_tlb_base", tlb_base, 64), ("tipvu_tlb_size", tlb_size, 32),
        ):
            if not isinstance(value, int) or value < 0 or value >> bits:
                raise ConfigError(f"expected u{bits}, got {value!r}", field=f"IommuUnit.{name}")
        return cls(type=IommuType.PVU, base=base, size=size,
                   union=abi.IOMMU_PVU.pack(tlb_base, tlb_size))

    @property
    def amd_bdf(self) -> int:
        """AMD view: BDF of the IOMMU PCI function."""
        return int(abi.IOMMU_AMD.unpack(self.union)[0])

    @property
    def amd_base_cap(self) -> int:
        """AMD view: offset of the IOMMU base capability."""
        return int(abi.IOMMU_AMD.unpack(self.union)[1])

    @property
    def amd_msi_cap(self) -> int:
        """AMD view: offset of the IOMMU MSI capability."""
        return int(abi.IOMMU_AMD.unpack(self.union)[2])

    @property
    def amd_features(self) -> int:
        """AMD view: feature bits."""
        return int(abi.IOMMU_AMD.unpack(self.union)[3])

    @property
    def tipvu_tlb_base(self) -> int:
        """TI PVU view: TLB base."""
        return int(abi.IOMMU_PVU.unpack(self.union)[0])

    @property
    def tipvu_tlb_size(self) -> int:
        """TI PVU view: TLB size."""
        return int(abi.IOMMU_PVU.unpack(self.union)[1])

    @property
    def in_use(self) -> bool:
        """Whether this slot describes a unit (type != UNUSED)."""
        return self.type != IommuType.UNUSED

    def to_bytes(self) -> bytes:
        """The 28-byte ``struct jailhouse_iommu``."""
        return abi.IOMMU.pack(self.type, self.base, self.size, self.union)


@dataclass(frozen=True, kw_only=True, slots=True)
class X86Platform:
    """``platform_info.x86`` (the 44-byte arch union read as its x86 member).

    :param pm_timer_address: ACPI PM timer port
    :param apic_mode: :class:`ApicMode`
    :param vtd_interrupt_limit: number of VT-d interrupt remapping entries
    :param tsc_khz: TSC frequency (0 = the driver fills it in)
    :param apic_khz: APIC timer frequency (0 = the driver fills it in)
    :param padding: the byte at offset 315, kept for exactness
    :param remainder: the last 28 bytes of the union (used by the ARM member only)
    """

    pm_timer_address: int = 0
    apic_mode: int = ApicMode.AUTO
    vtd_interrupt_limit: int = 0
    tsc_khz: int = 0
    apic_khz: int = 0
    padding: int = 0
    remainder: bytes = bytes(28)

    _SPEC = (
        ("pm_timer_address", _U16), ("apic_mode", _U8), ("vtd_interrupt_limit", _U32),
        ("tsc_khz", _U32), ("apic_khz", _U32), ("padding", _U8),
    )

    def __post_init__(self) -> None:
        _check_bytes(self, "remainder", 28)
        _validate(self, self._SPEC)

    def to_bytes(self) -> bytes:
        """The 44 bytes of the arch union."""
        return abi.X86_PLATFORM.pack(
            self.pm_timer_address, self.apic_mode, self.padding, self.vtd_interrupt_limit,
            self.tsc_khz, self.apic_khz, self.remainder,
        )


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
        ("architecture", _U8), ("revision", _U16), ("id", _U32), ("flags", _U32),
        ("vpci_irq_base", _U32), ("cpu_reset_address", _U64), ("msg_reply_timeout", _U64),
    )

    def __post_init__(self) -> None:
        _check_bytes(self, "signature", 5)
        _check_uints(self, self._SPEC)
        encode_name(self.name, self.name_padding)
        if not isinstance(self.cpu_set, bytes) or not (
            0 < len(self.cpu_set) <= abi.MAX_CPU_SET_SIZE
        ):
            raise _fail(
                self, "cpu_set", f"expected 1..{abi.MAX_CPU_SET_SIZE} bytes of CPU bitmap"
            )
        _check_tuple(self, "memory_regions", MemoryRegion)
        _check_tuple(self, "cache_regions", CacheRegion)
        _check_tuple(self, "irqchips", Irqchip)
        _check_tuple(self, "pio_regions", PioRegion)
        _check_tuple(self, "pci_devices", PciDevice)
        _check_tuple(self, "pci_caps", PciCapability)
        _check_tuple(self, "stream_ids", int)
        for sid in self.stream_ids:
            if sid < 0 or sid >> 32:
                raise _fail(self, "stream_ids", f"expected u32 stream IDs, got {sid!r}")
        if not isinstance(self.console, Console):
            raise _fail(self, "console", f"expected a Console, got {self.console!r}")

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


def _unused_iommus() -> tuple[IommuUnit, ...]:
    return (IommuUnit(),) * abi.MAX_IOMMU_UNITS


def _root_cell_placeholder() -> CellConfig:
    return CellConfig(signature=bytes(5), architecture=0, revision=0, name="")


@dataclass(frozen=True, kw_only=True, slots=True)
class SystemConfig:
    """``struct jailhouse_system`` (488 bytes) plus the root cell's arrays.

    :param signature: 5 bytes, ``b"JHSYS"``
    :param architecture: :class:`Architecture`
    :param revision: :data:`CONFIG_REVISION`
    :param flags: :class:`SysFlags`
    :param hypervisor_memory: where the hypervisor lives (``phys_start``, ``size``)
    :param debug_console: the hypervisor's console
    :param pci_mmconfig_base: MMCONFIG base (0 = no interception)
    :param pci_mmconfig_end_bus: last bus covered by MMCONFIG
    :param pci_is_virtual: ARM vPCI
    :param pci_domain: PCI segment of the vPCI host bridge
    :param iommu_units: exactly 8 slots; unused ones have type UNUSED
    :param x86: the x86 member of the arch union (raw remainder for ARM)
    :param root_cell: the embedded root cell descriptor and its arrays
    """

    signature: bytes = abi.SYSTEM_SIGNATURE
    architecture: int = Architecture.X86
    revision: int = abi.CONFIG_REVISION
    flags: int = 0
    hypervisor_memory: MemoryRegion = field(default_factory=MemoryRegion)
    debug_console: Console = field(default_factory=Console)
    pci_mmconfig_base: int = 0
    pci_mmconfig_end_bus: int = 0
    pci_is_virtual: int = 0
    pci_domain: int = 0
    iommu_units: tuple[IommuUnit, ...] = field(default_factory=_unused_iommus)
    x86: X86Platform = field(default_factory=X86Platform)
    root_cell: CellConfig = field(default_factory=_root_cell_placeholder)

    _SPEC = (
        ("architecture", _U8), ("revision", _U16), ("flags", _U32),
        ("pci_mmconfig_base", _U64), ("pci_mmconfig_end_bus", _U8), ("pci_is_virtual", _U8),
        ("pci_domain", _U16),
    )

    def __post_init__(self) -> None:
        _check_bytes(self, "signature", 5)
        _check_uints(self, self._SPEC)
        _check_tuple(self, "iommu_units", IommuUnit, abi.MAX_IOMMU_UNITS)
        for name, kind in (
            ("hypervisor_memory", MemoryRegion), ("debug_console", Console),
            ("x86", X86Platform), ("root_cell", CellConfig),
        ):
            if not isinstance(getattr(self, name), kind):
                raise _fail(self, name, f"expected a {kind.__name__}")

    @property
    def name(self) -> str:
        """The root cell's name."""
        return self.root_cell.name

    @property
    def sys_flags(self) -> SysFlags:
        """:attr:`flags` as :class:`SysFlags`."""
        return SysFlags(self.flags)

    @property
    def active_iommu_units(self) -> tuple[IommuUnit, ...]:
        """The IOMMU slots in use (type != UNUSED), in slot order."""
        return tuple(unit for unit in self.iommu_units if unit.in_use)

    @property
    def mmconfig_size(self) -> int:
        """Bytes of MMCONFIG space: ``(end_bus + 1) * 256 * 4096``."""
        return (self.pci_mmconfig_end_bus + 1) * 256 * 4096

    @property
    def size(self) -> int:
        """Size of the binary config: 356 bytes of header plus the root cell config."""
        return abi.ROOT_CELL_OFFSET + self.root_cell.size

    def header_bytes(self) -> bytes:
        """The 356 bytes of ``struct jailhouse_system`` before the root cell descriptor."""
        parts = [
            abi.SYSTEM_HEAD.pack(self.signature, self.architecture, self.revision, self.flags),
            self.hypervisor_memory.to_bytes(),
            self.debug_console.to_bytes(),
            abi.PLATFORM_PCI.pack(
                self.pci_mmconfig_base, self.pci_mmconfig_end_bus, self.pci_is_virtual,
                self.pci_domain,
            ),
        ]
        parts.extend(unit.to_bytes() for unit in self.iommu_units)
        parts.append(self.x86.to_bytes())
        return b"".join(parts)

    def to_bytes(self) -> bytes:
        """The binary system config."""
        return self.header_bytes() + self.root_cell.to_bytes()
