"""Config sets as ``tools/jailhouse-config-check`` reads them; models ``pyjailhouse/config_parser.py``.

Jailhouse's checker does not read a config the way the driver or :mod:`.parser` does: it
decodes only what its checks need and is lenient about everything else. This module reads
the same bytes the same way, so that ``jailhouse config check`` accepts, rejects and names
exactly what Jailhouse's tool accepts, rejects and names (anchored revision: master
``e57d1eff``):

* a system config needs its 12-byte header with ``JHSYS``, revision 14 and an architecture
  0..2, then the fields up to the root cell (hypervisor memory, MMCONFIG, eight IOMMU
  slots, the arch union). An IOMMU slot is read as far as its type needs (16 bytes, 26 for
  AMD, 28 for the TI PVU); another type than 0..5 stops the reading;
* a cell (and the root cell, without the signature and revision test) needs its 132-byte
  descriptor and then only the arrays the checker uses, in file order: memory regions
  after the CPU set, the cache regions skipped without being read, irqchips, PIO regions
  (``jailhouse cell linux`` reads the same, and the descriptor's ``cpu_reset_address``).
  PCI devices, capabilities, stream IDs and any bytes after them are not looked at, so a
  file cut short there, or longer than its counts say, is accepted;
* the name is the whole 32-byte field decoded as UTF-8 with NULs stripped at both ends
  (bytes after the first NUL stay part of it); bytes that are not UTF-8 are an exception
  the tool does not catch;
* the architecture of the root cell's own descriptor is converted (> 2 is an error) but
  never compared; a non-root cell of another architecture than the system's is refused.

Every refusal is a :class:`SetReadError` carrying the tool's message; the tool prints it as
``MESSAGE: FILE`` (:meth:`SetReadError.tool_line`). :func:`region_dump` and
:func:`mem_flag_str` print a region as ``MemRegion.__str__`` does.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from .. import abi
from ..abi import Architecture, IommuType, MemFlags
from ..errors import ConfigError
from .model import CellConfig, MemoryRegion
from .system import SystemConfig

#: Start of a cell descriptor: signature, architecture, revision, name.
_CELL_HEAD: Final = struct.Struct("<5sBH32s")
#: The counts the checker uses: cpu_set_size, memory regions, cache regions, irqchips, PIO.
_CELL_COUNTS: Final = struct.Struct("<5I")
#: The descriptor's ``cpu_reset_address``.
_CPU_RESET_ADDRESS: Final = struct.Struct("<Q")
#: Start of a system config as the checker unpacks it: signature, architecture, revision
#: (and the four flag bytes it skips).
_SYSTEM_HEAD: Final = struct.Struct("<5sBH4x")
#: The part of an IOMMU slot read before its type is known: type, base, size.
_IOMMU_HEAD: Final = struct.Struct("<IQI")
#: The ARM member of the arch union: maintenance IRQ, GIC version, GICD/C/H/V/R bases.
_ARM_PLATFORM: Final = struct.Struct("<BB2xQQQQQ")
#: Bytes of each IOMMU type's union member the checker reads after the 16-byte head.
_IOMMU_UNION_READ: Final = {
    IommuType.UNUSED: 0, IommuType.AMD: 10, IommuType.INTEL: 0, IommuType.SMMUV3: 0,
    IommuType.PVU: 12, IommuType.ARM_MMU500: 0,
}

NOT_A_CELL: Final = "Not a cell configuration"
NOT_A_ROOT_CELL: Final = "Not a root cell configuration"
REVISION_MISMATCH: Final = "Configuration file revision mismatch"
UNSUPPORTED_ARCH: Final = "Configuration has unsupported architecture"


class SetReadError(ConfigError):
    """A config Jailhouse's checker refuses, with the tool's own message.

    :param message: the message (``Not a cell configuration``, ...)
    :param source: the file name as given on the command line
    :param uncaught: the tool does not catch this one (it ends with a traceback whose last
        line is ``message``, and exits 1)
    """

    def __init__(self, message: str, *, source: str = "<config>", uncaught: bool = False
                 ) -> None:
        super().__init__(message, source=source)
        self.uncaught = uncaught

    @property
    def tool_line(self) -> str:
        """The line the tool prints on stderr (without the newline)."""
        return self.message if self.uncaught else f"{self.message}: {self.source}"


@dataclass(frozen=True, kw_only=True, slots=True)
class SetCell:
    """A cell as the checker sees it.

    :param name: the name as pyjailhouse decodes it
    :param arch: the architecture label (``x86``, ``arm``, ``arm64``)
    :param memory_regions: the memory regions, in file order
    :param irqchip_addresses: the irqchips' MMIO bases, in file order
    :param cpu_set: the CPU bitmap (read only when asked for: Jailhouse's next branch)
    :param pio_regions: (base, length) of each PIO region, in file order
    :param cpu_reset_address: where the cell's CPUs start
    """

    name: str
    arch: str
    memory_regions: tuple[MemoryRegion, ...]
    irqchip_addresses: tuple[int, ...]
    cpu_set: bytes = b""
    pio_regions: tuple[tuple[int, int], ...] = ()
    cpu_reset_address: int = 0

    @property
    def cpus(self) -> set[int]:
        """The CPU numbers, added in ascending order as next's pyjailhouse adds them (the
        order decides how Python prints a set of them)."""
        return {index * 8 + bit for index, byte in enumerate(self.cpu_set) for bit in range(8)
                if byte >> bit & 1}


@dataclass(frozen=True, kw_only=True, slots=True)
class SetSystem:
    """A system config as the checker sees it.

    :param arch: the architecture label
    :param hypervisor_memory: the hypervisor's memory region
    :param pci_mmconfig_base: MMCONFIG base (0: no MMCONFIG check)
    :param pci_mmconfig_end_bus: last MMCONFIG bus
    :param iommus: (type, base, size) of each IOMMU slot in use, in slot order
    :param gic_version: ARM: the GIC version (0 on x86)
    :param gic_bases: ARM: GICD, GICC, GICH, GICV, GICR bases (zeros on x86)
    :param root: the root cell
    """

    arch: str
    hypervisor_memory: MemoryRegion
    pci_mmconfig_base: int
    pci_mmconfig_end_bus: int
    iommus: tuple[tuple[int, int, int], ...]
    gic_version: int
    gic_bases: tuple[int, int, int, int, int]
    root: SetCell

    @property
    def mmconfig_size(self) -> int:
        """Bytes of MMCONFIG space: ``(end_bus + 1) * 256 * 4096``."""
        return (self.pci_mmconfig_end_bus + 1) * 256 * 4096


def arch_label(value: int) -> str:
    """``convert_arch``: the label of an architecture byte.

    :raise SetReadError: for a value above 2
    """
    if value not in Architecture._value2member_map_:
        raise SetReadError(UNSUPPORTED_ARCH)
    return Architecture(value).label


def _unpack(fmt: struct.Struct, data: bytes, offset: int, missing: str) -> tuple[Any, ...]:
    """``struct.unpack_from`` at ``offset``; a short blob raises ``missing``."""
    if offset + fmt.size > len(data):
        raise SetReadError(missing)
    return fmt.unpack_from(data, offset)


def read_cell(data: bytes, *, root: bool = False, cpu_set: bool = False,
              arch: str | None = None, source: str = "<config>") -> SetCell:
    """Read a cell config (or, with ``root``, the root cell at the start of ``data``).

    :param data: the bytes, starting at the cell descriptor
    :param root: the root cell inside a system config: no signature or revision test, and
        a short blob is "Not a root cell configuration"
    :param cpu_set: also read the CPU set, as Jailhouse's next branch does (a short blob
        is refused there)
    :param arch: the system's architecture label: a cell of another one is refused, after
        it was read (``Cell architecture mismatch: arm64``)
    :param source: the file name for the error
    :raise SetReadError: what the tool refuses, in the tool's order
    """
    missing = NOT_A_ROOT_CELL if root else NOT_A_CELL
    try:
        if len(data) < abi.CELL_DESC_SIZE:  # the tool unpacks the descriptor at once
            raise SetReadError(missing)
        signature, arch_byte, revision, raw_name = _CELL_HEAD.unpack_from(data)
        if not root:
            if signature != abi.CELL_SIGNATURE:
                raise SetReadError(NOT_A_CELL)
            if revision != abi.CONFIG_REVISION:
                raise SetReadError(REVISION_MISMATCH)
        try:
            name = raw_name.decode().strip("\0")
        except UnicodeDecodeError as exc:
            raise SetReadError(f"{type(exc).__name__}: {exc}", uncaught=True) from None
        label = arch_label(arch_byte)
        set_size, num_memory, num_caches, num_irqchips, num_pio = _CELL_COUNTS.unpack_from(
            data, abi.CELL_OFF_CPU_SET_SIZE)
        (reset_address,) = _CPU_RESET_ADDRESS.unpack_from(data, abi.CELL_OFF_CPU_RESET_ADDRESS)
        offset = abi.CELL_DESC_SIZE
        cpus = b""
        if cpu_set:
            if offset + set_size > len(data):
                raise SetReadError(missing)
            cpus = data[offset:offset + set_size]
        offset += set_size
        regions = []
        for _ in range(num_memory):
            phys, virt, size, flags = _unpack(abi.MEMORY, data, offset, missing)
            regions.append(MemoryRegion(phys_start=phys, virt_start=virt, size=size, flags=flags))
            offset += abi.MEMORY.size
        offset += num_caches * abi.CACHE.size
        addresses = []
        for _ in range(num_irqchips):
            addresses.append(_unpack(abi.IRQCHIP, data, offset, missing)[0])
            offset += abi.IRQCHIP.size
        pios = []
        for _ in range(num_pio):
            pios.append(_unpack(abi.PIO, data, offset, missing))
            offset += abi.PIO.size
        if arch is not None and label != arch:
            raise SetReadError(f"Cell architecture mismatch: {label}")
    except SetReadError as exc:
        exc.source = source
        raise
    return SetCell(name=name, arch=label, memory_regions=tuple(regions),
                   irqchip_addresses=tuple(addresses), cpu_set=cpus,
                   pio_regions=tuple((base, length) for base, length in pios),
                   cpu_reset_address=reset_address)


def read_system(data: bytes, *, cpu_set: bool = False, source: str = "<config>") -> SetSystem:
    """Read a system config and its root cell.

    :param data: the whole file
    :param cpu_set: also read the root cell's CPU set (Jailhouse's next branch)
    :param source: the file name for the error
    :raise SetReadError: what the tool refuses, in the tool's order
    """
    try:
        signature, arch, revision = _unpack(_SYSTEM_HEAD, data, 0, NOT_A_ROOT_CELL)
        if signature != abi.SYSTEM_SIGNATURE:
            raise SetReadError(NOT_A_ROOT_CELL)
        if revision != abi.CONFIG_REVISION:
            raise SetReadError(REVISION_MISMATCH)
        label = arch_label(arch)
        phys, virt, size, flags = _unpack(abi.MEMORY, data, abi.SYS_OFF_HV_MEMORY,
                                          NOT_A_ROOT_CELL)
        hypervisor = MemoryRegion(phys_start=phys, virt_start=virt, size=size, flags=flags)
        mmconfig_base, end_bus, _virtual, _domain = _unpack(
            abi.PLATFORM_PCI, data, abi.SYS_OFF_PLATFORM, NOT_A_ROOT_CELL)
        iommus = []
        for slot in range(abi.MAX_IOMMU_UNITS):
            offset = abi.SYS_OFF_IOMMU + slot * abi.IOMMU.size
            kind, base, unit_size = _unpack(_IOMMU_HEAD, data, offset, NOT_A_ROOT_CELL)
            if kind not in _IOMMU_UNION_READ:
                raise SetReadError(f"Unknown IOMMU type: {kind}")
            if offset + _IOMMU_HEAD.size + _IOMMU_UNION_READ[IommuType(kind)] > len(data):
                raise SetReadError(NOT_A_ROOT_CELL)
            if kind != IommuType.UNUSED:
                iommus.append((kind, base, unit_size))
        arm = _unpack(_ARM_PLATFORM, data, abi.SYS_OFF_X86, NOT_A_ROOT_CELL)
        is_arm = label != Architecture.X86.label
        root = read_cell(data[abi.ROOT_CELL_OFFSET:], root=True, cpu_set=cpu_set)
    except SetReadError as exc:
        exc.source = source
        raise
    gic_bases = (arm[2], arm[3], arm[4], arm[5], arm[6]) if is_arm else (0, 0, 0, 0, 0)
    return SetSystem(
        arch=label, hypervisor_memory=hypervisor, pci_mmconfig_base=mmconfig_base,
        pci_mmconfig_end_bus=end_bus, iommus=tuple(iommus),
        gic_version=arm[1] if is_arm else 0, gic_bases=gic_bases, root=root,
    )


def read_set(system: SystemConfig, cells: Sequence[CellConfig], *, cpu_set: bool = False,
             sources: Sequence[str] | None = None, system_source: str = "<system>",
             ) -> tuple[SetSystem, list[SetCell]]:
    """What the checker reads from the binary form of model objects.

    :param sources: file names of ``cells``, for errors (default: ``<cell N>``)
    :param system_source: file name of the system config, for errors
    :raise SetReadError: what the tool would refuse in those bytes
    """
    names = list(sources) if sources is not None else [f"<cell {i}>" for i in range(len(cells))]
    set_system = read_system(system.to_bytes(), cpu_set=cpu_set, source=system_source)
    return set_system, [
        read_cell(cell.to_bytes(), cpu_set=cpu_set, arch=set_system.arch, source=name)
        for cell, name in zip(cells, names, strict=True)
    ]


def mem_flag_str(flags: int) -> str:
    """``flag_str(JAILHOUSE_MEM, flags)``: ``JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE``,
    lowest bit first, bits without a name as ``0x200``."""
    names = []
    bit = 1
    while bit <= flags:
        if flags & bit:
            name = MemFlags(bit).name
            names.append(f"JAILHOUSE_MEM_{name}" if name else f"{bit:#x}")
        bit <<= 1
    return " | ".join(names)


def region_dump(region: MemoryRegion) -> str:
    """``MemRegion.__str__``: four indented lines, no newline at the end."""
    return (
        f"  phys_start: 0x{region.phys_start:016x}\n"
        f"  virt_start: 0x{region.virt_start:016x}\n"
        f"  size:       0x{region.size:016x}\n"
        f"  flags:      {mem_flag_str(region.flags)}"
    )
