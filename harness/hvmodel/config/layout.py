"""Byte layout of ``include/jailhouse/cell-config.h`` (revision 14, and revision 12 of v0.12).

Every Jailhouse config struct is ``__attribute__((packed))`` and little-endian on x86, so
each one maps to one :class:`struct.Struct` with the ``<`` prefix (no padding, standard
sizes). The offsets and sizes below are the ones the reference measured with gcc
(``offsetof``/``sizeof``); :mod:`harness.hvmodel.config.parser` and the ``to_bytes``
methods of the model share these definitions so reading and writing cannot drift apart.

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

import struct
from typing import Final

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
PAGE_SIZE: Final = 0x1000

# --- revision 14 -------------------------------------------------------------------------

#: ``struct jailhouse_console``: address, size, type, flags, divider, gate_nr, clock_reg.
CONSOLE: Final = struct.Struct("<QIHHIIQ")
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
#: ``platform_info`` PCI fields: pci_mmconfig_base, end_bus, is_virtual, domain.
PLATFORM_PCI: Final = struct.Struct("<QBBH")

CELL_DESC_SIZE: Final = 132
SYSTEM_SIZE: Final = 488
#: Offset of the embedded root cell descriptor in ``struct jailhouse_system``.
ROOT_CELL_OFFSET: Final = 356

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
