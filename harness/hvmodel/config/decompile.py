"""TOML sources from config objects: the way back from :mod:`.toml`.

:func:`decompile` turns any config object into a source in :mod:`.toml`'s schema that
compiles to identical bytes, so any ``.cell`` file becomes editable. The line builders
(:func:`console_lines`, :func:`pci_lines`, :func:`iommu_lines`) and value formatters are
shared with :func:`harness.hvmodel.config.create.render_toml`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .. import abi
from ..abi import (
    ApicMode,
    Architecture,
    CacheFlags,
    CacheType,
    CellFlags,
    ConsoleFlags,
    ConsoleType,
    IommuType,
    MemFlags,
    PciCapFlags,
    PciCapId,
    PciDeviceType,
    SysFlags,
)
from ..cpus import format_cpu_list
from .model import (
    CellConfig,
    Console,
    MemoryRegion,
    PciDevice,
    format_bdf,
    shmem_protocol_name,
)
from .system import IommuUnit, SystemConfig


def quote(text: str) -> str:
    """A TOML basic string."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def hex_value(value: int) -> str:
    """A number as TOML writes it here: hex above 9."""
    return f"{value:#x}" if value > 9 else str(value)


def size_value(value: int) -> str:
    """Whole GiB/MiB as ``"2G"``/``"74M"``, small page multiples as ``"4K"``, else hex."""
    for suffix, shift in (("G", 30), ("M", 20)):
        if value and value % (1 << shift) == 0:
            return quote(f"{value >> shift}{suffix}")
    if value and value % 0x1000 == 0 and value <= 0x10000:
        return quote(f"{value >> 10}K")
    return hex_value(value)


def flag_names(value: int, enum: type[Any]) -> str:
    """Flag bits as a list of names, or a number when some bit has no name."""
    names = []
    rest = value
    for member in enum:
        if value & member.value:
            names.append(quote(member.name))
            rest &= ~member.value
    if rest:
        return hex_value(value)
    return "[" + ", ".join(names) + "]"


def enum_name(value: int, enum: type[Any], aliases: Mapping[int, str] | None = None) -> str:
    """A type code as its (quoted) name, or a number when it has none."""
    if aliases and value in aliases:
        return quote(aliases[value])
    if value in enum._value2member_map_:
        return quote(enum(value).name)
    return hex_value(value)


def ranges(numbers: Iterable[int]) -> str:
    """CPUs or pins as a quoted list of ranges (``"0-2,5"``)."""
    return quote(format_cpu_list(numbers))


def _raw(data: bytes) -> str:
    text = data.rstrip(b"\0")
    if all(0x20 <= b < 0x7F for b in text) and b"\0" not in text:
        return quote(text.decode("ascii"))
    return quote("hex:" + data.hex())


def console_lines(console: Console) -> list[str]:
    """The keys of a console table."""
    lines = [f"type = {enum_name(console.type, ConsoleType, {2: '8250'})}"]
    if console.address or console.type != ConsoleType.NONE:
        lines.append(f"address = {hex_value(console.address)}")
    for name in ("size", "divider", "gate_nr", "clock_reg"):
        value = getattr(console, name)
        if value:
            lines.append(f"{name} = {hex_value(value)}")
    if console.flags:
        lines.append(f"flags = {flag_names(console.flags, ConsoleFlags)}")
    return lines


def _cell_lines(cell: CellConfig, prefix: str, *, root: bool) -> list[str]:
    """Keys and tables of one cell; ``prefix`` is ``""`` or ``"root_cell."``."""
    lines: list[str] = []
    default_sig = bytes(5) if root else abi.CELL_SIGNATURE
    default_rev = 0 if root else abi.CONFIG_REVISION
    if cell.signature != default_sig:
        lines.append(f"signature = {_raw(cell.signature)}")
    if cell.architecture != Architecture.X86:
        lines.append(f"architecture = {enum_name(cell.architecture, Architecture)}")
    if cell.revision != default_rev:
        lines.append(f"revision = {cell.revision}")
    lines.append(f"name = {quote(cell.name)}")
    if cell.name_padding:
        lines.append(f"name_padding = {quote('hex:' + cell.name_padding.hex())}")
    if cell.id:
        lines.append(f"id = {cell.id}")
    if cell.flags:
        lines.append(f"flags = {flag_names(cell.flags, CellFlags)}")
    lines.append(f"cpus = {ranges(cell.cpus)}")
    if cell.cpu_set_size != 8:
        lines.append(f"cpu_set_size = {cell.cpu_set_size}")
    for name in ("vpci_irq_base", "cpu_reset_address", "msg_reply_timeout"):
        value = getattr(cell, name)
        if value:
            lines.append(f"{name} = {hex_value(value)}")
    if cell.stream_ids:
        lines.append("stream_ids = [" + ", ".join(hex_value(s) for s in cell.stream_ids) + "]")
    if cell.pio_regions:
        lines.append("pio_regions = [")
        for index, pio in enumerate(cell.pio_regions):
            lines.append(f"    {{ base = {hex_value(pio.base)}, length = {hex_value(pio.length)} }},"
                         f"  # {index}")
        lines.append("]")
    if cell.console != Console():
        lines += ["", f"[{prefix}console]", *console_lines(cell.console)]
    for index, region in enumerate(cell.memory_regions):
        lines += ["", f"[[{prefix}memory_regions]]  # {index}"]
        if region == MemoryRegion():
            continue
        if region.phys_start or region.virt_start != region.phys_start:
            lines.append(f"phys_start = {hex_value(region.phys_start)}")
        if region.virt_start != region.phys_start:
            lines.append(f"virt_start = {hex_value(region.virt_start)}")
        lines.append(f"size = {size_value(region.size)}")
        if region.flags:
            lines.append(f"flags = {flag_names(region.flags, MemFlags)}")
    for cache in cell.cache_regions:
        lines += ["", f"[[{prefix}cache_regions]]",
                  f"start = {cache.start}", f"size = {cache.size}",
                  f"type = {enum_name(cache.type, CacheType)}"]
        if cache.flags:
            lines.append(f"flags = {flag_names(cache.flags, CacheFlags)}")
        if cache.padding:
            lines.append(f"padding = {cache.padding}")
    for chip in cell.irqchips:
        lines += ["", f"[[{prefix}irqchips]]", f"address = {hex_value(chip.address)}",
                  f"id = {hex_value(chip.id)}"]
        if chip.pin_base:
            lines.append(f"pin_base = {chip.pin_base}")
        lines.append(f"pins = {ranges(chip.pins)}")
    owners: dict[int, list[str]] = {}
    for device in cell.pci_devices:
        for cap_index in range(device.caps_start, device.caps_start + device.num_caps):
            owners.setdefault(cap_index, []).append(device.bdf_str)
    for index, device in enumerate(cell.pci_devices):
        lines += ["", f"[[{prefix}pci_devices]]  # {index}: {device.bdf_str}"]
        lines += pci_lines(device)
    for index, cap in enumerate(cell.pci_caps):
        owner = ", ".join(owners.get(index, ["unused"]))
        lines += ["", f"[[{prefix}pci_caps]]  # {index}: {owner}",
                  f"id = {enum_name(cap.id, PciCapId) if cap.id else 0}",
                  f"start = {hex_value(cap.start)}",
                  f"len = {hex_value(cap.len)}"]
        if cap.flags:
            lines.append(f"flags = {flag_names(cap.flags, PciCapFlags)}")
    return lines


def pci_lines(device: PciDevice) -> list[str]:
    """The keys of a PCI device table."""
    lines = [f"type = {enum_name(device.type, PciDeviceType)}"]
    if device.iommu:
        lines.append(f"iommu = {device.iommu}")
    if device.domain:
        lines.append(f"domain = {hex_value(device.domain)}")
    lines.append(f"bdf = {quote(device.bdf_str)}")
    if any(device.bar_mask):
        named = [name for name, masks in abi.IVSHMEM_BAR_MASKS.items() if masks == device.bar_mask]
        if named and device.is_ivshmem:
            lines.append(f"bar_mask = {quote(named[0])}")
        else:
            lines.append("bar_mask = [" + ", ".join(f"{m:#010x}" for m in device.bar_mask) + "]")
    for name in ("caps_start", "num_caps", "num_msi_vectors"):
        value = getattr(device, name)
        if value:
            lines.append(f"{name} = {value}")
    if device.msi_64bits:
        lines.append("msi_64bits = true")
    if device.msi_maskable:
        lines.append("msi_maskable = true")
    if device.msi_reserved_bits:
        lines.append(f"msi_reserved_bits = {hex_value(device.msi_reserved_bits)}")
    if device.num_msix_vectors:
        lines.append(f"num_msix_vectors = {device.num_msix_vectors}")
    for name in ("msix_region_size", "msix_address"):
        value = getattr(device, name)
        if value:
            lines.append(f"{name} = {hex_value(value)}")
    if device.is_ivshmem or device.shmem_peers or device.shmem_regions_start:
        lines.append(f"shmem_regions_start = {device.shmem_regions_start}")
        lines.append(f"shmem_dev_id = {device.shmem_dev_id}")
        lines.append(f"shmem_peers = {device.shmem_peers}")
        lines.append(f"shmem_protocol = {quote(shmem_protocol_name(device.shmem_protocol))}")
    elif device.shmem_dev_id or device.shmem_protocol:
        lines.append(f"shmem_dev_id = {device.shmem_dev_id}")
        lines.append(f"shmem_protocol = {quote(shmem_protocol_name(device.shmem_protocol))}")
    return lines


def iommu_lines(unit: IommuUnit) -> list[str]:
    """The keys of an IOMMU unit table."""
    lines = [f"type = {enum_name(unit.type, IommuType)}", f"base = {hex_value(unit.base)}",
             f"size = {hex_value(unit.size)}"]
    if unit.type == IommuType.AMD and unit.union[8:] == bytes(4):
        lines += [f"amd_bdf = {quote(format_bdf(unit.amd_bdf))}",
                  f"amd_base_cap = {hex_value(unit.amd_base_cap)}",
                  f"amd_msi_cap = {hex_value(unit.amd_msi_cap)}",
                  f"amd_features = {hex_value(unit.amd_features)}"]
    elif unit.type == IommuType.PVU:
        lines += [f"tipvu_tlb_base = {hex_value(unit.tipvu_tlb_base)}",
                  f"tipvu_tlb_size = {hex_value(unit.tipvu_tlb_size)}"]
    elif any(unit.union):
        lines.append(f"union = {quote('hex:' + unit.union.hex())}")
    return lines


def decompile(config: SystemConfig | CellConfig, origin: str | None = None) -> str:
    """Write a TOML source that compiles back to exactly ``config.to_bytes()``.

    :param config: a parsed or built config
    :param origin: named in the header comment (e.g. the ``.cell`` file)
    :return: the TOML text
    """
    kind = "system" if isinstance(config, SystemConfig) else "cell"
    cell = config.root_cell if isinstance(config, SystemConfig) else config
    header = f"# {cell.name or '(unnamed)'}: Jailhouse {kind} config, revision {config.revision}"
    lines = [header + (f", decompiled from {origin}" if origin else ""),
             f"# compiled size: {config.size} bytes", f"kind = {quote(kind)}"]
    if isinstance(config, CellConfig):
        lines += _cell_lines(config, "", root=False)
        return "\n".join(lines) + "\n"
    system = config
    if system.signature != abi.SYSTEM_SIGNATURE:
        lines.append(f"signature = {_raw(system.signature)}")
    if system.architecture != Architecture.X86:
        lines.append(f"architecture = {enum_name(system.architecture, Architecture)}")
    if system.revision != abi.CONFIG_REVISION:
        lines.append(f"revision = {system.revision}")
    if system.flags:
        lines.append(f"flags = {flag_names(system.flags, SysFlags)}")
    hv = system.hypervisor_memory
    lines += ["", "[hypervisor_memory]", f"phys_start = {hex_value(hv.phys_start)}",
              f"size = {size_value(hv.size)}"]
    if hv.virt_start:
        lines.append(f"virt_start = {hex_value(hv.virt_start)}")
    if hv.flags:
        lines.append(f"flags = {flag_names(hv.flags, MemFlags)}")
    if system.debug_console != Console():
        lines += ["", "[debug_console]", *console_lines(system.debug_console)]
    lines += ["", "[platform]"]
    for name in ("pci_mmconfig_base", "pci_mmconfig_end_bus", "pci_is_virtual", "pci_domain"):
        value = getattr(system, name)
        if value:
            lines.append(f"{name} = {hex_value(value)}")
    used = [i for i, unit in enumerate(system.iommu_units) if unit != IommuUnit()]
    for unit in system.iommu_units[: used[-1] + 1 if used else 0]:
        lines += ["", "[[platform.iommu_units]]", *iommu_lines(unit)]
    x86 = system.x86
    lines += ["", "[platform.x86]"]
    lines.append(f"pm_timer_address = {hex_value(x86.pm_timer_address)}")
    lines.append(f"apic_mode = {enum_name(x86.apic_mode, ApicMode)}")
    lines.append(f"vtd_interrupt_limit = {x86.vtd_interrupt_limit}")
    lines.append(f"tsc_khz = {x86.tsc_khz}")
    lines.append(f"apic_khz = {x86.apic_khz}")
    if x86.padding:
        lines.append(f"padding = {x86.padding}")
    if any(x86.remainder):
        lines.append(f"remainder = {quote('hex:' + x86.remainder.hex())}")
    lines += ["", "[root_cell]", *_cell_lines(system.root_cell, "root_cell.", root=True)]
    return "\n".join(lines) + "\n"
