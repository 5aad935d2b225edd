"""The Jailhouse configuration format: models ``include/jailhouse/cell-config.h``.

Read, write, check and author Jailhouse system (``JHSYS``) and cell (``JHCLL``) configs,
revision 14, byte for byte; revision 12 (v0.12) is read and converted. Standard library
only. The pieces:

* :mod:`.model`: the config objects (frozen dataclasses) and flag/type enums;
* :mod:`.parser`: :func:`parse_cell`, :func:`parse_system`, :func:`parse`, :func:`load`;
* :mod:`.checkset`, :mod:`.check`, :mod:`.report`: ``jailhouse config check`` (the set as
  Jailhouse's tool reads it, its checks, its output); :mod:`.jhlab_checks`: jhlab's own;
* :mod:`.toml`: TOML sources that compile to binary, and the decompiler;
* :mod:`.show`: text and JSON renderings;
* :mod:`.cli`: ``python3 -m harness.hvmodel.config {show,check,compile,decompile,create}``
  and ``jailhouse config check``.
"""

from .check import check, check_set
from .checkset import SetCell, SetReadError, SetSystem, read_cell, read_system
from .cli import jailhouse_config_check, main
from .layout import CELL_DESC_SIZE, CONFIG_REVISION, SYSTEM_SIZE
from .model import (
    ApicMode,
    Arch,
    CacheFlags,
    CacheRegion,
    CacheType,
    CellConfig,
    CellFlags,
    Console,
    ConsoleFlags,
    ConsoleType,
    IommuType,
    IommuUnit,
    Irqchip,
    MemFlags,
    MemoryRegion,
    PciCapability,
    PciCapFlags,
    PciCapId,
    PciDevice,
    PciDeviceType,
    PioRegion,
    ShmemProtocol,
    SysFlags,
    SystemConfig,
    VirtioDevice,
    X86Platform,
    cpu_set_from,
    format_bdf,
)
from .parser import convert_revision12, load, parse, parse_cell, parse_system
from .report import CheckReport, CheckSection, Finding, render_check
from .show import render_text, to_dict
from .toml import compile_source, decompile, load_source

__all__ = [
    "CELL_DESC_SIZE",
    "CONFIG_REVISION",
    "SYSTEM_SIZE",
    "ApicMode",
    "Arch",
    "CacheFlags",
    "CacheRegion",
    "CacheType",
    "CellConfig",
    "CellFlags",
    "CheckReport",
    "CheckSection",
    "Console",
    "ConsoleFlags",
    "ConsoleType",
    "Finding",
    "IommuType",
    "IommuUnit",
    "Irqchip",
    "MemFlags",
    "MemoryRegion",
    "PciCapFlags",
    "PciCapId",
    "PciCapability",
    "PciDevice",
    "PciDeviceType",
    "PioRegion",
    "SetCell",
    "SetReadError",
    "SetSystem",
    "ShmemProtocol",
    "SysFlags",
    "SystemConfig",
    "VirtioDevice",
    "X86Platform",
    "check",
    "check_set",
    "compile_source",
    "convert_revision12",
    "cpu_set_from",
    "decompile",
    "format_bdf",
    "jailhouse_config_check",
    "load",
    "load_source",
    "main",
    "parse",
    "parse_cell",
    "parse_system",
    "read_cell",
    "read_system",
    "render_check",
    "render_text",
    "to_dict",
]
