"""Config-set checks; models ``tools/jailhouse-config-check`` (master and next) and extends it.

:func:`check` runs, on a system config plus the non-root cell configs meant to run
together, every check of ``jailhouse config check`` with its titles, in its order:

1. Overlapping memory regions inside cell
2. Overlapping memory regions with hypervisor
3. Missing PCI MMCONFIG interceptions (only with an MMCONFIG base)
4. Missing IOMMU interceptions (only with IOMMU units)
5. Missing resource interceptions for architecture <arch>
6. Root cell CPU starvation (next; with at least one non-root cell)
7. Overlapping cores between non-root cells (next; with at least two non-root cells)

and then jhlab's checks of what the hypervisor and the tool let through (each returns
findings under its own title, printed in the same shape):

* **Overlapping memory regions between non-root cells**: physical overlaps that are not
  shared on purpose. On purpose means: both regions belong to the same ivshmem link
  (memory of ivshmem devices with the same domain and BDF in both cells), or both are
  ROOTSHARED. Comm regions (whose ``phys_start`` is ignored) are skipped.
* **Invalid CPU assignments**: a non-root cell with no CPU, with CPU 0, or with a CPU the
  root cell does not own (``cell create`` fails with -EBUSY).
* **PIO ranges claimed twice**: overlapping ranges inside one cell's whitelist, and ranges of
  two non-root cells that overlap. Identical 8-port, 8-aligned windows (UARTs) are taken
  as shared on purpose, as Jailhouse's own demo cells all whitelist ``0x2f8``, ``0x3f8`` and
  ``0xe010`` and print through the same UART.
* **PCI devices in two cells**: a physical device or bridge (same domain and BDF) listed
  by two non-root cells.
* **Inconsistent ivshmem links**: endpoints of one BDF link that disagree on the number of
  peers, the protocol (virtio front-ends pair with back-ends of the same device), the
  physical windows or their sizes; IDs out of range or taken twice; memory regions
  missing; more than 16 MSI-X vectors; a writable state table or a writable output
  section that is not the endpoint's own; the same shared memory used under two BDFs.
* **Loadable regions outside root RAM**: LOADABLE memory of a non-root cell that the root
  cell's writable regions do not cover (``cell load`` maps it back into the root).
* **Missing communication region**: x86 non-root cells whose comm region is absent or not
  at guest-physical 0x100000 (size 0x1000), where inmates and the Linux loader expect it.
* **MSI-X tables inside mapped memory**: an MSI-X table (``msix_address``,
  ``msix_region_size``) that one of the owning cell's memory regions maps, so guest writes
  would bypass the hypervisor's interception; a table too small for its vectors.
* **Sub-page region flags**: a sub-page region (``virt_start`` or ``size`` not 4K-aligned)
  without any access-width flag (every access would fail), or with EXECUTE, DMA or
  LOADABLE (sub-page regions are MMIO-dispatched, never mapped); width/unaligned flags on
  a page-mapped region, where they have no effect; a page-mapped region whose
  ``phys_start`` is not page-aligned.

:func:`render_check` prints a :class:`CheckReport` exactly as ``jailhouse config check``
does (including its quirk: check 3 does not reset the "found" state of check 2, so after a
hypervisor overlap it prints an empty block instead of ``None``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from .. import abi
from ..abi import (
    Architecture,
    IommuType,
    MemFlags,
    PciDeviceType,
    ShmemProtocol,
)
from ..errors import ConfigError
from .model import (
    CellConfig,
    MemoryRegion,
    PciDevice,
)
from .system import SystemConfig

# Titles, exactly as the tool prints them.
T_INSIDE: Final = "Overlapping memory regions inside cell"
T_HYPERVISOR: Final = "Overlapping memory regions with hypervisor"
T_MMCONFIG: Final = "Missing PCI MMCONFIG interceptions"
T_IOMMU: Final = "Missing IOMMU interceptions"
T_ARCH: Final = "Missing resource interceptions for architecture {arch}"
T_STARVATION: Final = "Root cell CPU starvation"
T_CORES: Final = "Overlapping cores between non-root cells"
# jhlab's checks.
T_BETWEEN: Final = "Overlapping memory regions between non-root cells"
T_CPUS: Final = "Invalid CPU assignments"
T_PIO: Final = "PIO ranges claimed twice"
T_PCI: Final = "PCI devices in two cells"
T_IVSHMEM: Final = "Inconsistent ivshmem links"
T_LOADABLE: Final = "Loadable regions outside root RAM"
T_COMM: Final = "Missing communication region"
T_MSIX: Final = "MSI-X tables inside mapped memory"
T_SUBPAGE: Final = "Sub-page region flags"



@dataclass(frozen=True, kw_only=True, slots=True)
class Finding:
    """One problem found by a check.

    :param title: the check's title (as printed)
    :param cell: the cell the finding is about (``""`` for the set as a whole)
    :param details: the text printed for it, without the blank line before it
    :param code: a short stable identifier of the kind of problem
    """

    title: str
    cell: str
    details: str
    code: str


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckSection:
    """One check as printed: its title, its findings, and whether it is Jailhouse's own.

    :param quirk_found: print an empty block instead of ``None`` even without findings
        (check 3 inherits check 2's "found" state in the tool)
    """

    title: str
    findings: tuple[Finding, ...]
    jailhouse: bool = True
    quirk_found: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckReport:
    """The result of :func:`check`: what was read and what each check found.

    :param arch: architecture label (``x86``)
    :param root: (name, source) of the root cell
    :param cells: (name, source) of each non-root cell, in the order given
    :param sections: the checks in printing order
    """

    arch: str
    root: tuple[str, str]
    cells: tuple[tuple[str, str], ...]
    sections: tuple[CheckSection, ...]

    @property
    def findings(self) -> tuple[Finding, ...]:
        """All findings, in printing order."""
        return tuple(f for section in self.sections for f in section.findings)

    @property
    def ok(self) -> bool:
        """Whether no check found anything."""
        return not any(section.findings for section in self.sections)

    @property
    def exit_status(self) -> int:
        """1 when anything was found, else 0 (as the tool exits)."""
        return 0 if self.ok else 1

    def titles(self) -> tuple[str, ...]:
        """The titles of the checks that ran."""
        return tuple(section.title for section in self.sections)


# --- helpers ----------------------------------------------------------------------------------


def region_dump(region: MemoryRegion) -> str:
    """A region as the tool prints it (four indented lines, C flag names)."""
    return (
        f"  phys_start: 0x{region.phys_start:016x}\n"
        f"  virt_start: 0x{region.virt_start:016x}\n"
        f"  size:       0x{region.size:016x}\n"
        f"  flags:      {mem_flag_str(region.flags)}"
    )


def mem_flag_str(flags: int) -> str:
    """``JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE``; unknown bits as hex, lowest first."""
    names = []
    bit = 1
    while bit <= flags:
        if flags & bit:
            name = MemFlags(bit).name
            names.append(f"JAILHOUSE_MEM_{name}" if name else f"{bit:#x}")
        bit <<= 1
    return " | ".join(names)


def _cpu_list(cpus: Iterable[int]) -> str:
    """Python's ``str(set).strip('{}')`` for a set of small ints: ascending, comma+space."""
    return ", ".join(str(cpu) for cpu in sorted(cpus))


def _overlap(a_start: int, a_size: int, b_start: int, b_size: int) -> bool:
    return bool(a_size and b_size) and a_start < b_start + b_size and b_start < a_start + a_size


def _resource(start: int, size: int) -> MemoryRegion:
    return MemoryRegion(phys_start=start, virt_start=start, size=size, flags=0)


def _region_finding(
    title: str, code: str, cell: CellConfig, index: int, what: str, other: MemoryRegion
) -> Finding:
    details = (
        f"In cell '{cell.name}', region {index}\n{region_dump(cell.memory_regions[index])}\n"
        f"{what}\n{region_dump(other)}"
    )
    return Finding(title=title, cell=cell.name, details=details, code=code)


def _plain(title: str, code: str, cell: str, text: str) -> Finding:
    return Finding(title=title, cell=cell, details=text, code=code)


def _arm_gic_resources(system: SystemConfig) -> list[tuple[str, int, int]]:
    """The GIC regions of an ARM system config (the ARM view of the arch union)."""
    raw = system.x86.to_bytes()
    version = raw[1]
    bases = [int.from_bytes(raw[4 + 8 * i:12 + 8 * i], "little") for i in range(5)]
    gicd, gicc, gich, gicv, gicr = bases
    if version == 2:
        return [("GICD", gicd, 0x1000), ("GICC", gicc, 0x2000), ("GICH", gich, 0x2000),
                ("GICV", gicv, 0x2000)]
    if version == 3:
        return [("GICD", gicd, 0x10000), ("GICR", gicr, 0x20000)]
    raise ConfigError(f"Unknown GIC version: {version}", field="platform_info.arm.gic_version")


# --- Jailhouse's checks -----------------------------------------------------------------------


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


def _check_inside(cells: Sequence[CellConfig]) -> list[Finding]:
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


def _check_against(
    cells: Sequence[CellConfig], title: str, code: str,
    resources: Sequence[tuple[str, MemoryRegion]],
) -> list[Finding]:
    findings = []
    spans = [(what, res.phys_start, res.phys_start + res.size) for what, res in resources
             if res.size]
    targets = dict(resources)
    for cell in cells:
        for index, region in enumerate(cell.memory_regions):
            size = region.size
            if not size:
                continue
            start = region.phys_start
            end = start + size
            for what, res_start, res_end in spans:
                if start < res_end and res_start < end:
                    findings.append(
                        _region_finding(title, code, cell, index, what, targets[what]))
    return findings


def _check_starvation(root: CellConfig, others: Sequence[CellConfig]) -> list[Finding]:
    remaining = set(root.cpus)
    for cell in others:
        remaining -= cell.cpus
    if remaining:
        return []
    return [_plain(T_STARVATION, "root-starved", root.name,
                   "No root cell CPUs left when all non-root cells are started")]


def _check_cores(others: Sequence[CellConfig]) -> list[Finding]:
    findings = []
    for i, cell in enumerate(others):
        for other in others[i + 1:]:
            shared = cell.cpus & other.cpus
            if shared:
                findings.append(_plain(
                    T_CORES, "shared-cpus", cell.name,
                    f"Cells '{cell.name}' and '{other.name}' share CPUs:\n{_cpu_list(shared)}",
                ))
    return findings


# --- jhlab's checks ---------------------------------------------------------------------------


def _link_regions(cell: CellConfig) -> dict[int, tuple[int, int]]:
    """Region index -> (domain, bdf) of the ivshmem link whose memory it is."""
    owner: dict[int, tuple[int, int]] = {}
    for device in cell.pci_devices:
        if device.type != PciDeviceType.IVSHMEM:
            continue
        start = device.shmem_regions_start
        for index in range(start, min(start + 2 + device.shmem_peers, len(cell.memory_regions))):
            owner[index] = (device.domain, device.bdf)
    return owner


def _check_between(others: Sequence[CellConfig]) -> list[Finding]:
    findings = []
    links = [_link_regions(cell) for cell in others]
    for a in range(len(others)):
        for b in range(a + 1, len(others)):
            cell_a, cell_b = others[a], others[b]
            for i, ra in enumerate(cell_a.memory_regions):
                if not ra.size or ra.is_comm_region:
                    continue
                for j, rb in enumerate(cell_b.memory_regions):
                    if not rb.size or rb.is_comm_region or not ra.phys_overlaps(rb):
                        continue
                    link = links[a].get(i)
                    if link is not None and link == links[b].get(j):
                        continue
                    if ra.flags & rb.flags & MemFlags.ROOTSHARED:
                        continue
                    findings.append(_region_finding(
                        T_BETWEEN, "overlap-between-cells", cell_a, i,
                        f"physically overlaps with region {j} of cell '{cell_b.name}'", rb,
                    ))
    return findings


def _check_cpus(root: CellConfig, others: Sequence[CellConfig]) -> list[Finding]:
    findings = []
    for cell in others:
        cpus = cell.cpus
        if not cpus:
            findings.append(_plain(T_CPUS, "no-cpus", cell.name,
                                   f"Cell '{cell.name}' has no CPU"))
            continue
        if 0 in cpus:
            findings.append(_plain(
                T_CPUS, "cpu0", cell.name,
                f"Cell '{cell.name}' takes CPU 0, the root's boot CPU, which Linux cannot hand over",
            ))
        foreign = cpus - root.cpus
        if foreign:
            findings.append(_plain(
                T_CPUS, "cpu-not-in-root", cell.name,
                f"Cell '{cell.name}' uses CPUs the root cell does not own:\n{_cpu_list(foreign)}",
            ))
    return findings


def _pio_str(base: int, length: int) -> str:
    return f"{base:#x}-{base + length - 1:#x}" if length else f"{base:#x} (empty)"


def _check_pio(cells: Sequence[CellConfig], others: Sequence[CellConfig]) -> list[Finding]:
    findings = []
    for cell in cells:
        pios = cell.pio_regions
        for i in range(len(pios)):
            for j in range(i + 1, len(pios)):
                if pios[i].overlaps(pios[j]):
                    findings.append(_plain(
                        T_PIO, "pio-twice-in-cell", cell.name,
                        f"In cell '{cell.name}', PIO range {i} "
                        f"({_pio_str(pios[i].base, pios[i].length)}) overlaps with range {j} "
                        f"({_pio_str(pios[j].base, pios[j].length)})",
                    ))
    for a in range(len(others)):
        for b in range(a + 1, len(others)):
            for i, pa in enumerate(others[a].pio_regions):
                for j, pb in enumerate(others[b].pio_regions):
                    if not pa.overlaps(pb):
                        continue
                    if pa == pb and pa.length == 8 and pa.base % 8 == 0:
                        continue  # the same UART, shared on purpose (see module docs)
                    findings.append(_plain(
                        T_PIO, "pio-twice", others[a].name,
                        f"Cells '{others[a].name}' and '{others[b].name}' both claim ports: "
                        f"range {i} ({_pio_str(pa.base, pa.length)}) and range {j} "
                        f"({_pio_str(pb.base, pb.length)})",
                    ))
    return findings


def _check_pci(others: Sequence[CellConfig]) -> list[Finding]:
    findings = []
    seen: dict[tuple[int, int], str] = {}
    for cell in others:
        for device in cell.pci_devices:
            if device.type == PciDeviceType.IVSHMEM:
                continue
            key = (device.domain, device.bdf)
            if key in seen and seen[key] != cell.name:
                findings.append(_plain(
                    T_PCI, "pci-twice", cell.name,
                    f"PCI device {device.domain:04x}:{device.bdf_str} is in cells "
                    f"'{seen[key]}' and '{cell.name}'",
                ))
            else:
                seen.setdefault(key, cell.name)
    return findings


def _virtio_peer(a: int, b: int) -> bool:
    """Whether two protocols may share a link: equal, or virtio front+back of one device."""
    if a == b:
        return True
    front, back = ShmemProtocol.VIRTIO_FRONT, ShmemProtocol.VIRTIO_BACK
    low, high = sorted((a, b))
    return front <= low < back <= high and high - back == low - front


def _check_ivshmem(cells: Sequence[CellConfig]) -> list[Finding]:
    findings: list[Finding] = []

    def add(cell: str, code: str, text: str) -> None:
        findings.append(_plain(T_IVSHMEM, code, cell, text))

    links: dict[tuple[int, int], list[tuple[CellConfig, PciDevice]]] = {}
    by_table: dict[int, set[tuple[int, int]]] = {}
    for cell in cells:
        for device in cell.pci_devices:
            if device.type != PciDeviceType.IVSHMEM:
                continue
            name = f"cell '{cell.name}', ivshmem {device.bdf_str}"
            if device.num_msix_vectors > abi.IVSHMEM_MSIX_VECTORS:
                add(cell.name, "ivshmem-msix",
                    f"In {name}: {device.num_msix_vectors} MSI-X vectors, at most "
                    f"{abi.IVSHMEM_MSIX_VECTORS}")
            if device.shmem_dev_id >= min(device.shmem_peers, abi.IVSHMEM_MAX_PEERS) or (
                device.shmem_peers > abi.IVSHMEM_MAX_PEERS
            ):
                add(cell.name, "ivshmem-id",
                    f"In {name}: ID {device.shmem_dev_id} with {device.shmem_peers} peers "
                    f"(IDs must be below the peer count and {abi.IVSHMEM_MAX_PEERS})")
            end = device.shmem_regions_start + 2 + device.shmem_peers
            if end > len(cell.memory_regions):
                add(cell.name, "ivshmem-regions",
                    f"In {name}: needs memory regions {device.shmem_regions_start}..{end - 1}, "
                    f"the cell has {len(cell.memory_regions)}")
                continue
            regions = cell.memory_regions[device.shmem_regions_start:end]
            if regions[0].flags & MemFlags.WRITE:
                add(cell.name, "ivshmem-writable",
                    f"In {name}: the state table (region {device.shmem_regions_start}) "
                    "is writable")
            for peer, region in enumerate(regions[2:]):
                if peer != device.shmem_dev_id and region.flags & MemFlags.WRITE:
                    add(cell.name, "ivshmem-writable",
                        f"In {name}: the output section of peer {peer} (region "
                        f"{device.shmem_regions_start + 2 + peer}) is writable; only the "
                        f"own section (peer {device.shmem_dev_id}) may be")
            links.setdefault((device.domain, device.bdf), []).append((cell, device))
            if regions[0].size:
                by_table.setdefault(regions[0].phys_start, set()).add(
                    (device.domain, device.bdf))
    for (domain, _bdf), ends in links.items():
        first_cell, first = ends[0]
        ids: dict[int, str] = {}
        for cell, device in ends:
            where = f"ivshmem link {domain:04x}:{device.bdf_str}"
            if device.shmem_dev_id in ids and ids[device.shmem_dev_id] != cell.name:
                add(cell.name, "ivshmem-id",
                    f"On {where}: cells '{ids[device.shmem_dev_id]}' and '{cell.name}' both "
                    f"use ID {device.shmem_dev_id}")
            ids.setdefault(device.shmem_dev_id, cell.name)
            if device is first:
                continue
            if device.shmem_peers != first.shmem_peers:
                add(cell.name, "ivshmem-peers",
                    f"On {where}: cell '{first_cell.name}' says {first.shmem_peers} peers, "
                    f"cell '{cell.name}' {device.shmem_peers}")
                continue
            if not _virtio_peer(first.shmem_protocol, device.shmem_protocol):
                add(cell.name, "ivshmem-protocol",
                    f"On {where}: protocol {first.shmem_protocol:#06x} in cell "
                    f"'{first_cell.name}', {device.shmem_protocol:#06x} in cell '{cell.name}'")
            mine = cell.shmem_regions_of(device)
            theirs = first_cell.shmem_regions_of(first)
            for index, (ra, rb) in enumerate(zip(theirs, mine, strict=True)):
                if (ra.phys_start, ra.size) != (rb.phys_start, rb.size):
                    add(cell.name, "ivshmem-regions",
                        f"On {where}: shared-memory region {index} is "
                        f"{ra.phys_start:#x}/{ra.size:#x} in cell '{first_cell.name}', "
                        f"{rb.phys_start:#x}/{rb.size:#x} in cell '{cell.name}'")
    for table, keys in by_table.items():
        if len(keys) > 1:
            names = ", ".join(f"{d:04x}:{b >> 8:02x}:{(b >> 3) & 0x1f:02x}.{b & 7}"
                              for d, b in sorted(keys))
            add("", "ivshmem-bdf",
                f"The shared memory at {table:#x} is used by ivshmem devices with different "
                f"BDFs: {names}")
    return findings


def _covered(start: int, size: int, spans: Sequence[tuple[int, int]]) -> bool:
    """Whether [start, start+size) is covered by the union of the (start, end) spans."""
    position, end = start, start + size
    for span_start, span_end in sorted(spans):
        if span_start > position:
            break
        position = max(position, span_end)
        if position >= end:
            return True
    return position >= end


def _check_loadable(root: CellConfig, others: Sequence[CellConfig]) -> list[Finding]:
    want = MemFlags.READ | MemFlags.WRITE
    spans = [
        (r.phys_start, r.phys_end) for r in root.memory_regions
        if r.size and r.flags & want == want and not r.is_comm_region
    ]
    findings = []
    for cell in others:
        for index, region in enumerate(cell.memory_regions):
            if region.flags & MemFlags.LOADABLE and region.size and not _covered(
                region.phys_start, region.size, spans
            ):
                findings.append(Finding(
                    title=T_LOADABLE, cell=cell.name, code="loadable-outside-root",
                    details=f"In cell '{cell.name}', region {index}\n{region_dump(region)}\n"
                    f"is not covered by writable memory of the root cell '{root.name}'",
                ))
    return findings


def _check_comm(others: Sequence[CellConfig]) -> list[Finding]:
    findings = []
    for cell in others:
        if cell.architecture != Architecture.X86:
            continue
        comm = [(i, r) for i, r in enumerate(cell.memory_regions) if r.is_comm_region]
        if not comm:
            findings.append(_plain(T_COMM, "no-comm-region", cell.name,
                                   f"Cell '{cell.name}' has no communication region"))
            continue
        for index, region in comm:
            if (region.virt_start, region.size) != (abi.COMM_REGION_BASE, abi.PAGE_SIZE):
                findings.append(Finding(
                    title=T_COMM, cell=cell.name, code="comm-region-address",
                    details=f"In cell '{cell.name}', region {index}\n{region_dump(region)}\n"
                    f"is not at {abi.COMM_REGION_BASE:#x} with size {abi.PAGE_SIZE:#x}",
                ))
    return findings


def _check_msix(cells: Sequence[CellConfig]) -> list[Finding]:
    findings = []
    for cell in cells:
        for device in cell.pci_devices:
            if device.type == PciDeviceType.IVSHMEM or not device.msix_address:
                continue
            table = _resource(device.msix_address, device.msix_region_size)
            if device.num_msix_vectors * 16 > device.msix_region_size:
                findings.append(_plain(
                    T_MSIX, "msix-too-small", cell.name,
                    f"In cell '{cell.name}', PCI device {device.bdf_str}: "
                    f"{device.num_msix_vectors} MSI-X vectors need "
                    f"{device.num_msix_vectors * 16:#x} bytes, msix_region_size is "
                    f"{device.msix_region_size:#x}",
                ))
            for index, region in enumerate(cell.memory_regions):
                if region.phys_overlaps(table):
                    findings.append(_region_finding(
                        T_MSIX, "msix-mapped", cell, index,
                        f"maps the MSI-X table of PCI device {device.bdf_str}", table,
                    ))
    return findings


_WIDTHS: Final = int(MemFlags.IO_8 | MemFlags.IO_16 | MemFlags.IO_32 | MemFlags.IO_64)
_UNALIGNED: Final = int(MemFlags.IO_UNALIGNED)
_NOT_MMIO: Final = int(MemFlags.EXECUTE | MemFlags.DMA | MemFlags.LOADABLE)
_COMM: Final = int(MemFlags.COMM_REGION)


def _check_subpage(cells: Sequence[CellConfig]) -> list[Finding]:
    findings = []
    for cell in cells:
        for index, region in enumerate(cell.memory_regions):
            flags = region.flags
            if not region.size or flags & _COMM:
                continue
            problems = []
            if (region.virt_start | region.size) & (abi.PAGE_SIZE - 1):
                if not flags & _WIDTHS:
                    problems.append("is sub-page but allows no access width (IO_8..IO_64)")
                if flags & _NOT_MMIO:
                    problems.append(f"is sub-page (MMIO-dispatched) but has "
                                    f"{mem_flag_str(flags & _NOT_MMIO)}")
            else:
                extra = flags & (_WIDTHS | _UNALIGNED)
                if extra:
                    problems.append(f"is page-mapped, so {mem_flag_str(extra)} have no effect")
                if region.phys_start % abi.PAGE_SIZE:
                    problems.append("is page-mapped but phys_start is not page-aligned")
            for problem in problems:
                findings.append(Finding(
                    title=T_SUBPAGE, cell=cell.name, code="subpage-flags",
                    details=f"In cell '{cell.name}', region {index}\n{region_dump(region)}\n"
                    f"{problem}",
                ))
    return findings


# --- entry points -----------------------------------------------------------------------------


def check(
    system: SystemConfig,
    cells: Sequence[CellConfig] = (),
    *,
    sources: Sequence[str] | None = None,
    system_source: str = "<system>",
    next_checks: bool = True,
    extra: bool = True,
) -> CheckReport:
    """Check a system config and the non-root cells meant to run together.

    :param system: the system config (its root cell is the first cell checked)
    :param cells: the non-root cell configs
    :param sources: file names of ``cells``, for the report (default: ``<cell N>``)
    :param system_source: file name of the system config, for the report
    :param next_checks: include the two CPU checks of Jailhouse's next branch
    :param extra: include jhlab's checks after Jailhouse's
    :return: the report (:attr:`CheckReport.exit_status` is 1 on findings)
    :raise ConfigError: on a cell whose architecture differs from the system's (the tool
        stops with ``Cell architecture mismatch``), or an ARM GIC version it cannot check
    """
    names = list(sources) if sources is not None else [f"<cell {i}>" for i in range(len(cells))]
    if len(names) != len(cells):
        raise ValueError("sources must name every cell")
    arch = Architecture(system.architecture).label if system.architecture in Architecture._value2member_map_ \
        else str(system.architecture)
    for cell, source in zip(cells, names, strict=True):
        if cell.architecture != system.architecture:
            label = Architecture(cell.architecture).label if cell.architecture in \
                Architecture._value2member_map_ else str(cell.architecture)
            raise ConfigError(f"Cell architecture mismatch: {label}", source=source)
    root = system.root_cell
    others = list(cells)
    everyone = [root, *others]

    sections = [CheckSection(title=T_INSIDE, findings=tuple(_check_inside(everyone)))]
    hv_found = _check_against(
        everyone, T_HYPERVISOR, "overlap-hypervisor",
        [("overlaps with hypervisor memory region", system.hypervisor_memory)],
    )
    sections.append(CheckSection(title=T_HYPERVISOR, findings=tuple(hv_found)))
    if system.pci_mmconfig_base > 0:
        mmcfg = _resource(system.pci_mmconfig_base, system.mmconfig_size)
        found = _check_against(everyone, T_MMCONFIG, "mmconfig-mapped",
                               [("overlaps with MMCONFIG", mmcfg)])
        sections.append(CheckSection(title=T_MMCONFIG, findings=tuple(found),
                                     quirk_found=bool(hv_found)))
    units = system.active_iommu_units
    if units:
        found = _check_against(
            everyone, T_IOMMU, "iommu-mapped",
            [(f"overlaps with IOMMU {i}", _resource(u.base, u.size))
             for i, u in enumerate(units) if u.type != IommuType.UNUSED],
        )
        sections.append(CheckSection(title=T_IOMMU, findings=tuple(found)))
    title = T_ARCH.format(arch=arch)
    if system.architecture == Architecture.X86:
        resources = [("overlaps with xAPIC", _resource(abi.XAPIC_BASE, abi.PAGE_SIZE))]
        resources += [("overlaps with IOAPIC", _resource(chip.address, abi.PAGE_SIZE))
                      for chip in root.irqchips]
    else:
        resources = [(f"overlaps with {name}", _resource(base, size))
                     for name, base, size in _arm_gic_resources(system)]
    sections.append(CheckSection(
        title=title, findings=tuple(_check_against(everyone, title, "arch-mapped", resources))))
    if next_checks and others:
        sections.append(CheckSection(title=T_STARVATION,
                                     findings=tuple(_check_starvation(root, others))))
    if next_checks and len(others) > 1:
        sections.append(CheckSection(title=T_CORES, findings=tuple(_check_cores(others))))
    if extra:
        for extra_title, found in (
            (T_BETWEEN, _check_between(others)),
            (T_CPUS, _check_cpus(root, others)),
            (T_PIO, _check_pio(everyone, others)),
            (T_PCI, _check_pci(others)),
            (T_IVSHMEM, _check_ivshmem(everyone)),
            (T_LOADABLE, _check_loadable(root, others)),
            (T_COMM, _check_comm(others)),
            (T_MSIX, _check_msix(everyone)),
            (T_SUBPAGE, _check_subpage(everyone)),
        ):
            sections.append(CheckSection(title=extra_title, findings=tuple(found),
                                         jailhouse=False))
    return CheckReport(
        arch=arch,
        root=(root.name, system_source),
        cells=tuple((cell.name, source) for cell, source in zip(cells, names, strict=True)),
        sections=tuple(sections),
    )


def render_check(report: CheckReport, *, jailhouse_only: bool = False) -> str:
    """The text ``jailhouse config check`` prints for this report (jhlab's checks follow).

    :param report: from :func:`check`
    :param jailhouse_only: leave out jhlab's own checks (output identical to the tool's)
    """
    out = ["Reading configuration set:\n", f"  Architecture:  {report.arch}\n",
           f"  Root cell:     {report.root[0]} ({report.root[1]})\n"]
    out += [f"  Non-root cell: {name} ({source})\n" for name, source in report.cells]
    for section in report.sections:
        if jailhouse_only and not section.jailhouse:
            continue
        out.append(f"{section.title}:")
        for finding in section.findings:
            out.append("\n\n" + finding.details)
        out.append("\n\n" if section.findings or section.quirk_found else " None\n")
    return "".join(out)
