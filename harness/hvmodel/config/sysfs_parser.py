"""The facts of a running root cell, as ``config create`` reads them; models
``pyjailhouse/sysfs_parser.py``.

:mod:`.collect` prints what the root cell shows (``/proc/iomem`` and ``/proc/ioports``,
PCI config space and ``resource`` files from sysfs, the ACPI tables, CPUs, UARTs) as one
JSON document; :func:`load_facts` and :meth:`Facts.from_json` read it back, and the
classes here decode it the way Jailhouse's parser does: the I/O resource trees
(:func:`parse_io_tree`), PCI functions with their BAR masks and the capability list with
the lengths and write permissions Jailhouse's tool derives, and the ACPI tables (MADT
IOAPICs, DMAR units, device scopes and RMRRs, the FADT's PM timer, MCFG). What becomes of
the facts is :mod:`.create`'s business.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .. import abi
from ..abi import PciCapFlags, PciCapId
from ..cpus import parse_cpu_list
from ..errors import ConfigError
from .model import PciCapability, format_bdf

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
        if low & abi.PCI_BAR_IO:
            return 0  # an I/O BAR cannot hold an MSI-X table
        address = low & ~0xF
        if low & abi.PCI_BAR_MEM_TYPE_MASK == abi.PCI_BAR_64BIT and index < 5:
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
        end = min(len(self.config), abi.PCI_CFG_SPACE_SIZE)
        while pointer and pointer not in seen and pointer + 2 <= end:
            seen.add(pointer)
            cap_id, following = self._u8(pointer), self._u8(pointer + 1) & ~0x3
            msix = 0
            flags: int
            if cap_id == PciCapId.PM:
                length, flags = 8, PciCapFlags.WRITE
            elif cap_id == PciCapId.MSI:
                control = self.u16(pointer + 2)
                length = 10 + (4 if control & abi.PCI_MSI_CTRL_64BIT else 0) + (
                    10 if control & abi.PCI_MSI_CTRL_MASKBIT else 0)
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
            if cap_id & abi.PCI_EXT_CAP:
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
            caps.append(DerivedCap(cap_id | abi.PCI_EXT_CAP, pointer, length, 0))
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
