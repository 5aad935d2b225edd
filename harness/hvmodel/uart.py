"""The hypervisor's debug console; models ``hypervisor/uart.c`` and ``uart-8250.c``.

Jailhouse prints its console (``printk``) to the debug UART the system config names
(``debug_console``: an 8250 at port 0x3f8 for qemu-x86). In jhlab the driver daemon
does that for the model: :class:`DebugConsole` takes the console text from the model's
threads and feeds it, in order and from a thread of its own, to a
:class:`ConsoleTarget`: :class:`Uart8250` (the 8250 protocol on a
:class:`PortBackend`, normally :class:`DevPortBackend`, ``/dev/port``) or
:class:`FileTarget` (the byte stream appended to a file, for hosts without the lab's
UART). :func:`open_target` picks the target for a daemon option and a system config.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Final, Protocol

from .config import ConsoleFlags, ConsoleType, parse_system
from .errors import JhlabError

__all__ = [
    "ConsoleTarget",
    "DebugConsole",
    "DevPortBackend",
    "FileTarget",
    "PortBackend",
    "Uart8250",
    "open_target",
]

LOG = logging.getLogger(__name__)

#: 8250 registers and bits (``hypervisor/uart-8250.c``)
UART_TX: Final = 0x0
UART_DLL: Final = 0x0
UART_DLM: Final = 0x1
UART_LCR: Final = 0x3
UART_LCR_8N1: Final = 0x03
UART_LCR_DLAB: Final = 0x80
UART_LSR: Final = 0x5
UART_LSR_THRE: Final = 0x20
#: how long one character may wait for THRE before it is written anyway
THRE_TIMEOUT: Final = 0.1


class PortBackend(Protocol):
    """Byte-wide I/O port access (``inb``/``outb``)."""

    def inb(self, port: int) -> int:
        """Read one byte port."""
        ...

    def outb(self, port: int, value: int) -> None:
        """Write one byte port."""

    def close(self) -> None:
        """Release the backend; idempotent."""


class DevPortBackend:
    """Ports through ``/dev/port`` (the file offset is the port number).

    :param path: the port device
    :raise OSError: when it cannot be opened read-write
    """

    def __init__(self, path: str = "/dev/port") -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def inb(self, port: int) -> int:
        """Read one byte port."""
        data = os.pread(self._fd, 1, port)
        return data[0] if data else 0xFF

    def outb(self, port: int, value: int) -> None:
        """Write one byte port."""
        os.pwrite(self._fd, bytes((value & 0xFF,)), port)

    def close(self) -> None:
        """Close the device; idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Uart8250:
    """Jailhouse's 8250 debug console driver (``uart_init`` and ``uart_write`` of
    ``hypervisor/uart.c`` / ``uart-8250.c``), PIO variant.

    Each character waits until the line status register shows an empty transmit holding
    register (THRE), then goes to THR; ``\\n`` is sent as ``\\r\\n``. Jailhouse spins
    forever for THRE; here a character waits at most :data:`THRE_TIMEOUT` and is then
    written anyway, so a dead UART cannot hang the daemon.

    :param ports: the port backend
    :param base: the UART's base port (``debug_console.address``)
    :param divider: ``debug_console.divider``; non-zero programs the baud divisor first
        (as ``uart_init`` does), 0 leaves the UART as Linux set it up
    """

    def __init__(self, ports: PortBackend, base: int, divider: int = 0) -> None:
        self.ports = ports
        self.base = base
        #: characters written without THRE (the UART never became ready)
        self.thre_timeouts = 0
        if divider:
            ports.outb(base + UART_LCR, UART_LCR_DLAB)
            ports.outb(base + UART_DLL, divider & 0xFF)
            ports.outb(base + UART_DLM, 0)
            ports.outb(base + UART_LCR, UART_LCR_8N1)

    def _write_char(self, char: int) -> None:
        ports = self.ports
        lsr = self.base + UART_LSR
        if not ports.inb(lsr) & UART_LSR_THRE:
            deadline = time.monotonic() + THRE_TIMEOUT
            while not ports.inb(lsr) & UART_LSR_THRE:
                if time.monotonic() > deadline:
                    self.thre_timeouts += 1
                    break
        ports.outb(self.base + UART_TX, char)

    def write(self, data: bytes) -> None:
        """Transmit ``data`` (``uart_write``)."""
        for char in data:
            if char == 0x0A:
                self._write_char(0x0D)
            self._write_char(char)

    def close(self) -> None:
        """Release the port backend."""
        self.ports.close()


class FileTarget:
    """A debug console that appends the UART's byte stream (``\\r\\n`` line ends) to a file.

    :param path: the file
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by close()

    def write(self, data: bytes) -> None:
        """Append ``data`` as the UART would transmit it."""
        self._file.write(data.replace(b"\n", b"\r\n"))

    def close(self) -> None:
        """Close the file."""
        self._file.close()


class ConsoleTarget(Protocol):
    """Where the debug console's bytes go (:class:`Uart8250`, :class:`FileTarget`)."""

    def write(self, data: bytes) -> None:
        """Transmit ``data``."""

    def close(self) -> None:
        """Release the target."""


class DebugConsole:
    """Feeds hypervisor console text to a target (UART or file) from its own thread, so
    the model never waits for the UART while it works.

    Lifecycle: built without a target; :meth:`set_target` before enable; text written
    with :meth:`write` (any thread, order kept); :meth:`flush` waits until it is out (the
    daemon does before it answers an operation, as Jailhouse's ``printk`` has written to
    the UART when the hypercall returns); :meth:`close` flushes (bounded) and ends the
    thread. Text written while there is no target is dropped. :attr:`description` says
    what the target is, for logs and the daemon's ``state`` reply.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: list[bytes] = []
        self._busy = False
        self._closing = False
        self._target: ConsoleTarget | None = None
        self._target_lock = threading.Lock()
        self.description = "none"
        self._thread = threading.Thread(target=self._run, name="debug-console", daemon=True)
        self._thread.start()

    def set_target(self, target: ConsoleTarget | None, description: str) -> None:
        """Send from now on to ``target`` (None: drop); the old one is closed."""
        with self._target_lock:
            old, self._target = self._target, target
            self.description = description
        if old is not None and old is not target:
            old.close()
        LOG.info("debug console: %s", description)

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the target."""
        with self._cond:
            self._pending.append(data)
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until everything written so far reached the target.

        :return: False when it had not after ``timeout`` seconds
        """
        with self._cond:
            return self._cond.wait_for(lambda: not (self._pending or self._busy), timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    return  # closing, and everything is out
                data = b"".join(self._pending)
                self._pending.clear()
                self._busy = True
            try:
                self._send(data)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _send(self, data: bytes) -> None:
        with self._target_lock:
            target = self._target
            if target is None:
                return
            try:
                target.write(data)
            except OSError as exc:
                LOG.error("debug console %s failed: %s; output to it stops", self.description, exc)
                self._target = None
                self.description = "none"

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued (at most ``timeout`` seconds), end the thread, close
        the target."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            LOG.warning("debug console: output still queued after %.1f s; dropped", timeout)
        self.set_target(None, "none")


def open_target(mode: str, system_data: bytes, port_device: str) -> tuple[ConsoleTarget | None, str]:
    """The debug console target for the daemon option ``mode`` and a system config.

    :param mode: ``auto`` (the config's 8250 through ``port_device`` if it can be
        opened), ``none``, ``uart`` (the config's 8250, an error in the log if
        impossible), ``uart:PORT`` (an 8250 at PORT) or ``file:PATH``
    :param system_data: the system config given to enable (its ``debug_console``)
    :param port_device: the port device for an 8250
    :return: the target (None: output is dropped) and its description
    """
    if mode == "none":
        return None, "none"
    if mode.startswith("file:"):
        path = mode[len("file:"):]
        try:
            return FileTarget(path), f"file {path}"
        except OSError as exc:
            LOG.error("debug console file %s: %s", path, exc)
            return None, "none"
    base: int | None = None
    divider = 0
    if mode.startswith("uart:"):
        base = int(mode[len("uart:"):], 0)
    else:
        try:
            system = parse_system(system_data, source="JAILHOUSE_ENABLE")
        except (JhlabError, ValueError) as exc:
            LOG.info("debug console: config unreadable (%s)", exc)
            return None, "none"
        dbg = system.debug_console
        if dbg.type == ConsoleType.UART_8250 and not dbg.flags & ConsoleFlags.ACCESS_MMIO \
                and dbg.address:
            base, divider = dbg.address, dbg.divider
        else:
            level = logging.ERROR if mode == "uart" else logging.INFO
            LOG.log(level, "debug console: type %#x flags %#x is not an 8250 on PIO; none",
                    dbg.type, dbg.flags)
    if base is None:
        return None, "none"
    try:
        ports = DevPortBackend(port_device)
    except OSError as exc:
        level = logging.INFO if mode == "auto" else logging.ERROR
        LOG.log(level, "debug console: %s: %s; none", port_device, exc.strerror)
        return None, "none"
    return Uart8250(ports, base, divider), f"8250 at {base:#x} via {port_device}"
