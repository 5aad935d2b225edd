"""Config-set checks; models ``tools/jailhouse-config-check`` (master ``e57d1eff``, and next).

:func:`check_set` runs, on a config set as the tool reads it (:mod:`.checkset`), the
checks of ``jailhouse config check`` with their titles, in their order:

1. Overlapping memory regions inside cell: every pair of regions of one cell (root cell
   first) that overlaps physically and/or virtually;
2. Overlapping memory regions with hypervisor;
3. Missing PCI MMCONFIG interceptions (only with an MMCONFIG base): regions over
   ``[base, base + (end_bus + 1) * 1 MiB)``;
4. Missing IOMMU interceptions (only with IOMMU units);
5. Missing resource interceptions for architecture <arch>: on x86 the xAPIC page and the
   page of every irqchip of the root cell, on ARM the GIC (v2: GICD, GICC, GICH, GICV;
   v3: GICD, GICR; another version ends the tool with an exception after the title).

Zero-size regions never overlap. Each finding names the cell and the region's index and
prints both regions (:func:`.checkset.region_dump`); a resource prints as a region with its
address as ``phys_start`` and ``virt_start`` and no flags.

With ``next_checks``, the two CPU checks of Jailhouse's next branch follow (they are not
in the anchored revision): *Root cell CPU starvation* (with at least one non-root cell:
the non-root cells take every CPU of the root cell) and *Overlapping cores between
non-root cells* (with at least two: the shared CPUs as Python prints a set).

:func:`check` does the same for model objects (read from their binary form, as the tool
would read the files) and, with ``extra``, appends jhlab's checks (:mod:`.jhlab_checks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Final

from .. import abi
from .checkset import SetCell, SetSystem, read_set, region_dump
from .jhlab_checks import jhlab_sections
from .model import CellConfig, MemoryRegion
from .report import NEXT, CheckReport, CheckSection, Finding
from .system import SystemConfig

# Titles, exactly as the tool prints them.
T_INSIDE: Final = "Overlapping memory regions inside cell"
T_HYPERVISOR: Final = "Overlapping memory regions with hypervisor"
T_MMCONFIG: Final = "Missing PCI MMCONFIG interceptions"
T_IOMMU: Final = "Missing IOMMU interceptions"
T_ARCH: Final = "Missing resource interceptions for architecture {arch}"
T_STARVATION: Final = "Root cell CPU starvation"
T_CORES: Final = "Overlapping cores between non-root cells"

#: The xAPIC page the tool requires to be intercepted on x86 (its own literal).
XAPIC_PAGE: Final = (abi.XAPIC_BASE, abi.PAGE_SIZE)
#: Size of the irqchip (IOAPIC) page the tool checks at each root irqchip address.
IRQCHIP_PAGE_SIZE: Final = abi.PAGE_SIZE
#: GIC regions per GIC version: (name, index into :attr:`SetSystem.gic_bases`, size).
GIC_RESOURCES: Final = {
    2: (("GICD", 0, 0x1000), ("GICC", 1, 0x2000), ("GICH", 2, 0x2000), ("GICV", 3, 0x2000)),
    3: (("GICD", 0, 0x10000), ("GICR", 4, 0x20000)),
}
STARVED: Final = "No root cell CPUs left when all non-root cells are started"


def _resource(start: int, size: int) -> MemoryRegion:
    """``ResourceRegion``: a region at ``start`` (physical and virtual), no flags."""
    return MemoryRegion(phys_start=start, virt_start=start, size=size, flags=0)


def _region_finding(title: str, code: str, cell: SetCell, index: int, what: str,
                    other: MemoryRegion) -> Finding:
    details = (
        f"In cell '{cell.name}', region {index}\n{region_dump(cell.memory_regions[index])}\n"
        f"{what}\n{region_dump(other)}"
    )
    return Finding(title=title, cell=cell.name, details=details, code=code)


def _overlapping_pairs(spans: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
    """Index pairs (i < j) of non-empty (start, size) spans that intersect (sort and sweep)."""
    order = sorted((start, start + size, index) for index, (start, size) in enumerate(spans)
                   if size)
    pairs: set[tuple[int, int]] = set()
    active: list[tuple[int, int]] = []
    for start, end, index in order:
        active = [(e, j) for e, j in active if e > start]
        for _end, j in active:
            pairs.add((j, index) if j < index else (index, j))
        active.append((end, index))
    return pairs


def _check_inside(cells: Sequence[SetCell]) -> list[Finding]:
    findings = []
    for cell in cells:
        regions = cell.memory_regions
        phys = _overlapping_pairs([(r.phys_start, r.size) for r in regions])
        virt = _overlapping_pairs([(r.virt_start, r.size) for r in regions])
        for i, j in sorted(phys | virt):
            hits = (("physically", (i, j) in phys), ("virtually", (i, j) in virt))
            what = " and ".join(word for word, hit in hits if hit)
            findings.append(_region_finding(
                T_INSIDE, "overlap-in-cell", cell, i, f"{what} overlaps with region {j}",
                regions[j],
            ))
    return findings


def _check_against(cells: Sequence[SetCell], title: str, code: str,
                   resources: Sequence[tuple[str, MemoryRegion]]) -> list[Finding]:
    """Regions physically overlapping a resource: per cell, per region, per resource."""
    findings = []
    for cell in cells:
        for index, region in enumerate(cell.memory_regions):
            for what, resource in resources:
                if region.phys_overlaps(resource):
                    findings.append(_region_finding(title, code, cell, index, what, resource))
    return findings


def _arch_resources(system: SetSystem) -> tuple[list[tuple[str, MemoryRegion]], str]:
    """The resources of check 5, or the exception that ends the tool instead."""
    if system.arch == "x86":
        resources = [("overlaps with xAPIC", _resource(*XAPIC_PAGE))]
        resources += [("overlaps with IOAPIC", _resource(address, IRQCHIP_PAGE_SIZE))
                      for address in system.root.irqchip_addresses]
        return resources, ""
    gic = GIC_RESOURCES.get(system.gic_version)
    if gic is None:
        return [], f"RuntimeError: Unknown GIC version: {system.gic_version}"
    return [(f"overlaps with {name}", _resource(system.gic_bases[index], size))
            for name, index, size in gic], ""


def _check_starvation(root: SetCell, others: Sequence[SetCell]) -> list[Finding]:
    remaining = root.cpus
    for cell in others:
        remaining -= cell.cpus
    if remaining:
        return []
    return [Finding(title=T_STARVATION, cell=root.name, details=STARVED, code="root-starved")]


def _check_cores(others: Sequence[SetCell]) -> list[Finding]:
    findings = []
    for i, cell in enumerate(others):
        for other in others[i + 1:]:
            shared = cell.cpus & other.cpus
            if shared:
                # str() of the set, as the tool prints it (CPython's order, not sorted)
                findings.append(Finding(
                    title=T_CORES, cell=cell.name, code="shared-cpus",
                    details=f"Cells '{cell.name}' and '{other.name}' share CPUs:\n"
                    f"{str(shared).strip('{}')}",
                ))
    return findings


def check_set(
    system: SetSystem,
    cells: Sequence[SetCell] = (),
    *,
    sources: Sequence[str] | None = None,
    system_source: str = "<system>",
    next_checks: bool = False,
) -> CheckReport:
    """Run the checks of ``jailhouse config check`` on a config set as the tool reads it.

    :param system: the system config (its root cell is the first cell checked)
    :param cells: the non-root cells, of the system's architecture
        (:func:`.checkset.read_cell` with ``arch``)
    :param sources: file names of ``cells``, for the report (default: ``<cell N>``)
    :param system_source: file name of the system config, for the report
    :param next_checks: add the two CPU checks of Jailhouse's next branch (the cells must
        have been read with their CPU sets)
    :return: the report (:attr:`.CheckReport.exit_status` is 1 on findings)
    """
    names = list(sources) if sources is not None else [f"<cell {i}>" for i in range(len(cells))]
    if len(names) != len(cells):
        raise ValueError("sources must name every cell")
    root = system.root
    everyone = [root, *cells]
    sections = [CheckSection(title=T_INSIDE, findings=tuple(_check_inside(everyone)))]
    hypervisor = _check_against(everyone, T_HYPERVISOR, "overlap-hypervisor", [
        ("overlaps with hypervisor memory region", system.hypervisor_memory)])
    sections.append(CheckSection(title=T_HYPERVISOR, findings=tuple(hypervisor)))
    if system.pci_mmconfig_base > 0:
        mmconfig = _resource(system.pci_mmconfig_base, system.mmconfig_size)
        found = _check_against(everyone, T_MMCONFIG, "mmconfig-mapped",
                               [("overlaps with MMCONFIG", mmconfig)])
        sections.append(CheckSection(title=T_MMCONFIG, findings=tuple(found),
                                     quirk_found=bool(hypervisor)))
    if system.iommus:
        found = _check_against(everyone, T_IOMMU, "iommu-mapped", [
            ("overlaps with IOMMU", _resource(base, size)) for _kind, base, size in system.iommus])
        sections.append(CheckSection(title=T_IOMMU, findings=tuple(found)))
    title = T_ARCH.format(arch=system.arch)
    resources, error = _arch_resources(system)
    sections.append(CheckSection(
        title=title, findings=tuple(_check_against(everyone, title, "arch-mapped", resources)),
        error=error))
    if next_checks and cells and not error:
        sections.append(CheckSection(title=T_STARVATION, origin=NEXT,
                                     findings=tuple(_check_starvation(root, cells))))
    if next_checks and len(cells) > 1 and not error:
        sections.append(CheckSection(title=T_CORES, origin=NEXT,
                                     findings=tuple(_check_cores(cells))))
    return CheckReport(
        arch=system.arch,
        root=(root.name, system_source),
        cells=tuple((cell.name, source) for cell, source in zip(cells, names, strict=True)),
        sections=tuple(sections),
    )


def check(
    system: SystemConfig,
    cells: Sequence[CellConfig] = (),
    *,
    sources: Sequence[str] | None = None,
    system_source: str = "<system>",
    next_checks: bool = False,
    extra: bool = False,
) -> CheckReport:
    """Check a system config and the non-root cells meant to run together.

    By default this is exactly what ``jailhouse config check`` says about the binary form
    of these configs.

    :param system: the system config
    :param cells: the non-root cell configs
    :param sources: file names of ``cells``, for the report (default: ``<cell N>``)
    :param system_source: file name of the system config, for the report
    :param next_checks: add the two CPU checks of Jailhouse's next branch
    :param extra: add jhlab's checks after Jailhouse's (:mod:`.jhlab_checks`)
    :return: the report (:attr:`.CheckReport.exit_status` is 1 on findings)
    :raise SetReadError: on configs the tool refuses to read (another revision or signature
        of a non-root cell, a cell of another architecture than the system: ``Cell
        architecture mismatch``, ...); its ``source`` is the file name of the config
    """
    set_system, set_cells = read_set(system, cells, cpu_set=next_checks,
                                     sources=sources, system_source=system_source)
    report = check_set(set_system, set_cells, sources=sources, system_source=system_source,
                       next_checks=next_checks)
    if extra and not report.error:
        report = replace(report, sections=report.sections + tuple(jhlab_sections(system, cells)))
    return report
