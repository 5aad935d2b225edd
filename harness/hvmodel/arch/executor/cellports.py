"""What a cell's I/O bitmap loop serves besides its whitelist; stands where
``x86_pci_config_handler`` (``hypervisor/arch/x86/pci.c``) answers for devices outside
the cell, and where Jailhouse's UARTs would show what a cell prints.

The executor gives every non-root cell a
:class:`~harness.hvmodel.arch.portio.CellPorts` (:func:`cell_ports`), shared by the I/O
bitmap loops of its CPUs, and each loop a bitmap (:func:`loop_bitmap`): the model's I/O
bitmap of the cell, plus

* the PCI configuration ports 0xCF8-0xCFF as
  :data:`~harness.hvmodel.arch.portio.PORT_PCI_CONFIG`: the loop latches addresses of
  devices the cell does not have and reads all ones from them, as Jailhouse does; the
  rest reaches the model (:meth:`CellPortsSync.before_exit` first gives it the latched
  address, so that its ``pci_addr_port_val`` is the cell's);
* the transmit registers of the cell's UARTs (the PC UARTs its whitelist opens and its
  console, when an 8250 on PIO) as
  :data:`~harness.hvmodel.arch.portio.PORT_CAPTURED`: what the cell prints there is kept
  in a ring (:func:`console_tail`), its first bytes apart (:func:`console_view`), for
  the ``jailhouse cell linux`` watch and report and the executor's status.

Jailhouse counts each configuration-port access as a PIO exit; the loop's answers are
added to the CPU's ``vmexits_pio`` (and ``vmexits_total``) the next time the CPU's thread
hands an exit to the model (:meth:`CellPortsSync.before_exit`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final, Protocol

from ...abi import (
    PCI_REG_ADDR_PORT,
    PCI_REG_DATA_PORT,
    PLATFORM_UARTS,
    ConsoleFlags,
    ConsoleType,
    CpuStat,
)
from ..portio import PORT_CAPTURED, PORT_OPEN, PORT_PCI_CONFIG, PORT_TRAPPED, CellPorts

if TYPE_CHECKING:
    from ...config import CellConfig
    from ...percpu import ExitResult

__all__ = ["CellPortsSync", "PortModel", "cell_ports", "console_ports", "console_tail", "console_text",
           "console_view", "loop_bitmap"]

LOG = logging.getLogger(__name__)

#: the configuration-port range the loop watches (address port to the data port's end)
PCI_CONFIG_PORTS: Final = range(PCI_REG_ADDR_PORT, PCI_REG_DATA_PORT + 4)


def cell_ports(config: CellConfig) -> CellPorts:
    """The shared port state of a new cell: its PCI devices go to the model."""
    return CellPorts(device.bdf for device in config.pci_devices)


def console_ports(config: CellConfig) -> frozenset[int]:
    """The transmit registers of the UARTs the cell may print on: each PC UART its PIO
    whitelist names, and its console when that is an 8250 on PIO."""
    ports = {base for pio in config.pio_regions for base in PLATFORM_UARTS
             if pio.base <= base < pio.base + pio.length}
    console = config.console
    if console.type == ConsoleType.UART_8250 and not console.flags & ConsoleFlags.ACCESS_MMIO:
        ports.add(int(console.address))
    return frozenset(ports)


def loop_bitmap(pio_open: bytes | bytearray, config: CellConfig) -> bytearray:
    """The loop's bitmap for a CPU of the cell: the model's I/O bitmap (1 = open), the
    configuration ports it traps marked for the loop, its open UART transmit registers
    marked for capture."""
    bitmap = bytearray(pio_open)
    for port in PCI_CONFIG_PORTS:
        if bitmap[port] == PORT_TRAPPED:
            bitmap[port] = PORT_PCI_CONFIG
    for port in console_ports(config):
        if bitmap[port] == PORT_OPEN:
            bitmap[port] = PORT_CAPTURED
    return bitmap


#: bytes of a cell's UART output the executor status shows
CONSOLE_TAIL: Final = 2048


def console_tail(ports: CellPorts | None, limit: int = CONSOLE_TAIL) -> str:
    """The last ``limit`` bytes the cell wrote to its UARTs, as text (:func:`console_text`);
    none without ``ports``."""
    if ports is None:
        return ""
    data, _head = ports.captured(max(ports.capture_head - limit, 0))
    return console_text(data)


def console_text(data: bytes) -> str:
    """UART bytes as text (Latin-1; control characters but line feeds and tabs dropped:
    carriage returns, and the divisor bytes a driver writes to the same register while it
    sets the baud rate)."""
    return data.translate(None, _CONTROL).decode("latin-1")


def console_view(ports: CellPorts | None) -> dict[str, str]:
    """What the executor status shows of a cell's UART output: its tail (``console``)
    and its first bytes (``console_start``, :meth:`~harness.hvmodel.arch.portio.CellPorts.keep_start`)."""
    if ports is None:
        return {"console": "", "console_start": ""}
    return {"console": console_tail(ports), "console_start": console_text(bytes(ports.start))}


_CONTROL: Final = bytes(byte for byte in range(0x20) if byte not in b"\n\t") + b"\x7f"


class PortModel(Protocol):
    """The model's entry points a sync uses (part of :class:`.exits.ExitHandler`)."""

    def handle_pio(
        self, cpu: int, port: int, size: int, is_write: bool, value: int = 0, *, rep: bool = False
    ) -> ExitResult: ...

    def count_exit(self, cpu: int, stat: CpuStat, count: int = 1) -> None: ...


class CellPortsSync:
    """Keeps the model in step with what one CPU's loop did without it.

    :param cpu: the CPU number
    :param ports: the cell's shared port state
    """

    def __init__(self, cpu: int, ports: CellPorts) -> None:
        self.cpu = cpu
        self.ports = ports
        #: configuration-port answers of the current loop already counted in the model
        self._counted = 0

    def new_loop(self) -> None:
        """A new loop starts counting from 0 (after a reset)."""
        self._counted = 0

    def uncounted(self, pci_served: int) -> int:
        """The loop's configuration-port answers the model has not counted yet (it counts
        them at this CPU's next exit; a cell that only halts makes none)."""
        return max(0, pci_served - self._counted)

    def before_exit(self, handler: PortModel, pci_served: int, *, port_exit: bool) -> None:
        """Before the model gets an exit of this CPU: count the loop's answers as PIO
        exits and, for a port access, hand it the address the loop latched.

        :param pci_served: the loop's count of configuration-port answers
        :param port_exit: the exit is a port access (the model may look at its address
            port)
        """
        self.ports.keep_start()
        latch = self.ports.take_latch() if port_exit else None
        if latch is not None:
            # The latched write as the model would have seen it; the loop counted it.
            handler.handle_pio(self.cpu, PCI_REG_ADDR_PORT, 4, True, latch)
            self._counted += 1
        pending = pci_served - self._counted
        if pending > 0:
            handler.count_exit(self.cpu, CpuStat.VMEXITS_PIO, pending)
            self._counted = pci_served
