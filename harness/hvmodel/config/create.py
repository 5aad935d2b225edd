"""Generate a root-cell system config from collected facts; models ``tools/jailhouse-config-create``.

Jailhouse's ``jailhouse config create`` (with ``pyjailhouse/sysfs_parser.py`` and the
``root-cell-config.c.tmpl`` template) reads ``/proc/iomem``, ``/proc/ioports``, sysfs PCI
config space and the ACPI tables of the running machine and writes a C system config that
gives the root cell everything Linux uses, leaving out what the hypervisor intercepts.
This module does the same from the JSON document :mod:`.collect` prints (standard library
only, so it runs in the root cell as well as on the host) and returns a
:class:`~.model.SystemConfig` plus the notes that explain each entry; :func:`render_toml`
writes it as a commented TOML source (``config compile`` turns it into the same bytes).

The derivation follows Jailhouse's tool; where jhlab differs it says so here:

Memory (``/proc/iomem``):

* top-level ``System RAM`` (the kernel's own ``Kernel code/data/bss`` entries included)
  and ``RAM buffer``, DMAR RMRRs: R/W/X/DMA; adjacent RAM ranges are merged; a first RAM
  range starting at 0x1000 starts at 0 (the page is needed for CPU start-up);
* every other leaf of the tree, at any level, R/W: device BARs, the HPET, the legacy VGA
  window ``PCI Bus`` at 0xa0000, BIOS ``System ROM``; the option ROMs between 0xc0000 and
  0xdffff become one region; other ``PCI Bus`` windows are left out (mapping an empty
  window would need interception once a device appears);
* never mapped: ``PCI MMCONFIG``, anything named ``APIC`` (local APIC, IOAPIC), the VT-d
  units (``dmar``), AMD IOMMUs, and ``Reserved`` leaves; each device's MSI-X table pages
  are cut out of its BAR (the hypervisor traps them);
* **jhlab:** the ``Reserved`` (or ``ACPI Tables``) ranges above 1 MiB that hold ACPI tables,
  located by :mod:`.collect` through the RSDP, are mapped read-only: root Linux keeps
  reading them, and SeaBIOS (QEMU) puts them in e820 reserved memory, which Jailhouse's
  tool drops (Jailhouse's ``qemu-x86.c`` adds the range by hand, read-only); an ``ACPI
  Non-volatile Storage`` range holding tables is mapped R/W (firmware code writes it);
* **jhlab:** start and size are page-aligned outwards (Jailhouse rounds only the size) and
  regions that then overlap are merged, so sub-page BARs never make overlapping regions;
* the ``memmap=SIZE$START`` window on the kernel command line holds, in this order, the
  hypervisor (``--mem-hv``, jhlab default 6 MiB as in ``qemu-x86.c``; Jailhouse's 64 MiB),
  the inmates' RAM (``--mem-inmates``, default: the rest of the window; **jhlab:**
  R/W/X/DMA like ``qemu-x86.c``, Jailhouse's tool maps it R/W) and, at the end of the
  window, the shared memory of the ivshmem devices. Without ``memmap=`` the window is taken
  from the start of the last RAM range big enough, as Jailhouse does, and
  :attr:`CreateResult.memmap` names the parameter to add.

ivshmem devices are virtual, so no machine shows them: **jhlab** copies them (BDF, peers,
ID, protocol, vectors) and the layout of their shared memory from a reference system
config (``--ivshmem-from``; the default lab uses ``qemu-x86.toml``), moved to the end of
the window.

PCI (every ``/sys/bus/pci/devices`` function, host bridges included):

* type BRIDGE for class 0x0604, else DEVICE; ``bar_mask`` from the ``resource`` sizes (I/O,
  32- and 64-bit memory BARs; unassigned BARs 0);
* capabilities walked in list order: PM 8 bytes writable, MSI 10 (+4 with 64-bit, +10
  with per-vector masking) writable, MSI-X 12 writable (table address from its BAR
  register and offset), PCI Express 20 bytes or 60 for version 2 read-only, anything else
  2 bytes read-only; for PCI Express devices the extended list too, read-only, with
  Jailhouse's lengths (AER 64, DSN 12, ...). **jhlab:** a zero extended header ends the
  list (Jailhouse records a capability 0 there);
* MSI vectors, 64-bit and maskable bits; MSI-X vectors, table address and page-rounded
  table size; identical capability lists are shared between devices;
* IOMMU unit from the DMAR device scopes (endpoints, sub-hierarchies behind bridges,
  INCLUDE_PCI_ALL);
* **jhlab:** :data:`PCI_QUIRKS` adds what a root-cell driver is known to write outside
  the derived permissions; Jailhouse's ``qemu-x86.c`` carries the same entries by hand.

Platform: MMCONFIG from MCFG (one segment-0 entry starting at bus 0), VT-d units from DMAR
with their size from the ``dmar`` entries of ``/proc/iomem`` (Linux must run with the
IOMMU on), IOAPICs from the MADT with (unit << 16 | BDF) IDs from the DMAR IOAPIC scopes
and pins 0-23 (Jailhouse's tool writes 0xffffff too), the PM timer port from the FADT
(cross-checked with ``ACPI PM_TMR`` in ``/proc/ioports``), ``vtd_interrupt_limit`` = 120
pins per IOAPIC plus every MSI/MSI-X vector, rounded up to a power of two. CPUs: the
online set. Debug console: the 8250 of ``--console`` (``ttyS0``).

Ports (``/proc/ioports``, Jailhouse's whitelist style): every leaf below 0xd00 except the
PCI config ports 0xcf8; the PIT (0x40), keyboard and NMI status (0x60, 0x61, 0x64), RTC
(0x70), the UARTs 0x2f8/0x3f8 and anything named VGA or VESA are whitelisted; above 0xd00
the I/O BARs of PCI devices. The others stay trapped and are listed as comments.
**jhlab:** the debug console's UART is not whitelisted (the hypervisor owns it; Jailhouse's
``qemu-x86.c`` leaves it out too, its tool keeps it).

Not done (Jailhouse's tool neither, unless said): AMD IVRS (AMD IOMMU; jhlab warns),
multi-segment MMCONFIG, CAT cache regions, non-8250 consoles.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from .. import abi
from ..abi import (
    ApicMode,
    ConsoleType,
    IommuType,
    MemFlags,
    PciCapFlags,
    PciCapId,
    PciDeviceType,
    SysFlags,
)
from ..cpus import cpu_set_from, parse_cpu_list
from ..errors import ConfigError
from .model import (
    CellConfig,
    Console,
    Irqchip,
    MemoryRegion,
    PciCapability,
    PciDevice,
    PioRegion,
    format_bdf,
)
from .system import IommuUnit, SystemConfig, X86Platform
from .toml import (
    _console_lines,
    _enum_name,
    _flag_names,
    _hex,
    _iommu_lines,
    _pci_lines,
    _q,
    _ranges,
    _size,
)

MIB: Final = 1 << 20

#: Memory flags of RAM the root cell owns (and may hand to cells).
RAM_FLAGS: Final = MemFlags.READ | MemFlags.WRITE | MemFlags.EXECUTE | MemFlags.DMA
#: Memory flags of device MMIO.
MMIO_FLAGS: Final = MemFlags.READ | MemFlags.WRITE

#: Default hypervisor size (``qemu-x86.c``: 6 MiB; Jailhouse's tool defaults to 64 MiB).
DEFAULT_MEM_HV: Final = 6 * MIB
#: Default root-cell name (Jailhouse's tool: "RootCell").
DEFAULT_NAME: Final = "RootCell"
#: IOAPIC pins given to the root cell (Jailhouse's tool writes ``pin_bitmap = 0xffffff``).
IOAPIC_PINS: Final = 24

#: iomem names whose ranges are RAM (``MemRegion.is_ram`` of pyjailhouse).
_RAM_NAMES: Final = frozenset({"System RAM", "Kernel", "RAM buffer", "ACPI DMAR RMRR",
                               "ACPI IVRS"})
_ROM_AREA: Final = (0xC0000, 0xDFFFF)
_VGA_WINDOW: Final = 0xA0000
_LOW_MEMORY: Final = 0x100000
_BDF_NAME: Final = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_MEMMAP: Final = re.compile(r"(?:^|\s)memmap=([0-9a-fA-FxX]+)([KMGkmg]?)\$"
                            r"([0-9a-fA-FxX]+)([KMGkmg]?)(?=\s|$)")

#: Port ranges whose first port Jailhouse's tool whitelists for the root cell.
PIO_WHITELIST: Final = {0x40: "PIT", 0x60: "keyboard", 0x61: "NMI status/control",
                        0x64: "i8042", 0x70: "RTC", 0x2F8: "serial", 0x3F8: "serial"}
#: Ports from here on belong to PCI I/O BARs (Jailhouse drops other ranges above it).
PCI_PIO_START: Final = 0xD00

# PCI Express extended capabilities: their lengths (IDs without JAILHOUSE_PCI_EXT_CAP)
_EXT_CAP_LEN: Final = {
    0x01: 64,  # AER
    0x02: 16, 0x09: 16,  # VC, VC9: at least 4 dwords
    0x03: 12, 0x1F: 12,  # DSN, PTM
    0x04: 16, 0x19: 16,  # power budgeting, secondary PCIe
    0x08: 4,  # MFVC
    0x0E: 8, 0x18: 8, 0x1B: 8,  # ARI, LTR, PASID
    0x10: 64,  # SR-IOV
    0x12: 48,  # multicast
}
_EXT_VNDR: Final = 0x0B
_EXT_ACS: Final = 0x0D

# /sys/bus/pci/devices/*/resource flags (include/linux/ioport.h)
IORESOURCE_IO: Final = 0x100
IORESOURCE_MEM: Final = 0x200
IORESOURCE_MEM_64: Final = 0x100000


@dataclass(frozen=True, slots=True)
class PciQuirk:
    """What the root cell's driver of one device writes beyond the derived permissions.

    :param vendor: PCI vendor ID
    :param device: PCI device ID
    :param reason: why, printed as the capability comment
    :param writable: capability IDs to make writable
    :param extra: capability entries to add (ID 0: a plain register window)
    """

    vendor: int
    device: int
    reason: str
    writable: frozenset[int] = frozenset()
    extra: tuple[PciCapability, ...] = ()


#: jhlab's device knowledge; each entry is one Jailhouse's ``qemu-x86.c`` makes by hand.
PCI_QUIRKS: Final = (
    PciQuirk(0x8086, 0x2668, "ICH6 HD audio: snd-hda-intel writes HDCTL, TCSEL, DCKCTL, "
             "DCKSTS (0x40-0x4f), outside any capability",
             extra=(PciCapability(id=0, start=0x40, len=0x10, flags=PciCapFlags.WRITE),)),
    PciQuirk(0x8086, 0x10D3, "82574L (e1000e): the driver writes the PCI Express device "
             "control register", writable=frozenset({int(PciCapId.EXP)})),
)


# --- raw facts ------------------------------------------------------------------------------


def _parse_size(number: str, suffix: str) -> int:
    shift = {"": 0, "K": 10, "M": 20, "G": 30}[suffix.upper()]
    return int(number, 0) << shift


def parse_size(text: str) -> int:
    """A size like ``6M``, ``0x600000``, ``512K`` (powers of 1024).

    :raise ValueError: on anything else
    """
    match = re.fullmatch(r"\s*(0[xX][0-9a-fA-F]+|[0-9]+)\s*([KMGkmg]?)\s*", text)
    if not match:
        raise ValueError(f"bad size {text!r}; expected e.g. 6M, 512K or 0x600000")
    return _parse_size(match[1], match[2])


@dataclass(frozen=True, slots=True)
class IoRegion:
    """One line of ``/proc/iomem`` or ``/proc/ioports`` with the lines nested below it.

    :param start: first address (or port)
    :param end: last address, inclusive (as the kernel prints it)
    :param name: what the kernel calls it
    :param children: the nested entries
    :param parent: names of the enclosing entries, outermost first
    """

    start: int
    end: int
    name: str
    children: tuple[IoRegion, ...] = ()
    parent: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    @property
    def label(self) -> str:
        """``start-end : parent > name`` as a comment."""
        return " > ".join((*self.parent, self.name))

    def walk(self) -> Iterator[IoRegion]:
        """This entry and everything below it, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()

    def leaves(self) -> Iterator[IoRegion]:
        """The entries with nothing nested below them."""
        if not self.children:
            yield self
        for child in self.children:
            yield from child.leaves()


def parse_io_tree(text: str, source: str = "/proc/iomem") -> tuple[IoRegion, ...]:
    """Parse ``/proc/iomem`` or ``/proc/ioports`` into its top-level entries.

    :raise ConfigError: on a line that is not ``start-end : name``
    """
    # Each stack entry: (indent, start, end, name, children list)
    Entry = tuple[int, int, int, str, list[IoRegion]]

    def finish(entry: Entry, parents: Sequence[Entry]) -> IoRegion:
        names = tuple(p[3] for p in parents)
        return IoRegion(entry[1], entry[2], entry[3], tuple(entry[4]), names)

    top: list[IoRegion] = []
    stack: list[Entry] = []

    def pop() -> None:
        entry = stack.pop()
        done = finish(entry, stack)
        (stack[-1][4] if stack else top).append(done)

    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        span, sep, name = line.strip().partition(" : ")
        low, dash, high = span.partition("-")
        try:
            start, end = int(low, 16), int(high, 16)
        except ValueError:
            start = end = -1
        if not sep or not dash or start < 0 or end < start - 1:
            raise ConfigError(f"line {number}: expected 'start-end : name', got {line!r}",
                              source=source)
        while stack and stack[-1][0] >= indent:
            pop()
        stack.append((indent, start, end, name.strip(), []))
    while stack:
        pop()
    return tuple(top)


@dataclass(frozen=True, slots=True)
class Resource:
    """One line of a PCI ``resource`` file: a BAR, the ROM or a bridge window."""

    start: int
    end: int
    flags: int

    @property
    def assigned(self) -> bool:
        return bool(self.flags & (IORESOURCE_IO | IORESOURCE_MEM)) and self.end > self.start

    @property
    def size(self) -> int:
        return self.end - self.start + 1 if self.assigned else 0

    def contains(self, start: int, end: int) -> bool:
        return self.assigned and self.start <= start and end <= self.end


@dataclass(frozen=True, slots=True)
class DerivedCap:
    """A capability found in config space, with what Jailhouse's tool derives from it.

    :param id: capability ID; extended ones ORed with 0x8000
    :param start: config-space offset
    :param len: bytes given to the entry
    :param flags: :class:`PciCapFlags`
    :param msix_address: MSI-X only: physical address of the vector table (0 if invalid)
    """

    id: int
    start: int
    len: int
    flags: int
    msix_address: int = 0

    def entry(self) -> PciCapability:
        return PciCapability(id=self.id, start=self.start, len=self.len, flags=self.flags)


@dataclass(frozen=True, slots=True)
class PciFunction:
    """One PCI function as sysfs shows it.

    :param domain: PCI segment
    :param bdf: ``bus << 8 | dev << 3 | fn``
    :param config: config space, padded back to its size with zeros
    :param resources: the lines of its ``resource`` file (BAR0..5, ROM, bridge windows)
    :param driver: the bound driver, if any
    """

    domain: int
    bdf: int
    config: bytes
    resources: tuple[Resource, ...]
    driver: str | None = None

    def _u8(self, offset: int) -> int:
        return self.config[offset] if offset < len(self.config) else 0

    def u16(self, offset: int) -> int:
        """The config-space word at ``offset`` (0 beyond what could be read)."""
        return int(struct.unpack_from("<H", self.config, offset)[0]) \
            if offset + 2 <= len(self.config) else 0

    def _u32(self, offset: int) -> int:
        return int(struct.unpack_from("<I", self.config, offset)[0]) \
            if offset + 4 <= len(self.config) else 0

    @property
    def slot(self) -> str:
        return f"{self.domain:04x}:{format_bdf(self.bdf)}"

    @property
    def vendor(self) -> int:
        return self.u16(0)

    @property
    def device(self) -> int:
        return self.u16(2)

    @property
    def class_code(self) -> int:
        """Base class, subclass and programming interface (24 bits)."""
        return self._u32(8) >> 8

    @property
    def is_bridge(self) -> bool:
        """Class 0x0604: a PCI-to-PCI bridge (Jailhouse's BRIDGE type)."""
        return self.u16(0x0A) == 0x0604

    @property
    def secondary_buses(self) -> range:
        """Buses behind a bridge (secondary..subordinate); empty for others."""
        if not self.is_bridge:
            return range(0)
        return range(self._u8(abi.PCI_CFG_SECONDARY_BUS), self._u8(abi.PCI_CFG_SECONDARY_BUS + 1) + 1)

    @property
    def bars(self) -> tuple[Resource, ...]:
        return self.resources[:6]

    def bar_masks(self) -> tuple[int, int, int, int, int, int]:
        """The six ``bar_mask`` words, from the resource sizes (pyjailhouse ``PCIBARs``)."""
        masks: list[int] = []
        index = 0
        bars = list(self.bars) + [Resource(0, 0, 0)] * (6 - len(self.bars))
        while index < 6:
            bar = bars[index]
            index += 1
            if bar.flags & IORESOURCE_IO:
                masks.append(~(bar.end - bar.start) & 0xFFFFFFFF)
            elif bar.flags & IORESOURCE_MEM and bar.flags & IORESOURCE_MEM_64 and index < 6:
                size = bar.end - bar.start
                upper = bars[index]
                size |= (upper.end - upper.start) << 32
                mask = ~size
                masks += [mask & 0xFFFFFFFF, (mask >> 32) & 0xFFFFFFFF]
                index += 1
            elif bar.flags & IORESOURCE_MEM:
                masks.append(~(bar.end - bar.start) & 0xFFFFFFFF)
            else:
                masks.append(0)
        return (masks[0], masks[1], masks[2], masks[3], masks[4], masks[5])

    def _bar_address(self, index: int) -> int:
        low = self._u32(abi.PCI_CFG_BAR + 4 * index)
        if low & 0x1:
            return 0  # an I/O BAR cannot hold an MSI-X table
        address = low & ~0xF
        if low & 0x6 == 0x4 and index < 5:
            address |= self._u32(abi.PCI_CFG_BAR + 4 * index + 4) << 32
        return address

    def capabilities(self, warnings: list[str] | None = None) -> tuple[DerivedCap, ...]:
        """Walk the capability lists (pyjailhouse ``PCICapability.parse_pcicaps``)."""
        caps: list[DerivedCap] = []
        if not self.u16(abi.PCI_CFG_STATUS) & abi.PCI_STS_CAPS:
            return ()
        express = False
        seen: set[int] = set()
        pointer = self._u8(abi.PCI_CFG_CAPS) & ~0x3
        while pointer and pointer not in seen and pointer + 2 <= min(len(self.config), 0x100):
            seen.add(pointer)
            cap_id, following = self._u8(pointer), self._u8(pointer + 1) & ~0x3
            msix = 0
            flags: int
            if cap_id == PciCapId.PM:
                length, flags = 8, PciCapFlags.WRITE
            elif cap_id == PciCapId.MSI:
                control = self.u16(pointer + 2)
                length = 10 + (4 if control & 0x80 else 0) + (10 if control & 0x100 else 0)
                flags = PciCapFlags.WRITE
            elif cap_id == PciCapId.EXP:
                length = 60 if self.u16(pointer + 2) & 0xF >= 2 else 20
                flags = 0
                express = True
            elif cap_id == PciCapId.MSIX:
                length, flags = 12, PciCapFlags.WRITE
                table = self._u32(pointer + 4)
                base = self._bar_address(table & 0x7)
                msix = base + (table & ~0x7) if base else 0
            else:
                length, flags = 2, 0
            caps.append(DerivedCap(cap_id, pointer, length, int(flags), msix))
            pointer = following
        if express and len(self.config) > abi.PCI_CFG_SPACE_SIZE:
            caps += self._extended_caps(warnings)
        return tuple(caps)

    def _extended_caps(self, warnings: list[str] | None) -> list[DerivedCap]:
        caps: list[DerivedCap] = []
        pointer, seen = abi.PCI_CFG_SPACE_SIZE, set()
        while pointer and pointer not in seen and pointer + 4 <= len(self.config):
            seen.add(pointer)
            header = self._u32(pointer)
            cap_id = header & 0xFFFF
            if header == 0 or cap_id == 0xFFFF:
                break
            if cap_id & 0x8000:
                if warnings is not None:
                    warnings.append(f"{self.slot}: ignoring unsupported PCI Express extended "
                                    f"capability ID {cap_id:#x}")
                break
            if cap_id == _EXT_VNDR:
                length = 4 + (self._u32(pointer + 4) >> 20)
            elif cap_id == _EXT_ACS:
                length = 8
                acs_cap, acs_ctrl = self.u16(pointer + 4), self.u16(pointer + 6)
                if acs_cap & 0x20 and acs_ctrl & 0x20:
                    bits = acs_cap >> 8 or 256
                    length += (bits + 31) // 32 * 4
            else:
                length = _EXT_CAP_LEN.get(cap_id, 4)
            caps.append(DerivedCap(cap_id | 0x8000, pointer, length, 0))
            pointer = header >> 20
        return caps


@dataclass(frozen=True, slots=True)
class IoApic:
    """A MADT I/O APIC entry."""

    id: int
    address: int
    gsi_base: int


@dataclass(frozen=True, slots=True)
class DmarScope:
    """A DMAR device scope: type (1 endpoint, 2 sub-hierarchy, 3 IOAPIC, 4 HPET)."""

    type: int
    enum_id: int
    bus: int
    path: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class DmarUnit:
    """A DMAR DRHD: a VT-d remapping unit and the devices in its scope."""

    base: int
    flags: int
    segment: int
    scopes: tuple[DmarScope, ...]

    @property
    def include_all(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class AcpiLocation:
    """Where an ACPI table lies in physical memory."""

    signature: str
    address: int
    length: int


def _table(tables: Mapping[str, bytes], name: str, source: str) -> bytes | None:
    data = tables.get(name)
    if data is None:
        return None
    if len(data) < 36 or data[:4] != name.encode("ascii"):
        raise ConfigError(f"ACPI table {name}: not a {name} table", source=source)
    length = struct.unpack_from("<I", data, 4)[0]
    if length > len(data):
        raise ConfigError(f"ACPI table {name}: {len(data)} bytes, the header says {length}",
                          source=source)
    return data[:length]


@dataclass(frozen=True, kw_only=True, slots=True)
class Facts:
    """The collected facts, decoded. Build with :meth:`from_json` or :func:`load_facts`.

    :param source: where the document came from (for errors)
    """

    source: str
    cmdline: str
    cpus: frozenset[int]
    iomem: tuple[IoRegion, ...]
    ioports: tuple[IoRegion, ...]
    pci: tuple[PciFunction, ...]
    acpi_tables: Mapping[str, bytes]
    acpi_locations: tuple[AcpiLocation, ...]
    serial: Mapping[str, Mapping[str, str]]
    product: str = ""
    kernel: str = ""
    cpu_vendor: str = ""
    jailhouse_enabled: bool = False
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, doc: object, source: str = "<facts>") -> Facts:
        """Decode a document of :func:`.collect.collect`.

        :raise ConfigError: when it is not a facts document or is malformed
        """
        from .collect import FACTS_FORMAT, FACTS_VERSION

        if not isinstance(doc, dict) or doc.get("format") != FACTS_FORMAT:
            raise ConfigError(f"not a {FACTS_FORMAT} document", source=source)
        if not isinstance(doc.get("version"), int) or doc["version"] > FACTS_VERSION:
            raise ConfigError(f"facts version {doc.get('version')!r} is newer than this "
                              f"generator ({FACTS_VERSION})", source=source)
        try:
            return cls._decode(doc, source)
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, struct.error) as exc:
            raise ConfigError(f"malformed facts document: {type(exc).__name__}: {exc}",
                              source=source) from exc

    @classmethod
    def _decode(cls, doc: dict[str, Any], source: str) -> Facts:
        for key in ("iomem", "ioports", "cmdline"):
            if not isinstance(doc.get(key), str):
                raise ConfigError(f"the facts lack {key!r} (collector warnings: "
                                  f"{'; '.join(doc.get('warnings') or []) or 'none'})",
                                  source=source)
        functions = []
        for entry in doc.get("pci") or []:
            slot = str(entry["slot"])
            domain, bus, devfn = slot.split(":")
            dev, fn = devfn.split(".")
            size = int(entry["config_size"])
            config = bytes.fromhex(entry["config"]).ljust(size, b"\0")
            resources = []
            for line in str(entry["resource"]).splitlines():
                if line.strip():
                    start, end, flags = (int(x, 16) for x in line.split())
                    resources.append(Resource(start, end, flags))
            functions.append(PciFunction(
                domain=int(domain, 16), bdf=int(bus, 16) << 8 | int(dev, 16) << 3 | int(fn, 16),
                config=config, resources=tuple(resources), driver=entry.get("driver")))
        tables = {str(k): bytes.fromhex(v) for k, v in (doc.get("acpi_tables") or {}).items()}
        located = (doc.get("acpi_locations") or {}).get("tables") or []
        locations = tuple(AcpiLocation(str(t["signature"]), int(t["address"]), int(t["length"]))
                          for t in located)
        dmi = doc.get("dmi") or {}
        product = " ".join(str(dmi[k]) for k in ("sys_vendor", "product_name") if dmi.get(k))
        cpus_text = (doc.get("cpus") or {}).get("online")
        if not isinstance(cpus_text, str):
            raise ConfigError("the facts lack the online CPU list", source=source)
        return cls(
            source=source, cmdline=doc["cmdline"], cpus=parse_cpu_list(cpus_text),
            iomem=parse_io_tree(doc["iomem"], f"{source}: /proc/iomem"),
            ioports=parse_io_tree(doc["ioports"], f"{source}: /proc/ioports"),
            pci=tuple(sorted(functions, key=lambda f: (f.domain, f.bdf))),
            acpi_tables=tables, acpi_locations=locations,
            serial={str(k): {str(a): str(b) for a, b in v.items()}
                    for k, v in (doc.get("serial") or {}).items()},
            product=product, kernel=str(doc.get("kernel") or ""),
            cpu_vendor=str(doc.get("cpu_vendor") or ""),
            jailhouse_enabled=doc.get("jailhouse_enabled") == "1",
            warnings=tuple(str(w) for w in doc.get("warnings") or ()),
        )

    # -- ACPI ---------------------------------------------------------------------------

    def table(self, name: str) -> bytes | None:
        """The ACPI table ``name`` (cut to its header's length), or None.

        :raise ConfigError: when the bytes are not that table
        """
        return _table(self.acpi_tables, name, self.source)

    def ioapics(self) -> tuple[IoApic, ...]:
        """The I/O APICs of the MADT (``APIC``), in table order."""
        madt = self.table("APIC")
        if madt is None:
            raise ConfigError("no ACPI MADT (APIC table) in the facts", source=self.source)
        chips = []
        offset = 44
        while offset + 2 <= len(madt):
            kind, length = madt[offset], madt[offset + 1]
            if length < 2:
                break
            if kind == 1 and length >= 12:
                chip_id, address, gsi = struct.unpack_from("<BxII", madt, offset + 2)
                chips.append(IoApic(chip_id, address, gsi))
            offset += length
        return tuple(chips)

    def dmar_units(self) -> tuple[DmarUnit, ...]:
        """The DRHD structures of the DMAR table (empty without one)."""
        dmar = self.table("DMAR")
        if dmar is None:
            return ()
        units = []
        offset = 48
        while offset + 4 <= len(dmar):
            kind, length = struct.unpack_from("<HH", dmar, offset)
            if length < 4:
                break
            if kind == 0:
                flags, segment, base = struct.unpack_from("<BxHQ", dmar, offset + 4)
                scopes = _dmar_scopes(dmar[offset + 16:offset + length])
                units.append(DmarUnit(base, flags, segment, scopes))
            offset += length
        return tuple(units)

    def dmar_rmrrs(self) -> tuple[tuple[int, int], ...]:
        """The reserved memory ranges (RMRR) of the DMAR table: (base, limit)."""
        dmar = self.table("DMAR")
        rmrrs = []
        offset = 48
        while dmar is not None and offset + 4 <= len(dmar):
            kind, length = struct.unpack_from("<HH", dmar, offset)
            if length < 4:
                break
            if kind == 1 and length >= 24:
                rmrrs.append(struct.unpack_from("<QQ", dmar, offset + 8))
            offset += length
        return tuple((int(a), int(b)) for a, b in rmrrs)

    def pm_timer_port(self) -> int:
        """The ACPI PM timer port: the FADT's X_PM_TMR_BLK (I/O space) or PM_TMR_BLK."""
        facp = self.table("FACP")
        if facp is None:
            raise ConfigError("no ACPI FADT (FACP table) in the facts", source=self.source)
        port = struct.unpack_from("<I", facp, 76)[0] if len(facp) >= 80 else 0
        if len(facp) >= 220:
            space, address = facp[208], struct.unpack_from("<Q", facp, 212)[0]
            if space == 1 and address:
                port = address
        if not port:
            raise ConfigError("the FADT names no PM timer port", source=self.source)
        return int(port)

    def mmconfig(self) -> tuple[int, int]:
        """(base, end bus) of the one MCFG entry Jailhouse supports.

        :raise ConfigError: when there is no MCFG, several entries or an unusual one
        """
        mcfg = self.table("MCFG")
        if mcfg is None:
            raise ConfigError("no ACPI MCFG table in the facts", source=self.source)
        entries = [struct.unpack_from("<QHBB", mcfg, offset)
                   for offset in range(44, len(mcfg) - 15, 16)]
        if len(entries) != 1:
            raise ConfigError(f"{len(entries)} MMCONFIG regions in the MCFG; Jailhouse "
                              "supports exactly one", source=self.source)
        base, segment, start_bus, end_bus = entries[0]
        if segment or start_bus:
            raise ConfigError(f"MCFG entry for segment {segment}, buses from {start_bus}: "
                              "Jailhouse needs segment 0 from bus 0", source=self.source)
        return int(base), int(end_bus)

    def function(self, bdf: int) -> PciFunction | None:
        return next((f for f in self.pci if f.bdf == bdf and f.domain == 0), None)


def _dmar_scopes(data: bytes) -> tuple[DmarScope, ...]:
    scopes = []
    offset = 0
    while offset + 6 <= len(data):
        kind, length, enum_id, bus = struct.unpack_from("<BBxxBB", data, offset)
        if length < 6:
            break
        raw = data[offset + 6:offset + length]
        path = tuple((raw[i], raw[i + 1]) for i in range(0, len(raw) - 1, 2))
        scopes.append(DmarScope(kind, enum_id, bus, path))
        offset += length
    return tuple(scopes)


def load_facts(path: str | os.PathLike[str]) -> Facts:
    """Read and decode a facts JSON file.

    :raise ConfigError: when it cannot be read or decoded
    """
    source = os.fspath(path)
    try:
        doc = json.loads(Path(source).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", source=source) from exc
    except ValueError as exc:
        raise ConfigError(f"not JSON: {exc}", source=source) from exc
    return Facts.from_json(doc, source)


# --- options and result -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class CreateOptions:
    """What ``config create`` is asked for.

    :param name: the root cell's name
    :param mem_hv: hypervisor memory at the start of the window
    :param mem_inmates: inmate RAM after it (None: the rest of the window before the
        shared memory; without a ``memmap=`` window: 2 MiB, Jailhouse's default)
    :param ivshmem_from: a system config whose ivshmem devices (and their shared memory
        layout) the root cell gets; None for none
    :param console: the UART (``/sys/class/tty`` name) of the debug console
    :param quirks: apply :data:`PCI_QUIRKS`
    """

    name: str = DEFAULT_NAME
    mem_hv: int = DEFAULT_MEM_HV
    mem_inmates: int | None = None
    ivshmem_from: SystemConfig | None = None
    console: str = "ttyS0"
    quirks: bool = True


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


@dataclass(frozen=True, kw_only=True, slots=True)
class CreateResult:
    """A generated system config with the notes that explain it.

    :param config: the system config
    :param regions: one note per memory region of the root cell
    :param pio: one comment per whitelisted port range
    :param pio_trapped: ports ``/proc/ioports`` lists that stay trapped (comment lines)
    :param devices: one comment per PCI device
    :param caps: one comment per capability entry
    :param memmap: the ``memmap=`` kernel parameter the config expects
    :param window: (start, size) of that reserved window
    :param vectors: MSI/MSI-X vectors counted for ``vtd_interrupt_limit``
    :param warnings: what the generator could not do or had to guess
    :param facts: the facts it was made from
    """

    config: SystemConfig
    regions: tuple[RegionNote, ...]
    pio: tuple[str, ...]
    pio_trapped: tuple[str, ...]
    devices: tuple[str, ...]
    caps: tuple[str, ...]
    memmap: str
    window: tuple[int, int]
    vectors: int
    warnings: tuple[str, ...]
    facts: Facts = field(repr=False)


# --- the generator ------------------------------------------------------------------------------


def _align_down(value: int) -> int:
    return value & ~(abi.PAGE_SIZE - 1)


def _align_up(value: int) -> int:
    return (value + abi.PAGE_SIZE - 1) & ~(abi.PAGE_SIZE - 1)


@dataclass(slots=True)
class _Span:
    """A region being built: [start, end) with flags and a note."""

    start: int
    end: int
    flags: int
    note: RegionNote


def _memmap_window(cmdline: str) -> tuple[int, int] | None:
    """(start, size) of the last ``memmap=SIZE$START`` reservation, as Jailhouse reads it."""
    found = None
    for match in _MEMMAP.finditer(cmdline):
        found = (_parse_size(match[3], match[4]), _parse_size(match[1], match[2]))
    return found


def _format_memmap(start: int, size: int) -> str:
    for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}${start:#x}"
    return f"{size:#x}${start:#x}"


def _owner(facts: Facts, start: int, end: int) -> tuple[PciFunction, int] | None:
    for function in facts.pci:
        for index, resource in enumerate(function.resources[:7]):
            if resource.contains(start, end):
                return function, index
    return None


def _device_note(facts: Facts, region: IoRegion, start: int, end: int) -> RegionNote:
    owner = _owner(facts, start, end)
    label = f"{region.start:x}-{region.end:x} : {region.label}"
    if owner is None:
        return RegionNote(kind="mmio", text=label)
    function, index = owner
    what = "ROM" if index == 6 else f"BAR{index}"
    return RegionNote(kind="device", text=f"{label} ({format_bdf(function.bdf)} {what})",
                      bdf=function.bdf, resource=index,
                      offset=start - function.resources[index].start)


def _iomem_regions(facts: Facts, msix: Sequence[tuple[int, int]]
                   ) -> tuple[list[_Span], list[IoRegion]]:
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
    spans: list[_Span] = []
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
            spans.append(_Span(entry.start, entry.end + 1, int(RAM_FLAGS),
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
            spans.append(_Span(low, high, int(MMIO_FLAGS),
                               _device_note(facts, entry, low, high - 1)))
    if rom:
        spans.append(_Span(_ROM_AREA[0], _ROM_AREA[1] + 1, int(MMIO_FLAGS),
                           RegionNote(kind="rom", text="c0000-dffff : option ROMs")))
    if spans and spans[0].note.kind == "ram" and spans[0].start == 0x1000:
        spans[0].start = 0  # the first page is needed for CPU start-up
    return spans, dmar


def _acpi_spans(facts: Facts, warnings: list[str]) -> list[_Span]:
    """Read-only regions for the firmware ranges above 1 MiB that hold ACPI tables."""
    if not facts.acpi_locations:
        warnings.append("the facts do not say where the ACPI tables are: no region maps them "
                        "(collect as root with /dev/mem access)")
        return []
    spans: dict[int, _Span] = {}
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
        spans.setdefault(entry.start, _Span(
            entry.start, entry.end + 1, int(flags),
            RegionNote(kind="acpi", text=f"{entry.start:x}-{entry.end:x} : {entry.name}: "
                       "ACPI tables")))
    for span in spans.values():
        names = sorted({loc.signature for loc in facts.acpi_locations
                        if span.start <= loc.address < span.end})
        span.note = replace(span.note, text=f"{span.note.text} ({', '.join(names)})")
    return list(spans.values())


def _normalize(spans: list[_Span]) -> list[_Span]:
    """Page-align every span outwards; merge what then overlaps (flags ORed)."""
    out: list[_Span] = []
    for span in sorted(spans, key=lambda s: (s.start, s.end)):
        span.start, span.end = _align_down(span.start), _align_up(span.end)
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


def _ivshmem_template(system: SystemConfig) -> list[tuple[PciDevice, tuple[MemoryRegion, ...]]]:
    root = system.root_cell
    return [(device, root.shmem_regions_of(device)) for device in root.pci_devices
            if device.type == PciDeviceType.IVSHMEM]


def _shmem_block(template: Sequence[tuple[PciDevice, tuple[MemoryRegion, ...]]]
                 ) -> tuple[int, int]:
    """(start, size) of the page range the template's shared memory spans."""
    used = [r for _, regions in template for r in regions if r.size]
    if not used:
        return 0, 0
    low = _align_down(min(r.phys_start for r in used))
    high = _align_up(max(r.phys_end for r in used))
    return low, high - low


def _pio_regions(facts: Facts, console_port: int | None
                 ) -> tuple[list[tuple[PioRegion, str]], list[str]]:
    """Port whitelist in Jailhouse's style (pyjailhouse ``parse_ioports``)."""
    allowed: list[tuple[int, int, str]] = []
    trapped: list[str] = []

    def leaves(entries: Iterable[IoRegion]) -> Iterator[IoRegion]:
        for entry in entries:
            yield from entry.leaves()

    def pci_nodes(entries: Iterable[IoRegion]) -> Iterator[IoRegion]:
        for entry in entries:
            if _BDF_NAME.match(entry.name):
                yield entry
            else:
                yield from pci_nodes(entry.children)

    console = range(console_port, console_port + 8) if console_port is not None else range(0)
    for leaf in leaves(facts.ioports):
        if leaf.start == abi.PCI_REG_ADDR_PORT or leaf.start >= PCI_PIO_START:
            continue
        label = f"{leaf.start:04x}-{leaf.end:04x} : {leaf.label}"
        lowered = leaf.name.lower()
        if leaf.start in console:
            trapped.append(f"{label} (the hypervisor's debug console)")
        elif leaf.start in PIO_WHITELIST or "vga" in lowered or "vesa" in lowered:
            allowed.append((leaf.start, leaf.size, label))
        else:
            trapped.append(label)
    for node in pci_nodes(facts.ioports):
        if node.start >= PCI_PIO_START:
            allowed.append((node.start, node.size,
                            f"{node.start:04x}-{node.end:04x} : {node.label} (PCI I/O BAR)"))
    allowed.sort()
    return [(PioRegion(base=b, length=n), text) for b, n, text in allowed], trapped


def _iommu_of(facts: Facts, units: Sequence[DmarUnit]) -> dict[int, int]:
    """IOMMU unit index of every function (pyjailhouse ``parse_dmar``) by BDF."""
    result: dict[int, int] = {}
    for index, unit in enumerate(units):
        if unit.include_all:
            for function in facts.pci:
                result.setdefault(function.bdf, index)
            continue
        for scope in unit.scopes:
            if scope.type not in (1, 2) or not scope.path:
                continue
            bus = scope.bus
            bdf = 0
            for step, (dev, fn) in enumerate(scope.path):
                bdf = bus << 8 | dev << 3 | fn
                if step + 1 < len(scope.path):
                    bridge = facts.function(bdf)
                    if bridge is None or not bridge.secondary_buses:
                        break
                    bus = bridge.secondary_buses.start
            result[bdf] = index
            if scope.type == 2:
                bridge = facts.function(bdf)
                buses = bridge.secondary_buses if bridge is not None else range(0)
                for function in facts.pci:
                    if function.bdf >> 8 in buses:
                        result[function.bdf] = index
    return result


def _bus_iommu(facts: Facts, units: Sequence[DmarUnit], iommu: Mapping[int, int],
               bdf: int) -> int | None:
    """IOMMU of a virtual device at ``bdf``: the unit covering its bus."""
    bus = bdf >> 8
    for function in facts.pci:
        if function.is_bridge and bus in function.secondary_buses and function.bdf in iommu:
            return iommu[function.bdf]
    for index, unit in enumerate(units):
        if unit.include_all:
            return index
    if bus == 0 and units:
        return 0
    return None


def _console(facts: Facts, name: str, warnings: list[str]) -> tuple[Console, int | None]:
    attrs = facts.serial.get(name)
    if not attrs:
        warnings.append(f"no UART {name} in the facts: debug console 8250 at 0x3f8 assumed")
        return Console(address=0x3F8, type=ConsoleType.UART_8250), 0x3F8
    mmio = int(attrs.get("iomem_base", "0"), 0)
    if mmio:
        shift = int(attrs.get("iomem_reg_shift", "0"), 0)
        flags = 0x1 | (0x2 if shift == 2 else 0)
        return Console(address=mmio, size=0x1000, type=ConsoleType.UART_8250, flags=flags), None
    port = int(attrs.get("port", "0x3f8"), 0)
    return Console(address=port, type=ConsoleType.UART_8250), port


def create(facts: Facts, options: CreateOptions | None = None) -> CreateResult:
    """Generate the root cell's system config from the facts.

    :param facts: what the root cell sees (:func:`load_facts`, :meth:`Facts.from_json`)
    :param options: sizes, name, ivshmem template (default: :class:`CreateOptions`)
    :return: the config and the notes explaining it
    :raise ConfigError: when the facts do not allow a config (no MCFG, a VT-d unit of
        unknown size, a window too small, an ivshmem BDF taken by a real device, ...)
    """
    opts = options or CreateOptions()
    warnings = list(facts.warnings)
    if facts.jailhouse_enabled:
        warnings.append("Jailhouse was enabled when the facts were collected: the root cell "
                        "may not see the whole machine")

    # -- PCI devices, capabilities, MSI-X tables -------------------------------------------
    units = facts.dmar_units()
    if not units:
        what = "an AMD IVRS table, which this generator does not read" \
            if "IVRS" in facts.acpi_tables else "no DMAR table"
        warnings.append(f"no VT-d unit: {what}; the config has no IOMMU")
    if any(unit.segment for unit in units):
        raise ConfigError("DMAR unit for PCI segment != 0: not supported", source=facts.source)
    if len(units) > abi.MAX_IOMMU_UNITS:
        raise ConfigError(f"{len(units)} DMAR units; Jailhouse supports "
                          f"{abi.MAX_IOMMU_UNITS}", source=facts.source)
    iommu = _iommu_of(facts, units)
    devices: list[PciDevice] = []
    device_notes: list[str] = []
    caps: list[PciCapability] = []
    cap_notes: list[str] = []
    cap_lists: dict[tuple[PciCapability, ...], int] = {}
    msix_tables: list[tuple[int, int]] = []
    vectors = 0
    for function in facts.pci:
        if function.vendor == 0xFFFF:
            warnings.append(f"ignoring apparently disabled PCI device {function.slot}")
            continue
        if function.domain:
            raise ConfigError(f"PCI device {function.slot} in segment {function.domain}: "
                              "not supported", source=facts.source)
        if units and function.bdf not in iommu:
            raise ConfigError(f"PCI device {function.slot} outside the scope of an IOMMU",
                              source=facts.source)
        derived = function.capabilities(warnings)
        entries = [cap.entry() for cap in derived]
        notes = [f"{format_bdf(function.bdf)}" for _ in derived]
        quirk = next((q for q in PCI_QUIRKS if (q.vendor, q.device) ==
                      (function.vendor, function.device)), None) if opts.quirks else None
        if quirk is not None:
            for index, entry in enumerate(entries):
                if entry.id in quirk.writable:
                    entries[index] = replace(entry, flags=entry.flags | PciCapFlags.WRITE)
                    notes[index] += f": writable, jhlab quirk: {quirk.reason}"
            for extra in quirk.extra:
                entries.append(extra)
                notes.append(f"{format_bdf(function.bdf)}: jhlab quirk: {quirk.reason}")
        msi = next((c for c in derived if c.id == PciCapId.MSI), None)
        msix = next((c for c in derived if c.id == PciCapId.MSIX), None)
        msi_vectors = msix_vectors = msix_size = msix_address = 0
        msi_64 = msi_mask = False
        if msi is not None:
            control = function.u16(msi.start + 2)
            msi_vectors = 1 << ((control >> 1) & 0x7)
            msi_64, msi_mask = bool(control & 0x80), bool(control & 0x100)
        if msix is not None:
            if msix.msix_address:
                msix_vectors = (function.u16(msix.start + 2) & 0x7FF) + 1
                msix_size = _align_up(msix_vectors * 16)
                msix_address = msix.msix_address
                msix_tables.append((msix_address, msix_size))
            else:
                warnings.append(f"ignoring invalid MSI-X configuration of {function.slot}")
        vectors += max(msi_vectors, msix_vectors)
        key = tuple(entries)
        if key and key in cap_lists:
            caps_start = cap_lists[key]
            cap_notes[caps_start] += f", shared with {format_bdf(function.bdf)}"
        elif key:
            caps_start = len(caps)
            cap_lists[key] = caps_start
            caps += entries
            cap_notes += notes
        else:
            caps_start = 0
        devices.append(PciDevice(
            type=PciDeviceType.BRIDGE if function.is_bridge else PciDeviceType.DEVICE,
            iommu=iommu.get(function.bdf, 0), bdf=function.bdf,
            bar_mask=function.bar_masks(), caps_start=caps_start, num_caps=len(entries),
            num_msi_vectors=msi_vectors, msi_64bits=msi_64, msi_maskable=msi_mask,
            num_msix_vectors=msix_vectors, msix_region_size=msix_size,
            msix_address=msix_address))
        driver = f", driver {function.driver}" if function.driver else ""
        device_notes.append(f"{format_bdf(function.bdf)} {function.vendor:04x}:"
                            f"{function.device:04x} class {function.class_code:06x}{driver}")

    # -- memory ----------------------------------------------------------------------------
    spans, dmar_entries = _iomem_regions(facts, msix_tables)
    for base, limit in facts.dmar_rmrrs():
        spans.append(_Span(base, limit + 1, int(RAM_FLAGS),
                           RegionNote(kind="rmrr", text=f"{base:x}-{limit:x} : DMAR RMRR")))
    spans += _acpi_spans(facts, warnings)
    template = _ivshmem_template(opts.ivshmem_from) if opts.ivshmem_from else []
    _, shmem_size = _shmem_block(template)
    window = _memmap_window(facts.cmdline)
    if window is not None:
        start, size = window
        ram = [s for s in spans if s.note.kind == "ram" and s.start < start + size
               and start < s.end]
        if ram:
            raise ConfigError(f"the memmap= window {start:#x}+{size:#x} overlaps System RAM "
                              f"{ram[0].start:#x}-{ram[0].end - 1:#x}: the reservation did "
                              "not take effect", source=facts.source)
    else:
        wanted = opts.mem_inmates if opts.mem_inmates is not None else 2 * MIB
        size = (opts.mem_hv + wanted + shmem_size + MIB - 1) & ~(MIB - 1)
        holder = next((s for s in reversed(spans) if s.note.kind == "ram"
                       and s.end - _align_up(s.start) >= size), None)
        if holder is None:
            raise ConfigError(f"no RAM range of {size:#x} bytes for the hypervisor",
                              source=facts.source)
        start = _align_up(holder.start)
        holder.start = start + size
        warnings.append(f"no memmap= reservation on the kernel command line: the config "
                        f"expects memmap={_format_memmap(start, size)}")
    low = start + opts.mem_hv + (opts.mem_inmates or 0)
    # the shared memory ends the window, starting MiB-aligned where there is room
    shmem_start = start + size - shmem_size
    if shmem_start & (MIB - 1) and shmem_start & ~(MIB - 1) >= low:
        shmem_start &= ~(MIB - 1)
    shmem_start = _align_down(shmem_start)
    if shmem_start < low:
        raise ConfigError(f"the memmap= reservation ({size:#x} bytes at {start:#x}) is too "
                          f"small: the hypervisor, inmates and shared memory need "
                          f"{low - start + shmem_size:#x}", source=facts.source)
    inmates = opts.mem_inmates if opts.mem_inmates is not None else \
        shmem_start - start - opts.mem_hv
    memmap = _format_memmap(start, size)
    if inmates:
        spans.append(_Span(start + opts.mem_hv, start + opts.mem_hv + inmates, int(RAM_FLAGS),
                           RegionNote(kind="inmates", text="RAM (inmates): loadable cell RAM "
                                      "must lie here")))
    spans = [s for s in _normalize(spans) if s.end > s.start]

    # ivshmem devices and their shared memory at the end of the window
    shmem_regions: list[MemoryRegion] = []
    shmem_notes: list[RegionNote] = []
    block_start, _ = _shmem_block(template)
    names = ("state table", "R/W section")
    for device, regions in template:
        if facts.function(device.bdf) is not None:
            raise ConfigError(f"ivshmem device {device.bdf_str} of the template collides with "
                              "a real PCI device", source=facts.source)
        if device.bdf >> 8 and not any(device.bdf >> 8 in f.secondary_buses
                                       for f in facts.pci):
            warnings.append(f"no bridge leads to bus {device.bdf >> 8:02x} of ivshmem "
                            f"{device.bdf_str}: Linux will not find it")
        first = len(shmem_regions)
        for index, region in enumerate(regions):
            moved = replace(region, phys_start=region.phys_start - block_start + shmem_start,
                            virt_start=region.virt_start - block_start + shmem_start) \
                if region.size else region
            shmem_regions.append(moved)
            part = names[index] if index < 2 else f"output section of peer {index - 2}"
            if index - 2 == device.shmem_dev_id:
                part += " (ours)"
            shmem_notes.append(RegionNote(kind="ivshmem", text=f"ivshmem {device.bdf_str}: "
                                          f"{part}", bdf=device.bdf))
        covering = _bus_iommu(facts, units, iommu, device.bdf)
        devices.append(replace(device, shmem_regions_start=first,
                               iommu=covering if covering is not None else 0))
        device_notes.append(f"{device.bdf_str} ivshmem (virtual, from the template)")

    memory = shmem_regions + [MemoryRegion(phys_start=s.start, virt_start=s.start,
                                           size=s.end - s.start, flags=s.flags) for s in spans]
    region_notes = shmem_notes + [s.note for s in spans]

    # -- platform --------------------------------------------------------------------------
    mmconfig_base, end_bus = facts.mmconfig()
    iommu_units: list[IommuUnit] = []
    for unit in units:
        dmar_entry = next((e for e in dmar_entries if e.start == unit.base), None)
        if dmar_entry is None:
            raise ConfigError(f"the size of the DMAR unit at {unit.base:#x} cannot be "
                              "identified: Linux must run with the Intel IOMMU enabled "
                              "(intel_iommu=on)", source=facts.source)
        unit_size = _align_up(dmar_entry.size)
        if unit_size > 0x3000:
            raise ConfigError(f"unexpectedly large DMAR region at {unit.base:#x} "
                              f"({unit_size:#x})", source=facts.source)
        iommu_units.append(IommuUnit(type=IommuType.INTEL, base=unit.base, size=unit_size))
    iommu_units += [IommuUnit()] * (abi.MAX_IOMMU_UNITS - len(iommu_units))

    ioapics = facts.ioapics()
    chips = []
    for chip in ioapics:
        unit_index, bdf = 0, 0
        for index, unit in enumerate(units):
            for scope in unit.scopes:
                if scope.type == 3 and scope.enum_id == chip.id and scope.path:
                    dev, fn = scope.path[0]
                    unit_index, bdf = index, scope.bus << 8 | dev << 3 | fn
        chips.append(Irqchip(address=chip.address, id=unit_index << 16 | bdf,
                             pin_bitmap=((1 << IOAPIC_PINS) - 1, 0, 0, 0)))
    pm_timer = facts.pm_timer_port()
    pm_ports = [e for top in facts.ioports for e in top.walk() if "ACPI PM_TMR" in e.name]
    if pm_ports and pm_ports[0].start != pm_timer:
        warnings.append(f"the FADT says PM timer port {pm_timer:#x}, /proc/ioports "
                        f"{pm_ports[0].start:#x}")
    interrupts = abi.IOAPIC_MAX_PINS * max(1, len(ioapics)) + vectors
    limit = 1 << math.ceil(math.log2(interrupts))

    console, console_port = _console(facts, opts.console, warnings)
    pio, trapped = _pio_regions(facts, console_port)
    if not facts.cpus:
        raise ConfigError("no online CPU in the facts", source=facts.source)
    cpu_bytes = (max(facts.cpus) // 64 + 1) * 8

    root = CellConfig(
        signature=bytes(5), architecture=0, revision=0, name=opts.name,
        cpu_set=cpu_set_from(facts.cpus, cpu_bytes), memory_regions=tuple(memory),
        irqchips=tuple(chips), pio_regions=tuple(p for p, _ in pio),
        pci_devices=tuple(devices), pci_caps=tuple(caps))
    system = SystemConfig(
        flags=SysFlags.VIRTUAL_DEBUG_CONSOLE,
        hypervisor_memory=MemoryRegion(phys_start=start, size=opts.mem_hv),
        debug_console=console, pci_mmconfig_base=mmconfig_base, pci_mmconfig_end_bus=end_bus,
        iommu_units=tuple(iommu_units),
        x86=X86Platform(pm_timer_address=pm_timer, apic_mode=ApicMode.AUTO,
                        vtd_interrupt_limit=limit),
        root_cell=root)
    return CreateResult(
        config=system, regions=tuple(region_notes), pio=tuple(t for _, t in pio),
        pio_trapped=tuple(trapped), devices=tuple(device_notes), caps=tuple(cap_notes),
        memmap=memmap, window=(start, size), vectors=vectors, warnings=tuple(warnings),
        facts=facts)


# --- TOML ---------------------------------------------------------------------------------------


def render_toml(result: CreateResult) -> str:
    """The generated config as a commented TOML source (compiles to the same bytes).

    :param result: what :func:`create` returned
    """
    system = result.config
    root = system.root_cell
    facts = result.facts
    start, size = result.window
    what = f" of {facts.product}" if facts.product else ""
    lines = [
        f"# {root.name}: Jailhouse system config generated by 'config create' from what the "
        f"root cell{what} sees",
        f"# (kernel {facts.kernel or 'unknown'}; facts: {facts.source}).",
        f"# The root cell's kernel command line must reserve the window: memmap={result.memmap}",
        f"# ({start:#x}..{start + size:#x}: hypervisor, inmate RAM, ivshmem shared memory).",
    ]
    for warning in result.warnings:
        lines.append(f"# WARNING: {warning}")
    lines += ['kind = "system"', 'flags = ["VIRTUAL_DEBUG_CONSOLE"]', "",
              "[hypervisor_memory]  # start of the memmap= window",
              f"phys_start = {_hex(system.hypervisor_memory.phys_start)}",
              f"size = {_size(system.hypervisor_memory.size)}", "",
              "[debug_console]", *_console_lines(system.debug_console), "",
              "[platform]  # ACPI MCFG",
              f"pci_mmconfig_base = {_hex(system.pci_mmconfig_base)}",
              f"pci_mmconfig_end_bus = {_hex(system.pci_mmconfig_end_bus)}"]
    for unit in system.active_iommu_units:
        lines += ["", "[[platform.iommu_units]]  # ACPI DMAR", *_iommu_lines(unit)]
    x86 = system.x86
    lines += ["", "[platform.x86]",
              f"pm_timer_address = {_hex(x86.pm_timer_address)}  # ACPI FADT",
              f"apic_mode = {_enum_name(x86.apic_mode, ApicMode)}",
              f"vtd_interrupt_limit = {x86.vtd_interrupt_limit}  # 2^n >= "
              f"{abi.IOAPIC_MAX_PINS} per IOAPIC + {result.vectors} MSI/MSI-X vectors",
              "tsc_khz = 0  # 0: the driver fills in Linux's values", "apic_khz = 0", "",
              "[root_cell]", f"name = {_q(root.name)}",
              f"cpus = {_ranges(root.cpus)}  # online CPUs"]
    if root.cpu_set_size != 8:
        lines.append(f"cpu_set_size = {root.cpu_set_size}")
    lines.append("pio_regions = [")
    for index, (pio, text) in enumerate(zip(root.pio_regions, result.pio, strict=True)):
        lines.append(f"    {{ base = {_hex(pio.base)}, length = {_hex(pio.length)} }},"
                     f"  # {index}: {text}")
    lines.append("]")
    if result.pio_trapped:
        lines.append("# Trapped (not whitelisted):")
        lines += [f"#   {text}" for text in result.pio_trapped]
    for index, (region, note) in enumerate(zip(root.memory_regions, result.regions,
                                               strict=True)):
        lines += ["", f"[[root_cell.memory_regions]]  # {index}: {note.text}"]
        if region == MemoryRegion():
            continue
        lines.append(f"phys_start = {_hex(region.phys_start)}")
        if region.virt_start != region.phys_start:
            lines.append(f"virt_start = {_hex(region.virt_start)}")
        lines.append(f"size = {_size(region.size)}")
        lines.append(f"flags = {_flag_names(region.flags, MemFlags)}")
    for chip in root.irqchips:
        lines += ["", "[[root_cell.irqchips]]  # IOAPIC (MADT; ID: DMAR unit << 16 | BDF)",
                  f"address = {_hex(chip.address)}", f"id = {_hex(chip.id)}",
                  f"pins = {_ranges(chip.pins)}"]
    for index, (device, text) in enumerate(zip(root.pci_devices, result.devices, strict=True)):
        lines += ["", f"[[root_cell.pci_devices]]  # {index}: {text}", *_pci_lines(device)]
    for index, (cap, text) in enumerate(zip(root.pci_caps, result.caps, strict=True)):
        lines += ["", f"[[root_cell.pci_caps]]  # {index}: {text}",
                  f"id = {_enum_name(cap.id, PciCapId) if cap.id else 0}",
                  f"start = {_hex(cap.start)}", f"len = {_hex(cap.len)}"]
        if cap.flags:
            lines.append(f"flags = {_flag_names(cap.flags, PciCapFlags)}")
    return "\n".join(lines) + "\n"
