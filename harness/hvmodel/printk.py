"""Hypervisor console; models ``hypervisor/printk.c`` and ``include/jailhouse/printk.h``.

Jailhouse writes every ``printk`` to its debug UART and, when the system config sets
``JAILHOUSE_SYS_VIRTUAL_DEBUG_CONSOLE``, into a 2048-byte ring the root reads through
``/sys/devices/jailhouse/console`` (and the ``console`` device read). The model keeps the
same ring, passes the text to :meth:`Arch.console_write <harness.hvmodel.arch.Arch.
console_write>` for the UART, logs each complete line at INFO on this module's logger,
and keeps a bounded history of complete lines for tests.

The wording of every line is Jailhouse's; the formats live here as constants so tests
and the oracle use the very same strings.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Final

LOG = logging.getLogger(__name__)

#: size of ``jailhouse_virt_console.content``
CONSOLE_RING_SIZE: Final = 2048

# Jailhouse's console lines (printf formats turned into str.format / %-formats).
MSG_CREATED: Final = 'Created cell "%s"\n'
MSG_CLOSING: Final = 'Closing cell "%s"\n'
MSG_CAN_BE_LOADED: Final = 'Cell "%s" can be loaded\n'
MSG_STARTED: Final = 'Started cell "%s"\n'
MSG_POOL_USAGE: Final = "Page pool usage %s: mem %d/%d, remap %d/%d\n"
MSG_PARKING: Final = 'Parking CPU %d (Cell: "%s")\n'
MSG_STOPPING: Final = 'Stopping CPU %d (Cell: "%s")\n'
MSG_TIMEOUT: Final = "Timeout expired while waiting for reply from target cell\n"
MSG_SHUTTING_DOWN: Final = "Shutting down hypervisor\n"
MSG_RELEASING: Final = " Releasing CPU %d\n"
MSG_REMAP_WARNING: Final = "WARNING: Failed to re-assign memory region to root cell\n"
MSG_PCI_REASSIGN_WARNING: Final = "WARNING: Failed to re-assign PCI device to root cell\n"
MSG_MMIO_OVERFLOW: Final = "WARNING: Overflow during MMIO region registration!\n"
MSG_ADD_PCI: Final = 'Adding PCI device %02x:%02x.%x to cell "%s"\n'
MSG_REMOVE_PCI: Final = 'Removing PCI device %02x:%02x.%x from cell "%s"\n'
MSG_ADD_VPCI: Final = 'Adding virtual PCI device %02x:%02x.%x to cell "%s"\n'
MSG_UNKNOWN_HYPERCALL: Final = "CPU %d: Unknown hypercall %d, RIP: 0x%016x\n"
MSG_INIT_UNIT: Final = "Initializing unit: %s\n"

FATAL_PIO: Final = "FATAL: Invalid PIO %s, port: %x size: %d\n"
FATAL_MMIO: Final = "FATAL: Invalid MMIO/RAM %s, addr: 0x%016x size: %d\n"
FATAL_PCI_CONFIG_PORT: Final = "FATAL: Invalid PCI config %s, port: 0x%x, size: %d\n"
FATAL_PCI_CONFIG: Final = "FATAL: Invalid PCI config %s, device %02x:%02x.%x, reg: 0x%x, size: %d\n"
FATAL_PCI_MMCONFIG: Final = "FATAL: Invalid PCI MMCONFIG %s, device %02x:%02x.%x, reg: 0x%x, size: %d\n"
FATAL_MSIX: Final = "FATAL: Invalid PCI MSI-X table/PBA access, device %02x:%02x.%x\n"
FATAL_I8042: Final = "FATAL: Invalid write to i8042 controller port\n"
FATAL_SUBPAGE: Final = "FATAL: Invalid MMIO %s, address: %x, size: %x\n"
FATAL_IOAPIC: Final = "FATAL: Invalid IOAPIC %s, reg: %x, index: %x\n"
FATAL_IVSHMEM_MSIX: Final = "FATAL: ivshmem MSI-X target outside of cell\n"


def bdf_params(bdf: int) -> tuple[int, int, int]:
    """Bus, device and function of a 16-bit BDF (``PCI_BDF_PARAMS``)."""
    return bdf >> 8, (bdf >> 3) & 0x1F, bdf & 0x7


class Console:
    """The hypervisor console: ring, UART sink, line history.

    Writes go to the sink at once and are logged per complete line; the ring and the
    line history are brought up to date when read (writes only queue the text), which
    keeps ``printk`` cheap on the hot paths.  Thread-safe: cell CPUs of the executor
    print from their own threads while the root reads the ring.

    :param sink: receives every written chunk (the debug UART), or None
    :param history: how many complete lines :attr:`lines` keeps
    """

    def __init__(self, sink: Callable[[str], None] | None = None, history: int = 4096) -> None:
        self._sink = sink
        self._ring = bytearray()
        self._partial = ""
        self._pending: list[str] = []
        self._lines: collections.deque[str] = collections.deque(maxlen=history)
        self._log_partial = ""
        # one writer or reader at a time; the sink runs under it so UART order is text order
        self._lock = threading.RLock()
        #: total characters ever written
        self.written = 0

    def write(self, text: str) -> None:
        """Append ``text`` (``printk``): sink, logging, and (on read) ring and history."""
        if not text:
            return
        with self._lock:
            self.written += len(text)
            pending = self._pending
            pending.append(text)
            if len(pending) > 512:
                self._flush()
            if self._sink is not None:
                self._sink(text)
            if LOG.isEnabledFor(logging.INFO):
                joined = self._log_partial + text
                *complete, self._log_partial = joined.split("\n")
                for line in complete:
                    LOG.info("%s", line)

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        text = "".join(pending)
        pending.clear()
        ring = self._ring
        ring += text.encode("latin-1", "replace")
        if len(ring) > CONSOLE_RING_SIZE:
            del ring[: len(ring) - CONSOLE_RING_SIZE]
        parts = (self._partial + text).split("\n")
        self._partial = parts.pop()
        self._lines.extend(parts)

    def printk(self, fmt: str, *args: object) -> None:
        """``printk(fmt, args...)`` with C-like ``%`` formatting."""
        self.write(fmt % args if args else fmt)

    @property
    def lines(self) -> collections.deque[str]:
        """The most recent complete lines, oldest first, without newlines."""
        with self._lock:
            self._flush()
            return self._lines

    @property
    def content(self) -> str:
        """The ring as the root reads it: at most the last 2048 bytes."""
        with self._lock:
            self._flush()
            return bytes(self._ring).decode("latin-1")

    def text(self) -> str:
        """All complete lines in the history plus the unfinished one, joined."""
        with self._lock:
            lines = self.lines
            body = "\n".join(lines)
            if lines:
                body += "\n"
            return body + self._partial

    def clear(self) -> None:
        """Empty the ring and the history (a fresh enable)."""
        with self._lock:
            self._flush()
            self._ring.clear()
            self._partial = ""
            self._lines.clear()
            self.written = 0
