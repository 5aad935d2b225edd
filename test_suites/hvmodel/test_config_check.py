"""Config-set checks on model objects: Jailhouse's (titles, output shape), its next branch's
and jhlab's, each tripped once. The command line, byte for byte against Jailhouse's tool,
is in ``test_config_check_jailhouse.py``."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from test_config_vectors import CONFIGS_DIR

from harness.hvmodel.config import (
    Architecture,
    CellConfig,
    MemFlags,
    MemoryRegion,
    PciDevice,
    PioRegion,
    SetReadError,
    SystemConfig,
    X86Platform,
    check,
    cpu_set_from,
    load_source,
    render_check,
)
from harness.hvmodel.config.check import T_ARCH
from harness.hvmodel.config.checkset import mem_flag_str, region_dump

RW = MemFlags.READ | MemFlags.WRITE
JAILHOUSE_TITLES = (
    "Overlapping memory regions inside cell",
    "Overlapping memory regions with hypervisor",
    "Missing PCI MMCONFIG interceptions",
    "Missing IOMMU interceptions",
    "Missing resource interceptions for architecture x86",
)


def source(name: str) -> SystemConfig | CellConfig:
    """A shipped config, compiled from harness/configs."""
    return load_source(CONFIGS_DIR / f"{name}.toml")


def system() -> SystemConfig:
    """The default lab's system config."""
    config = source("qemu-x86")
    assert isinstance(config, SystemConfig)
    return config


def cell(name: str) -> CellConfig:
    """A shipped cell config."""
    config = source(name)
    assert isinstance(config, CellConfig)
    return config


def codes(sys_config: SystemConfig, *cells: CellConfig) -> list[str]:
    """Codes of all findings, in order."""
    return [f.code for f in check(sys_config, cells, extra=True).findings]


def with_regions(config: CellConfig, *regions: MemoryRegion) -> CellConfig:
    """``config`` with extra memory regions appended."""
    return replace(config, memory_regions=config.memory_regions + regions)


# --- clean sets ------------------------------------------------------------------------------


@pytest.mark.parametrize("cells", [("apic-demo", "tiny-demo"), ("ivshmem-demo", "linux-x86-demo"),
                                   ()])
def test_default_sets_are_clean(cells: tuple[str, ...]) -> None:
    """The default lab with its co-resident demo sets passes every check, jhlab's included."""
    report = check(system(), [cell(n) for n in cells], sources=[f"{n}.cell" for n in cells],
                   system_source="qemu-x86.cell", next_checks=True, extra=True)
    assert report.ok and report.exit_status == 0, render_check(report)
    assert report.titles()[:5] == JAILHOUSE_TITLES


@pytest.mark.parametrize("name", ["apic-demo", "tiny-demo", "smp-demo", "ioapic-demo",
                                  "pci-demo", "e1000-demo", "ivshmem-demo", "linux-x86-demo"])
def test_each_demo_cell_alone_is_clean(name: str) -> None:
    """Every shipped demo cell, alone with the system config, has no findings."""
    report = check(system(), [cell(name)], next_checks=True, extra=True)
    assert report.ok, render_check(report)


def test_reference_set_passes_checks_1_to_5() -> None:
    """Reference: qemu-x86 + apic + ivshmem + linux + e1000 pass checks 1-5; next finds CPU 3."""
    names = ["apic-demo", "ivshmem-demo", "linux-x86-demo", "e1000-demo"]
    report = check(system(), [cell(n) for n in names], next_checks=True)
    for section in report.sections[:5]:
        assert not section.findings, section.title
    cores = report.sections[6]
    assert cores.title == "Overlapping cores between non-root cells"
    shared = {f.details for f in cores.findings}
    assert "Cells 'apic-demo' and 'linux-x86-demo' share CPUs:\n3" in shared
    assert "Cells 'linux-x86-demo' and 'e1000-demo' share CPUs:\n2" in shared


def test_render_clean_output_shape() -> None:
    """The text is the tool's: header, architecture, cells, then `title: None` lines."""
    report = check(system(), [cell("apic-demo"), cell("tiny-demo")],
                   sources=["apic-demo.cell", "tiny-demo.cell"], system_source="qemu-x86.cell")
    text = render_check(report)
    assert text == (
        "Reading configuration set:\n"
        "  Architecture:  x86\n"
        "  Root cell:     QEMU-VM (qemu-x86.cell)\n"
        "  Non-root cell: apic-demo (apic-demo.cell)\n"
        "  Non-root cell: tiny-demo (tiny-demo.cell)\n"
        "Overlapping memory regions inside cell: None\n"
        "Overlapping memory regions with hypervisor: None\n"
        "Missing PCI MMCONFIG interceptions: None\n"
        "Missing IOMMU interceptions: None\n"
        "Missing resource interceptions for architecture x86: None\n"
    )
    cells = [cell("apic-demo"), cell("tiny-demo")]
    with_next = render_check(check(system(), cells, sources=["apic-demo.cell", "tiny-demo.cell"],
                                   system_source="qemu-x86.cell", next_checks=True))
    assert with_next == text + ("Root cell CPU starvation: None\n"
                                "Overlapping cores between non-root cells: None\n")
    full = render_check(check(system(), cells, sources=["apic-demo.cell", "tiny-demo.cell"],
                              system_source="qemu-x86.cell", next_checks=True, extra=True))
    assert full.startswith(with_next) and full.endswith("Sub-page region flags: None\n")


def test_next_checks_need_cells() -> None:
    """Starvation runs with one non-root cell, core overlap with two (as in next)."""
    assert "Root cell CPU starvation" not in check(system(), next_checks=True).titles()
    one = check(system(), [cell("apic-demo")], next_checks=True).titles()
    assert "Root cell CPU starvation" in one and "Overlapping cores between non-root cells" \
        not in one
    assert "Root cell CPU starvation" not in check(system(), [cell("apic-demo")]).titles()


# --- Jailhouse's checks ----------------------------------------------------------------------


def test_overlap_inside_cell_output() -> None:
    """Two overlapping regions print as the tool prints them."""
    extra = MemoryRegion(phys_start=0x3EF80000, virt_start=0x80000, size=0x1000, flags=RW)
    report = check(system(), [with_regions(cell("apic-demo"), extra)],
                   sources=["a.cell"], system_source="s.cell")
    (finding,) = report.sections[0].findings
    assert finding.cell == "apic-demo" and finding.code == "overlap-in-cell"
    assert finding.details == (
        "In cell 'apic-demo', region 0\n"
        "  phys_start: 0x000000003ef00000\n"
        "  virt_start: 0x0000000000000000\n"
        "  size:       0x0000000000100000\n"
        "  flags:      JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE | JAILHOUSE_MEM_EXECUTE | "
        "JAILHOUSE_MEM_LOADABLE\n"
        "physically and virtually overlaps with region 2\n"
        "  phys_start: 0x000000003ef80000\n"
        "  virt_start: 0x0000000000080000\n"
        "  size:       0x0000000000001000\n"
        "  flags:      JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE"
    )
    text = render_check(report)
    assert "Overlapping memory regions inside cell:\n\nIn cell 'apic-demo', region 0\n" in text
    assert "  flags:      JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE\n\n" \
           "Overlapping memory regions with hypervisor: None\n" in text
    assert report.exit_status == 1


def test_virtual_only_overlap() -> None:
    """Regions overlapping only in guest-physical space say so."""
    extra = MemoryRegion(phys_start=0x3E000000, virt_start=0x0, size=0x1000, flags=RW)
    (finding,) = check(system(), [with_regions(cell("apic-demo"), extra)]).sections[0].findings
    assert "\nvirtually overlaps with region 2\n" in finding.details


def test_hypervisor_overlap_and_mmconfig_quirk() -> None:
    """A region on the hypervisor is found; check 3 then prints an empty block, not None."""
    hv = MemoryRegion(phys_start=0x3A100000, virt_start=0x200000, size=0x1000, flags=RW)
    report = check(system(), [with_regions(cell("apic-demo"), hv)])
    (finding,) = report.sections[1].findings
    assert "overlaps with hypervisor memory region\n  phys_start: 0x000000003a000000" in \
        finding.details
    text = render_check(report)
    assert "Missing PCI MMCONFIG interceptions:\n\nMissing IOMMU interceptions: None\n" in text
    assert not report.sections[2].findings and report.sections[2].quirk_found


@pytest.mark.parametrize(
    ("address", "section", "what"),
    [(0xB0100000, 2, "overlaps with MMCONFIG"), (0xFED90000, 3, "overlaps with IOMMU"),
     (0xFEE00000, 4, "overlaps with xAPIC"), (0xFEC00000, 4, "overlaps with IOAPIC")],
)
def test_missing_interceptions(address: int, section: int, what: str) -> None:
    """Mapping MMCONFIG, the VT-d unit, the xAPIC or the root's IOAPIC is found."""
    region = MemoryRegion(phys_start=address, virt_start=0x200000, size=0x1000, flags=RW)
    report = check(system(), [with_regions(cell("apic-demo"), region)])
    (finding,) = report.sections[section].findings
    assert f"\n{what}\n" in finding.details


def test_root_cell_regions_are_checked_too() -> None:
    """The root cell is the first cell checked."""
    sys_config = system()
    root = with_regions(sys_config.root_cell, MemoryRegion(
        phys_start=0xFEE00000, virt_start=0xFEE00000, size=0x1000, flags=RW))
    report = check(replace(sys_config, root_cell=root))
    (finding,) = report.sections[4].findings
    assert finding.cell == "QEMU-VM" and "region 31" in finding.details


def test_root_cpu_starvation() -> None:
    """All root CPUs taken by non-root cells."""
    cpu0 = replace(cell("tiny-demo"), name="cpu0", cpu_set=cpu_set_from([0]),
                   memory_regions=())
    report = check(system(), [cell("smp-demo"), cpu0], next_checks=True)
    (finding,) = [f for f in report.findings if f.code == "root-starved"]
    assert finding.details == "No root cell CPUs left when all non-root cells are started"
    assert "Root cell CPU starvation:\n\nNo root cell CPUs left when all non-root cells are " \
           "started\n\n" in render_check(report)


def test_overlapping_cores_output() -> None:
    """Shared CPUs are listed as Python prints a set without braces."""
    report = check(system(), [cell("smp-demo"), cell("linux-x86-demo")], next_checks=True)
    text = render_check(report)
    assert "Overlapping cores between non-root cells:\n\nCells 'smp-demo' and " \
           "'linux-x86-demo' share CPUs:\n2, 3\n\n" in text


def test_architecture_mismatch() -> None:
    """A cell of another architecture stops the check, as in the tool."""
    with pytest.raises(SetReadError) as info:
        check(system(), [replace(cell("apic-demo"), architecture=Architecture.ARM64)], sources=["a"])
    assert info.value.tool_line == "Cell architecture mismatch: arm64: a"


def _arm_system(version: int) -> SystemConfig:
    raw = struct.pack("<BB2xQQQQQ", 25, version, 0x8000000, 0x8010000, 0x8030000, 0x8040000,
                      0x80A0000)
    pm, mode, pad, vtd, tsc, apic, rest = struct.unpack("<HBBIII28s", raw)
    x86 = X86Platform(pm_timer_address=pm, apic_mode=mode, padding=pad, vtd_interrupt_limit=vtd,
                      tsc_khz=tsc, apic_khz=apic, remainder=rest)
    root = CellConfig(name="arm", signature=bytes(5), revision=0, architecture=Architecture.ARM64,
                      memory_regions=(MemoryRegion(phys_start=0x8000000, virt_start=0x8000000,
                                                   size=0x100000, flags=RW),))
    return SystemConfig(architecture=Architecture.ARM64, x86=x86, root_cell=root)


def test_arm_gic_interceptions() -> None:
    """ARM: the GIC regions from the arch union are checked (GICv2: D, C, H, V)."""
    report = check(_arm_system(2))
    section = report.sections[2]  # no MMCONFIG, no IOMMU: the arch check is third
    assert section.title == T_ARCH.format(arch="arm64")
    assert [f.details.split("\n")[5] for f in section.findings] == [
        "overlaps with GICD", "overlaps with GICC", "overlaps with GICH", "overlaps with GICV"]
    v3 = check(_arm_system(3)).sections[2].findings
    assert [f.details.split("\n")[5] for f in v3] == ["overlaps with GICD", "overlaps with GICR"]
    unknown = check(_arm_system(4))
    assert unknown.error == "RuntimeError: Unknown GIC version: 4" and unknown.exit_status == 1
    assert render_check(unknown).endswith("\nMissing resource interceptions for architecture "
                                          "arm64:")


# --- jhlab's checks --------------------------------------------------------------------------


def test_overlap_between_cells() -> None:
    """tiny-demo and pci-demo both use RAM 0x3ee00000 (alternatives, not co-residents)."""
    report = check(system(), [cell("tiny-demo"), cell("pci-demo")], extra=True)
    found = [f for f in report.findings if f.code == "overlap-between-cells"]
    assert len(found) == 1 and "region 0 of cell 'pci-demo'" in found[0].details


def test_shared_on_purpose_is_not_an_overlap() -> None:
    """ivshmem links and ROOTSHARED memory are shared on purpose."""
    assert "overlap-between-cells" not in codes(system(), cell("ivshmem-demo"),
                                                cell("linux-x86-demo"))
    shared = MemoryRegion(phys_start=0x3F200000, virt_start=0x3F200000, size=0x1000,
                          flags=RW | MemFlags.ROOTSHARED)
    a = with_regions(cell("apic-demo"), shared)
    b = with_regions(cell("tiny-demo"), shared)
    assert "overlap-between-cells" not in codes(system(), a, b)
    plain = replace(shared, flags=RW)
    assert "overlap-between-cells" in codes(system(), with_regions(cell("apic-demo"), plain),
                                            with_regions(cell("tiny-demo"), plain))


@pytest.mark.parametrize(("cpus", "code"), [([0], "cpu0"), ([5], "cpu-not-in-root"),
                                            ([], "no-cpus")])
def test_invalid_cpus(cpus: list[int], code: str) -> None:
    """CPU 0, CPUs the root does not own, and no CPU at all."""
    bad = replace(cell("apic-demo"), cpu_set=cpu_set_from(cpus))
    assert code in codes(system(), bad)


def test_pio_claimed_twice() -> None:
    """Overlapping ranges in one cell, and partial overlaps between cells, are found."""
    extra = PioRegion(base=0x3FC, length=2)
    dup = replace(cell("apic-demo"), pio_regions=(*cell("apic-demo").pio_regions, extra))
    assert "pio-twice-in-cell" in codes(system(), dup)
    wide = replace(cell("tiny-demo"), pio_regions=(PioRegion(base=0xE000, length=0x20),))
    found = [f for f in check(system(), [cell("apic-demo"), wide], extra=True).findings
             if f.code == "pio-twice"]
    assert len(found) == 1 and "0xe010-0xe017" in found[0].details
    # Identical UART windows are shared on purpose, as in Jailhouse's demo sets.
    assert "pio-twice" not in codes(system(), cell("apic-demo"), cell("tiny-demo"))


def test_pci_device_in_two_cells() -> None:
    """The HDA in pci-demo and in a second cell."""
    twin = replace(cell("pci-demo"), name="twin", cpu_set=cpu_set_from([3]),
                   memory_regions=cell("apic-demo").memory_regions)
    found = [f for f in check(system(), [cell("pci-demo"), twin], extra=True).findings
             if f.code == "pci-twice"]
    assert len(found) == 1 and "0000:00:1b.0" in found[0].details


def _ivshmem(**changes: object) -> CellConfig:
    demo = cell("ivshmem-demo")
    return replace(demo, pci_devices=(replace(demo.pci_devices[0], **changes),))


def _ivshmem_regions(index: int, **changes: object) -> CellConfig:
    demo = cell("ivshmem-demo")
    regions = list(demo.memory_regions)
    regions[index] = replace(regions[index], **changes)
    return replace(demo, memory_regions=tuple(regions))


@pytest.mark.parametrize(
    ("bad", "code", "words"),
    [
        (lambda: _ivshmem(shmem_dev_id=0), "ivshmem-id", "both use ID 0"),
        (lambda: _ivshmem(shmem_dev_id=3), "ivshmem-id", "ID 3 with 3 peers"),
        (lambda: _ivshmem(shmem_peers=2), "ivshmem-peers", "says 3 peers"),
        (lambda: _ivshmem(shmem_protocol=0x0001), "ivshmem-protocol", "protocol"),
        (lambda: _ivshmem(num_msix_vectors=17), "ivshmem-msix", "17 MSI-X vectors"),
        (lambda: _ivshmem(shmem_regions_start=3), "ivshmem-regions", "needs memory regions"),
        (lambda: _ivshmem(bdf=0x0180), "ivshmem-bdf", "different BDFs"),
        (lambda: _ivshmem_regions(1, size=0x8000), "ivshmem-regions", "region 1"),
        (lambda: _ivshmem_regions(0, flags=RW | MemFlags.ROOTSHARED), "ivshmem-writable",
         "state table"),
        (lambda: _ivshmem_regions(4, flags=RW | MemFlags.ROOTSHARED), "ivshmem-writable",
         "peer 2"),
    ],
)
def test_ivshmem_links(bad: object, code: str, words: str) -> None:
    """Each way an ivshmem endpoint can disagree with its link is found."""
    found = [f for f in check(system(), [bad()], extra=True).findings  # type: ignore[operator]
             if f.code == code]
    assert found and words in found[0].details, [f.details for f in found]


def test_virtio_front_pairs_with_back() -> None:
    """virtio back-end 0xc002 (root) and front-end 0x8002 (linux) are one link."""
    assert "ivshmem-protocol" not in codes(system(), cell("linux-x86-demo"))
    linux = cell("linux-x86-demo")
    devices = list(linux.pci_devices)
    devices[0] = replace(devices[0], shmem_protocol=0x8003)  # console front on the blk link
    assert "ivshmem-protocol" in codes(system(), replace(linux, pci_devices=tuple(devices)))


@pytest.mark.parametrize("address", [0x80000000, 0x3FF00000])
def test_loadable_outside_root_ram(address: int) -> None:
    """LOADABLE memory outside the root's writable regions (beyond RAM, over ACPI)."""
    demo = cell("apic-demo")
    regions = (replace(demo.memory_regions[0], phys_start=address), demo.memory_regions[1])
    assert "loadable-outside-root" in codes(system(), replace(demo, memory_regions=regions))


def test_comm_region() -> None:
    """x86 cells need their comm region at 0x100000."""
    demo = cell("apic-demo")
    assert "no-comm-region" in codes(system(), replace(demo, memory_regions=(
        demo.memory_regions[0],)))
    moved = replace(demo.memory_regions[1], virt_start=0x200000)
    assert "comm-region-address" in codes(system(), replace(demo, memory_regions=(
        demo.memory_regions[0], moved)))


def test_msix_table_mapped() -> None:
    """A region over the e1000e MSI-X table, and a table too small for its vectors."""
    sys_config = system()
    regions = list(sys_config.root_cell.memory_regions)
    regions[26] = replace(regions[26], phys_start=0xFEA90000, virt_start=0xFEA90000,
                          size=0x4000)
    root = replace(sys_config.root_cell, memory_regions=tuple(regions))
    found = [f for f in check(replace(sys_config, root_cell=root), extra=True).findings
             if f.code == "msix-mapped"]
    assert len(found) == 1 and "maps the MSI-X table of PCI device 00:02.0" in found[0].details
    small = replace(cell("pci-demo"), pci_devices=(PciDevice(
        bdf=0xD8, num_msix_vectors=8, msix_region_size=0x40, msix_address=0xFEBD8000),))
    assert "msix-too-small" in codes(system(), small)


@pytest.mark.parametrize(
    ("region", "words"),
    [
        (MemoryRegion(phys_start=0xFED00000, virt_start=0xFED00000, size=0x100, flags=RW),
         "no access width"),
        (MemoryRegion(phys_start=0xFED00000, virt_start=0xFED00000, size=0x100,
                      flags=RW | MemFlags.EXECUTE | MemFlags.IO_32), "JAILHOUSE_MEM_EXECUTE"),
        (MemoryRegion(phys_start=0xFED00000, virt_start=0xFED00000, size=0x1000,
                      flags=RW | MemFlags.IO_32), "have no effect"),
        (MemoryRegion(phys_start=0xFED00800, virt_start=0xFED00000, size=0x1000, flags=RW),
         "not page-aligned"),
    ],
)
def test_subpage_flags(region: MemoryRegion, words: str) -> None:
    """Sub-page regions need widths and no X/DMA/LOADABLE; page regions no width flags."""
    found = [f for f in check(system(), [with_regions(cell("apic-demo"), region)],
                              extra=True).findings if f.code == "subpage-flags"]
    assert len(found) == 1 and words in found[0].details


def test_good_subpage_region_is_clean() -> None:
    """A proper sub-page MMIO region (widths given) passes."""
    region = MemoryRegion(phys_start=0xFED00000, virt_start=0xFED00000, size=0x400,
                          flags=RW | MemFlags.IO_32 | MemFlags.IO_64)
    assert "subpage-flags" not in codes(system(), with_regions(cell("apic-demo"), region))


def test_flag_and_dump_helpers() -> None:
    """Flag names follow the C macros, unknown bits in hex."""
    assert mem_flag_str(0) == ""
    assert mem_flag_str(0x200 | 1) == "JAILHOUSE_MEM_READ | 0x200"
    assert region_dump(MemoryRegion()).endswith("  flags:      ")


def test_exit_status_on_findings() -> None:
    """The report's exit status is 1 on findings, as the tool's; Jailhouse's own checks let
    this set (cells sharing RAM) through."""
    assert check(system(), [cell("tiny-demo"), cell("pci-demo")]).exit_status == 0
    report = check(system(), [cell("tiny-demo"), cell("pci-demo")], extra=True)
    assert report.exit_status == 1 and not report.ok
