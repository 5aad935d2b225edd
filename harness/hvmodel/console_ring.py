"""The hypervisor console as the driver reads it; models the console part of
``driver/main.c`` (``jailhouse_console_read``, ``jailhouse_console_dump_delta``).

The hypervisor keeps its console in a 2048-byte ring and counts every byte ever written
(``jailhouse_virt_console``: ``content``, ``tail``); a reader of ``/dev/jailhouse``
keeps its own position and, when it fell behind the ring, gets a
``<missed N bytes of console log>`` notice first. :class:`ConsoleRing` is that ring in
the daemon (fed by the model's console, read by ``jailhouse console``);
:func:`dump_delta` is one ``read()`` from a position, also used on the console kept at
disable (``last_console``).
"""

from __future__ import annotations

import threading
from typing import Final

from .printk import CONSOLE_RING_SIZE

__all__ = ["MISSED_FORMAT", "ConsoleRing", "dump_delta"]

#: the driver's console message for bytes that fell out of the ring
MISSED_FORMAT: Final = "<missed %u bytes of console log>\n"


class ConsoleRing:
    """The hypervisor console as the driver sees it: a 2048-byte ring and the count of
    bytes ever written (``jailhouse_virt_console``: ``content`` and ``tail``).

    Thread-safe; readers wait on :meth:`wait_beyond`.
    """

    def __init__(self, size: int = CONSOLE_RING_SIZE) -> None:
        self.size = size
        self._ring = bytearray()
        #: bytes written since the ring was created
        self.tail = 0
        self._cond = threading.Condition()

    def append(self, data: bytes) -> None:
        """Add console output (called from the model's threads)."""
        if not data:
            return
        with self._cond:
            self._ring += data
            if len(self._ring) > self.size:
                del self._ring[: len(self._ring) - self.size]
            self.tail += len(data)
            self._cond.notify_all()

    def snapshot(self) -> tuple[int, bytes]:
        """``(tail, content)``."""
        with self._cond:
            return self.tail, bytes(self._ring)

    def since(self, mark: int) -> bytes:
        """What was written after ``tail`` was ``mark`` (as far as the ring still holds)."""
        with self._cond:
            count = min(self.tail - mark, len(self._ring))
            return bytes(self._ring[len(self._ring) - count :]) if count > 0 else b""

    def read(self, head: int, size: int) -> tuple[bytes, int]:
        """One ``read()`` of the console device from position ``head``.

        :return: ``(data, new head)``; data is empty when nothing new was written
        """
        with self._cond:
            return dump_delta(self.tail, bytes(self._ring), head, size, self.size)

    def wait_beyond(self, head: int, timeout: float) -> bool:
        """Wait until something was written beyond ``head``.

        :return: whether there is
        """
        with self._cond:
            return self._cond.wait_for(lambda: self.tail != head, timeout)

    def wake(self) -> None:
        """Wake every waiting reader (shutdown)."""
        with self._cond:
            self._cond.notify_all()


def dump_delta(tail: int, content: bytes, head: int, size: int,
               ring_size: int = CONSOLE_RING_SIZE) -> tuple[bytes, int]:
    """``jailhouse_console_dump_delta`` + the miss handling of ``jailhouse_console_read``.

    :param tail: bytes written so far
    :param content: the ring's content (its last ``ring_size`` bytes)
    :param head: the reader's position
    :param size: the reader's buffer size
    :return: ``(data, new head)``: the missed-bytes notice if the reader fell behind the
        ring (its head then skips the lost bytes), else up to ``size`` new bytes
    """
    delta = (tail - head) & 0xFFFFFFFF
    if delta == 0:
        return b"", head
    if delta > ring_size:
        missed = delta - ring_size
        notice = (MISSED_FORMAT % missed).encode("ascii")
        return notice[:size], (head + missed) & 0xFFFFFFFF
    chunk = content[len(content) - delta :][:size]
    return chunk, (head + len(chunk)) & 0xFFFFFFFF

