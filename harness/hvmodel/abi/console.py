"""Console descriptor; models ``include/jailhouse/console.h``.

``struct jailhouse_console`` (32 bytes, packed) describes the hypervisor's debug console
in the system config and each cell's console in its descriptor; the comm region carries
a copy so that inmates find their UART.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

__all__ = ["CONSOLE", "ConsoleFlags", "ConsoleType"]

#: ``struct jailhouse_console``: address, size, type, flags, divider, gate_nr, clock_reg.
CONSOLE: Final = struct.Struct("<QIHHIIQ")


class ConsoleType(enum.IntEnum):
    """``JAILHOUSE_CON_TYPE_*`` (``UART_8250`` is ``JAILHOUSE_CON_TYPE_8250``)."""

    NONE = 0x0000
    EFIFB = 0x0001
    UART_8250 = 0x0002
    PL011 = 0x0003
    XUARTPS = 0x0004
    MVEBU = 0x0005
    HSCIF = 0x0006
    SCIFA = 0x0007
    IMX = 0x0008
    IMX_LPUART = 0x0009
    SCIF = 0x000A


class ConsoleFlags(enum.IntFlag):
    """``JAILHOUSE_CON_*`` flags; PIO access, 1-byte spacing and 1024x768 are the zeros."""

    ACCESS_MMIO = 0x0001
    REGDIST_4 = 0x0002
    FB_1920x1080 = 0x0004
    INVERTED_GATE = 0x1000
    MDR_QUIRK = 0x2000
