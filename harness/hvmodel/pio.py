"""Port I/O; models the I/O-bitmap and port-exit parts of ``hypervisor/arch/x86/vcpu.c``
plus ``i8042.c`` and the port handler of ``hypervisor/arch/x86/pci.c``.

Every cell has an I/O bitmap: a port either passes through to the hardware or exits
into the hypervisor. At cell creation the cell's whitelist is opened in its own bitmap
and *closed in the root's*; the PM timer (4 ports at ``pm_timer_address``) is always
open for the cell; the i8042 command port 0x64 is always trapped. At destruction the
root gets back only the intersection of the cell's whitelist with the root's configured
whitelist.

A trapped access is handled in Jailhouse's order: string/REP I/O is fatal; 0xCF8 is the
per-cell PCI address shadow (4-byte accesses only); 0xCFC-0xCFF go through the PCI
config moderation; 0x64 passes the i8042 filter if the cell whitelists it; a byte
access to 0x80 is ignored; anything else is ``FATAL: Invalid PIO read/write``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from .abi import PCI_REG_ADDR_PORT, PCI_REG_DATA_PORT
from .percpu import EXIT_DONE, EXIT_FAILED, ExitResult
from .printk import FATAL_I8042, FATAL_PCI_CONFIG, FATAL_PCI_CONFIG_PORT, FATAL_PIO, bdf_params

if TYPE_CHECKING:
    from .cell import Cell
    from .pci import PciUnit
    from .unit import UnitHost

I8042_CMD_REG: Final = 0x64
#: "write output port" command
I8042_CMD_WRITE_CTRL_PORT: Final = 0xD1
#: "pulse output port" commands (0xF0..0xFF), i.e. reset
I8042_CMD_PULSE_CTRL_PORT: Final = 0xF0
POST_PORT: Final = 0x80
PM_TIMER_PORTS: Final = 4


_FILL: Final = (memoryview(bytes(0x10000)), memoryview(b"\x01" * 0x10000))


def _set(bitmap: bytearray, base: int, length: int, value: int) -> None:
    end = min(base + length, 0x10000)
    if end > base:
        bitmap[base:end] = _FILL[value][: end - base]


def cell_init(host: UnitHost, cell: Cell) -> None:
    """Build the cell's I/O bitmap and shrink the root's (``vcpu_cell_init``)."""
    bitmap = cell.pio_open
    for pio in cell.config.pio_regions:
        _set(bitmap, pio.base, pio.length, 1)
    bitmap[I8042_CMD_REG] = 0
    if cell is not host.root:
        root_bitmap = host.root.pio_open
        for pio in cell.config.pio_regions:
            _set(root_bitmap, pio.base, pio.length, 0)
    pm_timer = host.system.x86.pm_timer_address
    if pm_timer:
        _set(bitmap, pm_timer, PM_TIMER_PORTS, 1)


def cell_exit(root: Cell, cell: Cell) -> None:
    """Give the root back what it is configured to have (``vcpu_cell_exit``)."""
    if cell is root:
        return
    root_bitmap = root.pio_open
    for start, end in _give_back(root, cell):
        _set(root_bitmap, start, end - start, 1)
    root_bitmap[I8042_CMD_REG] = 0


def _give_back(root: Cell, cell: Cell) -> list[tuple[int, int]]:
    """The cell's whitelist clipped to the root's configured one (cached per whitelist)."""
    key = cell.config.pio_regions
    cache = root.pio_give_back
    ranges = cache.get(key)
    if ranges is None:
        ranges = []
        for pio in key:
            base, end = pio.base, pio.base + pio.length
            for root_base, root_end in _root_ranges(root):
                if root_base < end and base < root_end:
                    ranges.append((max(base, root_base), min(end, root_end)))
        if len(cache) > 256:
            cache.clear()
        cache[key] = ranges
    return ranges


def _root_ranges(root: Cell) -> list[tuple[int, int]]:
    ranges = root.pio_ranges
    if ranges is None:
        ranges = [(pio.base, pio.base + pio.length) for pio in root.config.pio_regions]
        root.pio_ranges = ranges
    return ranges


def whitelisted(cell: Cell, port: int) -> bool:
    """Whether ``port`` lies in the cell's configured whitelist."""
    return any(pio.base <= port < pio.base + pio.length for pio in cell.config.pio_regions)


def is_open(cell: Cell, port: int, size: int) -> bool:
    """Whether an access passes through without an exit (all its ports open)."""
    bitmap = cell.pio_open
    if size == 1:
        return bool(bitmap[port])
    return 0 not in bitmap[port : port + size]


def handle(
    host: UnitHost, pci: PciUnit, cell: Cell, port: int, size: int, is_write: bool, value: int,
    rep: bool,
) -> ExitResult:
    """Handle a trapped port access (``vcpu_handle_io_access``); FATAL lines printed here.

    :param pci: serves the configuration ports
    :return: the result; :data:`EXIT_FAILED` tells the caller to park the CPU
    """
    console = host.console
    direction = "write" if is_write else "read"
    if rep:
        console.printk(FATAL_PIO, direction, port, size)
        return EXIT_FAILED
    if port == PCI_REG_ADDR_PORT or PCI_REG_DATA_PORT <= port < PCI_REG_DATA_PORT + 4:
        return _pci_config(host, pci, cell, port, size, is_write, value)
    if port == I8042_CMD_REG and whitelisted(cell, port):
        if size != 1:
            console.printk(FATAL_PIO, direction, port, size)
            return EXIT_FAILED
        if not is_write:
            return ExitResult(True, host.arch.pio_read(port, 1))
        byte = value & 0xFF
        if byte == I8042_CMD_WRITE_CTRL_PORT or byte & 0xF0 == I8042_CMD_PULSE_CTRL_PORT:
            console.write(FATAL_I8042)
            return EXIT_FAILED
        host.arch.pio_write(port, 1, byte)
        return EXIT_DONE
    if port == POST_PORT and size == 1:
        return EXIT_DONE
    console.printk(FATAL_PIO, direction, port, size)
    return EXIT_FAILED


def _pci_config(
    host: UnitHost, pci: PciUnit, cell: Cell, port: int, size: int, is_write: bool, value: int
) -> ExitResult:
    """``x86_pci_config_handler``."""
    console = host.console
    direction = "write" if is_write else "read"
    if port == PCI_REG_ADDR_PORT:
        if size != 4:
            console.printk(FATAL_PCI_CONFIG_PORT, direction, port, size)
            return EXIT_FAILED
        if is_write:
            cell.pci_addr_port_val = value & 0xFFFFFFFF
            return EXIT_DONE
        return ExitResult(True, cell.pci_addr_port_val)
    if port + size > PCI_REG_DATA_PORT + 4:
        console.printk(FATAL_PCI_CONFIG_PORT, direction, port, size)
        return EXIT_FAILED
    address = cell.pci_addr_port_val
    bdf = (address >> 8) & 0xFFFF
    reg = (address & 0xFC) + (port - PCI_REG_DATA_PORT)
    if is_write:
        if not pci.cfg_write(cell, bdf, reg, size, value):
            console.printk(FATAL_PCI_CONFIG, direction, *bdf_params(bdf), reg, size)
            return EXIT_FAILED
        return EXIT_DONE
    return ExitResult(True, pci.cfg_read(cell, bdf, reg, size))
