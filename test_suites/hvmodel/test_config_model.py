"""Config objects: constants, enums, derived properties, and the text/JSON renderings."""

from __future__ import annotations

import json

import pytest
from test_config_vectors import CONFIGS_DIR, VECTORS

from harness.hvmodel.config import (
    CELL_DESC_SIZE,
    CONFIG_REVISION,
    SYSTEM_SIZE,
    Architecture,
    CacheFlags,
    CellConfig,
    CellFlags,
    IommuType,
    IommuUnit,
    Irqchip,
    MemFlags,
    MemoryRegion,
    PciCapFlags,
    PciDevice,
    PciDeviceType,
    PioRegion,
    SysFlags,
    SystemConfig,
    cpu_set_from,
    format_bdf,
    load_source,
    parse,
    render_text,
    to_dict,
)
from harness.hvmodel.config.model import shmem_protocol_name, shmem_protocol_value


def test_constants_and_enum_values() -> None:
    """Numbers from the reference §1.1-§1.12."""
    assert (CONFIG_REVISION, CELL_DESC_SIZE, SYSTEM_SIZE) == (14, 132, 488)
    assert (Architecture.X86, Architecture.ARM, Architecture.ARM64) == (0, 1, 2)
    assert (MemFlags.COMM_REGION, MemFlags.ROOTSHARED, MemFlags.NO_HUGEPAGES,
            MemFlags.IO_UNALIGNED, MemFlags.IO_64) == (0x20, 0x80, 0x100, 0x8000, 0x80000)
    assert CellFlags.VIRTUAL_CONSOLE_ACTIVE == 0x80000000 and CellFlags.AARCH32 == 4
    assert SysFlags.VIRTUAL_DEBUG_CONSOLE == 1 and PciCapFlags.WRITE == 1
    assert CacheFlags.ROOTSHARED == 1 and PciDeviceType.IVSHMEM == 3
    assert IommuType.PVU == 4 and IommuType.ARM_MMU500 == 5


def test_memory_region_properties() -> None:
    """Ends are exclusive, zero-size regions never overlap, sub-page detection."""
    a = MemoryRegion(phys_start=0x1000, virt_start=0x5000, size=0x2000, flags=3)
    b = MemoryRegion(phys_start=0x2FFF, virt_start=0x7000, size=1)
    assert (a.phys_end, a.virt_end) == (0x3000, 0x7000)
    assert a.phys_overlaps(b) and b.phys_overlaps(a) and not a.virt_overlaps(b)
    assert not a.phys_overlaps(MemoryRegion(phys_start=0x1000, size=0))
    assert b.is_subpage and not a.is_subpage
    assert a.mem_flags == MemFlags.READ | MemFlags.WRITE
    assert MemoryRegion(flags=0xF).is_ram and not MemoryRegion(flags=0x8F).is_ram


def test_pio_irqchip_pci_properties() -> None:
    """Port overlaps, IOAPIC pins, BDF fields."""
    assert PioRegion(base=0x3F8, length=8).overlaps(PioRegion(base=0x3FF, length=1))
    assert not PioRegion(base=0x3F8, length=8).overlaps(PioRegion(base=0x400, length=1))
    assert not PioRegion(base=0x3F8, length=0).overlaps(PioRegion(base=0x3F8, length=8))
    assert Irqchip(pin_bitmap=(0x18, 0, 1, 0x80000000)).pins == {3, 4, 64, 127}
    assert Irqchip(pin_base=32, pin_bitmap=(1, 0, 0, 0)).pins == {32}
    device = PciDevice(bdf=0x01D9)
    assert (device.bus, device.dev, device.fn, device.bdf_str) == (1, 0x1B, 1, "01:1b.1")
    assert format_bdf(0xFFFF) == "ff:1f.7"


def test_iommu_union_views() -> None:
    """AMD and PVU views of the union are packed at the reference offsets."""
    amd = IommuUnit.amd(base=0xFEB80000, size=0x80000, bdf=0x0002, base_cap=0x40,
                        msi_cap=0x54, features=0x80048F6E)
    assert amd.union == bytes.fromhex("0200") + bytes([0x40, 0x54]) + \
        (0x80048F6E).to_bytes(4, "little") + bytes(4)
    assert (amd.amd_bdf, amd.amd_features, amd.in_use) == (2, 0x80048F6E, True)
    pvu = IommuUnit.pvu(base=0, size=0, tlb_base=0x36000000, tlb_size=0x40000)
    assert (pvu.tipvu_tlb_base, pvu.tipvu_tlb_size) == (0x36000000, 0x40000)
    assert len(amd.to_bytes()) == 28 and not IommuUnit().in_use


def test_cell_and_system_sizes() -> None:
    """Sizes follow §1.6: 132 + arrays; system = 356 + root cell."""
    cell = CellConfig(name="c", cpu_set=cpu_set_from([1, 9], 2),
                      memory_regions=(MemoryRegion(),), stream_ids=(7,))
    assert cell.cpus == {1, 9} and cell.cpu_set == b"\x02\x02"
    assert cell.size == 132 + 2 + 32 + 4 == len(cell.to_bytes())
    system = SystemConfig(root_cell=cell)
    assert system.size == 356 + cell.size == len(system.to_bytes())
    assert len(SystemConfig().to_bytes()) == 488 + 8


@pytest.mark.parametrize("value", [0, 1, 0x4000, 0x4012, 0x8001, 0x8002, 0x8003, 0x8009, 0xC002,
                                   0xC003, 0xFFFF, 0x0002, 0x3FFF])
def test_shmem_protocol_names_round_trip(value: int) -> None:
    """Protocol names (VIRTIO_BACK_BLOCK, CUSTOM+0x12, ...) map back to their values."""
    assert shmem_protocol_value(shmem_protocol_name(value)) == value
    assert shmem_protocol_name(0xC002) == "VIRTIO_BACK_BLOCK"
    assert shmem_protocol_name(0x8003) == "VIRTIO_FRONT_CONSOLE"


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_json_is_complete_and_serialisable(name: str) -> None:
    """to_dict gives JSON-able data carrying the raw values."""
    config = parse(VECTORS[name][0]())
    data = json.loads(json.dumps(to_dict(config)))
    assert data["size"] == VECTORS[name][1]
    cell = data["root_cell"] if data["kind"] == "system" else data
    cell_config = config.root_cell if isinstance(config, SystemConfig) else config
    assert len(cell["memory_regions"]) == len(cell_config.memory_regions)
    assert [d["bdf_str"] for d in cell["pci_devices"]] == [
        d.bdf_str for d in cell_config.pci_devices]


def test_text_rendering() -> None:
    """The listing names flags and types and shows every array."""
    system = load_source(CONFIGS_DIR / "qemu-x86.toml")
    text = render_text(system, "qemu-x86.cell")
    assert text.startswith("System config qemu-x86.cell: revision 14, x86, 2372 bytes\n")
    assert "IOMMU 0: INTEL at 0xfed90000 size 0x1000" in text
    assert "     17  0x0000000000-0x0039ffffff" in text and "928 MiB  R|W|X|DMA" in text
    assert "MSI-X 5 at 0xfea90000/0x1000" in text and "BRIDGE" in text
    assert "VIRTIO_BACK_BLOCK" in text and "pins 0-23" in text
    linux = render_text(load_source(CONFIGS_DIR / "linux-x86-demo.toml"))
    assert "(comm region)" in linux and "console: none" in linux and "CPUs: 2-3" in linux
    assert "L3 bits 0..1" in linux
