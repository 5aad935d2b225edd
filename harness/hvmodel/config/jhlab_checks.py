"""jhlab's config-set checks: what the hypervisor and ``jailhouse config check`` let through.

These run after Jailhouse's checks only when asked for (``jhlab config check --jhlab``,
:func:`.check.check` with ``extra``); each returns its findings under its own title,
printed in the same shape as Jailhouse's (:mod:`.report`):

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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from ..abi import (
    COMM_PAGE_SIZE,
    COMM_REGION_BASE,
    IVSHMEM_MAX_PEERS,
    IVSHMEM_MSIX_VECTORS,
    MEM_IO_WIDTHS,
    PAGE_SIZE,
    Architecture,
    MemFlags,
    PciDeviceType,
    ShmemProtocol,
)
from .checkset import mem_flag_str, region_dump
from .model import CellConfig, MemoryRegion, PciDevice
from .report import JHLAB, CheckSection, Finding
from .system import SystemConfig

T_BETWEEN: Final = "Overlapping memory regions between non-root cells"
T_CPUS: Final = "Invalid CPU assignments"
T_PIO: Final = "PIO ranges claimed twice"
T_PCI: Final = "PCI devices in two cells"
T_IVSHMEM: Final = "Inconsistent ivshmem links"
T_LOADABLE: Final = "Loadable regions outside root RAM"
T_COMM: Final = "Missing communication region"
T_MSIX: Final = "MSI-X tables inside mapped memory"
T_SUBPAGE: Final = "Sub-page region flags"



def _cpu_list(cpus: Iterable[int]) -> str:
    """CPU numbers, ascending, comma and space."""
    return ", ".join(str(cpu) for cpu in sorted(cpus))


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
            if device.num_msix_vectors > IVSHMEM_MSIX_VECTORS:
                add(cell.name, "ivshmem-msix",
                    f"In {name}: {device.num_msix_vectors} MSI-X vectors, at most "
                    f"{IVSHMEM_MSIX_VECTORS}")
            if device.shmem_dev_id >= min(device.shmem_peers, IVSHMEM_MAX_PEERS) or (
                device.shmem_peers > IVSHMEM_MAX_PEERS
            ):
                add(cell.name, "ivshmem-id",
                    f"In {name}: ID {device.shmem_dev_id} with {device.shmem_peers} peers "
                    f"(IDs must be below the peer count and {IVSHMEM_MAX_PEERS})")
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
            if (region.virt_start, region.size) != (COMM_REGION_BASE, COMM_PAGE_SIZE):
                findings.append(Finding(
                    title=T_COMM, cell=cell.name, code="comm-region-address",
                    details=f"In cell '{cell.name}', region {index}\n{region_dump(region)}\n"
                    f"is not at {COMM_REGION_BASE:#x} with size {COMM_PAGE_SIZE:#x}",
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


_WIDTHS: Final = int(MEM_IO_WIDTHS)
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
            if region.is_subpage:
                if not flags & _WIDTHS:
                    problems.append("is sub-page but allows no access width (IO_8..IO_64)")
                if flags & _NOT_MMIO:
                    problems.append(f"is sub-page (MMIO-dispatched) but has "
                                    f"{mem_flag_str(flags & _NOT_MMIO)}")
            else:
                extra = flags & (_WIDTHS | _UNALIGNED)
                if extra:
                    problems.append(f"is page-mapped, so {mem_flag_str(extra)} have no effect")
                if region.phys_start % PAGE_SIZE:
                    problems.append("is page-mapped but phys_start is not page-aligned")
            for problem in problems:
                findings.append(Finding(
                    title=T_SUBPAGE, cell=cell.name, code="subpage-flags",
                    details=f"In cell '{cell.name}', region {index}\n{region_dump(region)}\n"
                    f"{problem}",
                ))
    return findings



def jhlab_sections(system: SystemConfig, cells: Sequence[CellConfig]) -> list[CheckSection]:
    """jhlab's checks of a system config and the non-root cells meant to run with it.

    :return: one section per check, in the order of the module documentation
    """
    root = system.root_cell
    others = list(cells)
    everyone = [root, *others]
    return [
        CheckSection(title=title, findings=tuple(found), origin=JHLAB)
        for title, found in (
            (T_BETWEEN, _check_between(others)),
            (T_CPUS, _check_cpus(root, others)),
            (T_PIO, _check_pio(everyone, others)),
            (T_PCI, _check_pci(others)),
            (T_IVSHMEM, _check_ivshmem(everyone)),
            (T_LOADABLE, _check_loadable(root, others)),
            (T_COMM, _check_comm(others)),
            (T_MSIX, _check_msix(everyone)),
            (T_SUBPAGE, _check_subpage(everyone)),
        )
    ]
