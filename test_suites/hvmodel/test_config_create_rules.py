"""``config create``: the collector, the generator's rules and the command line.

Most tests start from the facts captured in the default lab
(``data/default-lab-facts.json``, made with ``jhlab config create --save-facts``) and change
one thing in the document; the rest build config spaces and tables byte by byte. The
comparison with Jailhouse's ``qemu-x86`` is in ``test_config_create_qemu_x86.py``; the run
in a live lab in ``test_suites/e2e/test_config_create.py``.
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any

import pytest

import harness
from harness.hvmodel.config import SystemConfig, compile_source, load, load_source, main
from harness.hvmodel.config.collect import FACTS_FORMAT, collect
from harness.hvmodel.config.collect import main as collect_main
from harness.hvmodel.config.create import CreateOptions, create, render_toml
from harness.hvmodel.config.sysfs_parser import Facts, PciFunction, Resource, parse_io_tree
from harness.hvmodel.errors import ConfigError

DATA = Path(__file__).parent / "data"
FACTS = DATA / "default-lab-facts.json"
CONFIGS = Path(harness.__file__).parent / "configs"
QEMU_X86 = CONFIGS / "qemu-x86.toml"

R, W, X, DMA, RS = 0x1, 0x2, 0x4, 0x8, 0x80
RAM, RW = R | W | X | DMA, R | W
MIB = 1 << 20


def raw_facts() -> dict[str, Any]:
    """A fresh copy of the captured document."""
    doc: dict[str, Any] = json.loads(FACTS.read_text())
    return doc


def facts(doc: dict[str, Any] | None = None) -> Facts:
    return Facts.from_json(raw_facts() if doc is None else doc, "<test>")


def qemu_x86() -> SystemConfig:
    config = load_source(QEMU_X86)
    assert isinstance(config, SystemConfig)
    return config


def regions(system: SystemConfig) -> list[tuple[int, int, int]]:
    return [(r.phys_start, r.size, r.flags) for r in system.root_cell.memory_regions]


def device(system: SystemConfig, bdf: int) -> Any:
    return next(d for d in system.root_cell.pci_devices if d.bdf == bdf)


# --- the generated config ------------------------------------------------------------------


def test_toml_compiles_to_the_same_bytes() -> None:
    """The commented TOML source compiles to exactly the generated config."""
    result = create(facts(), CreateOptions(ivshmem_from=qemu_x86()))
    text = render_toml(result)
    assert "memmap=82M$0x3a000000" in text
    assert compile_source(text).to_bytes() == result.config.to_bytes()


def test_window_layout_with_the_qemu_x86_ivshmem_template() -> None:
    """Hypervisor at the window start, inmate RAM after it, shared memory at the end."""
    result = create(facts(), CreateOptions(ivshmem_from=qemu_x86()))
    system = result.config
    assert result.memmap == "82M$0x3a000000"
    assert result.window == (0x3A000000, 82 * MIB)
    assert (system.hypervisor_memory.phys_start, system.hypervisor_memory.size) == \
        (0x3A000000, 6 * MIB)
    assert (0x3A600000, 74 * MIB, RAM) in regions(system)
    shmem = [r for r in system.root_cell.memory_regions[:17] if r.size]
    assert min(r.phys_start for r in shmem) == 0x3F000000
    assert max(r.phys_end for r in shmem) == 0x3F1FF000
    assert [d.bdf_str for d in system.root_cell.pci_devices if d.is_ivshmem] == \
        ["01:0c.0", "01:0d.0", "01:0e.0", "01:0f.0"]


def test_platform_from_the_acpi_tables() -> None:
    """MMCONFIG, VT-d unit, IOAPIC, PM timer, CPUs and the interrupt limit."""
    result = create(facts())
    system = result.config
    assert (system.pci_mmconfig_base, system.pci_mmconfig_end_bus) == (0xB0000000, 0xFF)
    units = system.active_iommu_units
    assert [(u.type, u.base, u.size) for u in units] == [(2, 0xFED90000, 0x1000)]
    assert [(c.address, c.id, c.pins) for c in system.root_cell.irqchips] == \
        [(0xFEC00000, 0xFF00, frozenset(range(24)))]
    assert system.x86.pm_timer_address == 0x608
    assert result.vectors == 13  # e1000e 5, bridge 1, virtio-net 4, edu, HDA, AHCI 1 each
    assert system.x86.vtd_interrupt_limit == 256  # 120 + 13 rounded up
    assert system.root_cell.cpus == frozenset(range(4))
    assert (system.debug_console.type, system.debug_console.address) == (2, 0x3F8)
    assert system.flags == 1 and system.root_cell.name == "RootCell"


def test_without_template_the_inmates_get_the_whole_rest() -> None:
    """No ivshmem devices: inmate RAM runs to the end of the window."""
    system = create(facts()).config
    assert not any(d.is_ivshmem for d in system.root_cell.pci_devices)
    assert (0x3A600000, 76 * MIB, RAM) in regions(system)


def test_mem_inmates_and_mem_hv_options() -> None:
    """--mem-inmates sets the inmate RAM; the shared memory stays at the window's end."""
    system = create(facts(), CreateOptions(ivshmem_from=qemu_x86(), mem_hv=4 * MIB,
                                           mem_inmates=MIB, name="lab")).config
    assert system.hypervisor_memory.size == 4 * MIB
    assert (0x3A400000, MIB, RAM) in regions(system)
    assert system.root_cell.memory_regions[0].phys_start == 0x3F000000
    assert system.root_cell.name == "lab"


def test_window_too_small() -> None:
    """A window without room for hypervisor, inmates and shared memory is refused."""
    with pytest.raises(ConfigError, match="too small"):
        create(facts(), CreateOptions(ivshmem_from=qemu_x86(), mem_hv=81 * MIB))


def test_without_memmap_the_window_is_taken_from_ram() -> None:
    """As Jailhouse: the last RAM range big enough gives the window; a warning names it."""
    doc = raw_facts()
    doc["cmdline"] = doc["cmdline"].replace("memmap=82M$0x3a000000 ", "")
    result = create(facts(doc), CreateOptions(ivshmem_from=qemu_x86()))
    assert result.memmap == "10M$0x3f200000"
    assert any("memmap=10M$0x3f200000" in w for w in result.warnings)
    assert result.config.hypervisor_memory.phys_start == 0x3F200000
    assert (0x3F200000 + 10 * MIB, 0xDDF000 - 10 * MIB, RAM) in regions(result.config)


def test_memmap_window_over_ram_is_refused() -> None:
    """A memmap= that did not take effect (the range is System RAM) is an error."""
    doc = raw_facts()
    doc["cmdline"] = doc["cmdline"].replace("memmap=82M$0x3a000000", "memmap=16M$0x10000000")
    with pytest.raises(ConfigError, match="overlaps System RAM"):
        create(facts(doc))


def test_memory_rules() -> None:
    """RAM merged across the kernel, VGA window, ROMs, ACPI read-only, MSI-X pages cut out,
    nothing intercepted mapped."""
    result = create(facts())
    mapped = regions(result.config)
    assert (0, 0xA0000, RAM) in mapped  # first page included
    assert (0x100000, 0x39F00000, RAM) in mapped  # kernel code/data merged in
    assert (0xC0000, 0x20000, RW) in mapped  # option ROMs as one region
    assert (0x3FFDF000, 0x21000, R) in mapped  # the reserved range with the ACPI tables
    e1000e_bar3 = 0xFEA90000
    assert (e1000e_bar3 + 0x1000, 0x3000, RW) in mapped  # after its MSI-X table page
    for start, end in ((0xB0000000, 0xC0000000), (0xFEC00000, 0xFEC01000),
                       (0xFED90000, 0xFED91000), (0xFEE00000, 0xFEE01000),
                       (0xFEA9B000, 0xFEA9C000), (e1000e_bar3, e1000e_bar3 + 0x1000),
                       (0x3A000000, 0x3A600000)):
        assert not any(s < end and start < s + n for s, n, _ in mapped), hex(start)
    notes = {n.text: n for n in result.regions}
    bar0 = next(n for n in notes.values() if n.kind == "device" and n.bdf == 0x10
                and n.resource == 0)
    assert bar0.offset == 0 and "e1000e" in bar0.text


def test_acpi_region_needs_the_table_locations() -> None:
    """Without table addresses (no /dev/mem) the ACPI range is left out, with a warning."""
    doc = raw_facts()
    doc["acpi_locations"] = {"rsdp": None, "tables": []}
    result = create(facts(doc))
    assert (0x3FFDF000, 0x21000, R) not in regions(result.config)
    assert any("ACPI tables" in w for w in result.warnings)


def test_pci_devices_and_capabilities() -> None:
    """Every function, bridge type, BAR masks, MSI/MSI-X fields, caps in list order."""
    system = create(facts()).config
    root = system.root_cell
    assert [d.bdf_str for d in root.pci_devices] == [
        "00:00.0", "00:01.0", "00:02.0", "00:03.0", "00:1b.0", "00:1f.0", "00:1f.2",
        "00:1f.3", "00:1f.7", "01:01.0"]
    e1000e = device(system, 0x10)
    assert e1000e.bar_mask == (0xFFFE0000, 0xFFFE0000, 0xFFFFFFE0, 0xFFFFC000, 0, 0)
    assert (e1000e.num_msi_vectors, e1000e.msi_64bits, e1000e.msi_maskable) == (1, True, False)
    assert (e1000e.num_msix_vectors, e1000e.msix_region_size, e1000e.msix_address) == \
        (5, 0x1000, 0xFEA90000)
    assert [(c.id, c.start, c.len, c.flags) for c in root.caps_of(e1000e)] == [
        (0x01, 0xC8, 8, 1), (0x05, 0xD0, 14, 1), (0x10, 0xE0, 20, 1), (0x11, 0xA0, 12, 1),
        (0x8001, 0x100, 64, 0), (0x8003, 0x140, 12, 0)]
    bridge = device(system, 0x18)
    assert bridge.type == 2 and (bridge.msi_64bits, bridge.msi_maskable) == (True, True)
    assert [(c.id, c.start, c.len) for c in root.caps_of(bridge)] == [
        (0x05, 0x8C, 24), (0x01, 0x84, 8), (0x10, 0x48, 60), (0x0C, 0x40, 2),
        (0x8001, 0x100, 64)]
    virtio = device(system, 0xFF)
    assert virtio.bar_mask[4:] == (0xFFFFC000, 0xFFFFFFFF)  # 16K, 64-bit
    assert virtio.msix_address == 0xFEA9B000 and virtio.num_msix_vectors == 4


def test_quirks_can_be_turned_off() -> None:
    """Without quirks: HDA gets only its MSI entry, e1000e's PCIe cap is read-only."""
    system = create(facts(), CreateOptions(quirks=False)).config
    root = system.root_cell
    hda = device(system, 0xD8)
    assert [(c.id, c.start, c.len, c.flags) for c in root.caps_of(hda)] == [(5, 0x60, 14, 1)]
    e1000e = device(system, 0x10)
    assert [c.flags for c in root.caps_of(e1000e) if c.id == 0x10] == [0]


def test_identical_cap_lists_are_shared_and_include_all_units() -> None:
    """A second edu shares the first one's capability entry; INCLUDE_PCI_ALL covers it."""
    doc = raw_facts()
    edu = next(p for p in doc["pci"] if p["slot"] == "0000:01:01.0")
    doc["pci"].append(dict(edu, slot="0000:01:02.0"))
    dmar = bytearray.fromhex(doc["acpi_tables"]["DMAR"])
    dmar[52] |= 1  # DRHD flags: INCLUDE_PCI_ALL
    doc["acpi_tables"]["DMAR"] = dmar.hex()
    system = create(facts(doc)).config
    first, second = device(system, 0x108), device(system, 0x110)
    assert (second.caps_start, second.num_caps) == (first.caps_start, first.num_caps) == \
        (second.caps_start, 1)
    assert second.iommu == 0


def test_device_outside_every_iommu_scope() -> None:
    """A function no DMAR scope names is refused, as Jailhouse's tool does."""
    doc = raw_facts()
    dmar = bytes.fromhex(doc["acpi_tables"]["DMAR"])
    scope = bytes.fromhex("0108000000001b00")  # endpoint 00:1b.0
    index = dmar.index(scope)
    cut = bytearray(dmar[:index] + dmar[index + 8:])
    struct.pack_into("<I", cut, 4, len(cut))
    struct.pack_into("<H", cut, 50, struct.unpack_from("<H", cut, 50)[0] - 8)
    doc["acpi_tables"]["DMAR"] = cut.hex()
    with pytest.raises(ConfigError, match=r"0000:00:1b\.0 outside the scope of an IOMMU"):
        create(facts(doc))


def test_vtd_unit_size_needs_the_dmar_iomem_entry() -> None:
    """Without Linux's dmar0 resource the unit size is unknown (intel_iommu must be on)."""
    doc = raw_facts()
    doc["iomem"] = "\n".join(line for line in doc["iomem"].splitlines() if "dmar" not in line)
    with pytest.raises(ConfigError, match="intel_iommu=on"):
        create(facts(doc))


def test_no_dmar_table() -> None:
    """Without DMAR: a warning, no IOMMU unit, still a clean config."""
    doc = raw_facts()
    del doc["acpi_tables"]["DMAR"]
    result = create(facts(doc))
    assert not result.config.active_iommu_units
    assert any("no VT-d unit" in w for w in result.warnings)
    assert result.config.root_cell.irqchips[0].id == 0


def test_ivshmem_template_bdf_taken() -> None:
    """An ivshmem device of the template at a real device's BDF is refused."""
    template = qemu_x86()
    root = template.root_cell
    moved = tuple(d if not d.is_ivshmem or d.bdf != 0x160 else
                  type(d)(**{**{f: getattr(d, f) for f in d.__slots__}, "bdf": 0x108})
                  for d in root.pci_devices)
    template = type(template)(**{**{f: getattr(template, f) for f in template.__slots__},
                                 "root_cell": type(root)(**{**{f: getattr(root, f)
                                                              for f in root.__slots__},
                                                           "pci_devices": moved})})
    with pytest.raises(ConfigError, match="collides with a real PCI device"):
        create(facts(), CreateOptions(ivshmem_from=template))


def test_port_whitelist() -> None:
    """Jailhouse's rules; the debug console's UART stays trapped."""
    result = create(facts())
    pio = [(p.base, p.length) for p in result.config.root_cell.pio_regions]
    assert pio == [(0x40, 4), (0x60, 1), (0x64, 1), (0x70, 8), (0x2F8, 8), (0x3C0, 0x20),
                   (0xD040, 0x20), (0xD060, 0x20), (0xD080, 0x20)]
    assert any(t.startswith("03f8-03ff") and "debug console" in t for t in result.pio_trapped)
    other = create(facts(), CreateOptions(console="ttyS1"))
    ports = [(p.base, p.length) for p in other.config.root_cell.pio_regions]
    assert (0x3F8, 8) in ports and (0x2F8, 8) not in ports
    assert other.config.debug_console.address == 0x2F8


# --- parsers ------------------------------------------------------------------------------------


def test_io_tree() -> None:
    """Nesting by indentation; labels name the enclosing entries."""
    text = ("00000000-00000fff : Reserved\n00100000-3fffffff : System RAM\n"
            "  01000000-01ffffff : Kernel code\nfed00000-fed003ff : HPET 0\n"
            "  fed00000-fed003ff : PNP0103:00\n")
    top = parse_io_tree(text)
    assert [e.name for e in top] == ["Reserved", "System RAM", "HPET 0"]
    assert top[1].children[0].name == "Kernel code" and top[1].children[0].start == 0x1000000
    assert [leaf.label for leaf in top[2].leaves()] == ["HPET 0 > PNP0103:00"]
    with pytest.raises(ConfigError, match="line 2"):
        parse_io_tree("0-f : ok\nnonsense\n")


def _function(config: bytes, resources: tuple[Resource, ...] = ()) -> PciFunction:
    return PciFunction(domain=0, bdf=0x08, config=config.ljust(4096, b"\0"),
                       resources=resources)


def test_capability_walk_and_extended_lengths() -> None:
    """MSI with masking, MSI-X in a 64-bit BAR, PCIe v2, extended caps up to a zero header."""
    cfg = bytearray(4096)
    struct.pack_into("<HH", cfg, 0, 0x1234, 0x5678)
    struct.pack_into("<H", cfg, 0x06, 0x10)  # capability list
    cfg[0x34] = 0x40
    cfg[0x40:0x44] = bytes([0x05, 0x50]) + struct.pack("<H", 0x0180 | 0x4)  # MSI 64+mask, 4 vec
    cfg[0x50:0x58] = bytes([0x11, 0x60]) + struct.pack("<HI", 7, 0x2000 | 2)  # MSI-X BAR2+0x2000
    cfg[0x60:0x64] = bytes([0x10, 0x70]) + struct.pack("<H", 0x0002)  # PCIe v2
    cfg[0x70:0x72] = bytes([0x09, 0x00])  # vendor specific
    struct.pack_into("<II", cfg, 0x18, 0xE0000004, 0x1)  # BAR2/3: 64-bit at 0x1_e0000000
    struct.pack_into("<I", cfg, 0x100, 0x0001 | 0x1 << 16 | 0x140 << 20)  # AER
    struct.pack_into("<I", cfg, 0x140, 0x000B | 0x1 << 16 | 0x160 << 20)  # VSEC
    struct.pack_into("<I", cfg, 0x144, 0x018 << 20)  # its length: 0x18
    struct.pack_into("<I", cfg, 0x160, 0x000D | 0x1 << 16 | 0x180 << 20)  # ACS
    struct.pack_into("<HH", cfg, 0x164, 0x20 | 0x40 << 8, 0x20)  # egress control, 64 bits
    function = _function(bytes(cfg))
    caps = function.capabilities()
    assert [(c.id, c.start, c.len, c.flags) for c in caps] == [
        (0x05, 0x40, 24, 1), (0x11, 0x50, 12, 1), (0x10, 0x60, 60, 0), (0x09, 0x70, 2, 0),
        (0x8001, 0x100, 64, 0), (0x800B, 0x140, 4 + 0x18, 0), (0x800D, 0x160, 8 + 8, 0)]
    assert caps[1].msix_address == 0x1E0002000


def test_capability_loop_and_plain_pci() -> None:
    """A looping list ends; a conventional device's config space has no extended list."""
    cfg = bytearray(256)
    struct.pack_into("<H", cfg, 0x06, 0x10)
    cfg[0x34] = 0x40
    cfg[0x40:0x42] = bytes([0x01, 0x40])  # PM pointing at itself
    assert [(c.id, c.len) for c in PciFunction(domain=0, bdf=0, config=bytes(cfg),
                                               resources=()).capabilities()] == [(1, 8)]


def test_bar_masks() -> None:
    """I/O, 32-bit, 64-bit (two words) and unassigned BARs."""
    io, mem, mem64 = 0x101, 0x40200, 0x140200
    resources = (Resource(0xD000, 0xD01F, io), Resource(0xFE000000, 0xFE000FFF, mem),
                 Resource(0x800000000, 0x8FFFFFFFF, mem64), Resource(0, 0, 0),
                 Resource(0, 0, 0), Resource(0, 0, 0))
    assert _function(bytes(64), resources).bar_masks() == \
        (0xFFFFFFE0, 0xFFFFF000, 0x00000000, 0xFFFFFFFF, 0, 0)  # 4 GiB 64-bit BAR


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="other"), "not a jhlab-config-facts document"),
    (lambda d: d.update(version=99), "newer than this generator"),
    (lambda d: d.pop("iomem"), "lack 'iomem'"),
    (lambda d: d["pci"][0].update(config="zz"), "malformed facts document"),
    (lambda d: d["cpus"].update(online=None), "online CPU list"),
    (lambda d: d["acpi_tables"].update(MCFG="00" * 40), "not a MCFG table"),
])
def test_bad_facts_are_config_errors(change: Any, message: str) -> None:
    """A broken document raises ConfigError naming the problem, nothing else."""
    doc = raw_facts()
    change(doc)
    with pytest.raises(ConfigError, match=message):
        create(facts(doc))


# --- collector --------------------------------------------------------------------------------


def fake_root(tmp_path: Path, doc: dict[str, Any]) -> Path:
    """A directory tree holding the files the document was collected from."""
    root = tmp_path / "root"

    def put(name: str, data: str | bytes) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)

    put("proc/cmdline", doc["cmdline"] + "\n")
    put("proc/iomem", doc["iomem"])
    put("proc/ioports", doc["ioports"])
    put("proc/sys/kernel/osrelease", doc["kernel"] + "\n")
    put("proc/cpuinfo", f"processor\t: 0\nvendor_id\t: {doc['cpu_vendor']}\n")
    for name, value in doc["cpus"].items():
        put(f"sys/devices/system/cpu/{name}", value + "\n")
    for entry in doc["pci"]:
        base = f"sys/bus/pci/devices/{entry['slot']}"
        put(f"{base}/config", bytes.fromhex(entry["config"]).ljust(entry["config_size"], b"\0"))
        put(f"{base}/resource", entry["resource"])
        if entry["driver"]:
            (root / "sys/bus/drivers" / entry["driver"]).mkdir(parents=True, exist_ok=True)
            (root / base / "driver").symlink_to(root / "sys/bus/drivers" / entry["driver"])
    for name, data in doc["acpi_tables"].items():
        put(f"sys/firmware/acpi/tables/{name}", bytes.fromhex(data))
    for name, value in doc["dmi"].items():
        put(f"sys/class/dmi/id/{name}", value + "\n")
    for tty, attrs in doc["serial"].items():
        for attr, value in attrs.items():
            put(f"sys/class/tty/{tty}/{attr}", value + "\n")
    return root


def test_collector_reads_a_tree_back(tmp_path: Path) -> None:
    """Collecting from a tree made of the captured document gives the same raw facts."""
    doc = raw_facts()
    got = collect(str(fake_root(tmp_path, doc)), devmem=False)
    assert got["format"] == FACTS_FORMAT and got["warnings"] == []
    for key in ("cmdline", "iomem", "ioports", "cpus", "pci", "acpi_tables", "dmi", "serial",
                "kernel", "cpu_vendor"):
        assert got[key] == doc[key], key
    assert got["jailhouse_enabled"] is None and got["acpi_locations"]["tables"] == []


def test_collector_cli_and_missing_files(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--root/-o write the document; what cannot be read becomes a warning; the generator
    then says what it lacks."""
    out = tmp_path / "facts.json"
    assert collect_main(["--root", str(tmp_path / "empty"), "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["iomem"] is None and any("/proc/iomem" in w for w in doc["warnings"])
    assert "WARNING: cannot read /proc/iomem" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"lack 'iomem'.*cannot read /proc/iomem"):
        Facts.from_json(doc)


# --- command line -----------------------------------------------------------------------------


def test_cli_create_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """create --facts writes .cell and .toml; they agree, and check is clean."""
    cell, source = tmp_path / "lab.cell", tmp_path / "lab.toml"
    assert main(["create", "--facts", str(FACTS), "--ivshmem-from", str(QEMU_X86),
                 "-o", str(cell), "--toml", str(source), "--name", "QEMU-VM"]) == 0
    assert capsys.readouterr().out == ""
    config = load(cell)
    assert isinstance(config, SystemConfig) and config.name == "QEMU-VM"
    assert load(source).to_bytes() == cell.read_bytes()
    assert main(["check", str(cell)]) == 0
    expected = create(facts(), CreateOptions(ivshmem_from=qemu_x86(), name="QEMU-VM"))
    assert cell.read_bytes() == expected.config.to_bytes()


def test_cli_create_prints_toml_and_saves_facts(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Without outputs the TOML goes to stdout; --save-facts copies the document."""
    saved = tmp_path / "saved.json"
    assert main(["create", "--facts", str(FACTS), "--save-facts", str(saved)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# RootCell: Jailhouse system config generated by 'config create'")
    assert json.loads(saved.read_text()) == raw_facts()
    assert main(["create", "--facts", str(FACTS), "--mem-hv", "lots"]) == 1
    assert "bad size 'lots'" in capsys.readouterr().err
    assert main(["create", "--facts", str(tmp_path / "missing.json")]) == 1


def test_facts_document_is_copied_not_shared() -> None:
    """(helper sanity) each test gets its own copy of the captured document."""
    first = raw_facts()
    first["pci"].clear()
    assert raw_facts()["pci"] and copy.deepcopy(first) == first


def test_host_cli_offline_uses_the_qemu_x86_ivshmem_for_the_default_lab(tmp_path: Path) -> None:
    """jhlab config create --facts: no lab needed; the default lab gets qemu-x86's ivshmem
    devices, '' turns them off."""
    from harness.cli import main as jhlab

    with_ivshmem, without = tmp_path / "a.cell", tmp_path / "b.cell"
    assert jhlab(["config", "create", "--facts", str(FACTS), "-o", str(with_ivshmem)]) == 0
    assert jhlab(["config", "create", "--lab", "default", "--facts", str(FACTS),
                  "--ivshmem-from", "", "-o", str(without)]) == 0
    assert with_ivshmem.read_bytes() == \
        create(facts(), CreateOptions(ivshmem_from=qemu_x86())).config.to_bytes()
    assert without.read_bytes() == create(facts()).config.to_bytes()
