"""The system config: ``struct jailhouse_system`` of ``include/jailhouse/cell-config.h``
with its platform information (the IOMMU units, the x86 member of the arch union) and
the embedded root cell (a :class:`~.model.CellConfig`).

Like :mod:`.model`: frozen, keyword-only dataclasses validated in ``__post_init__``,
byte-exact ``to_bytes``; the layout is :mod:`harness.hvmodel.abi`'s. Bytes without a
field are kept raw for exactness: the IOMMU union (:attr:`IommuUnit.union`), the x86
platform padding and the 28 bytes of the arch union that only ARM uses
(:attr:`X86Platform.padding`, :attr:`X86Platform.remainder`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import abi
from ..abi import ApicMode, Architecture, IommuType, SysFlags
from ..errors import ConfigError
from .fields import U8, U16, U32, U64, check_bytes, check_tuple, check_uints, fail, validate
from .model import CellConfig, Console, MemoryRegion

__all__ = ["IommuUnit", "SystemConfig", "X86Platform"]


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

    _SPEC = (("type", U32), ("base", U64), ("size", U32))

    def __post_init__(self) -> None:
        check_bytes(self, "union", 12)
        validate(self, self._SPEC)

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
        ("pm_timer_address", U16), ("apic_mode", U8), ("vtd_interrupt_limit", U32),
        ("tsc_khz", U32), ("apic_khz", U32), ("padding", U8),
    )

    def __post_init__(self) -> None:
        check_bytes(self, "remainder", 28)
        validate(self, self._SPEC)

    def to_bytes(self) -> bytes:
        """The 44 bytes of the arch union."""
        return abi.X86_PLATFORM.pack(
            self.pm_timer_address, self.apic_mode, self.padding, self.vtd_interrupt_limit,
            self.tsc_khz, self.apic_khz, self.remainder,
        )


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
        ("architecture", U8), ("revision", U16), ("flags", U32),
        ("pci_mmconfig_base", U64), ("pci_mmconfig_end_bus", U8), ("pci_is_virtual", U8),
        ("pci_domain", U16),
    )

    def __post_init__(self) -> None:
        check_bytes(self, "signature", 5)
        check_uints(self, self._SPEC)
        check_tuple(self, "iommu_units", IommuUnit, abi.MAX_IOMMU_UNITS)
        for name, kind in (
            ("hypervisor_memory", MemoryRegion), ("debug_console", Console),
            ("x86", X86Platform), ("root_cell", CellConfig),
        ):
            if not isinstance(getattr(self, name), kind):
                raise fail(self, name, f"expected a {kind.__name__}")

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
