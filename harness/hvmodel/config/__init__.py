"""The Jailhouse configuration format: models ``include/jailhouse/cell-config.h``.

Read, write, check and author Jailhouse system (``JHSYS``) and cell (``JHCLL``) configs,
revision 14, byte for byte; revision 12 (v0.12) is read and converted. Standard library
only. The pieces:

* :mod:`.model`: the config objects of a cell (frozen dataclasses), :mod:`.system` the
  system config, :mod:`.fields` their range checks; their flag/type enums and byte layout
  are :mod:`harness.hvmodel.abi`'s (re-exported here);
* :mod:`.parser`: :func:`parse_cell`, :func:`parse_system`, :func:`parse`, :func:`load`;
* :mod:`.check`: ``jailhouse config check`` and jhlab's extra checks;
* :mod:`.toml`: TOML sources that compile to binary, :mod:`.decompile` the way back;
* :mod:`.show`: text and JSON renderings;
* :mod:`.collect`, :mod:`.sysfs_parser`, :mod:`.regions`, :mod:`.create`: ``config
  create`` (the facts of a root cell, read back, turned into a system config);
* :mod:`.cli`: ``python3 -m harness.hvmodel.config {show,check,compile,decompile}``.
"""

from ..abi import (
    CELL_DESC_SIZE,
    CONFIG_REVISION,
    SYSTEM_SIZE,
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
    ShmemProtocol,
    SysFlags,
    VirtioDevice,
)
from ..cpus import cpu_set_from
from .check import CheckReport, CheckSection, Finding, check, render_check
from .cli import main
from .decompile import decompile
from .model import (
    CacheRegion,
    CellConfig,
    Console,
    Irqchip,
    MemoryRegion,
    PciCapability,
    PciDevice,
    PioRegion,
    format_bdf,
)
from .parser import convert_revision12, load, parse, parse_cell, parse_system
from .show import render_text, to_dict
from .system import IommuUnit, SystemConfig, X86Platform
from .toml import compile_source, load_source

__all__ = [
    "CELL_DESC_SIZE",
    "CONFIG_REVISION",
    "SYSTEM_SIZE",
    "ApicMode",
    "Architecture",
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
    "ShmemProtocol",
    "SysFlags",
    "SystemConfig",
    "VirtioDevice",
    "X86Platform",
    "check",
    "compile_source",
    "convert_revision12",
    "cpu_set_from",
    "decompile",
    "format_bdf",
    "load",
    "load_source",
    "main",
    "parse",
    "parse_cell",
    "parse_system",
    "render_check",
    "render_text",
    "to_dict",
]
