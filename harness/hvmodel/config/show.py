"""Human-readable views of ``include/jailhouse/cell-config.h`` structures (``config show``).

:func:`render_text` prints a system or cell config as an aligned text listing (one line
per region, port range, device and capability, with names for every flag and type);
:func:`to_dict` returns the same content as plain JSON-able data: every field with its raw
integer value, plus ``*_names`` lists for flag fields and ``*_name`` strings for type codes,
and raw bytes as hex strings.
"""

from __future__ import annotations

from typing import Any

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
from .model import (
    CacheRegion,
    CellConfig,
    Console,
    Irqchip,
    MemoryRegion,
    PciCapability,
    PciDevice,
    PioRegion,
    shmem_protocol_name,
)
from .system import IommuUnit, SystemConfig

JsonDict = dict[str, Any]

_MEM_SHORT = (
    (MemFlags.READ, "R"), (MemFlags.WRITE, "W"), (MemFlags.EXECUTE, "X"), (MemFlags.DMA, "DMA"),
    (MemFlags.IO, "IO"), (MemFlags.COMM_REGION, "COMM"), (MemFlags.LOADABLE, "LOAD"),
    (MemFlags.ROOTSHARED, "RS"), (MemFlags.NO_HUGEPAGES, "NOHUGE"),
    (MemFlags.IO_UNALIGNED, "UNALIGNED"), (MemFlags.IO_8, "IO8"), (MemFlags.IO_16, "IO16"),
    (MemFlags.IO_32, "IO32"), (MemFlags.IO_64, "IO64"),
)


def flag_names(value: int, enum: type[Any]) -> list[str]:
    """Names of the set bits of ``value``; unknown bits as one hex string at the end."""
    names = []
    rest = value
    for member in enum:
        if value & member.value:
            names.append(member.name)
            rest &= ~member.value
    if rest:
        names.append(f"{rest:#x}")
    return names


def enum_name(value: int, enum: type[Any]) -> str:
    """The member name for ``value``, or the number in hex."""
    if value in enum._value2member_map_:
        return str(enum(value).name)
    return f"{value:#x}"


def _size(value: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if value >= 1 << shift and value % (1 << shift) == 0:
            return f"{value >> shift} {unit}"
    return f"{value:#x} B"


def _ranges(numbers: frozenset[int]) -> str:
    ordered = sorted(numbers)
    parts = []
    index = 0
    while index < len(ordered):
        end = index
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        parts.append(str(ordered[index]) if end == index else f"{ordered[index]}-{ordered[end]}")
        index = end + 1
    return ",".join(parts) or "none"


def _khz(value: int) -> str:
    return f"{value} kHz" if value else "from the driver"


def _short_mem_flags(flags: int) -> str:
    names = [short for flag, short in _MEM_SHORT if flags & flag]
    rest = flags & ~sum(int(flag) for flag, _ in _MEM_SHORT)
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names) or "-"


def _console_text(console: Console) -> str:
    if console.type == ConsoleType.NONE and console == Console():
        return "none"
    kind = "8250" if console.type == ConsoleType.UART_8250 else enum_name(console.type,
                                                                          ConsoleType)
    access = "MMIO" if console.is_mmio else "PIO"
    text = f"{kind} {access} {console.address:#x}"
    if console.size:
        text += f" size {console.size:#x}"
    extras = [name for name in flag_names(console.flags, ConsoleFlags) if name != "ACCESS_MMIO"]
    if extras:
        text += " " + "|".join(extras)
    if console.divider:
        text += f" divider {console.divider:#x}"
    if console.gate_nr or console.clock_reg:
        text += f" gate {console.gate_nr} clock_reg {console.clock_reg:#x}"
    return text


def _pci_text(device: PciDevice) -> list[str]:
    head = f"{device.bdf_str}  {enum_name(device.type, PciDeviceType)}"
    if device.domain:
        head = f"{device.domain:04x}:{head}"
    parts = [head]
    if device.iommu:
        parts.append(f"IOMMU {device.iommu}")
    if any(device.bar_mask):
        parts.append("BARs " + " ".join(f"{m:08x}" for m in device.bar_mask))
    if device.num_msi_vectors or device.msi_64bits or device.msi_maskable:
        bits = [b for b, on in (("64-bit", device.msi_64bits), ("maskable", device.msi_maskable))
                if on]
        parts.append(f"MSI {device.num_msi_vectors}" + (f" ({', '.join(bits)})" if bits else ""))
    if device.num_msix_vectors or device.msix_address:
        text = f"MSI-X {device.num_msix_vectors}"
        if device.msix_address:
            text += f" at {device.msix_address:#x}/{device.msix_region_size:#x}"
        parts.append(text)
    if device.type == PciDeviceType.IVSHMEM:
        parts.append(
            f"shmem regions {device.shmem_regions_start}.."
            f"{device.shmem_regions_start + 1 + device.shmem_peers}, ID {device.shmem_dev_id} "
            f"of {device.shmem_peers}, {shmem_protocol_name(device.shmem_protocol)}"
        )
    lines = ["  ".join(parts)]
    if device.num_caps:
        lines.append(f"caps {device.caps_start}..{device.caps_start + device.num_caps - 1}")
    return lines


def _cap_text(cap: PciCapability) -> str:
    name = enum_name(cap.id, PciCapId) if cap.id else "0 (raw)"
    writable = " W" if cap.flags & PciCapFlags.WRITE else ""
    rest = cap.flags & ~PciCapFlags.WRITE
    return f"{name:10} {cap.start:#06x} len {cap.len:#x}{writable}" + (
        f" flags {rest:#x}" if rest else "")


def _cell_text(cell: CellConfig, *, root: bool) -> list[str]:
    title = "Root cell" if root else "Cell"
    out = [f"{title} \"{cell.name}\"" + (f" (id {cell.id})" if cell.id else "")]
    if not root:
        arch = enum_name(cell.architecture, Architecture).lower()
        out.append(f"  revision {cell.revision}, {arch}, {cell.size} bytes")
    out.append(f"  flags: {' '.join(flag_names(cell.flags, CellFlags)) or 'none'}")
    out.append(f"  CPUs: {_ranges(cell.cpus)} (cpu_set_size {cell.cpu_set_size})")
    out.append(f"  console: {_console_text(cell.console)}")
    for name in ("cpu_reset_address", "msg_reply_timeout", "vpci_irq_base"):
        value = getattr(cell, name)
        if value:
            out.append(f"  {name}: {value:#x}")
    out.append(f"  memory regions ({len(cell.memory_regions)}):")
    for index, region in enumerate(cell.memory_regions):
        if region == MemoryRegion():
            out.append(f"    {index:3}  (empty)")
            continue
        phys = "(comm region)" if region.is_comm_region else (
            f"{region.phys_start:#012x}-{region.phys_end - 1:#012x}" if region.size
            else f"{region.phys_start:#012x} (empty)")
        out.append(f"    {index:3}  {phys:27} virt {region.virt_start:#012x}  "
                   f"{_size(region.size):>10}  {_short_mem_flags(region.flags)}"
                   + ("  sub-page" if region.is_subpage else ""))
    if cell.cache_regions:
        out.append(f"  cache regions ({len(cell.cache_regions)}):")
        for cache in cell.cache_regions:
            flags = " ".join(flag_names(cache.flags, CacheFlags))
            out.append(f"         {enum_name(cache.type, CacheType)} bits {cache.start}.."
                       f"{cache.start + cache.size - 1}" + (f"  {flags}" if flags else ""))
    if cell.irqchips:
        out.append(f"  irqchips ({len(cell.irqchips)}):")
        for chip in cell.irqchips:
            out.append(f"         {chip.address:#x} id {chip.id:#x} pins {_ranges(chip.pins)}")
    out.append(f"  PIO regions ({len(cell.pio_regions)}):")
    for index, pio in enumerate(cell.pio_regions):
        span = f"{pio.base:#06x}-{pio.end - 1:#06x}" if pio.length else f"{pio.base:#06x}"
        ports = "port" if pio.length == 1 else "ports"
        out.append(f"    {index:3}  {span}  ({pio.length} {ports})")
    if cell.pci_devices:
        out.append(f"  PCI devices ({len(cell.pci_devices)}):")
        for index, device in enumerate(cell.pci_devices):
            first, *rest = _pci_text(device)
            out.append(f"    {index:3}  {first}")
            out.extend(f"         {line}" for line in rest)
    if cell.pci_caps:
        out.append(f"  PCI capabilities ({len(cell.pci_caps)}):")
        for index, cap in enumerate(cell.pci_caps):
            out.append(f"    {index:3}  {_cap_text(cap)}")
    if cell.stream_ids:
        out.append("  stream IDs: " + " ".join(f"{sid:#x}" for sid in cell.stream_ids))
    return out


def render_text(config: SystemConfig | CellConfig, source: str | None = None) -> str:
    """A readable listing of a config.

    :param config: a parsed or built config
    :param source: the file name, shown in the first line
    """
    where = f" {source}" if source else ""
    if isinstance(config, CellConfig):
        lines = [f"Cell config{where}:", *_cell_text(config, root=False)]
        return "\n".join(lines) + "\n"
    system = config
    arch = enum_name(system.architecture, Architecture).lower()
    lines = [
        f"System config{where}: revision {system.revision}, {arch}, {system.size} bytes",
        f"  flags: {' '.join(flag_names(system.flags, SysFlags)) or 'none'}",
        f"  hypervisor memory: {system.hypervisor_memory.phys_start:#x}-"
        f"{system.hypervisor_memory.phys_end - 1:#x} ({_size(system.hypervisor_memory.size)})",
        f"  debug console: {_console_text(system.debug_console)}",
    ]
    if system.pci_mmconfig_base:
        lines.append(
            f"  PCI MMCONFIG: {system.pci_mmconfig_base:#x}, buses 0-"
            f"{system.pci_mmconfig_end_bus:#x} ({_size(system.mmconfig_size)})"
        )
    if system.pci_is_virtual or system.pci_domain:
        lines.append(f"  PCI: virtual {system.pci_is_virtual}, domain {system.pci_domain:#x}")
    for index, unit in enumerate(system.iommu_units):
        if unit.in_use:
            text = f"  IOMMU {index}: {enum_name(unit.type, IommuType)} at {unit.base:#x} " \
                   f"size {unit.size:#x}"
            if unit.type == IommuType.AMD:
                text += f" bdf {unit.amd_bdf:#06x} caps {unit.amd_base_cap:#x}/" \
                        f"{unit.amd_msi_cap:#x} features {unit.amd_features:#x}"
            lines.append(text)
    x86 = system.x86
    lines.append(
        f"  x86: PM timer {x86.pm_timer_address:#x}, APIC mode "
        f"{enum_name(x86.apic_mode, ApicMode)}, VT-d interrupt limit {x86.vtd_interrupt_limit},"
        f" TSC {_khz(x86.tsc_khz)}, APIC timer {_khz(x86.apic_khz)}"
    )
    lines += _cell_text(system.root_cell, root=True)
    return "\n".join(lines) + "\n"


# --- JSON -------------------------------------------------------------------------------------


def _memory_dict(region: MemoryRegion) -> JsonDict:
    return {
        "phys_start": region.phys_start, "virt_start": region.virt_start, "size": region.size,
        "flags": region.flags, "flag_names": flag_names(region.flags, MemFlags),
        "subpage": region.is_subpage,
    }


def _console_dict(console: Console) -> JsonDict:
    return {
        "address": console.address, "size": console.size, "type": console.type,
        "type_name": enum_name(console.type, ConsoleType), "flags": console.flags,
        "flag_names": flag_names(console.flags, ConsoleFlags), "divider": console.divider,
        "gate_nr": console.gate_nr, "clock_reg": console.clock_reg,
    }


def _cache_dict(cache: CacheRegion) -> JsonDict:
    return {"start": cache.start, "size": cache.size, "type": cache.type,
            "type_name": enum_name(cache.type, CacheType), "flags": cache.flags,
            "flag_names": flag_names(cache.flags, CacheFlags), "padding": cache.padding}


def _irqchip_dict(chip: Irqchip) -> JsonDict:
    return {"address": chip.address, "id": chip.id, "pin_base": chip.pin_base,
            "pin_bitmap": list(chip.pin_bitmap), "pins": sorted(chip.pins)}


def _pio_dict(pio: PioRegion) -> JsonDict:
    return {"base": pio.base, "length": pio.length}


def _pci_dict(device: PciDevice) -> JsonDict:
    return {
        "type": device.type, "type_name": enum_name(device.type, PciDeviceType),
        "iommu": device.iommu, "domain": device.domain, "bdf": device.bdf,
        "bdf_str": device.bdf_str, "bar_mask": list(device.bar_mask),
        "caps_start": device.caps_start, "num_caps": device.num_caps,
        "num_msi_vectors": device.num_msi_vectors, "msi_64bits": device.msi_64bits,
        "msi_maskable": device.msi_maskable, "msi_reserved_bits": device.msi_reserved_bits,
        "num_msix_vectors": device.num_msix_vectors,
        "msix_region_size": device.msix_region_size, "msix_address": device.msix_address,
        "shmem_regions_start": device.shmem_regions_start,
        "shmem_dev_id": device.shmem_dev_id, "shmem_peers": device.shmem_peers,
        "shmem_protocol": device.shmem_protocol,
        "shmem_protocol_name": shmem_protocol_name(device.shmem_protocol),
    }


def _cap_dict(cap: PciCapability) -> JsonDict:
    return {"id": cap.id, "id_name": enum_name(cap.id, PciCapId), "start": cap.start,
            "len": cap.len, "flags": cap.flags,
            "flag_names": flag_names(cap.flags, PciCapFlags)}


def _iommu_dict(unit: IommuUnit) -> JsonDict:
    result: JsonDict = {"type": unit.type, "type_name": enum_name(unit.type, IommuType),
                        "base": unit.base, "size": unit.size, "union": unit.union.hex()}
    if unit.type == IommuType.AMD:
        result.update(amd_bdf=unit.amd_bdf, amd_base_cap=unit.amd_base_cap,
                      amd_msi_cap=unit.amd_msi_cap, amd_features=unit.amd_features)
    elif unit.type == IommuType.PVU:
        result.update(tipvu_tlb_base=unit.tipvu_tlb_base, tipvu_tlb_size=unit.tipvu_tlb_size)
    return result


def _cell_dict(cell: CellConfig) -> JsonDict:
    return {
        "kind": "cell",
        "signature": cell.signature.hex(), "architecture": cell.architecture,
        "architecture_name": enum_name(cell.architecture, Architecture).lower(),
        "revision": cell.revision, "name": cell.name, "name_padding": cell.name_padding.hex(),
        "id": cell.id, "flags": cell.flags, "flag_names": flag_names(cell.flags, CellFlags),
        "cpu_set": cell.cpu_set.hex(), "cpu_set_size": cell.cpu_set_size,
        "cpus": sorted(cell.cpus),
        "memory_regions": [_memory_dict(r) for r in cell.memory_regions],
        "cache_regions": [_cache_dict(c) for c in cell.cache_regions],
        "irqchips": [_irqchip_dict(c) for c in cell.irqchips],
        "pio_regions": [_pio_dict(p) for p in cell.pio_regions],
        "pci_devices": [_pci_dict(d) for d in cell.pci_devices],
        "pci_caps": [_cap_dict(c) for c in cell.pci_caps],
        "stream_ids": list(cell.stream_ids), "vpci_irq_base": cell.vpci_irq_base,
        "cpu_reset_address": cell.cpu_reset_address,
        "msg_reply_timeout": cell.msg_reply_timeout, "console": _console_dict(cell.console),
        "size": cell.size,
    }


def to_dict(config: SystemConfig | CellConfig) -> JsonDict:
    """The config as JSON-able data (ints, strings, lists, dicts; bytes as hex)."""
    if isinstance(config, CellConfig):
        return _cell_dict(config)
    system = config
    x86 = system.x86
    return {
        "kind": "system",
        "signature": system.signature.hex(), "architecture": system.architecture,
        "architecture_name": enum_name(system.architecture, Architecture).lower(),
        "revision": system.revision, "flags": system.flags,
        "flag_names": flag_names(system.flags, SysFlags),
        "hypervisor_memory": _memory_dict(system.hypervisor_memory),
        "debug_console": _console_dict(system.debug_console),
        "platform": {
            "pci_mmconfig_base": system.pci_mmconfig_base,
            "pci_mmconfig_end_bus": system.pci_mmconfig_end_bus,
            "pci_is_virtual": system.pci_is_virtual, "pci_domain": system.pci_domain,
            "iommu_units": [_iommu_dict(u) for u in system.iommu_units],
            "x86": {
                "pm_timer_address": x86.pm_timer_address, "apic_mode": x86.apic_mode,
                "apic_mode_name": enum_name(x86.apic_mode, ApicMode),
                "vtd_interrupt_limit": x86.vtd_interrupt_limit, "tsc_khz": x86.tsc_khz,
                "apic_khz": x86.apic_khz, "padding": x86.padding,
                "remainder": x86.remainder.hex(),
            },
        },
        "root_cell": _cell_dict(system.root_cell),
        "size": system.size,
    }
