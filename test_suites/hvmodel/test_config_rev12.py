"""Revision 12 (Jailhouse v0.12) configs are read and converted to revision 14.

The v0.12 vectors are packed here from v0.12's layout (``JHCELL``/``JHSYST`` 6-byte
signatures, no architecture byte, the x86 platform fields then 24-byte IOMMU units inside
the arch union, root cell descriptor at 322; memory flag 0x0100 = IO_UNALIGNED), never
with jhlab's writer.
"""

from __future__ import annotations

import struct

import pytest
from test_config_vectors import (
    COMM_REGION,
    DEMO_PIO,
    R,
    W,
    apic_demo,
    cache,
    cell_desc,
    console,
    demo_ram,
    mem,
    qemu_x86,
)

from harness.hvmodel.config import (
    CellConfig,
    IommuType,
    MemFlags,
    SystemConfig,
    convert_revision12,
    parse,
    parse_cell,
    parse_system,
)
from harness.hvmodel.errors import ConfigError

IO_UNALIGNED_12 = 0x0100
IO_32 = 0x40000


def v012_desc(name: bytes, flags: int, counts: tuple[int, ...], con: bytes) -> bytes:
    """A v0.12 cell descriptor: 6-byte signature, revision 12, then the common layout."""
    rest = cell_desc(signature=bytes(5), arch=0, revision=0, name=name, flags=flags,
                     cpu_set_size=8, counts=counts, con=con)[8:]  # type: ignore[arg-type]
    return b"JHCELL" + struct.pack("<H", 12) + rest


def v012_apic_demo() -> bytes:
    """apic-demo as v0.12 compiled it (same content, older header)."""
    desc = v012_desc(b"apic-demo", 0x40000000, (2, 1, 0, 3, 0, 0, 0), console(2, 0x3F8))
    body = [struct.pack("<Q", 0x8), demo_ram(0x3EF00000), COMM_REGION, cache(0, 2), *DEMO_PIO]
    return desc + b"".join(body)


def v012_system(*, iommu_type: int = 1, extra_root_regions: tuple[bytes, ...] = ()) -> bytes:
    """A v0.12 system config: AMD IOMMU unit 0, one sub-page IO_UNALIGNED root region."""
    head = b"JHSYST" + struct.pack("<HI", 12, 1)
    head += mem(0x3A000000, 0, 0x600000, 0) + console(2, 0x3F8)
    head += struct.pack("<QBBH", 0xB0000000, 0xFF, 0, 0)
    head += struct.pack("<HIB3sII", 0x608, 256, 2, b"\0\0\0", 2000000, 100000)
    head += struct.pack("<IQIHBBI", iommu_type, 0xFEB80000, 0x80000, 0x0002, 0x40, 0x54, 0xF0)
    head += bytes(24) * 7
    head += bytes(24)  # the ARM member's extra bytes at the end of the union
    assert len(head) == 322
    regions = (
        mem(0, 0, 0x3A000000, R | W | 0x4 | 0x8),
        mem(0xFED00000, 0xFED00000, 0x400, R | W | IO_UNALIGNED_12 | IO_32),
        *extra_root_regions,
    )
    desc = v012_desc(b"RootCell", 0, (len(regions), 0, 0, 0, 0, 0, 0), console())
    return head + desc + struct.pack("<Q", 0xF) + b"".join(regions)


def test_cell_converts_to_revision_14() -> None:
    """A v0.12 apic-demo becomes exactly the revision-14 apic-demo."""
    cell = parse_cell(v012_apic_demo(), "old.cell")
    assert isinstance(cell, CellConfig)
    assert (cell.signature, cell.revision, cell.architecture) == (b"JHCLL", 14, 0)
    assert cell.to_bytes() == apic_demo()
    assert convert_revision12(v012_apic_demo()) == apic_demo()
    assert parse(v012_apic_demo()) == parse(apic_demo())


def test_system_converts_to_revision_14() -> None:
    """Header, platform fields, IOMMU union and the moved IO_UNALIGNED flag are converted."""
    system = parse_system(v012_system(), "old-sys.cell")
    assert isinstance(system, SystemConfig)
    assert (system.signature, system.revision, system.flags) == (b"JHSYS", 14, 1)
    assert system.hypervisor_memory.size == 0x600000 and system.debug_console.address == 0x3F8
    assert system.pci_mmconfig_base == 0xB0000000 and system.pci_mmconfig_end_bus == 0xFF
    x86 = system.x86
    assert (x86.pm_timer_address, x86.vtd_interrupt_limit, x86.apic_mode, x86.tsc_khz,
            x86.apic_khz) == (0x608, 256, 2, 2000000, 100000)
    (unit,) = system.active_iommu_units
    assert unit.type == IommuType.AMD and (unit.base, unit.size) == (0xFEB80000, 0x80000)
    assert (unit.amd_bdf, unit.amd_base_cap, unit.amd_msi_cap, unit.amd_features) == (
        0x0002, 0x40, 0x54, 0xF0)
    root = system.root_cell
    assert root.name == "RootCell" and root.cpus == {0, 1, 2, 3}
    subpage = root.memory_regions[1]
    assert subpage.flags == MemFlags.READ | MemFlags.WRITE | MemFlags.IO_UNALIGNED | MemFlags.IO_32
    data = convert_revision12(v012_system())
    assert data[:5] == b"JHSYS" and len(data) == 356 + 132 + 8 + 64
    assert parse_system(data) == system


def test_revision12_errors() -> None:
    """v0.12 signatures with another revision, unknown IOMMU types and truncation."""
    with pytest.raises(ConfigError) as info:
        parse_cell(b"JHCELL" + struct.pack("<H", 14) + v012_apic_demo()[8:], "a")
    assert (info.value.offset, info.value.field) == (6, "revision")
    with pytest.raises(ConfigError) as info:
        parse_system(v012_system(iommu_type=4), "s")
    assert info.value.field == "platform_info.x86.iommu_units[0].type"
    with pytest.raises(ConfigError) as info:
        parse_system(v012_system()[:290], "s")
    assert info.value.field == "platform_info.x86.iommu_units[7]"
    with pytest.raises(ConfigError) as info:
        parse_system(v012_system() + b"\0", "s")
    assert info.value.offset == len(v012_system())
    with pytest.raises(ConfigError) as info:
        convert_revision12(qemu_x86(), "new")
    assert info.value.field == "signature"
