"""Reading binary configs as ``driver/cell.c`` and ``pyjailhouse/config_parser.py`` do.

:func:`parse_cell` reads a ``JHCLL`` cell config, :func:`parse_system` a ``JHSYS`` system
config, :func:`parse` either (by signature), :func:`load` a file. Revision 14 is the native
format; revision 12 (Jailhouse v0.12: ``JHCELL``/``JHSYST``) is read and converted to a
revision-14 object (see :mod:`harness.hvmodel.abi.cell_config` for its layout and
:func:`convert_revision12`).

Strictness: a blob is accepted only if it is exactly what the hypervisor would read. Any
defect raises one :class:`~harness.hvmodel.errors.ConfigError` naming the source, the byte
offset and the field, and saying what was expected: a wrong signature, revision or
architecture; a header or array cut short (the count that runs past the end is named);
bytes after the last array; a name without NUL (or not UTF-8); a CPU set of 0 or more
than 4096 bytes; an unknown IOMMU type (as pyjailhouse). No other exception leaves the
parser. Fields that the hypervisor does not check (the root cell descriptor's signature,
revision and architecture, reserved bytes) are kept as they are.

Revision-12 conversion assumptions (v0.12 has no architecture byte): the configuration is
taken as x86, the x86 member of the platform union is read, IOMMU units gain the
revision-14 union layout (AMD fields at the same offsets, 4 zero bytes), memory flag
``0x0100`` (``IO_UNALIGNED`` then) becomes ``0x8000``, and the 24 bytes at the end of the
v0.12 arch union, which only its ARM member used, are dropped.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Final, TypeVar

from .. import abi
from ..abi import (
    Architecture,
    IommuType,
    MemFlags,
)
from ..errors import ConfigError
from .model import (
    CacheRegion,
    CellConfig,
    Console,
    Irqchip,
    MemoryRegion,
    PciCapability,
    PciDevice,
    PioRegion,
)
from .system import IommuUnit, SystemConfig, X86Platform
from .toml import load_source

_ARRAYS = (
    ("memory_regions", "num_memory_regions", abi.MEMORY),
    ("cache_regions", "num_cache_regions", abi.CACHE),
    ("irqchips", "num_irqchips", abi.IRQCHIP),
    ("pio_regions", "num_pio_regions", abi.PIO),
    ("pci_devices", "num_pci_devices", abi.PCI_DEVICE),
    ("pci_caps", "num_pci_caps", abi.PCI_CAP),
    ("stream_ids", "num_stream_ids", abi.STREAM_ID),
)


class _Reader:
    """Error construction for one blob: every error names source, offset and field."""

    __slots__ = ("data", "prefix", "source")

    def __init__(self, data: bytes, source: str, prefix: str = "") -> None:
        self.data = data
        self.source = source
        self.prefix = prefix

    def error(self, message: str, offset: int | None, field: str | None) -> ConfigError:
        name = f"{self.prefix}{field}" if field else (self.prefix.rstrip(".") or None)
        return ConfigError(message, source=self.source, offset=offset, field=name)

    def need(self, base: int, fields: tuple[tuple[int, int, str], ...], what: str) -> None:
        """Raise for the first field of a fixed header that the data does not hold."""
        have = len(self.data)
        for offset, size, name in fields:
            if base + offset + size > have:
                raise self.error(
                    f"truncated {what}: {name} needs bytes {base + offset:#x}.."
                    f"{base + offset + size - 1:#x}, the data ends at {have:#x}",
                    base + offset,
                    name,
                )


def _decode_name(reader: _Reader, raw: bytes, offset: int) -> tuple[str, bytes]:
    nul = raw.find(b"\0")
    if nul < 0:
        raise reader.error(
            "name has no NUL terminator in its 32 bytes (at most 31 characters)", offset, "name"
        )
    try:
        name = raw[:nul].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise reader.error(f"name is not UTF-8 text ({exc.reason})", offset, "name") from None
    return name, raw[nul + 1:].rstrip(b"\0")


def _check_arch(reader: _Reader, value: int, offset: int) -> None:
    if value not in Architecture._value2member_map_:
        raise reader.error(
            f"unsupported architecture {value}, expected 0 (x86), 1 (arm) or 2 (arm64)",
            offset,
            "architecture",
        )


def _element_field(name: str, index: int) -> str:
    return f"{name}[{index}]"


def _parse_cell_at(
    reader: _Reader, base: int, *, root: bool, expect_end: bool = True
) -> CellConfig:
    """Parse a cell descriptor at ``base`` and its arrays; ``root`` skips the header checks."""
    data = reader.data
    if not root and data[base:base + 5] != abi.CELL_SIGNATURE:
        raise reader.error(
            f"signature {bytes(data[base:base + 5])!r}, expected {abi.CELL_SIGNATURE!r} "
            "(a cell config)",
            base,
            "signature",
        )
    reader.need(base, abi.CELL_DESC_FIELDS, "cell descriptor")
    fields = abi.CELL_DESC.unpack_from(data, base)
    signature, architecture, revision, raw_name = fields[0], fields[1], fields[2], fields[3]
    if not root:
        _check_arch(reader, architecture, base + 5)
        if revision != abi.CONFIG_REVISION:
            raise reader.error(
                f"revision {revision}, expected {abi.CONFIG_REVISION}", base + 6, "revision"
            )
    name, name_padding = _decode_name(reader, raw_name, base + 8)
    ident, flags, cpu_set_size = fields[4], fields[5], fields[6]
    counts = fields[7:14]
    vpci_irq_base, cpu_reset_address, msg_reply_timeout = fields[14], fields[15], fields[16]
    console = Console(
        address=fields[17], size=fields[18], type=fields[19], flags=fields[20],
        divider=fields[21], gate_nr=fields[22], clock_reg=fields[23],
    )
    if not 0 < cpu_set_size <= abi.MAX_CPU_SET_SIZE:
        raise reader.error(
            f"cpu_set_size {cpu_set_size}, expected 1..{abi.MAX_CPU_SET_SIZE} bytes",
            base + 48,
            "cpu_set_size",
        )
    offset = base + abi.CELL_DESC_SIZE
    if offset + cpu_set_size > len(data):
        raise reader.error(
            f"truncated CPU set: cpu_set_size {cpu_set_size} needs bytes up to "
            f"{offset + cpu_set_size:#x}, the data ends at {len(data):#x}",
            offset,
            "cpu_set",
        )
    cpu_set = bytes(data[offset:offset + cpu_set_size])
    offset += cpu_set_size

    arrays: dict[str, list[tuple[int, ...]]] = {}
    for (name_, count_name, element), count in zip(_ARRAYS, counts, strict=True):
        end = offset + count * element.size
        if end > len(data):
            missing = (len(data) - offset) // element.size
            raise reader.error(
                f"{count_name} = {count} runs past the end: element {missing} needs bytes "
                f"{offset + missing * element.size:#x}.."
                f"{offset + (missing + 1) * element.size - 1:#x}, the data ends at {len(data):#x}",
                offset + missing * element.size,
                _element_field(name_, missing),
            )
        arrays[name_] = list(element.iter_unpack(data[offset:end])) if count else []
        offset = end
    if expect_end and offset != len(data):
        raise reader.error(
            f"{len(data) - offset} trailing bytes after the configuration, which ends at "
            f"{offset:#x}",
            offset,
            None,
        )

    # Build the objects; values unpacked from C types are always in range, so the
    # dataclass checks cannot fail on them.
    regions = tuple(
        MemoryRegion(phys_start=p, virt_start=v, size=s, flags=f)
        for p, v, s, f in arrays["memory_regions"]
    )
    caches = tuple(
        CacheRegion(start=st, size=sz, type=ty, padding=pad, flags=fl)
        for st, sz, ty, pad, fl in arrays["cache_regions"]
    )
    irqchips = tuple(
        Irqchip(address=a, id=i, pin_base=pb, pin_bitmap=(w0, w1, w2, w3))
        for a, i, pb, w0, w1, w2, w3 in arrays["irqchips"]
    )
    pios = tuple(PioRegion(base=b, length=n) for b, n in arrays["pio_regions"])
    devices = tuple(_pci_device(values) for values in arrays["pci_devices"])
    caps = tuple(
        PciCapability(id=i, start=s, len=n, flags=f) for i, s, n, f in arrays["pci_caps"]
    )
    stream_ids = tuple(values[0] for values in arrays["stream_ids"])
    return CellConfig(
        signature=signature, architecture=architecture, revision=revision, name=name,
        id=ident, flags=flags, cpu_set=cpu_set, memory_regions=regions, cache_regions=caches,
        irqchips=irqchips, pio_regions=pios, pci_devices=devices, pci_caps=caps,
        stream_ids=stream_ids, vpci_irq_base=vpci_irq_base,
        cpu_reset_address=cpu_reset_address, msg_reply_timeout=msg_reply_timeout,
        console=console, name_padding=name_padding,
    )


def _pci_device(values: tuple[int, ...]) -> PciDevice:
    bits = values[13]
    return PciDevice(
        type=values[0], iommu=values[1], domain=values[2], bdf=values[3],
        bar_mask=(values[4], values[5], values[6], values[7], values[8], values[9]),
        caps_start=values[10], num_caps=values[11], num_msi_vectors=values[12],
        msi_64bits=bool(bits & 1), msi_maskable=bool(bits & 2), msi_reserved_bits=bits & 0xFC,
        num_msix_vectors=values[14], msix_region_size=values[15], msix_address=values[16],
        shmem_regions_start=values[17], shmem_dev_id=values[18], shmem_peers=values[19],
        shmem_protocol=values[20],
    )


def parse_cell(data: bytes, source: str = "<bytes>") -> CellConfig:
    """Parse a binary cell config (``JHCLL``, revision 14; or revision 12 ``JHCELL``).

    :param data: the whole file
    :param source: named in errors (usually the file name)
    :return: the cell config (revision 12 input comes back converted to revision 14)
    :raise ConfigError: on any defect
    """
    data = _as_bytes(data, source)
    if data[:6] == abi.CELL_SIGNATURE_12:
        return _parse_cell12(data, source)
    if data[:5] == abi.SYSTEM_SIGNATURE:
        raise ConfigError(
            "this is a system config (JHSYS), expected a cell config (JHCLL)",
            source=source, offset=0, field="signature",
        )
    return _guard(lambda: _parse_cell_at(_Reader(data, source), 0, root=False), source)


def parse_system(data: bytes, source: str = "<bytes>") -> SystemConfig:
    """Parse a binary system config (``JHSYS``, revision 14; or revision 12 ``JHSYST``).

    :param data: the whole file
    :param source: named in errors (usually the file name)
    :return: the system config (revision 12 input comes back converted to revision 14)
    :raise ConfigError: on any defect
    """
    data = _as_bytes(data, source)
    if data[:6] == abi.SYSTEM_SIGNATURE_12:
        return _parse_system12(data, source)
    return _guard(lambda: _parse_system14(data, source), source)


def parse(data: bytes, source: str = "<bytes>") -> SystemConfig | CellConfig:
    """Parse a system or a cell config, chosen by its signature.

    :raise ConfigError: on an unknown signature or any defect
    """
    data = _as_bytes(data, source)
    if data[:5] == abi.SYSTEM_SIGNATURE:
        return parse_system(data, source)
    if data[:5] == abi.CELL_SIGNATURE or data[:6] == abi.CELL_SIGNATURE_12:
        return parse_cell(data, source)
    raise ConfigError(
        f"signature {bytes(data[:6])!r}, expected b'JHSYS' (system) or b'JHCLL' (cell)",
        source=source, offset=0, field="signature",
    )


def load(path: str | os.PathLike[str]) -> SystemConfig | CellConfig:
    """Read a config file: binary (``.cell``) or, for a ``.toml`` name, a TOML source.

    :raise ConfigError: when the file cannot be read or is not a valid config
    """
    source = os.fspath(path)
    if source.endswith(".toml"):
        return load_source(source)
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", source=source) from exc
    return parse(data, source)


def _as_bytes(data: object, source: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise ConfigError(f"expected bytes, got {type(data).__name__}", source=source)


_T = TypeVar("_T")

#: Start of the message of errors the safety net in :func:`_guard` produces; the fuzz
#: tests assert it never appears (every defect must have its own precise error).
UNEXPECTED: Final = "malformed configuration"


def _guard(fn: Callable[[], _T], source: str) -> _T:
    """Run a parse step; give model errors the source, and turn any stray error into one."""
    try:
        return fn()
    except ConfigError as exc:
        if exc.source == "<config>":
            raise ConfigError(exc.message, source=source, offset=exc.offset,
                              field=exc.field) from exc
        raise
    except (struct.error, ValueError, IndexError, KeyError, OverflowError, TypeError) as exc:
        raise ConfigError(f"{UNEXPECTED} ({type(exc).__name__}: {exc})", source=source) from exc


def _parse_system14(data: bytes, source: str) -> SystemConfig:
    reader = _Reader(data, source)
    if len(data) < 5 or data[:5] != abi.SYSTEM_SIGNATURE:
        raise reader.error(
            f"signature {bytes(data[:5])!r}, expected {abi.SYSTEM_SIGNATURE!r} "
            "(a system config)",
            0,
            "signature",
        )
    reader.need(0, abi.SYSTEM_FIELDS, "system header")
    signature, architecture, revision, flags = abi.SYSTEM_HEAD.unpack_from(data, 0)
    _check_arch(reader, architecture, 5)
    if revision != abi.CONFIG_REVISION:
        raise reader.error(f"revision {revision}, expected {abi.CONFIG_REVISION}", 6, "revision")
    hv_memory = MemoryRegion(
        **dict(zip(("phys_start", "virt_start", "size", "flags"),
                   abi.MEMORY.unpack_from(data, abi.SYS_OFF_HV_MEMORY), strict=True))
    )
    debug_console = _console_at(data, abi.SYS_OFF_DEBUG_CONSOLE)
    mmcfg_base, end_bus, is_virtual, domain = abi.PLATFORM_PCI.unpack_from(
        data, abi.SYS_OFF_PLATFORM
    )
    units = []
    for index in range(abi.MAX_IOMMU_UNITS):
        offset = abi.SYS_OFF_IOMMU + index * abi.IOMMU.size
        kind, base, size, union = abi.IOMMU.unpack_from(data, offset)
        if kind not in IommuType._value2member_map_:
            raise reader.error(
                f"unknown IOMMU type {kind}, expected 0..{max(IommuType)}",
                offset,
                f"platform_info.iommu_units[{index}].type",
            )
        units.append(IommuUnit(type=kind, base=base, size=size, union=union))
    pm_timer, apic_mode, padding, vtd_limit, tsc_khz, apic_khz, remainder = (
        abi.X86_PLATFORM.unpack_from(data, abi.SYS_OFF_X86)
    )
    x86 = X86Platform(
        pm_timer_address=pm_timer, apic_mode=apic_mode, padding=padding,
        vtd_interrupt_limit=vtd_limit, tsc_khz=tsc_khz, apic_khz=apic_khz, remainder=remainder,
    )
    root = _parse_cell_at(
        _Reader(data, source, "root_cell."), abi.ROOT_CELL_OFFSET, root=True
    )
    return SystemConfig(
        signature=signature, architecture=architecture, revision=revision, flags=flags,
        hypervisor_memory=hv_memory, debug_console=debug_console, pci_mmconfig_base=mmcfg_base,
        pci_mmconfig_end_bus=end_bus, pci_is_virtual=is_virtual, pci_domain=domain,
        iommu_units=tuple(units), x86=x86, root_cell=root,
    )


def _console_at(data: bytes, offset: int) -> Console:
    address, size, kind, flags, divider, gate_nr, clock_reg = abi.CONSOLE.unpack_from(
        data, offset
    )
    return Console(address=address, size=size, type=kind, flags=flags, divider=divider,
                   gate_nr=gate_nr, clock_reg=clock_reg)


# --- revision 12 ----------------------------------------------------------------------------


def _convert_regions12(cell: CellConfig) -> CellConfig:
    """Renumber revision 12's IO_UNALIGNED (0x0100) to revision 14's 0x8000."""
    moved = abi.MEM_IO_UNALIGNED_12
    regions = tuple(
        replace(r, flags=(r.flags & ~moved) | MemFlags.IO_UNALIGNED) if r.flags & moved else r
        for r in cell.memory_regions
    )
    return replace(cell, memory_regions=regions)


def _parse_cell12(data: bytes, source: str) -> CellConfig:
    def run() -> CellConfig:
        reader = _Reader(data, source)
        reader.need(0, ((0, 6, "signature"), (6, 2, "revision")), "cell descriptor")
        (revision,) = struct.unpack_from("<H", data, 6)
        if revision != abi.REVISION_12:
            raise reader.error(
                f"revision {revision} with a v0.12 signature {abi.CELL_SIGNATURE_12!r}, "
                f"expected {abi.REVISION_12}",
                6,
                "revision",
            )
        # From offset 8 on, the v0.12 descriptor is the revision-14 one: read it through
        # the revision-14 reader with the root-cell leniency, then fix up the header.
        cell = _parse_cell_at(reader, 0, root=True)
        cell = replace(
            cell, signature=abi.CELL_SIGNATURE, architecture=Architecture.X86,
            revision=abi.CONFIG_REVISION,
        )
        return _convert_regions12(cell)

    return _guard(run, source)


def _parse_system12(data: bytes, source: str) -> SystemConfig:
    def run() -> SystemConfig:
        reader = _Reader(data, source)
        reader.need(0, abi.SYSTEM_FIELDS_12, "v0.12 system header")
        (revision,) = struct.unpack_from("<H", data, 6)
        if revision != abi.REVISION_12:
            raise reader.error(
                f"revision {revision} with a v0.12 signature {abi.SYSTEM_SIGNATURE_12!r}, "
                f"expected {abi.REVISION_12}",
                6,
                "revision",
            )
        (flags,) = struct.unpack_from("<I", data, abi.SYS_OFF_FLAGS)
        hv = abi.MEMORY.unpack_from(data, abi.SYS_OFF_HV_MEMORY)
        hv_memory = MemoryRegion(phys_start=hv[0], virt_start=hv[1], size=hv[2], flags=hv[3])
        debug_console = _console_at(data, abi.SYS_OFF_DEBUG_CONSOLE)
        mmcfg_base, end_bus, is_virtual, domain = abi.PLATFORM_PCI.unpack_from(
            data, abi.SYS_OFF_PLATFORM
        )
        pm_timer, vtd_limit, apic_mode, _pad, tsc_khz, apic_khz = (
            abi.X86_PLATFORM_12.unpack_from(data, abi.SYS12_OFF_ARCH)
        )
        units = []
        for index in range(abi.MAX_IOMMU_UNITS):
            offset = abi.SYS12_OFF_IOMMU + index * abi.IOMMU_12.size
            kind, base, size, bdf, base_cap, msi_cap, features = abi.IOMMU_12.unpack_from(
                data, offset
            )
            if kind not in (IommuType.UNUSED, IommuType.AMD, IommuType.INTEL, IommuType.SMMUV3):
                raise reader.error(
                    f"unknown v0.12 IOMMU type {kind}, expected 0..3",
                    offset,
                    f"platform_info.x86.iommu_units[{index}].type",
                )
            union = abi.IOMMU_AMD.pack(bdf, base_cap, msi_cap, features)
            units.append(IommuUnit(type=kind, base=base, size=size, union=union))
        x86 = X86Platform(
            pm_timer_address=pm_timer, apic_mode=apic_mode, vtd_interrupt_limit=vtd_limit,
            tsc_khz=tsc_khz, apic_khz=apic_khz,
        )
        root = _parse_cell_at(
            _Reader(data, source, "root_cell."), abi.ROOT_CELL_OFFSET_12, root=True
        )
        return SystemConfig(
            flags=flags, hypervisor_memory=hv_memory, debug_console=debug_console,
            pci_mmconfig_base=mmcfg_base, pci_mmconfig_end_bus=end_bus,
            pci_is_virtual=is_virtual, pci_domain=domain, iommu_units=tuple(units), x86=x86,
            root_cell=_convert_regions12(root),
        )

    return _guard(run, source)


def convert_revision12(data: bytes, source: str = "<bytes>") -> bytes:
    """Convert a revision-12 (v0.12) system or cell config to revision-14 bytes.

    :raise ConfigError: when ``data`` is not a valid revision-12 config
    """
    data = _as_bytes(data, source)
    if data[:6] == abi.SYSTEM_SIGNATURE_12:
        return _parse_system12(data, source).to_bytes()
    if data[:6] == abi.CELL_SIGNATURE_12:
        return _parse_cell12(data, source).to_bytes()
    raise ConfigError(
        f"signature {bytes(data[:6])!r}, expected b'JHSYST' or b'JHCELL' (v0.12)",
        source=source, offset=0, field="signature",
    )
