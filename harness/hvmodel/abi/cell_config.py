"""The configuration format; models ``include/jailhouse/cell-config.h`` (revision 14, and
revision 12 of v0.12): its constants, flags, type codes and byte layout.

Every Jailhouse config struct is ``__attribute__((packed))`` and little-endian on x86, so
each one maps to one :class:`struct.Struct` with the ``<`` prefix (no padding, standard
sizes). The offsets and sizes below are the ones the reference measured with gcc
(``offsetof``/``sizeof``); :mod:`harness.hvmodel.config.parser`, the ``to_bytes``
methods of the config objects, the driver and the control plane share these definitions,
so reading and writing cannot drift apart. Flags are :class:`enum.IntFlag`, type codes
:class:`enum.IntEnum`, with Jailhouse's exact values; the flags the control plane tests on
its hot paths are also given as plain integers (``MEM_WRITE``, ``CELL_PASSIVE_COMMREG``...),
derived from the enums.

Revision 12 (Jailhouse v0.12, tag ``v0.12``) is described here too, for the converter:

* the cell descriptor has ``char signature[6]`` = ``"JHCELL"`` and no architecture byte;
  from offset 8 on (name, id, flags, counts, console) it is identical to revision 14, so
  it is 132 bytes as well;
* the system header has ``char signature[6]`` = ``"JHSYST"``; ``flags``,
  ``hypervisor_memory``, ``debug_console`` and the PCI fields of ``platform_info`` sit at
  the revision-14 offsets, but the architecture union starts at 88 and holds, for x86,
  ``pm_timer_address`` (u16), ``vtd_interrupt_limit`` (u32), ``apic_mode`` (u8), three
  padding bytes, ``tsc_khz``, ``apic_khz`` and then ``iommu_units[8]``; a revision-12
  IOMMU unit is 24 bytes (type, base, size, amd_bdf, amd_base_cap, amd_msi_cap,
  amd_features: no PVU member yet). The union is 234 bytes because its ARM member (two
  u8, five u64 GIC bases, then the IOMMU units) is the larger one, so the root cell
  descriptor starts at 322 and the fixed part is 454 bytes;
* memory flag ``0x0100`` meant ``IO_UNALIGNED`` (revision 14 moved it to ``0x8000`` and
  gave ``0x0100`` to ``NO_HUGEPAGES``).
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from .console import CONSOLE

__all__ = [
    "CACHE",
    "CELL_DESC",
    "CELL_DESC_FIELDS",
    "CELL_DESC_SIZE",
    "CELL_NAME_MAXLEN",
    "CELL_OFF_CPU_RESET_ADDRESS",
    "CELL_OFF_CPU_SET_SIZE",
    "CELL_OFF_FLAGS",
    "CELL_OFF_ID",
    "CELL_OFF_NAME",
    "CELL_PASSIVE_COMMREG",
    "CELL_SIGNATURE",
    "CELL_SIGNATURE_12",
    "CELL_TEST_DEVICE",
    "CELL_VIRTUAL_CONSOLE_ACTIVE",
    "CELL_VIRTUAL_CONSOLE_PERMITTED",
    "CONFIG_HEAD",
    "CONFIG_REVISION",
    "ELEMENT_SIZES",
    "IOMMU",
    "IOMMU_12",
    "IOMMU_AMD",
    "IOMMU_PVU",
    "IRQCHIP",
    "IVSHMEM_BAR_MASKS",
    "MAX_CPU_SET_SIZE",
    "MAX_IOMMU_UNITS",
    "MEMORY",
    "MEM_COMM_REGION",
    "MEM_DMA",
    "MEM_IO",
    "MEM_IO_UNALIGNED",
    "MEM_IO_UNALIGNED_12",
    "MEM_IO_WIDTHS",
    "MEM_IO_WIDTH_SHIFT",
    "MEM_LOADABLE",
    "MEM_NO_HUGEPAGES",
    "MEM_READ",
    "MEM_ROOTSHARED",
    "MEM_WRITE",
    "NAME_FIELD_SIZE",
    "PCI_CAP",
    "PCI_DEVICE",
    "PCI_EXT_CAP",
    "PCI_TYPE_BRIDGE",
    "PCI_TYPE_DEVICE",
    "PCI_TYPE_IVSHMEM",
    "PIO",
    "PLATFORM_PCI",
    "REVISION_12",
    "ROOT_CELL_OFFSET",
    "ROOT_CELL_OFFSET_12",
    "STREAM_ID",
    "SYS12_ARCH_UNION_SIZE",
    "SYS12_OFF_ARCH",
    "SYS12_OFF_IOMMU",
    "SYSTEM_FIELDS",
    "SYSTEM_FIELDS_12",
    "SYSTEM_HEAD",
    "SYSTEM_SIGNATURE",
    "SYSTEM_SIGNATURE_12",
    "SYSTEM_SIZE",
    "SYSTEM_SIZE_12",
    "SYS_OFF_DEBUG_CONSOLE",
    "SYS_OFF_FLAGS",
    "SYS_OFF_HV_MEMORY",
    "SYS_OFF_IOMMU",
    "SYS_OFF_PLATFORM",
    "SYS_OFF_X86",
    "X86_PLATFORM",
    "X86_PLATFORM_12",
    "ApicMode",
    "Architecture",
    "CacheFlags",
    "CacheType",
    "CellFlags",
    "IommuType",
    "MemFlags",
    "PciCapFlags",
    "PciDeviceType",
    "ShmemProtocol",
    "SysFlags",
    "VirtioDevice",
    "config_size",
]

#: ``JAILHOUSE_CONFIG_REVISION`` of Jailhouse master/next.
CONFIG_REVISION: Final = 14
#: The revision of Jailhouse v0.12 (still the default of jailhouse-images).
REVISION_12: Final = 12

SYSTEM_SIGNATURE: Final = b"JHSYS"
CELL_SIGNATURE: Final = b"JHCLL"
SYSTEM_SIGNATURE_12: Final = b"JHSYST"
CELL_SIGNATURE_12: Final = b"JHCELL"

#: ``JAILHOUSE_CELL_NAME_MAXLEN`` (the name field is one byte longer, for the NUL).
CELL_NAME_MAXLEN: Final = 31
NAME_FIELD_SIZE: Final = 32
#: ``JAILHOUSE_MAX_IOMMU_UNITS``.
MAX_IOMMU_UNITS: Final = 8
#: The hypervisor refuses CPU sets larger than one page (``cell_init``: -EINVAL).
MAX_CPU_SET_SIZE: Final = 4096


# --- flags and type codes ------------------------------------------------------------------


class Architecture(enum.IntEnum):
    """``JAILHOUSE_X86``/``ARM``/``ARM64``: the architecture byte."""

    X86 = 0
    ARM = 1
    ARM64 = 2

    @property
    def label(self) -> str:
        """The name pyjailhouse and ``jailhouse config check`` print (``x86``...)."""
        return self.name.lower()


class MemFlags(enum.IntFlag):
    """``JAILHOUSE_MEM_*``: flags of a memory region."""

    READ = 0x0001
    WRITE = 0x0002
    EXECUTE = 0x0004
    DMA = 0x0008
    IO = 0x0010
    COMM_REGION = 0x0020
    LOADABLE = 0x0040
    ROOTSHARED = 0x0080
    NO_HUGEPAGES = 0x0100
    IO_UNALIGNED = 0x8000
    IO_8 = 0x10000
    IO_16 = 0x20000
    IO_32 = 0x40000
    IO_64 = 0x80000


# The memory flags as plain integers: ``int & IntFlag`` builds an enum member per test.
MEM_READ: Final = int(MemFlags.READ)
MEM_WRITE: Final = int(MemFlags.WRITE)
MEM_DMA: Final = int(MemFlags.DMA)
MEM_IO: Final = int(MemFlags.IO)
MEM_COMM_REGION: Final = int(MemFlags.COMM_REGION)
MEM_LOADABLE: Final = int(MemFlags.LOADABLE)
MEM_ROOTSHARED: Final = int(MemFlags.ROOTSHARED)
MEM_NO_HUGEPAGES: Final = int(MemFlags.NO_HUGEPAGES)
MEM_IO_UNALIGNED: Final = int(MemFlags.IO_UNALIGNED)
#: ``JAILHOUSE_MEM_IO_WIDTH_SHIFT``: IO_8/16/32/64 = access size << 16
MEM_IO_WIDTH_SHIFT: Final = 16
#: The access-width flags of sub-page regions (bits 16..19 = width << 16).
MEM_IO_WIDTHS: Final = MemFlags.IO_8 | MemFlags.IO_16 | MemFlags.IO_32 | MemFlags.IO_64


class CellFlags(enum.IntFlag):
    """``JAILHOUSE_CELL_*``: flags of a cell descriptor."""

    PASSIVE_COMMREG = 0x00000001
    TEST_DEVICE = 0x00000002
    AARCH32 = 0x00000004
    VIRTUAL_CONSOLE_PERMITTED = 0x40000000
    VIRTUAL_CONSOLE_ACTIVE = 0x80000000


# The cell flags the control plane tests, as plain integers.
CELL_PASSIVE_COMMREG: Final = int(CellFlags.PASSIVE_COMMREG)
CELL_TEST_DEVICE: Final = int(CellFlags.TEST_DEVICE)
CELL_VIRTUAL_CONSOLE_PERMITTED: Final = int(CellFlags.VIRTUAL_CONSOLE_PERMITTED)
CELL_VIRTUAL_CONSOLE_ACTIVE: Final = int(CellFlags.VIRTUAL_CONSOLE_ACTIVE)


class SysFlags(enum.IntFlag):
    """``JAILHOUSE_SYS_*``: flags of the system config."""

    VIRTUAL_DEBUG_CONSOLE = 0x0001


class PciCapFlags(enum.IntFlag):
    """``JAILHOUSE_PCICAPS_*``: flags of a PCI capability entry."""

    WRITE = 0x0001


class CacheFlags(enum.IntFlag):
    """``JAILHOUSE_CACHE_*`` flags of a cache region."""

    ROOTSHARED = 0x0001


class PciDeviceType(enum.IntEnum):
    """``JAILHOUSE_PCI_TYPE_*``."""

    DEVICE = 1
    BRIDGE = 2
    IVSHMEM = 3


# The PCI device types as plain integers.
PCI_TYPE_DEVICE: Final = int(PciDeviceType.DEVICE)
PCI_TYPE_BRIDGE: Final = int(PciDeviceType.BRIDGE)
PCI_TYPE_IVSHMEM: Final = int(PciDeviceType.IVSHMEM)


class IommuType(enum.IntEnum):
    """``JAILHOUSE_IOMMU_*`` (``PVU`` is pyjailhouse's ``TIPVU``)."""

    UNUSED = 0
    AMD = 1
    INTEL = 2
    SMMUV3 = 3
    PVU = 4
    ARM_MMU500 = 5


class CacheType(enum.IntEnum):
    """``JAILHOUSE_CACHE_*`` types (Intel CAT)."""

    L3_CODE = 0x01
    L3_DATA = 0x02
    L3 = 0x03


class ApicMode(enum.IntEnum):
    """``JAILHOUSE_APIC_MODE_*`` of ``platform_info.x86.apic_mode``."""

    AUTO = 0
    XAPIC = 1
    X2APIC = 2


#: ``JAILHOUSE_PCI_EXT_CAP``: marks an extended capability ID.
PCI_EXT_CAP: Final = 0x8000


class ShmemProtocol(enum.IntEnum):
    """``JAILHOUSE_SHMEM_PROTO_*`` bases; virtio ones add a :class:`VirtioDevice` number."""

    UNDEFINED = 0x0000
    VETH = 0x0001
    CUSTOM = 0x4000
    VIRTIO_FRONT = 0x8000
    VIRTIO_BACK = 0xC000


class VirtioDevice(enum.IntEnum):
    """``VIRTIO_DEV_*`` numbers added to the virtio protocol bases."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3


#: Jailhouse's ivshmem BAR-mask macros (``JAILHOUSE_IVSHMEM_BAR_MASK_*``), BAR0..BAR5.
IVSHMEM_BAR_MASKS: Final[dict[str, tuple[int, int, int, int, int, int]]] = {
    "IVSHMEM_INTX": (0xFFFFF000, 0, 0, 0, 0, 0),
    "IVSHMEM_MSIX": (0xFFFFF000, 0xFFFFF000, 0, 0, 0, 0),
    "IVSHMEM_INTX_64K": (0xFFFF0000, 0, 0, 0, 0, 0),
    "IVSHMEM_MSIX_64K": (0xFFFF0000, 0xFFFF0000, 0, 0, 0, 0),
}

# --- revision 14 -------------------------------------------------------------------------

#: ``struct jailhouse_cell_desc``: signature, architecture, revision, name, id, flags,
#: cpu_set_size, 7 counts, vpci_irq_base, cpu_reset_address, msg_reply_timeout, console.
CELL_DESC: Final = struct.Struct("<5sBH32s11IQQ" + CONSOLE.format[1:])
#: ``struct jailhouse_memory``: phys_start, virt_start, size, flags.
MEMORY: Final = struct.Struct("<QQQQ")
#: ``struct jailhouse_cache``: start, size, type, padding, flags.
CACHE: Final = struct.Struct("<IIBBH")
#: ``struct jailhouse_irqchip``: address, id, pin_base, pin_bitmap[4].
IRQCHIP: Final = struct.Struct("<QII4I")
#: ``struct jailhouse_pio``: base, length.
PIO: Final = struct.Struct("<HH")
#: ``struct jailhouse_pci_device``: type, iommu, domain, bdf, bar_mask[6], caps_start,
#: num_caps, num_msi_vectors, msi bit field byte, num_msix_vectors, msix_region_size,
#: msix_address, shmem_regions_start, shmem_dev_id, shmem_peers, shmem_protocol.
PCI_DEVICE: Final = struct.Struct("<BBHH6IHHBBHHQIBBH")
#: ``struct jailhouse_pci_capability``: id, start, len, flags.
PCI_CAP: Final = struct.Struct("<HHHH")
#: ``union jailhouse_stream_id`` read as its u32 member.
STREAM_ID: Final = struct.Struct("<I")
#: ``struct jailhouse_iommu``: type, base, size, then the 12-byte AMD/PVU union (raw).
IOMMU: Final = struct.Struct("<IQI12s")
#: The AMD view of the IOMMU union: bdf, base_cap, msi_cap, features (+4 unused bytes).
IOMMU_AMD: Final = struct.Struct("<HBBI4x")
#: The TI PVU view of the IOMMU union: tlb_base, tlb_size.
IOMMU_PVU: Final = struct.Struct("<QI")
#: ``platform_info.x86``: pm_timer_address, apic_mode, padding, vtd_interrupt_limit,
#: tsc_khz, apic_khz, then the 28 bytes only the ARM member uses.
X86_PLATFORM: Final = struct.Struct("<HBBIII28s")
#: Start of ``struct jailhouse_system``: signature, architecture, revision, flags.
SYSTEM_HEAD: Final = struct.Struct("<5sBHI")
#: Start of both descriptors (system and cell): signature, architecture, revision.
CONFIG_HEAD: Final = struct.Struct("<5sBH")
#: ``platform_info`` PCI fields: pci_mmconfig_base, end_bus, is_virtual, domain.
PLATFORM_PCI: Final = struct.Struct("<QBBH")

CELL_DESC_SIZE: Final = 132
SYSTEM_SIZE: Final = 488
#: Offset of the embedded root cell descriptor in ``struct jailhouse_system``.
ROOT_CELL_OFFSET: Final = 356

# Offsets inside struct jailhouse_cell_desc (revision 14) the driver reads and patches.
CELL_OFF_NAME: Final = 8
CELL_OFF_ID: Final = 40
CELL_OFF_FLAGS: Final = 44
CELL_OFF_CPU_SET_SIZE: Final = 48
CELL_OFF_CPU_RESET_ADDRESS: Final = 84

# Offsets inside struct jailhouse_system (revision 14).
SYS_OFF_FLAGS: Final = 8
SYS_OFF_HV_MEMORY: Final = 12
SYS_OFF_DEBUG_CONSOLE: Final = 44
SYS_OFF_PLATFORM: Final = 76
SYS_OFF_IOMMU: Final = 88
SYS_OFF_X86: Final = 312

#: Element sizes of the variable part, in file order.
ELEMENT_SIZES: Final = {
    "memory_regions": MEMORY.size,
    "cache_regions": CACHE.size,
    "irqchips": IRQCHIP.size,
    "pio_regions": PIO.size,
    "pci_devices": PCI_DEVICE.size,
    "pci_caps": PCI_CAP.size,
    "stream_ids": STREAM_ID.size,
}


_ELEMENT_SIZES_IN_ORDER: Final = tuple(ELEMENT_SIZES.values())


def config_size(desc: bytes | bytearray | memoryview) -> int:
    """Total size of a cell config from its 132-byte descriptor: the descriptor, the CPU
    set and the arrays (``jailhouse_cell_config_size``).

    :raise struct.error: when ``desc`` is shorter than a descriptor
    """
    fields = CELL_DESC.unpack_from(desc)
    cpu_set_size: int = fields[6]
    counts: tuple[int, ...] = fields[7:14]
    arrays = sum(n * size for n, size in zip(counts, _ELEMENT_SIZES_IN_ORDER, strict=True))
    return CELL_DESC_SIZE + cpu_set_size + arrays


#: (offset, size, field) of every field of the cell descriptor, for error messages.
CELL_DESC_FIELDS: Final = (
    (0, 5, "signature"),
    (5, 1, "architecture"),
    (6, 2, "revision"),
    (8, 32, "name"),
    (40, 4, "id"),
    (44, 4, "flags"),
    (48, 4, "cpu_set_size"),
    (52, 4, "num_memory_regions"),
    (56, 4, "num_cache_regions"),
    (60, 4, "num_irqchips"),
    (64, 4, "num_pio_regions"),
    (68, 4, "num_pci_devices"),
    (72, 4, "num_pci_caps"),
    (76, 4, "num_stream_ids"),
    (80, 4, "vpci_irq_base"),
    (84, 8, "cpu_reset_address"),
    (92, 8, "msg_reply_timeout"),
    (100, 32, "console"),
)

#: (offset, size, field) of the fixed part of struct jailhouse_system before the root cell.
SYSTEM_FIELDS: Final = (
    (0, 5, "signature"),
    (5, 1, "architecture"),
    (6, 2, "revision"),
    (8, 4, "flags"),
    (12, 32, "hypervisor_memory"),
    (44, 32, "debug_console"),
    (76, 8, "platform_info.pci_mmconfig_base"),
    (84, 1, "platform_info.pci_mmconfig_end_bus"),
    (85, 1, "platform_info.pci_is_virtual"),
    (86, 2, "platform_info.pci_domain"),
    *((88 + 28 * i, 28, f"platform_info.iommu_units[{i}]") for i in range(8)),
    (312, 44, "platform_info.x86"),
)

# --- revision 12 (Jailhouse v0.12) ---------------------------------------------------------

#: Revision-12 IOMMU unit: type, base, size, amd_bdf, amd_base_cap, amd_msi_cap, features.
IOMMU_12: Final = struct.Struct("<IQIHBBI")
#: Revision-12 x86 member of the union: pm_timer_address, vtd_interrupt_limit, apic_mode,
#: padding[3], tsc_khz, apic_khz (the IOMMU units follow).
X86_PLATFORM_12: Final = struct.Struct("<HIB3sII")
SYS12_OFF_ARCH: Final = 88
SYS12_OFF_IOMMU: Final = SYS12_OFF_ARCH + X86_PLATFORM_12.size
#: The union is as large as its ARM member: 2 + 5*8 + 8*24 bytes.
SYS12_ARCH_UNION_SIZE: Final = 2 + 5 * 8 + MAX_IOMMU_UNITS * IOMMU_12.size
ROOT_CELL_OFFSET_12: Final = SYS12_OFF_ARCH + SYS12_ARCH_UNION_SIZE
SYSTEM_SIZE_12: Final = ROOT_CELL_OFFSET_12 + CELL_DESC_SIZE
#: Revision-12 memory flag that revision 14 renumbered to 0x8000.
MEM_IO_UNALIGNED_12: Final = 0x0100

SYSTEM_FIELDS_12: Final = (
    (0, 6, "signature"),
    (6, 2, "revision"),
    (8, 4, "flags"),
    (12, 32, "hypervisor_memory"),
    (44, 32, "debug_console"),
    (76, 8, "platform_info.pci_mmconfig_base"),
    (84, 1, "platform_info.pci_mmconfig_end_bus"),
    (85, 1, "platform_info.pci_is_virtual"),
    (86, 2, "platform_info.pci_domain"),
    (88, X86_PLATFORM_12.size, "platform_info.x86"),
    *(
        (SYS12_OFF_IOMMU + IOMMU_12.size * i, IOMMU_12.size, f"platform_info.x86.iommu_units[{i}]")
        for i in range(8)
    ),
    (SYS12_OFF_IOMMU + 8 * IOMMU_12.size, ROOT_CELL_OFFSET_12 - SYS12_OFF_IOMMU - 8 * IOMMU_12.size,
     "platform_info (rest of the arch union)"),
)

if CELL_DESC.size != CELL_DESC_SIZE:  # pragma: no cover - guards the format strings
    raise ImportError(f"cell desc layout is {CELL_DESC.size} bytes, expected {CELL_DESC_SIZE}")
if ROOT_CELL_OFFSET + CELL_DESC_SIZE != SYSTEM_SIZE:  # pragma: no cover
    raise ImportError("system layout does not add up")
