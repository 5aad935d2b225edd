"""Every way a config can be malformed yields one ConfigError naming source, offset and field."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from test_config_vectors import apic_demo, linux_x86_demo, qemu_x86

from harness.hvmodel.config import (
    CacheRegion,
    CellConfig,
    IommuUnit,
    Irqchip,
    MemoryRegion,
    PciDevice,
    SystemConfig,
    compile_source,
    cpu_set_from,
    load,
    parse,
    parse_cell,
    parse_system,
)
from harness.hvmodel.errors import ConfigError

ROOT = 356  # offset of the root cell descriptor in a system config


def patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    """``data`` with ``struct.pack(fmt, *values)`` written at ``offset``."""
    raw = bytearray(data)
    struct.pack_into(fmt, raw, offset, *values)
    return bytes(raw)


def fails(fn: object, data: bytes, source: str = "x.cell") -> ConfigError:
    """Run a parser expecting a ConfigError; return it."""
    with pytest.raises(ConfigError) as info:
        fn(data, source)  # type: ignore[operator]
    assert info.value.source == source
    return info.value


# --- cell configs --------------------------------------------------------------------------


def test_wrong_cell_signature() -> None:
    """A cell whose signature is not JHCLL is refused at offset 0."""
    err = fails(parse_cell, b"JHXXX" + apic_demo()[5:])
    assert (err.offset, err.field) == (0, "signature")
    assert "JHCLL" in err.message


def test_system_given_as_cell() -> None:
    """parse_cell on a system config says what it got."""
    err = fails(parse_cell, qemu_x86())
    assert (err.offset, err.field) == (0, "signature") and "system config" in err.message


def test_wrong_revision() -> None:
    """Revision 13 is neither 14 nor the v0.12 layout."""
    err = fails(parse_cell, patch(apic_demo(), 6, "<H", 13))
    assert (err.offset, err.field) == (6, "revision") and "expected 14" in err.message


def test_wrong_architecture() -> None:
    """Architecture 3 does not exist (pyjailhouse refuses > 2 too)."""
    err = fails(parse_cell, patch(apic_demo(), 5, "<B", 3))
    assert (err.offset, err.field) == (5, "architecture")


@pytest.mark.parametrize(
    ("length", "field", "offset"),
    [(3, "signature", 0), (5, "architecture", 5), (20, "name", 8), (50, "cpu_set_size", 48),
     (131, "console", 100)],
)
def test_truncated_descriptor(length: int, field: str, offset: int) -> None:
    """A descriptor cut short names the first field it does not hold."""
    err = fails(parse_cell, apic_demo()[:length])
    assert (err.offset, err.field) == (offset, field)


def test_truncated_cpu_set() -> None:
    """The CPU set must follow the descriptor in full."""
    err = fails(parse_cell, apic_demo()[:136])
    assert (err.offset, err.field) == (132, "cpu_set")


@pytest.mark.parametrize(
    ("count_offset", "field", "element_offset"),
    [
        (52, "memory_regions[2]", 140 + 64),   # 2 regions then a third asked for
        (56, "pio_regions[0]", 140 + 64 + 24),  # the PIO bytes become cache region 1
        (60, "irqchips[0]", 140 + 64 + 12),
        (64, "pio_regions[3]", 140 + 64 + 12 + 12),
        (68, "pci_devices[0]", 140 + 64 + 12 + 12),
        (72, "pci_caps[0]", 140 + 64 + 12 + 12),
        (76, "stream_ids[0]", 140 + 64 + 12 + 12),
    ],
)
def test_count_runs_past_end(count_offset: int, field: str, element_offset: int) -> None:
    """Raising a count by one makes that array run past the end: its next element is named."""
    data = apic_demo()
    (count,) = struct.unpack_from("<I", data, count_offset)
    err = fails(parse_cell, patch(data, count_offset, "<I", count + 1))
    assert (err.field, err.offset) == (field, element_offset)
    assert "runs past the end" in err.message


def test_huge_count() -> None:
    """A count of 2^32-1 is refused without trying to allocate."""
    err = fails(parse_cell, patch(apic_demo(), 52, "<I", 0xFFFFFFFF))
    assert err.field == "memory_regions[2]"


def test_truncated_array() -> None:
    """Cutting the file inside the PIO array names the cut element."""
    err = fails(parse_cell, apic_demo()[:-2])
    assert (err.field, err.offset) == ("pio_regions[2]", 228 - 4)


def test_trailing_bytes() -> None:
    """Bytes after the last array are an error at the expected end."""
    err = fails(parse_cell, apic_demo() + b"\0")
    assert err.offset == 228 and err.field is None and "1 trailing bytes" in err.message


def test_name_without_nul() -> None:
    """A 32-byte name with no NUL cannot be a C string of at most 31 characters."""
    err = fails(parse_cell, patch(apic_demo(), 8, "32s", b"A" * 32))
    assert (err.offset, err.field) == (8, "name") and "NUL" in err.message


def test_name_not_utf8() -> None:
    """Names must be text."""
    err = fails(parse_cell, patch(apic_demo(), 8, "32s", b"\xff\xfe"))
    assert (err.offset, err.field) == (8, "name")


@pytest.mark.parametrize("size", [0, 4097])
def test_cpu_set_wrong_size(size: int) -> None:
    """cpu_set_size 0 or above one page (the hypervisor's -EINVAL) is refused."""
    err = fails(parse_cell, patch(apic_demo(), 48, "<I", size))
    assert (err.offset, err.field) == (48, "cpu_set_size")


def test_not_bytes() -> None:
    """A str is not a config."""
    err = fails(parse_cell, "JHCLL")  # type: ignore[arg-type]
    assert "expected bytes" in err.message


# --- system configs ------------------------------------------------------------------------


def test_wrong_system_signature() -> None:
    """parse_system on a cell config."""
    err = fails(parse_system, apic_demo())
    assert (err.offset, err.field) == (0, "signature")


def test_system_revision_and_arch() -> None:
    """System revision and architecture are checked (root cell ones are not)."""
    assert fails(parse_system, patch(qemu_x86(), 6, "<H", 12)).field == "revision"
    assert fails(parse_system, patch(qemu_x86(), 5, "<B", 9)).field == "architecture"


@pytest.mark.parametrize(
    ("length", "field", "offset"),
    [(10, "flags", 8), (60, "debug_console", 44), (87, "platform_info.pci_domain", 86),
     (190, "platform_info.iommu_units[3]", 172), (330, "platform_info.x86", 312),
     (400, "root_cell.flags", ROOT + 44), (406, "root_cell.cpu_set_size", ROOT + 48)],
)
def test_truncated_system(length: int, field: str, offset: int) -> None:
    """A system config cut short names the first field it lacks, root cell fields prefixed."""
    err = fails(parse_system, qemu_x86()[:length])
    assert (err.field, err.offset) == (field, offset)


def test_unknown_iommu_type() -> None:
    """IOMMU type 6 is unknown (pyjailhouse: 'Unknown IOMMU type')."""
    err = fails(parse_system, patch(qemu_x86(), 88 + 28, "<I", 6))
    assert (err.field, err.offset) == ("platform_info.iommu_units[1].type", 116)


def test_root_cell_errors_are_prefixed() -> None:
    """Errors inside the root cell name it: root_cell.<field>."""
    data = qemu_x86()
    err = fails(parse_system, patch(data, ROOT + 52, "<I", 1000))
    assert (err.field, err.offset) == ("root_cell.memory_regions[58]", 496 + 58 * 32)
    err = fails(parse_system, data + b"xx")
    assert err.offset == len(data)
    err = fails(parse_system, patch(data, ROOT + 8, "32s", b"Q" * 32))
    assert (err.field, err.offset) == ("root_cell.name", ROOT + 8)


def test_root_cell_header_is_not_checked() -> None:
    """Signature, revision and architecture of the embedded root descriptor are free."""
    data = patch(qemu_x86(), ROOT, "<5sBH", b"ABCDE", 7, 99)
    system = parse_system(data)
    assert system.root_cell.signature == b"ABCDE" and system.root_cell.architecture == 7
    assert system.to_bytes() == data


def test_parse_unknown_signature() -> None:
    """parse() needs JHSYS or JHCLL (or v0.12's JHCELL/JHSYST)."""
    err = fails(parse, b"ELF\x7f" + bytes(200))
    assert (err.offset, err.field) == (0, "signature")


def test_load_missing_file(tmp_path: Path) -> None:
    """An unreadable file is a ConfigError naming it."""
    path = tmp_path / "nope.cell"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.source == str(path) and "cannot read" in info.value.message


def test_load_reads_binary_and_toml(tmp_path: Path) -> None:
    """load() takes both a .cell and a .toml source."""
    path = tmp_path / "x.cell"
    path.write_bytes(linux_x86_demo())
    cell = load(path)
    assert isinstance(cell, CellConfig) and cell.name == "linux-x86-demo"
    source = tmp_path / "x.toml"
    source.write_text('name = "t"\ncpus = "1"\n')
    assert load(source) == CellConfig(name="t", cpu_set=cpu_set_from([1]))


# --- model validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: MemoryRegion(size=-1), "MemoryRegion.size"),
        (lambda: MemoryRegion(flags=1 << 64), "MemoryRegion.flags"),
        (lambda: MemoryRegion(phys_start="0x1000"), "MemoryRegion.phys_start"),
        (lambda: CacheRegion(type=256), "CacheRegion.type"),
        (lambda: Irqchip(pin_bitmap=(0, 0, 0)), "Irqchip.pin_bitmap"),
        (lambda: Irqchip(pin_bitmap=(1 << 32, 0, 0, 0)), "Irqchip.pin_bitmap"),
        (lambda: PciDevice(bdf=0x10000), "PciDevice.bdf"),
        (lambda: PciDevice(bar_mask=(0, 0, 0, 0, 0, -1)), "PciDevice.bar_mask"),
        (lambda: PciDevice(msi_64bits=1), "PciDevice.msi_64bits"),  # type: ignore[arg-type]
        (lambda: PciDevice(msi_reserved_bits=1), "PciDevice.msi_reserved_bits"),
        (lambda: IommuUnit(union=b"short"), "IommuUnit.union"),
        (lambda: IommuUnit.amd(base=0, size=0, bdf=1 << 16), "IommuUnit.amd_bdf"),
        (lambda: CellConfig(name="x" * 32), "CellConfig.name"),
        (lambda: CellConfig(name="a\0b"), "CellConfig.name"),
        (lambda: CellConfig(name="a", cpu_set=b""), "CellConfig.cpu_set"),
        (lambda: CellConfig(name="a", memory_regions=[MemoryRegion()]),
         "CellConfig.memory_regions"),
        (lambda: CellConfig(name="a", signature=b"JHCL"), "CellConfig.signature"),
        (lambda: CellConfig(name="a", stream_ids=(1 << 32,)), "CellConfig.stream_ids"),
        (lambda: SystemConfig(iommu_units=(IommuUnit(),)), "SystemConfig.iommu_units"),
        (lambda: cpu_set_from([64]), "CellConfig.cpu_set"),
    ],
)
def test_model_validation(build: object, field: str) -> None:
    """Out-of-range or mistyped fields raise ConfigError naming Class.field."""
    with pytest.raises(ConfigError) as info:
        build()  # type: ignore[operator]
    assert info.value.field == field


def test_caps_of_out_of_range() -> None:
    """A device pointing past the cell's capabilities is reported by caps_of."""
    cell = CellConfig(name="a", pci_devices=(PciDevice(caps_start=1, num_caps=2),))
    with pytest.raises(ConfigError) as info:
        cell.caps_of(cell.pci_devices[0])
    assert info.value.field == "PciDevice.caps_start"


# --- TOML sources --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ('name = "a"\ncpus = [1', None, "TOML syntax error"),
        ('name = "a"\ncolour = 1', "colour", "unknown key"),
        ('cpus = "1"', "name", "needs a name"),
        ('name = "a"\ncpus = "70"', "cpus", "out of range"),
        ('name = "a"\ncpus = "3-1"', "cpus", "N-M"),
        ('name = "a"\nflags = ["PASSIVE"]', "flags", "unknown flag"),
        ('name = "a"\n[[memory_regions]]\nsize = "1Q"', "memory_regions[0].size", "size like"),
        ('name = "a"\n[[memory_regions]]\nsize = -1', "memory_regions[0].size", "fit u64"),
        ('name = "a"\n[[pci_devices]]\nbdf = "00:20.0"', "pci_devices[0].bdf", "exceeds 0x1f"),
        ('name = "a"\n[[pci_devices]]\nbdf = "zz"', "pci_devices[0].bdf", "bad BDF"),
        ('name = "a"\n[[pci_devices]]\nbar_mask = "FOO"', "pci_devices[0].bar_mask", "BAR mask"),
        ('name = "a"\n[[pci_devices]]\ntype = "GPU"', "pci_devices[0].type", "unknown value"),
        ('name = "a"\n[[pci_devices]]\nshmem_protocol = "X"', "pci_devices[0].shmem_protocol",
         "unknown protocol"),
        ('name = "a"\n[[pci_devices]]\nmsi_64bits = 1', "pci_devices[0].msi_64bits",
         "true or false"),
        ('name = "a"\n[console]\ntype = "VGA"', "console.type", "unknown value"),
        ('name = "a"\n[[irqchips]]\npins = "0-200"', "irqchips[0].pins", "out of range"),
        ('name = "a"\n[[irqchips]]\npins = "1"\npin_bitmap = [1]', "irqchips[0].pins",
         "not both"),
        ('name = "' + "n" * 40 + '"', "name", "at most 31"),
        ('name = "a"\nsignature = "TOOLONG"', "signature", "do not fit"),
        ('name = "a"\nmemory_regions = 5', "memory_regions", "expected an array"),
        ('kind = "thing"', "kind", "expected"),
        ('kind = "system"', "root_cell", "needs a [root_cell]"),
        ('kind = "system"\n[root_cell]\nname = "r"\n' + "[[platform.iommu_units]]\n" * 9,
         "platform.iommu_units", "at most 8"),
        ('kind = "system"\n[root_cell]\nname = "r"\n[[platform.iommu_units]]\ntype = "AMD"\n'
         'amd_bdf = "00:00.2"\ntipvu_tlb_size = 1', "platform.iommu_units[0].tipvu_tlb_size",
         "one view"),
    ],
)
def test_toml_errors(text: str, field: str | None, words: str) -> None:
    """Schema violations name the dotted key and say what was expected."""
    with pytest.raises(ConfigError) as info:
        compile_source(text, "bad.toml")
    assert info.value.source == "bad.toml"
    assert info.value.field == field
    assert words in info.value.message
