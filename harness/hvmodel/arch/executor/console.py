"""The hypervisor's debug console on an 8250 UART; models ``hypervisor/uart-8250.c``
(``uart_write``: wait for THRE, ``\\n`` as ``\\r\\n``) on the system config's debug UART.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final

from ...abi import ConsoleFlags, ConsoleType
from ...errors import HvError
from ..portio import PortIo, open_ports

if TYPE_CHECKING:
    from ...config import SystemConfig

__all__ = ["DebugUart"]

LOG = logging.getLogger(__name__)

#: seconds the debug console waits for the UART's transmitter per character
UART_TIMEOUT: Final = 0.01
#: 8250 registers
UART_LSR: Final = 5
UART_LSR_THRE: Final = 0x20


class DebugUart:
    """Hypervisor console text to an 8250 on PIO.

    :param port: the UART's base port; None: the system config's debug console when it
        is an 8250 on PIO (see :meth:`pick`)
    :param enabled: write the console to a UART at all
    :param port_mode: the port backend to open for a write after the executor's shutdown
    """

    def __init__(self, *, port: int | None, enabled: bool, port_mode: str) -> None:
        self.port = port
        self.enabled = enabled
        self.port_mode = port_mode
        #: the UART written to (None: none, or it failed)
        self.base: int | None = None

    def pick(self, system: SystemConfig) -> None:
        """Choose the UART for ``system`` (at the executor's ``init``)."""
        self.base = None
        if not self.enabled:
            return
        if self.port is not None:
            self.base = self.port
            return
        con = system.debug_console
        if con.type == ConsoleType.UART_8250 and not con.flags & ConsoleFlags.ACCESS_MMIO and con.address:
            self.base = int(con.address)

    def write(self, text: str, ports: PortIo | None, *, after_shutdown: bool) -> None:
        """Send ``text`` (8250: wait for THRE, ``\\n`` as ``\\r\\n``).

        :param ports: the executor's port backend (None when it has none)
        :param after_shutdown: the executor is shut down (the model prints the
            ``Releasing CPU`` lines then, as Jailhouse's CPUs do on their way out): ports
            are opened for the call
        """
        base = self.base
        if base is None:
            return
        temporary: PortIo | None = None
        if ports is None:
            if not after_shutdown:
                return
            try:
                ports = temporary = open_ports(mode=self.port_mode)
            except HvError as exc:
                LOG.debug("no ports for the console after shutdown: %s", exc)
                return
        try:
            for byte in text.encode("latin-1", "replace"):
                if byte == 0x0A:
                    _uart_put(ports, base, 0x0D)
                _uart_put(ports, base, byte)
        except (OSError, HvError, ValueError) as exc:
            LOG.warning("debug UART %#x failed (%s); console output stays in the model", base, exc)
            self.base = None
        finally:
            if temporary is not None:
                temporary.close()


def _uart_put(ports: PortIo, base: int, byte: int) -> None:
    deadline = time.monotonic() + UART_TIMEOUT
    while not ports.read(base + UART_LSR, 1) & UART_LSR_THRE and time.monotonic() < deadline:
        pass
    ports.write(base, 1, byte)
