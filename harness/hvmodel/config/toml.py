"""TOML sources for Jailhouse configs: jhlab's replacement for ``configs/x86/*.c``.

Jailhouse writes configs as C initialisers compiled to binary; jhlab writes them as TOML
(read with :mod:`tomllib`) and compiles them with :func:`compile_source`. The schema follows
``struct jailhouse_system``/``jailhouse_cell_desc`` field for field, with readable values:

* integers may be TOML integers (``0x3f8``) or strings with a size suffix (``"1M"``,
  ``"4K"``, ``"0x1000"``; K/M/G/T are powers of 1024);
* flags are lists of names (``["READ", "WRITE"]``; the ``JAILHOUSE_MEM_`` style prefix is
  optional) or an integer; type fields take names (``"8250"``, ``"IVSHMEM"``, ``"L3"``);
* BDFs are ``"bb:dd.f"`` strings, CPU sets and IOAPIC pins lists like ``"1-3"``/``[1, 2]``;
* a memory region's ``virt_start`` defaults to its ``phys_start``; an empty table is the
  ``{ 0 }`` placeholder entry; ``bar_mask`` takes Jailhouse's ivshmem macros by name
  (``"IVSHMEM_MSIX"``...).

A cell source (``kind = "cell"``, the default when there is no ``root_cell``)::

    kind = "cell"
    name = "apic-demo"
    flags = ["VIRTUAL_CONSOLE_PERMITTED"]
    cpus = "3"
    pio_regions = [{ base = 0x3f8, length = 8 }]

    [console]
    type = "8250"
    address = 0x3f8

    [[memory_regions]]
    phys_start = 0x3ef00000
    virt_start = 0
    size = "1M"
    flags = ["READ", "WRITE", "EXECUTE", "LOADABLE"]

A system source (``kind = "system"``) has ``flags``, ``[hypervisor_memory]``,
``[debug_console]``, ``[platform]`` (``pci_*`` keys, ``[[platform.iommu_units]]`` up to 8,
``[platform.x86]``) and a ``[root_cell]`` table with the cell keys above. Defaults follow
what a Jailhouse C config leaves zero: revision 14, architecture x86, console none, the
cell signature ``JHCLL`` (the embedded root cell descriptor: signature, revision and
architecture zero), 8-byte CPU sets. Unknown keys are errors.

:func:`~harness.hvmodel.config.decompile.decompile` (:mod:`.decompile`) turns any config
object back into a source that compiles to identical bytes, so any ``.cell`` file becomes
editable.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

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
from ..cpus import cpu_set_from
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
    shmem_protocol_value,
)
from .system import IommuUnit, SystemConfig, X86Platform

_SUFFIXES: Final = {"K": 10, "M": 20, "G": 30, "T": 40}
_INT_RE: Final = re.compile(r"^(0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+|[0-9][0-9_]*)"
                            r"\s*([KMGTkmgt](?:i?[Bb])?)?$")
_BDF_RE: Final = re.compile(r"^(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})"
                            r"\.([0-7])$")
_CONSOLE_TYPE_ALIASES: Final = {"8250": ConsoleType.UART_8250}
_FLAG_PREFIXES: Final = (
    "JAILHOUSE_MEM_", "JAILHOUSE_CELL_", "JAILHOUSE_SYS_", "JAILHOUSE_PCICAPS_",
    "JAILHOUSE_CACHE_", "JAILHOUSE_CON_",
)


# --- compiling --------------------------------------------------------------------------------


class _Ctx:
    """Error construction: every error names the source and the dotted key path."""

    __slots__ = ("source",)

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(message, source=self.source, field=path or None)

    def table(self, value: object, path: str, allowed: Iterable[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table, got {_kind(value)}")
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            where = f"{path}." if path else ""
            raise self.error(
                f"{where}{unknown[0]}",
                f"unknown key {unknown[0]!r}; expected one of: {', '.join(sorted(allowed))}",
            )
        return value

    def num(self, value: object, path: str, bits: int) -> int:
        number = _to_int(value)
        if number is None:
            raise self.error(path, f"expected an integer or a size like \"1M\", got {value!r}")
        if number < 0 or number >> bits:
            raise self.error(path, f"{number:#x} does not fit u{bits}")
        return number

    def boolean(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(path, f"expected true or false, got {value!r}")
        return value

    def flags(self, value: object, path: str, enum: type[Any], bits: int) -> int:
        if isinstance(value, str):
            value = [part for part in (p.strip() for p in value.split("|")) if part]
        if isinstance(value, list):
            result = 0
            for item in value:
                if not isinstance(item, str):
                    result |= self.num(item, path, bits)
                    continue
                name = item.strip().upper()
                for prefix in _FLAG_PREFIXES:
                    name = name.removeprefix(prefix)
                if name not in enum.__members__:
                    raise self.error(
                        path,
                        f"unknown flag {item!r}; expected some of: "
                        f"{', '.join(enum.__members__)}",
                    )
                result |= int(enum[name])
            return result
        return self.num(value, path, bits)

    def enum(self, value: object, path: str, enum: type[Any], bits: int,
             aliases: Mapping[str, int] | None = None) -> int:
        if isinstance(value, str) and aliases and value.strip().upper() in aliases:
            return int(aliases[value.strip().upper()])
        if isinstance(value, str) and _to_int(value) is None:
            name = value.strip().upper()
            if name in enum.__members__:
                return int(enum[name])
            names = list(aliases or ()) + list(enum.__members__)
            raise self.error(path, f"unknown value {value!r}; expected one of: {', '.join(names)}")
        return self.num(value, path, bits)

    def raw(self, value: object, path: str, size: int) -> bytes:
        """Bytes from ``"hex:..."`` or from short ASCII text padded with NUL."""
        if not isinstance(value, str):
            raise self.error(path, f"expected a string, got {_kind(value)}")
        if value.startswith("hex:"):
            try:
                data = bytes.fromhex(value[4:])
            except ValueError:
                raise self.error(path, f"bad hex bytes in {value!r}") from None
        else:
            try:
                data = value.encode("ascii")
            except UnicodeEncodeError:
                raise self.error(path, "expected ASCII text or \"hex:...\"") from None
        if len(data) > size:
            raise self.error(path, f"{len(data)} bytes do not fit {size}")
        return data.ljust(size, b"\0")

    def numbers(self, value: object, path: str, limit: int) -> list[int]:
        """A list like ``"0-3,5"``, ``[1, 2]`` or a single integer."""
        numbers: list[int] = []
        if isinstance(value, str):
            for part in (p.strip() for p in value.split(",")):
                if not part:
                    continue
                low, dash, high = part.partition("-")
                first = _to_int(low.strip())
                last = _to_int(high.strip()) if dash else first
                if first is None or last is None or last < first:
                    raise self.error(path, f"bad list entry {part!r}; expected N or N-M")
                numbers.extend(range(first, last + 1))
        elif isinstance(value, list):
            for item in value:
                numbers.append(self.num(item, path, 32))
        else:
            numbers.append(self.num(value, path, 32))
        for number in numbers:
            if number >= limit:
                raise self.error(path, f"{number} is out of range (limit {limit})")
        return numbers

    def bdf(self, value: object, path: str) -> int:
        if isinstance(value, str) and _to_int(value) is None:
            match = _BDF_RE.match(value.strip())
            if not match:
                raise self.error(path, f"bad BDF {value!r}; expected \"bb:dd.f\"")
            bus, dev, fn = int(match[2], 16), int(match[3], 16), int(match[4])
            if dev > 0x1F:
                raise self.error(path, f"device number {dev:#x} exceeds 0x1f")
            return bus << 8 | dev << 3 | fn
        return self.num(value, path, 16)

    def array(self, value: object, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.error(path, f"expected an array, got {_kind(value)}")
        return value

    def build(self, path: str, factory: Callable[[], _B]) -> _B:
        """Construct a model object; its validation errors get the source and key path."""
        try:
            return factory()
        except ConfigError as exc:
            if exc.source == self.source:
                raise  # already names its key
            name = exc.field.rsplit(".", 1)[-1] if exc.field else ""
            where = ".".join(part for part in (path, name) if part)
            raise self.error(where, exc.message) from None


_B = TypeVar("_B")


def _kind(value: object) -> str:
    names: dict[type, str] = {dict: "a table", list: "an array", str: "a string"}
    return names.get(type(value), repr(value))


def _to_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        return None
    match = _INT_RE.match(value.strip())
    if not match:
        return None
    number = int(match[1].replace("_", ""), 0) if match[1] != "0" else 0
    if match[2]:
        number <<= _SUFFIXES[match[2][0].upper()]
    return number


_MEMORY_KEYS: Final = ("phys_start", "virt_start", "size", "flags")


def _memory(ctx: _Ctx, value: object, path: str, virt_default_phys: bool = True) -> MemoryRegion:
    table = ctx.table(value, path, _MEMORY_KEYS)
    phys = ctx.num(table.get("phys_start", 0), f"{path}.phys_start", 64)
    virt_raw = table.get("virt_start", phys if virt_default_phys else 0)
    virt = ctx.num(virt_raw, f"{path}.virt_start", 64)
    size = ctx.num(table.get("size", 0), f"{path}.size", 64)
    flags = ctx.flags(table.get("flags", 0), f"{path}.flags", MemFlags, 64)
    return MemoryRegion(phys_start=phys, virt_start=virt, size=size, flags=flags)


def _console(ctx: _Ctx, value: object, path: str) -> Console:
    keys = ("address", "size", "type", "flags", "divider", "gate_nr", "clock_reg")
    table = ctx.table(value, path, keys)
    return ctx.build(path, lambda: Console(
        address=ctx.num(table.get("address", 0), f"{path}.address", 64),
        size=ctx.num(table.get("size", 0), f"{path}.size", 32),
        type=ctx.enum(table.get("type", 0), f"{path}.type", ConsoleType, 16,
                      _CONSOLE_TYPE_ALIASES),
        flags=ctx.flags(table.get("flags", 0), f"{path}.flags", ConsoleFlags, 16),
        divider=ctx.num(table.get("divider", 0), f"{path}.divider", 32),
        gate_nr=ctx.num(table.get("gate_nr", 0), f"{path}.gate_nr", 32),
        clock_reg=ctx.num(table.get("clock_reg", 0), f"{path}.clock_reg", 64),
    ))


def _cache(ctx: _Ctx, value: object, path: str) -> CacheRegion:
    table = ctx.table(value, path, ("start", "size", "type", "flags", "padding"))
    return CacheRegion(
        start=ctx.num(table.get("start", 0), f"{path}.start", 32),
        size=ctx.num(table.get("size", 0), f"{path}.size", 32),
        type=ctx.enum(table.get("type", "L3"), f"{path}.type", CacheType, 8),
        flags=ctx.flags(table.get("flags", 0), f"{path}.flags", CacheFlags, 16),
        padding=ctx.num(table.get("padding", 0), f"{path}.padding", 8),
    )


def _irqchip(ctx: _Ctx, value: object, path: str) -> Irqchip:
    table = ctx.table(value, path, ("address", "id", "pin_base", "pins", "pin_bitmap"))
    pin_base = ctx.num(table.get("pin_base", 0), f"{path}.pin_base", 32)
    if "pins" in table and "pin_bitmap" in table:
        raise ctx.error(f"{path}.pins", "give either pins or pin_bitmap, not both")
    words = [0, 0, 0, 0]
    if "pin_bitmap" in table:
        raw = ctx.array(table["pin_bitmap"], f"{path}.pin_bitmap")
        if len(raw) > 4:
            raise ctx.error(f"{path}.pin_bitmap", "at most 4 words of 32 pins")
        for index, word in enumerate(raw):
            words[index] = ctx.num(word, f"{path}.pin_bitmap[{index}]", 32)
    else:
        for pin in ctx.numbers(table.get("pins", []), f"{path}.pins", pin_base + 128):
            if pin < pin_base:
                raise ctx.error(f"{path}.pins", f"pin {pin} is below pin_base {pin_base}")
            words[(pin - pin_base) // 32] |= 1 << ((pin - pin_base) % 32)
    return Irqchip(
        address=ctx.num(table.get("address", 0), f"{path}.address", 64),
        id=ctx.num(table.get("id", 0), f"{path}.id", 32),
        pin_base=pin_base,
        pin_bitmap=(words[0], words[1], words[2], words[3]),
    )


def _pio(ctx: _Ctx, value: object, path: str) -> PioRegion:
    table = ctx.table(value, path, ("base", "length"))
    return PioRegion(
        base=ctx.num(table.get("base", 0), f"{path}.base", 16),
        length=ctx.num(table.get("length", 0), f"{path}.length", 16),
    )


_PCI_KEYS: Final = (
    "type", "iommu", "domain", "bdf", "bar_mask", "caps_start", "num_caps", "num_msi_vectors",
    "msi_64bits", "msi_maskable", "num_msix_vectors", "msix_region_size", "msix_address",
    "shmem_regions_start", "shmem_dev_id", "shmem_peers", "shmem_protocol", "msi_reserved_bits",
)


def _pci_device(ctx: _Ctx, value: object, path: str) -> PciDevice:
    table = ctx.table(value, path, _PCI_KEYS)
    mask_value = table.get("bar_mask", [])
    if isinstance(mask_value, str):
        key = mask_value.strip().upper().removeprefix("JAILHOUSE_").replace("_BAR_MASK", "")
        if key not in abi.IVSHMEM_BAR_MASKS:
            raise ctx.error(
                f"{path}.bar_mask",
                f"unknown BAR mask {mask_value!r}; expected one of: {', '.join(abi.IVSHMEM_BAR_MASKS)}",
            )
        masks = list(abi.IVSHMEM_BAR_MASKS[key])
    else:
        raw = ctx.array(mask_value, f"{path}.bar_mask")
        if len(raw) > 6:
            raise ctx.error(f"{path}.bar_mask", "at most 6 BAR masks")
        masks = [ctx.num(m, f"{path}.bar_mask[{i}]", 32) for i, m in enumerate(raw)]
        masks += [0] * (6 - len(masks))
    protocol_value = table.get("shmem_protocol", 0)
    if isinstance(protocol_value, str) and _to_int(protocol_value) is None:
        try:
            protocol = shmem_protocol_value(protocol_value.strip().upper())
        except (KeyError, ValueError):
            raise ctx.error(
                f"{path}.shmem_protocol",
                f"unknown protocol {protocol_value!r}; expected UNDEFINED, VETH, CUSTOM+N, "
                "VIRTIO_FRONT_<NET|BLOCK|CONSOLE>, VIRTIO_BACK_<...> or a number",
            ) from None
    else:
        protocol = ctx.num(protocol_value, f"{path}.shmem_protocol", 16)
    if protocol >> 16:
        raise ctx.error(f"{path}.shmem_protocol", f"{protocol:#x} does not fit u16")
    return ctx.build(path, lambda: PciDevice(
        type=ctx.enum(table.get("type", "DEVICE"), f"{path}.type", PciDeviceType, 8),
        iommu=ctx.num(table.get("iommu", 0), f"{path}.iommu", 8),
        domain=ctx.num(table.get("domain", 0), f"{path}.domain", 16),
        bdf=ctx.bdf(table.get("bdf", 0), f"{path}.bdf"),
        bar_mask=(masks[0], masks[1], masks[2], masks[3], masks[4], masks[5]),
        caps_start=ctx.num(table.get("caps_start", 0), f"{path}.caps_start", 16),
        num_caps=ctx.num(table.get("num_caps", 0), f"{path}.num_caps", 16),
        num_msi_vectors=ctx.num(table.get("num_msi_vectors", 0), f"{path}.num_msi_vectors", 8),
        msi_64bits=ctx.boolean(table.get("msi_64bits", False), f"{path}.msi_64bits"),
        msi_maskable=ctx.boolean(table.get("msi_maskable", False), f"{path}.msi_maskable"),
        num_msix_vectors=ctx.num(table.get("num_msix_vectors", 0),
                                 f"{path}.num_msix_vectors", 16),
        msix_region_size=ctx.num(table.get("msix_region_size", 0),
                                 f"{path}.msix_region_size", 16),
        msix_address=ctx.num(table.get("msix_address", 0), f"{path}.msix_address", 64),
        shmem_regions_start=ctx.num(table.get("shmem_regions_start", 0),
                                    f"{path}.shmem_regions_start", 32),
        shmem_dev_id=ctx.num(table.get("shmem_dev_id", 0), f"{path}.shmem_dev_id", 8),
        shmem_peers=ctx.num(table.get("shmem_peers", 0), f"{path}.shmem_peers", 8),
        shmem_protocol=protocol,
        msi_reserved_bits=ctx.num(table.get("msi_reserved_bits", 0),
                                  f"{path}.msi_reserved_bits", 8),
    ))


def _pci_cap(ctx: _Ctx, value: object, path: str) -> PciCapability:
    table = ctx.table(value, path, ("id", "start", "len", "flags"))
    return PciCapability(
        id=ctx.enum(table.get("id", 0), f"{path}.id", PciCapId, 16),
        start=ctx.num(table.get("start", 0), f"{path}.start", 16),
        len=ctx.num(table.get("len", 0), f"{path}.len", 16),
        flags=ctx.flags(table.get("flags", 0), f"{path}.flags", PciCapFlags, 16),
    )


_CELL_KEYS: Final = (
    "kind", "signature", "architecture", "revision", "name", "name_padding", "id", "flags",
    "cpus", "cpu_set_size", "memory_regions", "cache_regions", "irqchips", "pio_regions",
    "pci_devices", "pci_caps", "stream_ids", "vpci_irq_base", "cpu_reset_address",
    "msg_reply_timeout", "console",
)


def _elements(ctx: _Ctx, table: Mapping[str, Any], key: str, path: str,
              parse_one: Callable[[_Ctx, object, str], _B]) -> tuple[_B, ...]:
    where = f"{path}{key}"
    items = ctx.array(table.get(key, []), where)
    return tuple(parse_one(ctx, item, f"{where}[{index}]") for index, item in enumerate(items))


def _cell(ctx: _Ctx, value: object, path: str, *, root: bool) -> CellConfig:
    keys = _CELL_KEYS if not root else tuple(k for k in _CELL_KEYS if k != "kind")
    table = ctx.table(value, path.rstrip("."), keys)
    if "name" not in table:
        raise ctx.error(f"{path}name", "every cell needs a name")
    name = table["name"]
    if not isinstance(name, str):
        raise ctx.error(f"{path}name", f"expected a string, got {_kind(name)}")
    size = ctx.num(table.get("cpu_set_size", 8), f"{path}cpu_set_size", 32)
    if not 0 < size <= abi.MAX_CPU_SET_SIZE:
        raise ctx.error(f"{path}cpu_set_size", f"expected 1..{abi.MAX_CPU_SET_SIZE} bytes")
    cpus = ctx.numbers(table.get("cpus", []), f"{path}cpus", size * 8)
    stream_ids = tuple(
        ctx.num(sid, f"{path}stream_ids[{i}]", 32)
        for i, sid in enumerate(ctx.array(table.get("stream_ids", []), f"{path}stream_ids"))
    )
    default_sig = "" if root else abi.CELL_SIGNATURE.decode()
    default_rev = 0 if root else abi.CONFIG_REVISION
    return ctx.build(path.rstrip("."), lambda: CellConfig(
        signature=ctx.raw(table.get("signature", default_sig), f"{path}signature", 5),
        architecture=ctx.enum(table.get("architecture", 0), f"{path}architecture", Architecture, 8,
                              {"X86": 0}),
        revision=ctx.num(table.get("revision", default_rev), f"{path}revision", 16),
        name=name,
        name_padding=ctx.raw(table["name_padding"], f"{path}name_padding", 31).rstrip(b"\0")
        if "name_padding" in table else b"",
        id=ctx.num(table.get("id", 0), f"{path}id", 32),
        flags=ctx.flags(table.get("flags", 0), f"{path}flags", CellFlags, 32),
        cpu_set=cpu_set_from(cpus, size),
        memory_regions=_elements(ctx, table, "memory_regions", path, _memory),
        cache_regions=_elements(ctx, table, "cache_regions", path, _cache),
        irqchips=_elements(ctx, table, "irqchips", path, _irqchip),
        pio_regions=_elements(ctx, table, "pio_regions", path, _pio),
        pci_devices=_elements(ctx, table, "pci_devices", path, _pci_device),
        pci_caps=_elements(ctx, table, "pci_caps", path, _pci_cap),
        stream_ids=stream_ids,
        vpci_irq_base=ctx.num(table.get("vpci_irq_base", 0), f"{path}vpci_irq_base", 32),
        cpu_reset_address=ctx.num(table.get("cpu_reset_address", 0),
                                  f"{path}cpu_reset_address", 64),
        msg_reply_timeout=ctx.num(table.get("msg_reply_timeout", 0),
                                  f"{path}msg_reply_timeout", 64),
        console=_console(ctx, table.get("console", {}), f"{path}console"),
    ))


def _iommu(ctx: _Ctx, value: object, path: str) -> IommuUnit:
    amd_keys = ("amd_bdf", "amd_base_cap", "amd_msi_cap", "amd_features")
    pvu_keys = ("tipvu_tlb_base", "tipvu_tlb_size")
    table = ctx.table(value, path, ("type", "base", "size", "union", *amd_keys, *pvu_keys))
    kind = ctx.enum(table.get("type", 0), f"{path}.type", IommuType, 32, {"TIPVU": 4})
    base = ctx.num(table.get("base", 0), f"{path}.base", 64)
    size = ctx.num(table.get("size", 0), f"{path}.size", 32)
    given = [k for k in (*amd_keys, *pvu_keys, "union") if k in table]
    if len({k.split("_")[0] for k in given}) > 1:
        raise ctx.error(f"{path}.{given[1]}", "give one view of the union: amd_*, tipvu_* or union")
    if any(k in table for k in amd_keys):
        union = IommuUnit.amd(
            base=base, size=size,
            bdf=ctx.bdf(table.get("amd_bdf", 0), f"{path}.amd_bdf"),
            base_cap=ctx.num(table.get("amd_base_cap", 0), f"{path}.amd_base_cap", 8),
            msi_cap=ctx.num(table.get("amd_msi_cap", 0), f"{path}.amd_msi_cap", 8),
            features=ctx.num(table.get("amd_features", 0), f"{path}.amd_features", 32),
        ).union
    elif any(k in table for k in pvu_keys):
        union = IommuUnit.pvu(
            base=base, size=size,
            tlb_base=ctx.num(table.get("tipvu_tlb_base", 0), f"{path}.tipvu_tlb_base", 64),
            tlb_size=ctx.num(table.get("tipvu_tlb_size", 0), f"{path}.tipvu_tlb_size", 32),
        ).union
    else:
        union = ctx.raw(table.get("union", ""), f"{path}.union", 12)
    return IommuUnit(type=kind, base=base, size=size, union=union)


def _x86(ctx: _Ctx, value: object, path: str) -> X86Platform:
    keys = ("pm_timer_address", "apic_mode", "vtd_interrupt_limit", "tsc_khz", "apic_khz",
            "padding", "remainder")
    table = ctx.table(value, path, keys)
    return X86Platform(
        pm_timer_address=ctx.num(table.get("pm_timer_address", 0), f"{path}.pm_timer_address",
                                 16),
        apic_mode=ctx.enum(table.get("apic_mode", 0), f"{path}.apic_mode", ApicMode, 8),
        vtd_interrupt_limit=ctx.num(table.get("vtd_interrupt_limit", 0),
                                    f"{path}.vtd_interrupt_limit", 32),
        tsc_khz=ctx.num(table.get("tsc_khz", 0), f"{path}.tsc_khz", 32),
        apic_khz=ctx.num(table.get("apic_khz", 0), f"{path}.apic_khz", 32),
        padding=ctx.num(table.get("padding", 0), f"{path}.padding", 8),
        remainder=ctx.raw(table.get("remainder", ""), f"{path}.remainder", 28),
    )


def _system(ctx: _Ctx, table: Mapping[str, Any]) -> SystemConfig:
    ctx.table(table, "", ("kind", "signature", "architecture", "revision", "flags",
                          "hypervisor_memory", "debug_console", "platform", "root_cell"))
    platform = ctx.table(table.get("platform", {}), "platform",
                         ("pci_mmconfig_base", "pci_mmconfig_end_bus", "pci_is_virtual",
                          "pci_domain", "iommu_units", "x86"))
    raw_units = ctx.array(platform.get("iommu_units", []), "platform.iommu_units")
    if len(raw_units) > abi.MAX_IOMMU_UNITS:
        raise ctx.error("platform.iommu_units",
                        f"{len(raw_units)} units, at most {abi.MAX_IOMMU_UNITS}")
    units = [_iommu(ctx, unit, f"platform.iommu_units[{i}]") for i, unit in enumerate(raw_units)]
    units += [IommuUnit()] * (abi.MAX_IOMMU_UNITS - len(units))
    if "root_cell" not in table:
        raise ctx.error("root_cell", "a system config needs a [root_cell] table")
    return SystemConfig(
        signature=ctx.raw(table.get("signature", "JHSYS"), "signature", 5),
        architecture=ctx.enum(table.get("architecture", 0), "architecture", Architecture, 8),
        revision=ctx.num(table.get("revision", abi.CONFIG_REVISION), "revision", 16),
        flags=ctx.flags(table.get("flags", 0), "flags", SysFlags, 32),
        hypervisor_memory=_memory(ctx, table.get("hypervisor_memory", {}), "hypervisor_memory",
                                  virt_default_phys=False),
        debug_console=_console(ctx, table.get("debug_console", {}), "debug_console"),
        pci_mmconfig_base=ctx.num(platform.get("pci_mmconfig_base", 0),
                                  "platform.pci_mmconfig_base", 64),
        pci_mmconfig_end_bus=ctx.num(platform.get("pci_mmconfig_end_bus", 0),
                                     "platform.pci_mmconfig_end_bus", 8),
        pci_is_virtual=ctx.num(platform.get("pci_is_virtual", 0), "platform.pci_is_virtual", 8),
        pci_domain=ctx.num(platform.get("pci_domain", 0), "platform.pci_domain", 16),
        iommu_units=tuple(units),
        x86=_x86(ctx, platform.get("x86", {}), "platform.x86"),
        root_cell=_cell(ctx, table["root_cell"], "root_cell.", root=True),
    )


def compile_source(text: str, source: str = "<toml>") -> SystemConfig | CellConfig:
    """Compile a TOML source to a config object (``.to_bytes()`` gives the binary).

    :param text: the TOML text
    :param source: named in errors (usually the file name)
    :raise ConfigError: on a TOML syntax error or any schema violation, naming the key
    """
    ctx = _Ctx(source)
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML syntax error: {exc}", source=source) from None
    kind = table.get("kind", "system" if "root_cell" in table else "cell")
    if kind == "system":
        return _system(ctx, table)
    if kind == "cell":
        return _cell(ctx, table, "", root=False)
    raise ctx.error("kind", f"expected \"system\" or \"cell\", got {kind!r}")


def load_source(path: str | os.PathLike[str]) -> SystemConfig | CellConfig:
    """Read and compile a TOML source file.

    :raise ConfigError: when the file cannot be read or does not compile
    """
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", source=source) from exc
    return compile_source(text, source)
