"""The ``/dev/jailhouse`` interface of the Linux driver; models ``driver/jailhouse.h``.

The ioctl numbers (x86-64 encoding) and the cell reference the tool hands the driver: a
``struct jailhouse_cell_id`` names a cell by id or, with :data:`CELL_ID_UNUSED`, by
name (at most :data:`CELL_ID_NAMELEN` bytes; a different limit from the config's
``JAILHOUSE_CELL_NAME_MAXLEN`` although both are 31).
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["CELL_ID_NAMELEN", "CELL_ID_UNUSED", "Ioctl"]


class Ioctl(enum.IntEnum):
    """``/dev/jailhouse`` ioctl numbers on x86-64."""

    ENABLE = 0x40080000
    DISABLE = 0x00000001
    CELL_CREATE = 0x40100002
    CELL_LOAD = 0x40300003
    CELL_START = 0x40280004
    CELL_DESTROY = 0x40280005


#: ``JAILHOUSE_CELL_ID_UNUSED``: ``struct jailhouse_cell_id.id`` meaning "look the cell
#: up by name"
CELL_ID_UNUSED: Final = -1
#: ``JAILHOUSE_CELL_ID_NAMELEN``: significant bytes of ``struct jailhouse_cell_id.name``
CELL_ID_NAMELEN: Final = 31
