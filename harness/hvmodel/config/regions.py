"""The root cell's memory regions for ``config create``: the ranges of ``/proc/iomem``
worth mapping (pyjailhouse's ``parse_iomem`` and Jailhouse's filters), the firmware
ranges that hold ACPI tables, the ``memmap=`` window and the ivshmem shared memory moved
to its end; see :mod:`.create` for the rules and where jhlab differs from Jailhouse.

A :class:`Span` is a region being built; :func:`normalize` page-aligns the spans and
merges what then overlaps. Each region keeps a :class:`RegionNote` saying where it comes
from, for the comments of the generated source.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Final

from .. import abi
from ..abi import MemFlags, PciDeviceType
from .model import MemoryRegion, PciDevice, format_bdf
from .sysfs_parser import Facts, IoRegion, PciFunction
from .system import SystemConfig

#: Memory flags of RAM the root cell owns (and may hand to cells).
RAM_FLAGS: Final = MemFlags.READ | MemFlags.WRITE | MemFlags.EXECUTE | MemFlags.DMA
#: Memory flags of device MMIO.
MMIO_FLAGS: Final = MemFlags.READ | MemFlags.WRITE

#: iomem names whose ranges are RAM (``MemRegion.is_ram`` of pyjailhouse).
_RAM_NAMES: Final = frozenset({"System RAM", "Kernel", "RAM buffer", "ACPI DMAR RMRR",
                               "ACPI IVRS"})
_ROM_AREA: Final = (0xC0000, 0xDFFFF)
_VGA_WINDOW: Final = 0xA0000
_LOW_MEMORY: Final = 0x100000
_MEMMAP: Final = re.compile(r"(?:^|\s)memmap=([0-9a-fA-FxX]+)([KMGkmg]?)\$"
                            r"([0-9a-fA-FxX]+)([KMGkmg]?)(?=\s|$)")


@dataclass(frozen=True, kw_only=True, slots=True)
class RegionNote:
    """Where a memory region of the generated config comes from.

    :param kind: ``ram``, ``inmates``, ``acpi``, ``rom``, ``mmio``, ``device``, ``rmrr``
        or ``ivshmem``
    :param text: the comment for it
    :param bdf: the PCI function owning the range (``device`` only)
    :param resource: index of the owning ``resource`` line (BAR 0-5, 6 = ROM)
    :param offset: offset of the region's start into that resource
    """

    kind: str
    text: str
    bdf: int | None = None
    resource: int | None = None
    offset: int = 0


def parse_size_parts(number: str, suffix: str) -> int:
    """A number (``0x`` hex or decimal) times the power of 1024 of ``K``/``M``/``G`` (or none)."""
    shift = {"": 0, "K": 10, "M": 20, "G": 30}[suffix.upper()]
    return int(number, 0) << shift


def align_down(value: int) -> int:
    return value & ~(abi.PAGE_SIZE - 1)


def align_up(value: int) -> int:
    return (value + abi.PAGE_SIZE - 1) & ~(abi.PAGE_SIZE - 1)


@dataclass(slots=True)
class Span:
    """A region being built: [start, end) with flags and a note."""

    start: int
    end: int
    flags: int
    note: RegionNote


def memmap_window(cmdline: str) -> tuple[int, int] | None:
    """(start, size) of the last ``memmap=SIZE$START`` reservation, as Jailhouse reads it."""
    found = None
    for match in _MEMMAP.finditer(cmdline):
        found = (parse_size_parts(match[3], match[4]), parse_size_parts(match[1], match[2]))
    return found


def format_memmap(start: int, size: int) -> str:
    for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}${start:#x}"
    return f"{size:#x}${start:#x}"


def owner_of(facts: Facts, start: int, end: int) -> tuple[PciFunction, int] | None:
    for function in facts.pci:
        for index, resource in enumerate(function.resources[:7]):
            if resource.contains(start, end):
                return function, index
    return None


def device_note(facts: Facts, region: IoRegion, start: int, end: int) -> RegionNote:
    owner = owner_of(facts, start, end)
    label = f"{region.start:x}-{region.end:x} : {region.label}"
    if owner is None:
        return RegionNote(kind="mmio", text=label)
    function, index = owner
    what = "ROM" if index == 6 else f"BAR{index}"
    return RegionNote(kind="device", text=f"{label} ({format_bdf(function.bdf)} {what})",
                      bdf=function.bdf, resource=index,
                      offset=start - function.resources[index].start)


def iomem_regions(facts: Facts, msix: Sequence[tuple[int, int]]
                   ) -> tuple[list[Span], list[IoRegion]]:
    """Memory regions from ``/proc/iomem`` (pyjailhouse ``parse_iomem``); also the dmar
    entries, for the VT-d unit sizes."""
    picked: list[IoRegion] = []
    dmar: list[IoRegion] = []

    def visit(entries: Iterable[IoRegion], level: int) -> None:
        for entry in entries:
            name = entry.name
            if level == 1 and name in ("System RAM", "RAM buffer"):
                picked.append(replace(entry, children=()))
                continue
            if "PCI MMCONFIG" in name or "APIC" in name:
                continue
            if entry.children:
                visit(entry.children, level + 1)
            elif name.lower() == "reserved":
                continue
            else:
                picked.append(entry)

    visit(facts.iomem, 1)
    spans: list[Span] = []
    rom = False
    for entry in picked:
        name = entry.name
        if "dmar" in name:
            dmar.append(entry)
            continue
        if "amd_iommu" in name:
            continue
        if name.startswith("PCI Bus") and entry.start != _VGA_WINDOW:
            continue
        if entry.start >= _ROM_AREA[0] and entry.end <= _ROM_AREA[1]:
            rom = True
            continue
        if name in _RAM_NAMES:
            spans.append(Span(entry.start, entry.end + 1, int(RAM_FLAGS),
                               RegionNote(kind="ram", text=entry.name)))
            continue
        pieces = [(entry.start, entry.end + 1)]
        for table, size in msix:
            cut = []
            for low, high in pieces:
                if low <= table < high:
                    cut += [(low, table), (table + size, high)]
                else:
                    cut.append((low, high))
            pieces = [(low, high) for low, high in cut if high > low]
        for low, high in pieces:
            spans.append(Span(low, high, int(MMIO_FLAGS),
                               device_note(facts, entry, low, high - 1)))
    if rom:
        spans.append(Span(_ROM_AREA[0], _ROM_AREA[1] + 1, int(MMIO_FLAGS),
                           RegionNote(kind="rom", text="c0000-dffff : option ROMs")))
    if spans and spans[0].note.kind == "ram" and spans[0].start == 0x1000:
        spans[0].start = 0  # the first page is needed for CPU start-up
    return spans, dmar


def acpi_regions(facts: Facts, warnings: list[str]) -> list[Span]:
    """Read-only regions for the firmware ranges above 1 MiB that hold ACPI tables."""
    if not facts.acpi_locations:
        warnings.append("the facts do not say where the ACPI tables are: no region maps them "
                        "(collect as root with /dev/mem access)")
        return []
    spans: dict[int, Span] = {}
    for location in facts.acpi_locations:
        if location.address < _LOW_MEMORY:
            continue
        entry = next((e for e in facts.iomem
                      if e.start <= location.address and location.address + location.length
                      - 1 <= e.end), None)
        if entry is None:
            warnings.append(f"ACPI table {location.signature} at {location.address:#x} is in "
                            "no /proc/iomem range: not mapped")
            continue
        if entry.name in _RAM_NAMES:
            continue  # in RAM: mapped already
        if entry.name.lower() not in ("reserved", "acpi tables", "acpi non-volatile storage"):
            warnings.append(f"ACPI table {location.signature} at {location.address:#x} lies in "
                            f"{entry.name!r}: not mapped")
            continue
        flags = MMIO_FLAGS if "non-volatile" in entry.name.lower() else MemFlags.READ
        spans.setdefault(entry.start, Span(
            entry.start, entry.end + 1, int(flags),
            RegionNote(kind="acpi", text=f"{entry.start:x}-{entry.end:x} : {entry.name}: "
                       "ACPI tables")))
    for span in spans.values():
        names = sorted({loc.signature for loc in facts.acpi_locations
                        if span.start <= loc.address < span.end})
        span.note = replace(span.note, text=f"{span.note.text} ({', '.join(names)})")
    return list(spans.values())


def normalize(spans: list[Span]) -> list[Span]:
    """Page-align every span outwards; merge what then overlaps (flags ORed)."""
    out: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.start, s.end)):
        span.start, span.end = align_down(span.start), align_up(span.end)
        if out and span.start < out[-1].end:
            last = out[-1]
            last.end = max(last.end, span.end)
            last.flags |= span.flags
            last.note = replace(last.note, text=f"{last.note.text}; {span.note.text}")
            continue
        if (out and span.start == out[-1].end and span.note.kind == "ram"
                and out[-1].note.kind == "ram" and span.flags == out[-1].flags):
            out[-1].end = span.end  # merge adjacent RAM
            continue
        out.append(span)
    return out


def ivshmem_template(system: SystemConfig) -> list[tuple[PciDevice, tuple[MemoryRegion, ...]]]:
    root = system.root_cell
    return [(device, root.shmem_regions_of(device)) for device in root.pci_devices
            if device.type == PciDeviceType.IVSHMEM]


def shmem_block(template: Sequence[tuple[PciDevice, tuple[MemoryRegion, ...]]]
                 ) -> tuple[int, int]:
    """(start, size) of the page range the template's shared memory spans."""
    used = [r for _, regions in template for r in regions if r.size]
    if not used:
        return 0, 0
    low = align_down(min(r.phys_start for r in used))
    high = align_up(max(r.phys_end for r in used))
    return low, high - low
