"""Generate a root-cell system config from collected facts; models ``tools/jailhouse-config-create``.

Jailhouse's ``jailhouse config create`` (with ``pyjailhouse/sysfs_parser.py`` and the
``root-cell-config.c.tmpl`` template) reads ``/proc/iomem``, ``/proc/ioports``, sysfs PCI
config space and the ACPI tables of the running machine and writes a C system config that
gives the root cell everything Linux uses, leaving out what the hypervisor intercepts.
This module does the same from the JSON document :mod:`.collect` prints (standard library
only, so it runs in the root cell as well as on the host; :mod:`.sysfs_parser` decodes the
document, :mod:`.regions` derives the memory regions) and returns a
:class:`~.system.SystemConfig` plus the notes that explain each entry; :func:`render_toml`
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

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

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
from ..cpus import cpu_set_from
from ..errors import ConfigError
from .decompile import (
    console_lines,
    enum_name,
    flag_names,
    hex_value,
    iommu_lines,
    pci_lines,
    quote,
    ranges,
    size_value,
)
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
from .regions import (
    RAM_FLAGS,
    RegionNote,
    Span,
    acpi_regions,
    align_down,
    align_up,
    format_memmap,
    iomem_regions,
    ivshmem_template,
    memmap_window,
    normalize,
    parse_size_parts,
    shmem_block,
)
from .sysfs_parser import DmarUnit, Facts, IoRegion
from .system import IommuUnit, SystemConfig, X86Platform

MIB: Final = 1 << 20


#: Default hypervisor size (``qemu-x86.c``: 6 MiB; Jailhouse's tool defaults to 64 MiB).
DEFAULT_MEM_HV: Final = 6 * MIB
#: Default root-cell name (Jailhouse's tool: "RootCell").
DEFAULT_NAME: Final = "RootCell"
#: IOAPIC pins given to the root cell (Jailhouse's tool writes ``pin_bitmap = 0xffffff``).
IOAPIC_PINS: Final = 24

_BDF_NAME: Final = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")

#: Port ranges whose first port Jailhouse's tool whitelists for the root cell.
PIO_WHITELIST: Final = {0x40: "PIT", 0x60: "keyboard", 0x61: "NMI status/control",
                        0x64: "i8042", 0x70: "RTC", 0x2F8: "serial", 0x3F8: "serial"}
#: Ports from here on belong to PCI I/O BARs (Jailhouse drops other ranges above it).
PCI_PIO_START: Final = 0xD00
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


# --- sizes ----------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """A size like ``6M``, ``0x600000``, ``512K`` (powers of 1024).

    :raise ValueError: on anything else
    """
    match = re.fullmatch(r"\s*(0[xX][0-9a-fA-F]+|[0-9]+)\s*([KMGkmg]?)\s*", text)
    if not match:
        raise ValueError(f"bad size {text!r}; expected e.g. 6M, 512K or 0x600000")
    return parse_size_parts(match[1], match[2])

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
            msi_vectors = 1 << ((control & abi.PCI_MSI_CTRL_MMC_MASK) >> abi.PCI_MSI_CTRL_MMC_SHIFT)
            msi_64 = bool(control & abi.PCI_MSI_CTRL_64BIT)
            msi_mask = bool(control & abi.PCI_MSI_CTRL_MASKBIT)
        if msix is not None:
            if msix.msix_address:
                msix_vectors = (function.u16(msix.start + 2) & abi.PCI_MSIX_CTRL_TABLE_SIZE) + 1
                msix_size = align_up(msix_vectors * abi.PCI_MSIX_VECTOR_SIZE)
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
    spans, dmar_entries = iomem_regions(facts, msix_tables)
    for base, limit in facts.dmar_rmrrs():
        spans.append(Span(base, limit + 1, int(RAM_FLAGS),
                           RegionNote(kind="rmrr", text=f"{base:x}-{limit:x} : DMAR RMRR")))
    spans += acpi_regions(facts, warnings)
    template = ivshmem_template(opts.ivshmem_from) if opts.ivshmem_from else []
    _, shmem_size = shmem_block(template)
    window = memmap_window(facts.cmdline)
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
                       and s.end - align_up(s.start) >= size), None)
        if holder is None:
            raise ConfigError(f"no RAM range of {size:#x} bytes for the hypervisor",
                              source=facts.source)
        start = align_up(holder.start)
        holder.start = start + size
        warnings.append(f"no memmap= reservation on the kernel command line: the config "
                        f"expects memmap={format_memmap(start, size)}")
    low = start + opts.mem_hv + (opts.mem_inmates or 0)
    # the shared memory ends the window, starting MiB-aligned where there is room
    shmem_start = start + size - shmem_size
    if shmem_start & (MIB - 1) and shmem_start & ~(MIB - 1) >= low:
        shmem_start &= ~(MIB - 1)
    shmem_start = align_down(shmem_start)
    if shmem_start < low:
        raise ConfigError(f"the memmap= reservation ({size:#x} bytes at {start:#x}) is too "
                          f"small: the hypervisor, inmates and shared memory need "
                          f"{low - start + shmem_size:#x}", source=facts.source)
    inmates = opts.mem_inmates if opts.mem_inmates is not None else \
        shmem_start - start - opts.mem_hv
    memmap = format_memmap(start, size)
    if inmates:
        spans.append(Span(start + opts.mem_hv, start + opts.mem_hv + inmates, int(RAM_FLAGS),
                           RegionNote(kind="inmates", text="RAM (inmates): loadable cell RAM "
                                      "must lie here")))
    spans = [s for s in normalize(spans) if s.end > s.start]

    # ivshmem devices and their shared memory at the end of the window
    shmem_regions: list[MemoryRegion] = []
    shmem_notes: list[RegionNote] = []
    block_start, _ = shmem_block(template)
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
        unit_size = align_up(dmar_entry.size)
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
              f"phys_start = {hex_value(system.hypervisor_memory.phys_start)}",
              f"size = {size_value(system.hypervisor_memory.size)}", "",
              "[debug_console]", *console_lines(system.debug_console), "",
              "[platform]  # ACPI MCFG",
              f"pci_mmconfig_base = {hex_value(system.pci_mmconfig_base)}",
              f"pci_mmconfig_end_bus = {hex_value(system.pci_mmconfig_end_bus)}"]
    for unit in system.active_iommu_units:
        lines += ["", "[[platform.iommu_units]]  # ACPI DMAR", *iommu_lines(unit)]
    x86 = system.x86
    lines += ["", "[platform.x86]",
              f"pm_timer_address = {hex_value(x86.pm_timer_address)}  # ACPI FADT",
              f"apic_mode = {enum_name(x86.apic_mode, ApicMode)}",
              f"vtd_interrupt_limit = {x86.vtd_interrupt_limit}  # 2^n >= "
              f"{abi.IOAPIC_MAX_PINS} per IOAPIC + {result.vectors} MSI/MSI-X vectors",
              "tsc_khz = 0  # 0: the driver fills in Linux's values", "apic_khz = 0", "",
              "[root_cell]", f"name = {quote(root.name)}",
              f"cpus = {ranges(root.cpus)}  # online CPUs"]
    if root.cpu_set_size != 8:
        lines.append(f"cpu_set_size = {root.cpu_set_size}")
    lines.append("pio_regions = [")
    for index, (pio, text) in enumerate(zip(root.pio_regions, result.pio, strict=True)):
        lines.append(f"    {{ base = {hex_value(pio.base)}, length = {hex_value(pio.length)} }},"
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
        lines.append(f"phys_start = {hex_value(region.phys_start)}")
        if region.virt_start != region.phys_start:
            lines.append(f"virt_start = {hex_value(region.virt_start)}")
        lines.append(f"size = {size_value(region.size)}")
        lines.append(f"flags = {flag_names(region.flags, MemFlags)}")
    for chip in root.irqchips:
        lines += ["", "[[root_cell.irqchips]]  # IOAPIC (MADT; ID: DMAR unit << 16 | BDF)",
                  f"address = {hex_value(chip.address)}", f"id = {hex_value(chip.id)}",
                  f"pins = {ranges(chip.pins)}"]
    for index, (device, text) in enumerate(zip(root.pci_devices, result.devices, strict=True)):
        lines += ["", f"[[root_cell.pci_devices]]  # {index}: {text}", *pci_lines(device)]
    for index, (cap, text) in enumerate(zip(root.pci_caps, result.caps, strict=True)):
        lines += ["", f"[[root_cell.pci_caps]]  # {index}: {text}",
                  f"id = {enum_name(cap.id, PciCapId) if cap.id else 0}",
                  f"start = {hex_value(cap.start)}", f"len = {hex_value(cap.len)}"]
        if cap.flags:
            lines.append(f"flags = {flag_names(cap.flags, PciCapFlags)}")
    return "\n".join(lines) + "\n"
