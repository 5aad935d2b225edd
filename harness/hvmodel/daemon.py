"""The driver process; stands where ``driver/main.c`` and ``driver/sysfs.c`` (the Linux
module ``jailhouse.ko``) are, plus the hypervisor's debug UART (``hypervisor/uart-8250.c``).

In jhlab the hypervisor is a Python model, so its "driver" is a long-running process that
owns the :class:`~harness.hvmodel.driver.Driver`, the
:class:`~harness.hvmodel.control.Hypervisor` it creates and the
:class:`~harness.hvmodel.arch.Arch` underneath (the KVM executor, or the bookkeeping
oracle). ``jailhouse enable`` starts it; a successful ``jailhouse disable`` ends it.

What it does, all of it in the run directory (:class:`~harness.hvmodel.ipc.RunDir`):

* serves the ioctls and the console read on ``driver.sock`` (mode 0600), JSON lines
  (:mod:`harness.hvmodel.ipc`), one thread per connection; management operations are
  serialised by one lock (the driver's ``jailhouse_lock``), console readers never take
  it, so ``jailhouse console -f`` does not hold up other commands;
* writes Jailhouse's sysfs tree (:func:`~harness.hvmodel.sysfs.sysfs_tree`) as real files
  under ``sys/devices/jailhouse``: after every operation, on request (``sysfs``) and, while
  a non-root cell runs, every ``--refresh`` seconds (states, failed CPUs and statistics
  change on their own then). Each refresh reads every file, so it costs the root CPU the
  hypercalls a reader of the real tree would cause;
* keeps the hypervisor console: a 2048-byte ring read as the driver's ``read()`` does
  (``<missed N bytes of console log>``), followed by ``console -f`` readers, saved to
  ``last_console`` at exit (the driver's ``last_console``);
* writes every console character to the system config's debug console, an 8250 UART at
  ``debug_console.address`` (0x3f8 for qemu-x86), through ``/dev/port`` with the 8250
  protocol (wait for THRE in LSR, then THR; ``\\n`` becomes ``\\r\\n``), where Jailhouse's
  own hypervisor prints (``--debug-console``);
* logs to ``daemon.log``; the lines the Linux driver would print (``pr_err``/``pr_info``)
  go to that log, to each reply's ``kernel_log`` and, with ``--kmsg``, to ``/dev/kmsg``;
* on ``disable`` and on SIGTERM/SIGINT shuts down cleanly: cells destroyed through the
  model (a refusing cell is asked again), the machine released, the sysfs tree put back
  to the disabled one, the socket removed; then the process ends.

Differences from the real driver, by construction: the daemon exists only while the
hypervisor is enabled (a failed enable ends it too), so "module loaded but disabled" is
played by the ``jailhouse`` command from the files left in the run directory; the binary
``core`` file is not written; console readers following with ``-f`` get end-of-file when
the daemon ends instead of blocking until the next enable.

The Arch's :meth:`~harness.hvmodel.arch.Arch.console_write` is not called: the daemon
puts a tap in front of the Arch and owns the debug console itself.

Usage: ``python3 -m harness.hvmodel.daemon [--run-dir DIR] [--arch auto|executor|oracle]
...`` (``--help``); normally started by ``jailhouse enable``. Exit status: 0 after a clean
shutdown, 1 on failure, 2 for usage errors, 75 when another daemon holds the run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import importlib
import importlib.util
import json
import logging
import os
import queue
import re
import select
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from . import faults
from .abi import CELL_ID_UNUSED, CellState
from .arch.oracle import RESPONDER_POLICIES
from .cpus import parse_cpu_list
from .driver import CellRef, Driver, HostInfo, Image
from .errors import Errno, HvError, JhlabError
from .ipc import (
    MAX_LINE,
    PROTOCOL_VERSION,
    CellId,
    RunDir,
    b64decode,
    decode,
    encode,
    reply,
)
from .printk import CONSOLE_RING_SIZE
from .sysfs import sysfs_tree

if TYPE_CHECKING:
    from .arch import Arch

__all__ = [
    "EXIT_BUSY",
    "ConsoleRing",
    "Daemon",
    "DaemonBusy",
    "DaemonError",
    "DaemonOptions",
    "DebugConsole",
    "SysfsWriter",
    "Uart8250",
    "main",
    "make_arch",
    "probe_host",
]

LOG = logging.getLogger("harness.hvmodel.daemon")

#: exit status when another daemon holds the run directory (``EX_TEMPFAIL``)
EXIT_BUSY: Final = 75
#: what the daemon prints on stdout once it accepts connections
READY_LINE: Final = "ready"
SYS_VIRTUAL_DEBUG_CONSOLE: Final = 0x0001
CON_TYPE_8250: Final = 0x0002
CON_ACCESS_MMIO: Final = 0x0001
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
#: how long shutdown waits for the management lock, the UART queue, readers
SHUTDOWN_TIMEOUT: Final = 30.0
#: a daemon that was not enabled this long after its start ends (its starter died)
ENABLE_TIMEOUT: Final = 120.0
#: the driver's console message for bytes that fell out of the ring
MISSED_FORMAT: Final = "<missed %u bytes of console log>\n"

#: driver error texts (HvError messages of :class:`~harness.hvmodel.driver.Driver`) and
#: the kernel log lines the Linux driver prints for them
_PR_ERR: Final[dict[str, tuple[str, ...]]] = {
    "Missing or unsupported HVM technology": ("jailhouse: Missing or unsupported HVM technology",),
    "Not a system configuration": ("jailhouse: Not a system configuration",),
    "Configuration revision mismatch": ("jailhouse: Configuration revision mismatch",),
    "Configuration architecture mismatch": ("jailhouse: Configuration architecture mismatch",),
    "VT-x disabled by Firmware/BIOS": ("jailhouse: VT-x disabled by Firmware/BIOS",),
    'Did you reserve the memory with "memmap=" or "mem="?': (
        "jailhouse: request_mem_region failed for hypervisor memory.",
        'jailhouse: Did you reserve the memory with "memmap=" or "mem="?',
    ),
    "Not a cell configuration": ("jailhouse: Not a cell configuration",),
    "Cannot assign CPU 0 to other cells": ("Cannot assign CPU 0 to other cells",),
}


class DaemonError(JhlabError):
    """The daemon cannot start or run as asked (bad option, missing device)."""


class DaemonBusy(DaemonError):
    """Another daemon holds the run directory."""


# =======================================================================================
# the debug console: an 8250 behind /dev/port
# =======================================================================================


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


class _Target(Protocol):
    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class DebugConsole:
    """Feeds hypervisor console text to a target (UART or file) from its own thread, so
    the model never waits for the UART.

    Lifecycle: built without a target; :meth:`set_target` before enable; text written
    with :meth:`write` (any thread, order kept); :meth:`close` flushes (bounded) and ends
    the thread. Text written while there is no target is dropped.

    :param description: what the target is, for logs and the ``state`` reply
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._target: _Target | None = None
        self._target_lock = threading.Lock()
        self.description = "none"
        self._thread = threading.Thread(target=self._run, name="debug-console", daemon=True)
        self._thread.start()

    def set_target(self, target: _Target | None, description: str) -> None:
        """Send from now on to ``target`` (None: drop); the old one is closed."""
        with self._target_lock:
            old, self._target = self._target, target
            self.description = description
        if old is not None and old is not target:
            old.close()
        LOG.info("debug console: %s", description)

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the target."""
        self._queue.put(data)

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            with self._target_lock:
                target = self._target
                if target is None:
                    continue
                try:
                    target.write(data)
                except OSError as exc:
                    LOG.error("debug console %s failed: %s; output to it stops",
                              self.description, exc)
                    self._target = None
                    self.description = "none"

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued (at most ``timeout`` seconds), end the thread, close
        the target."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            LOG.warning("debug console: output still queued after %.1f s; dropped", timeout)
        self.set_target(None, "none")


# =======================================================================================
# the console ring, as the driver reads it
# =======================================================================================


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


# =======================================================================================
# the sysfs tree as files
# =======================================================================================


class SysfsWriter:
    """Keeps a directory equal to a :func:`~harness.hvmodel.sysfs.sysfs_tree` rendering.

    Files are written atomically (temporary file, then rename), read-only (0444), and
    only when their content changed; files no longer in the tree are removed, then
    directories left empty (``cells/<id>`` after a destroy).

    :param root: the ``sys/devices/jailhouse`` directory
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._written: dict[str, bytes] = {}

    def clear(self) -> None:
        """Remove the whole tree (stale files of an earlier daemon included)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self._written = {}

    def write(self, tree: dict[str, str]) -> None:
        """Make the directory show ``tree``."""
        wanted = {path: _encode_file(path, text) for path, text in tree.items()}
        for path, data in wanted.items():
            if self._written.get(path) == data:
                continue
            target = self.root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = target.with_name(f".{target.name}.tmp")
            with open(temp, "wb") as out:
                out.write(data)
            os.chmod(temp, 0o444)
            os.replace(temp, target)
            self._written[path] = data
        stale = sorted(set(self._written) - set(wanted), reverse=True)
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                (self.root / path).unlink()
            del self._written[path]
            parent = (self.root / path).parent
            while parent != self.root and self.root in parent.parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent


def _encode_file(path: str, text: str) -> bytes:
    # The console ring holds bytes (the model keeps them as Latin-1 code points).
    if path == "console":
        return text.encode("latin-1", "replace")
    return text.encode("utf-8", "surrogateescape")


# =======================================================================================
# machine and Arch
# =======================================================================================


_SIZE_SUFFIX: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memmap(cmdline: str) -> tuple[tuple[int, int], ...]:
    """The ranges ``memmap=SIZE$START`` reserves on a kernel command line."""
    ranges = []
    for match in re.finditer(r"(?:^|\s)memmap=(\S+)", cmdline):
        for item in match.group(1).split(","):
            found = re.fullmatch(r"(0x[0-9a-fA-F]+|\d+)([kKmMgGtT]?)\$(0x[0-9a-fA-F]+|\d+)([kKmMgGtT]?)",
                                 item)
            if found is None:
                continue
            size = int(found.group(1), 0) * _SIZE_SUFFIX[found.group(2).lower()]
            start = int(found.group(3), 0) * _SIZE_SUFFIX[found.group(4).lower()]
            ranges.append((start, size))
    return tuple(ranges)


def _read_text(path: str, default: str = "") -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read()
    except OSError:
        return default


def probe_host() -> HostInfo:
    """The Linux this process runs on, as the driver sees it: online and possible CPUs,
    SVM or VMX (AMD preferred, as the driver picks its firmware), VMX enabled in
    ``IA32_FEATURE_CONTROL`` (when the ``msr`` device can tell), ``memmap=`` reservations,
    the TSC frequency from ``/proc/cpuinfo``. The APIC timer frequency is not exposed
    by Linux; the :class:`~harness.hvmodel.driver.HostInfo` default is kept.
    """
    defaults = HostInfo()
    online = parse_cpu_list(_read_text("/sys/devices/system/cpu/online")) or set(defaults.online_cpus)
    possible = parse_cpu_list(_read_text("/sys/devices/system/cpu/possible"))
    cpuinfo = _read_text("/proc/cpuinfo")
    flags: set[str] = set()
    mhz = 0.0
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "cpu MHz" and not mhz:
            with contextlib.suppress(ValueError):
                mhz = float(value)
    vendor = "amd" if "svm" in flags else "intel" if "vmx" in flags else ""
    vmx_allowed = True
    if vendor == "intel":
        try:
            fd = os.open("/dev/cpu/0/msr", os.O_RDONLY)
            try:
                feature = int.from_bytes(os.pread(fd, 8, 0x3A), "little")
                vmx_allowed = bool(feature & (1 << 2))
            finally:
                os.close(fd)
        except OSError:
            pass
    reserved = parse_memmap(_read_text("/proc/cmdline")) or None
    return HostInfo(
        online_cpus=frozenset(online),
        possible_cpus=max(possible) + 1 if possible else max(online) + 1,
        cpu_vendor=vendor,
        vmx_allowed=vmx_allowed,
        reserved=reserved,
        tsc_khz=round(mhz * 1000) if mhz else defaults.tsc_khz,
        apic_khz=defaults.apic_khz,
    )


def host_to_wire(host: HostInfo) -> dict[str, Any]:
    """A :class:`~harness.hvmodel.driver.HostInfo` as JSON (for the ``state`` reply)."""
    return {
        "online_cpus": sorted(host.online_cpus),
        "possible_cpus": host.possible_cpus,
        "cpu_vendor": host.cpu_vendor,
        "vmx_allowed": host.vmx_allowed,
        "firmware": host.firmware,
        "reserved": None if host.reserved is None else [list(r) for r in host.reserved],
        "tsc_khz": host.tsc_khz,
        "apic_khz": host.apic_khz,
        "pci_devices": None if host.pci_devices is None else sorted(map(list, host.pci_devices)),
    }


def host_from_wire(value: dict[str, Any]) -> HostInfo:
    """The inverse of :func:`host_to_wire` (the host side rebuilds the guest's driver)."""
    reserved = value.get("reserved")
    pci = value.get("pci_devices")
    return HostInfo(
        online_cpus=frozenset(value["online_cpus"]),
        possible_cpus=value["possible_cpus"],
        cpu_vendor=value["cpu_vendor"],
        vmx_allowed=value["vmx_allowed"],
        firmware=value["firmware"],
        reserved=None if reserved is None else tuple((int(a), int(b)) for a, b in reserved),
        tsc_khz=value["tsc_khz"],
        apic_khz=value["apic_khz"],
        pci_devices=None if pci is None else frozenset((int(d), int(b)) for d, b in pci),
    )


EXECUTOR_MODULE: Final = __package__ + ".arch.executor"


def executor_available() -> tuple[bool, str]:
    """Whether the KVM executor can be used here, and why not."""
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    try:
        found = importlib.util.find_spec(EXECUTOR_MODULE) is not None
    except ImportError as exc:
        return False, f"cannot import {EXECUTOR_MODULE}: {exc}"
    if not found:
        return False, f"{EXECUTOR_MODULE} is not installed"
    return True, "executor available"


def make_arch(
    choice: str, responders: dict[str, str] | None = None, *, rebind_pci: bool = False,
    native_pio: bool = True, exit_trace: bool = True,
) -> tuple[Arch, str]:
    """Build the Arch the daemon runs on.

    :param choice: ``executor`` (KVM; fails if unavailable), ``oracle`` (bookkeeping
        only), ``auto`` (the executor when ``/dev/kvm`` exists and
        ``harness.hvmodel.arch.executor`` imports, else the oracle)
    :param responders: oracle only: cell name -> policy (``approve``,
        ``deny-first-shutdown``, ``deny``, ``silent``), how scripted cells answer
    :param rebind_pci: executor only: a passed-through device a cell releases goes back
        to the root driver it had (Jailhouse leaves it unbound)
    :param native_pio: executor only: whitelisted port I/O in its I/O bitmap loop
    :param exit_trace: executor only: count the exits KVM handles in the kernel
    :return: the Arch and its name
    :raise DaemonError: when the executor was asked for and cannot be had
    """
    if choice not in ("auto", "executor", "oracle"):
        raise DaemonError(f"unknown arch {choice!r}")
    if choice != "oracle":
        available, why = executor_available()
        if available:
            module = importlib.import_module(EXECUTOR_MODULE)
            # The daemon owns the debug console (see _ArchTap): the executor's is off.
            arch = cast("Arch", module.ExecutorArch(console=False, rebind_released=rebind_pci,
                                                     native_pio=native_pio, exit_trace=exit_trace))
            if responders:
                LOG.warning("--responder is for the oracle; the executor's cells answer themselves")
            return arch, "executor"
        if choice == "executor":
            raise DaemonError(f"the executor is not available: {why}")
        LOG.info("arch auto: %s; using the oracle", why)
    from .arch.oracle import OracleArch, responder_for

    # Not recording: a daemon runs long and nobody reads the event list.
    oracle = OracleArch(record=False)
    for name, policy in (responders or {}).items():
        oracle.responders[name] = responder_for(policy)
    return oracle, "oracle"


class _ArchTap:
    """The daemon's Arch: every hook goes to the real Arch, except
    :meth:`~harness.hvmodel.arch.Arch.console_write`, which feeds the daemon's console.

    Bound methods of the wrapped Arch are cached on first use, so a hook call costs
    what it costs on the Arch itself.
    """

    def __init__(self, inner: Arch, sink: Callable[[str], None]) -> None:
        self._inner = inner
        self._sink = sink

    def console_write(self, text: str) -> None:
        self._sink(text)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if callable(value):
            object.__setattr__(self, name, value)
        return value


# =======================================================================================
# the daemon
# =======================================================================================


@dataclasses.dataclass(frozen=True, kw_only=True)
class DaemonOptions:
    """How the daemon runs (its command line).

    :param run_dir: the run directory
    :param arch: ``auto``, ``executor`` or ``oracle``
    :param host: ``probe`` (this machine) or ``model`` (the driver's default machine:
        4 CPUs, Intel); None: ``probe`` with the executor, ``model`` with the oracle
    :param debug_console: ``auto`` (the config's 8250 through the port device if it can
        be opened), ``none``, ``uart`` (the config's 8250, an error if impossible),
        ``uart:PORT`` (an 8250 at PORT) or ``file:PATH`` (append the byte stream to PATH)
    :param port_device: the port device for the UART
    :param responders: oracle only: cell name -> answer policy
    :param refresh: seconds between sysfs refreshes while a cell runs (0: never);
        None: 1 s with the executor, never with the oracle (nothing changes on its own)
    :param kmsg: copy the driver's kernel log lines to ``/dev/kmsg``; None: with the
        executor only
    :param foreground: keep stdio and log to stderr too (no ready line)
    :param verbose: log at DEBUG
    :param test_device: the hypervisor is built with ``CONFIG_TEST_DEVICE`` (the test
        device for cells with the ``TEST_DEVICE`` flag, :mod:`~harness.hvmodel.testdev`)
    :param rebind_pci: give released passed-through devices back to their root driver
    :param native_pio: the executor performs whitelisted port I/O in machine code (its
        I/O bitmap loop); off: every port exit goes through Python
    :param exit_trace: the executor counts the exits KVM handles in the kernel (CPUID,
        MSRs ...) through KVM's tracepoints; off: ``cell stats`` shows the model's only
    """

    run_dir: RunDir
    arch: str = "auto"
    host: str | None = None
    debug_console: str = "auto"
    port_device: str = "/dev/port"
    responders: dict[str, str] = dataclasses.field(default_factory=dict)
    refresh: float | None = None
    kmsg: bool | None = None
    foreground: bool = False
    verbose: bool = False
    test_device: bool = False
    rebind_pci: bool = False
    native_pio: bool = True
    exit_trace: bool = True


class Daemon:
    """The driver process.

    Lifecycle: :meth:`start` (run directory locked, log, Arch, driver, sysfs, socket),
    :meth:`serve` (until a successful disable or a signal), :meth:`shutdown` (cells
    destroyed, machine released, files reset) -- :meth:`run` does all three.

    :param options: the command line
    """

    def __init__(self, options: DaemonOptions) -> None:
        self.options = options
        self.run_dir = options.run_dir
        self.arch_name = ""
        self.arch: Arch | None = None
        self.driver: Driver | None = None
        self.host: HostInfo | None = None
        self.ring = ConsoleRing()
        self.debug_console: DebugConsole | None = None
        self.sysfs = SysfsWriter(self.run_dir.sysfs)
        self.console_available = False
        self.refresh_interval = 0.0
        self.kmsg = False
        #: the management lock (``jailhouse_lock``)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        #: set once the machine is released and the console final (readers may end)
        self._closing = threading.Event()
        self._stop_reason = ""
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._handlers: set[threading.Thread] = set()
        self._handlers_lock = threading.Lock()
        #: connections closed only by the process exit (the one that disabled)
        self._held: list[socket.socket] = []
        self._dir_fd = -1
        self._was_running = False
        self._log_handler: logging.Handler | None = None

    # -- start --------------------------------------------------------------------------

    def start(self) -> None:
        """Take the run directory, build the machine and open the socket.

        :raise DaemonError: when another daemon runs here or the Arch cannot be had
        :raise OSError: when the run directory or socket cannot be set up
        """
        options = self.options
        path = self.run_dir.path
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._dir_fd)
            self._dir_fd = -1
            raise DaemonBusy(f"another daemon runs in {path}") from exc
        self._setup_logging()
        LOG.info("daemon %d starting in %s (protocol %d)", os.getpid(), path, PROTOCOL_VERSION)
        faults.load_env()  # test-only fault injection ($JHLAB_FAULT, harness/hvmodel/faults.py)
        arch, self.arch_name = make_arch(options.arch, options.responders, rebind_pci=options.rebind_pci,
                                         native_pio=options.native_pio, exit_trace=options.exit_trace)
        self.arch = arch
        host_mode = options.host or ("probe" if self.arch_name == "executor" else "model")
        if host_mode not in ("probe", "model"):
            raise DaemonError(f"unknown host mode {host_mode!r}")
        self.host = self._probe_host() if host_mode == "probe" else HostInfo()
        tap = cast("Arch", _ArchTap(arch, self._console_write))
        driver = self.driver = Driver(tap, self.host, test_device=options.test_device)
        attach = getattr(arch, "attach", None)
        if callable(attach):
            # The executor's vCPU threads send their exits to the current hypervisor.
            attach(lambda: driver.hv)
        refresh = options.refresh
        self.refresh_interval = (1.0 if self.arch_name == "executor" else 0.0) if refresh is None else refresh
        kmsg = options.kmsg
        self.kmsg = (self.arch_name == "executor") if kmsg is None else kmsg
        LOG.info("arch %s, host %s %s, refresh %s s, kmsg %s", self.arch_name, host_mode,
                 host_to_wire(self.host), self.refresh_interval, self.kmsg)
        self.debug_console = DebugConsole()
        self.sysfs.clear()
        self.sysfs.write(sysfs_tree(self.driver))
        self._listen()

    def _probe_host(self) -> HostInfo:
        """This machine for the driver: the executor's ``host_info`` (timer frequencies as
        KVM gives them to cells) when it runs the cells, else :func:`probe_host`."""
        if self.arch_name == "executor":
            try:
                module = importlib.import_module(EXECUTOR_MODULE)
                return cast(HostInfo, module.host_info())
            except Exception:
                LOG.exception("the executor's host_info failed; probing /proc and /sys")
        return probe_host()

    def _setup_logging(self) -> None:
        root = logging.getLogger()
        handler = logging.FileHandler(self.run_dir.log, encoding="utf-8")
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(process)d %(threadName)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        if self.options.foreground:
            root.addHandler(logging.StreamHandler(sys.stderr))
        root.setLevel(logging.DEBUG if self.options.verbose else logging.INFO)
        self._log_handler = handler

    def _listen(self) -> None:
        sock_path = self.run_dir.socket
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()  # stale: we hold the lock, so nobody serves it
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(os.fspath(sock_path))
        finally:
            os.umask(old_umask)
        os.chmod(sock_path, 0o600)
        listener.listen(16)
        listener.settimeout(0.5)
        self._listener = listener

    # -- serve ----------------------------------------------------------------------------

    def serve(self) -> str:
        """Accept connections until stopped; refresh sysfs meanwhile.

        :return: why it stopped (``disable``, ``enable failed``, ``signal SIGTERM``)
        """
        self._accept_thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self._accept_thread.start()
        started = time.monotonic()
        driver = self.driver
        assert driver is not None  # set by start()
        while not self._stop.is_set():
            interval = self.refresh_interval
            self._stop.wait(interval if interval > 0 else 1.0)
            if interval > 0 and not self._stop.is_set():
                self._periodic_refresh()
            if not driver.enabled and time.monotonic() - started > ENABLE_TIMEOUT \
                    and not self._lock.locked():
                self.stop("never enabled")
        return self._stop_reason

    def stop(self, reason: str) -> None:
        """Ask :meth:`serve` to return (thread- and signal-safe)."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None  # set by start()
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            conn.settimeout(None)
            thread = threading.Thread(target=self._serve_connection, args=(conn,),
                                      name="conn", daemon=True)
            with self._handlers_lock:
                self._handlers = {t for t in self._handlers if t.is_alive()}
                self._handlers.add(thread)
            thread.start()

    def _serve_connection(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        hold = False
        try:
            while True:
                line = reader.readline(MAX_LINE)
                if not line:
                    return
                try:
                    request = decode(line)
                    op = request.get("op")
                except ValueError as exc:
                    conn.sendall(encode(reply(-errno.EINVAL, detail=f"malformed request: {exc}")))
                    continue
                if op == "console" and request.get("follow"):
                    self._follow_console(conn, request)
                    return
                answer = self._dispatch(op, request)
                driver = self.driver
                ending = (op == "disable" and answer["result"] == 0) or (
                    op == "enable" and driver is not None and not driver.enabled)
                if ending:
                    # No hypervisor, no driver: the daemon ends after a successful disable
                    # and after a failed enable. The asking connection stays open until
                    # the process exits, so the command can wait for the end.
                    answer["ending"] = True
                    answer["pid"] = os.getpid()
                    hold = True
                    self._held.append(conn)
                conn.sendall(encode(answer))
                if ending:
                    self.stop("disable" if op == "disable" else "enable failed")
                    return
        except OSError as exc:
            LOG.debug("connection ended: %s", exc)
        finally:
            reader.close()
            if not hold:
                conn.close()

    def _dispatch(self, op: object, request: dict[str, Any]) -> dict[str, Any]:
        handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "enable": self._op_enable,
            "disable": self._op_disable,
            "cell_create": self._op_cell_create,
            "cell_load": self._op_cell_load,
            "cell_start": self._op_cell_start,
            "cell_destroy": self._op_cell_destroy,
            "console": self._op_console,
            "sysfs": self._op_sysfs,
            "state": self._op_state,
        }
        handler = handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            # Any other ioctl: -EINVAL (jailhouse_ioctl's default).
            return reply(-errno.EINVAL, detail=f"unknown op {op!r}")
        try:
            return handler(request)
        except (KeyError, TypeError, ValueError) as exc:
            return reply(-errno.EINVAL, detail=f"malformed {op} request: {exc!r}")

    # -- operations ---------------------------------------------------------------------------

    def _call(self, name: str, operation: Callable[[Driver], object],
              extra_lines: Callable[[HvError], list[str]] | None = None) -> dict[str, Any]:
        """Run one driver command under the management lock, refresh sysfs, build the reply."""
        driver = self.driver
        assert driver is not None  # set by start()
        with self._lock:
            log_mark = len(driver.kernel_log)
            console_mark = self.ring.tail
            detail = ""
            errors: list[str] = []
            started = time.monotonic()
            try:
                operation(driver)
                result = 0
            except HvError as err:
                result = err.code
                detail = str(err)
                errors = list(_PR_ERR.get(err.message, ()))
                if extra_lines is not None:
                    errors += extra_lines(err)
            except Exception as exc:  # a model bug must not take the driver down
                LOG.exception("%s failed inside the model", name)
                result = -errno.EIO
                detail = f"{type(exc).__name__}: {exc}"
            info = driver.kernel_log[log_mark:]
            self._refresh_locked()
        console = self.ring.since(console_mark).decode("latin-1")
        LOG.info("%s -> %d%s (%.3f s)", name, result, f" [{detail}]" if detail else "",
                 time.monotonic() - started)
        self._kernel_log(info, errors)
        return reply(result, kernel_log=info + errors, console=console, detail=detail)

    def _kernel_log(self, info: list[str], errors: list[str]) -> None:
        # The driver model logs its own lines; the error lines are the daemon's.
        for line in errors:
            LOG.error("kernel: %s", line)
        if not self.kmsg or not (info or errors):
            return
        try:
            with open("/dev/kmsg", "w", encoding="utf-8") as kmsg:
                for level, lines in ((6, info), (3, errors)):
                    for line in lines:
                        kmsg.write(f"<{level}>{line}\n")
                        kmsg.flush()
        except OSError as exc:
            LOG.warning("/dev/kmsg: %s", exc)

    def _op_enable(self, request: dict[str, Any]) -> dict[str, Any]:
        data = b64decode(request["config"])

        def enable(drv: Driver) -> None:
            if not drv.enabled:
                # A fresh hypervisor: fresh console (last_console.valid = false), and the
                # debug console chosen before the hypervisor prints its banner.
                with contextlib.suppress(FileNotFoundError):
                    self.run_dir.last_console.unlink()
                self._configure_debug_console(data)
            drv.enable(data)
            system = drv.system
            self.console_available = bool(system is not None and system.flags & SYS_VIRTUAL_DEBUG_CONSOLE)

        def missing_image(err: HvError) -> list[str]:
            if err.message != "Missing hypervisor image":
                return []
            host = self.host
            firmware = "jailhouse-amd.bin" if host is not None and host.cpu_vendor == "amd" \
                else "jailhouse-intel.bin"
            return [f"jailhouse: Missing hypervisor image {firmware}"]

        return self._call("enable", enable, missing_image)

    def _op_disable(self, request: dict[str, Any]) -> dict[str, Any]:
        driver = self.driver
        assert driver is not None  # set by start()
        first_cell = ""

        def disable(drv: Driver) -> None:
            nonlocal first_cell
            remaining = sorted(cell_id for cell_id in drv.cells if cell_id != 0)
            first_cell = drv.cells[remaining[0]].name if remaining else ""
            drv.disable()

        def failed_destroy(err: HvError) -> list[str]:
            # jailhouse_cmd_cell_destroy_non_root names the cell that refused.
            if err.message != "hypercall CELL_DESTROY":
                return []
            remaining = sorted(cell_id for cell_id in driver.cells if cell_id != 0)
            name = driver.cells[remaining[0]].name if remaining else first_cell
            return [f'Jailhouse: failed to destroy cell "{name}"']

        return self._call("disable", disable, failed_destroy)

    def _op_cell_create(self, request: dict[str, Any]) -> dict[str, Any]:
        data = b64decode(request["config"])
        return self._call("cell_create", lambda drv: drv.cell_create(data))

    @staticmethod
    def _cell_ref(request: dict[str, Any]) -> CellRef:
        cell = CellId.from_wire(request["cell"])
        return cell.name if cell.id == CELL_ID_UNUSED else cell.id

    @staticmethod
    def _require_enabled(drv: Driver) -> None:
        # cell_management_prologue: -EINVAL while disabled (before looking the cell up)
        if not drv.enabled:
            raise HvError(Errno.EINVAL, "hypervisor not enabled")

    def _op_cell_load(self, request: dict[str, Any]) -> dict[str, Any]:
        ref = self._cell_ref(request)
        images = []
        for item in request.get("images", []):
            target = int(item["target"]) & 0xFFFFFFFFFFFFFFFF
            data = b64decode(item["data"])
            if data:  # load_image: an empty image is skipped
                images.append(Image(data, target))

        def load(drv: Driver) -> None:
            self._require_enabled(drv)
            drv.cell_load(ref, images)

        return self._call("cell_load", load)

    def _op_cell_start(self, request: dict[str, Any]) -> dict[str, Any]:
        ref = self._cell_ref(request)

        def start(drv: Driver) -> None:
            self._require_enabled(drv)
            drv.cell_start(ref)

        return self._call("cell_start", start)

    def _op_cell_destroy(self, request: dict[str, Any]) -> dict[str, Any]:
        ref = self._cell_ref(request)

        def destroy(drv: Driver) -> None:
            self._require_enabled(drv)
            drv.cell_destroy(ref)

        return self._call("cell_destroy", destroy)

    def _console_error(self) -> int:
        driver = self.driver
        if driver is None or not driver.enabled:
            return -errno.EAGAIN
        if not self.console_available:
            return -errno.EPERM
        return 0

    def _op_console(self, request: dict[str, Any]) -> dict[str, Any]:
        head = int(request.get("head", 0))
        size = max(1, int(request.get("size", 65536)))
        error = self._console_error()
        if error:
            return reply(error)
        data, head = self.ring.read(head, size)
        return reply(len(data), data=data.decode("latin-1"), head=head)

    def _follow_console(self, conn: socket.socket, request: dict[str, Any]) -> None:
        """``read()`` without O_NONBLOCK, repeated: stream chunks until the daemon ends
        or the reader goes away."""
        head = int(request.get("head", 0))
        size = max(1, int(request.get("size", 65536)))
        error = self._console_error()
        if error:
            conn.sendall(encode(reply(error)))
            return
        while True:
            data, head = self.ring.read(head, size)
            if data:
                conn.sendall(encode(reply(len(data), data=data.decode("latin-1"), head=head)))
                continue
            if self._closing.is_set():
                conn.sendall(encode(reply(0, data="", head=head, eof=True)))
                return
            self.ring.wait_beyond(head, 0.5)
            # A reader that went away shows as a readable socket at EOF.
            readable, _, _ = select.select([conn], [], [], 0)
            if readable and not conn.recv(1, socket.MSG_PEEK):
                return

    def _op_sysfs(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._refresh_locked()
        return reply(0)

    def _op_state(self, request: dict[str, Any]) -> dict[str, Any]:
        driver = self.driver
        assert driver is not None and self.host is not None  # set by start()
        with self._lock:
            cells = [
                {"id": cell.id, "name": cell.name, "cpus": sorted(cell.cpus_assigned)}
                for _, cell in sorted(driver.cells.items())
            ]
            enabled = driver.enabled
        return reply(
            0, pid=os.getpid(), protocol=PROTOCOL_VERSION, arch=self.arch_name,
            enabled=enabled, host=host_to_wire(self.host), run_dir=os.fspath(self.run_dir.path),
            debug_console=self.debug_console.description if self.debug_console else "none",
            refresh=self.refresh_interval, cells=cells, console_tail=self.ring.tail,
            executor=self._executor_status(),
        )

    def _executor_status(self) -> dict[str, Any] | None:
        """The executor's own state (threads, cells, passthrough), None with the oracle."""
        status = getattr(self.arch, "status", None)
        return cast("dict[str, Any]", status()) if callable(status) else None

    # -- console and sysfs --------------------------------------------------------------------

    def _console_write(self, text: str) -> None:
        """The Arch tap's console sink (called from the model, its lock held)."""
        data = text.encode("latin-1", "replace")
        self.ring.append(data)
        if self.debug_console is not None:
            self.debug_console.write(data)

    def _configure_debug_console(self, system_data: bytes) -> None:
        mode = self.options.debug_console
        console = self.debug_console
        assert console is not None  # set by start()
        if mode == "none":
            console.set_target(None, "none")
            return
        if mode.startswith("file:"):
            path = mode[len("file:"):]
            try:
                console.set_target(FileTarget(path), f"file {path}")
            except OSError as exc:
                LOG.error("debug console file %s: %s", path, exc)
                console.set_target(None, "none")
            return
        base: int | None = None
        divider = 0
        if mode.startswith("uart:"):
            base = int(mode[len("uart:"):], 0)
        else:
            from .config import parse_system

            try:
                system = parse_system(system_data, source="JAILHOUSE_ENABLE")
            except (JhlabError, ValueError) as exc:
                LOG.info("debug console: config unreadable (%s)", exc)
                console.set_target(None, "none")
                return
            dbg = system.debug_console
            if dbg.type == CON_TYPE_8250 and not dbg.flags & CON_ACCESS_MMIO and dbg.address:
                base, divider = dbg.address, dbg.divider
            else:
                level = logging.ERROR if mode == "uart" else logging.INFO
                LOG.log(level, "debug console: type %#x flags %#x is not an 8250 on PIO; none",
                        dbg.type, dbg.flags)
        if base is None:
            console.set_target(None, "none")
            return
        try:
            ports = DevPortBackend(self.options.port_device)
        except OSError as exc:
            level = logging.INFO if mode == "auto" else logging.ERROR
            LOG.log(level, "debug console: %s: %s; none", self.options.port_device, exc.strerror)
            console.set_target(None, "none")
            return
        console.set_target(Uart8250(ports, base, divider),
                           f"8250 at {base:#x} via {self.options.port_device}")

    def _refresh_locked(self) -> None:
        """Rewrite the sysfs files (management lock held)."""
        driver = self.driver
        assert driver is not None  # set by start()
        try:
            self.sysfs.write(sysfs_tree(driver))
        except OSError as exc:
            LOG.error("sysfs refresh failed: %s", exc)
        except Exception:  # a model inconsistency must not take the driver down
            LOG.exception("sysfs refresh failed inside the model")

    def _cells_running(self) -> bool:
        driver = self.driver
        hv = driver.hv if driver is not None else None
        if hv is None:
            return False
        live = (CellState.RUNNING, CellState.RUNNING_LOCKED)
        return any(cell.state in live for cell in list(hv.cells)[1:])

    def _periodic_refresh(self) -> None:
        running = self._cells_running()
        if not (running or self._was_running):
            return
        if not self._lock.acquire(timeout=0.5):
            return  # a management operation runs; it refreshes when done
        try:
            self._refresh_locked()
        finally:
            self._lock.release()
        self._was_running = running

    # -- shutdown --------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Release everything: socket, cells and hypervisor, machine, files; idempotent."""
        self._stop.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.run_dir.socket.unlink()
        if self._accept_thread is not None:
            self._accept_thread.join(2.0)
        self.ring.wake()
        if self._lock.acquire(timeout=SHUTDOWN_TIMEOUT):
            try:
                self._release_machine()
            finally:
                self._lock.release()
        else:
            LOG.error("a management operation still runs after %.0f s; releasing anyway",
                      SHUTDOWN_TIMEOUT)
            self._release_machine()
        self._save_last_console()
        self._closing.set()
        self.ring.wake()
        deadline = time.monotonic() + 2.0
        with self._handlers_lock:
            handlers = list(self._handlers)
        for thread in handlers:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.debug_console is not None:
            self.debug_console.close()
            self.debug_console = None
        LOG.info("daemon %d ends (%s)", os.getpid(), self._stop_reason or "shutdown")
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self._dir_fd >= 0:
            os.close(self._dir_fd)  # releases the run directory lock
            self._dir_fd = -1

    def _release_machine(self) -> None:
        driver = self.driver
        if driver is None:
            return
        if driver.enabled:
            # SIGTERM while enabled: disable as the driver's reboot notifier does. A cell
            # that refuses (apic-demo) is asked again.
            for attempt in range(1, 4):
                try:
                    driver.disable()
                    LOG.info("hypervisor disabled at shutdown")
                    break
                except HvError as err:
                    LOG.warning("disable at shutdown, attempt %d: %s", attempt, err)
                except Exception:
                    LOG.exception("disable at shutdown failed inside the model")
                    break
            if driver.enabled:
                LOG.error("the hypervisor could not be disabled; releasing the machine anyway")
                with contextlib.suppress(Exception):
                    driver.arch.shutdown()
        try:
            self.sysfs.write(sysfs_tree(driver))
        except Exception:
            LOG.exception("writing the disabled sysfs tree failed")
        close = getattr(self.arch, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                LOG.exception("closing the Arch failed")

    def _save_last_console(self) -> None:
        tail, content = self.ring.snapshot()
        if not tail:
            return
        data = {"tail": tail, "content": content.decode("latin-1")}
        temp = self.run_dir.last_console.with_name(".last_console.tmp")
        try:
            temp.write_text(json.dumps(data), encoding="utf-8")
            os.replace(temp, self.run_dir.last_console)
        except OSError as exc:
            LOG.error("saving the last console failed: %s", exc)

    # -- all together ----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the daemon cleanly; SIGHUP is ignored (main thread only)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            self.stop(f"signal {signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _detach_stdio() -> None:
    """Point stdin, stdout and stderr at /dev/null (the starter's pipes are let go)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def build_parser() -> argparse.ArgumentParser:
    """The daemon's command line."""
    parser = argparse.ArgumentParser(
        prog="python3 -m harness.hvmodel.daemon",
        description="jhlab's Jailhouse driver: serves the jailhouse command, runs the model.")
    parser.add_argument("--run-dir", help="run directory (default: $JAILHOUSE_RUN_DIR or /run/jailhouse)")
    parser.add_argument("--arch", default="auto", choices=["auto", "executor", "oracle"],
                        help="what runs the cells (default: auto)")
    parser.add_argument("--host", choices=["probe", "model"],
                        help="the Linux the driver sees: this machine, or the model's 4-CPU default "
                             "(default: probe with the executor, model with the oracle)")
    parser.add_argument("--debug-console", default="auto", metavar="TARGET",
                        help="auto, none, uart, uart:PORT or file:PATH (default: auto)")
    parser.add_argument("--port-device", default="/dev/port", help="port device for the UART")
    parser.add_argument("--responder", action="append", default=[], metavar="CELL=POLICY",
                        help="oracle: how CELL answers messages: " + ", ".join(RESPONDER_POLICIES))
    parser.add_argument("--refresh", type=float, metavar="SECONDS",
                        help="sysfs refresh period while cells run (0: off)")
    parser.add_argument("--kmsg", action=argparse.BooleanOptionalAction, default=None,
                        help="copy driver messages to /dev/kmsg (default: with the executor)")
    parser.add_argument("--test-device", action="store_true",
                        help="the hypervisor has CONFIG_TEST_DEVICE (test page for TEST_DEVICE cells)")
    parser.add_argument("--rebind-pci", action="store_true",
                        help="give devices a destroyed cell releases back to their root driver "
                             "(Jailhouse leaves them unbound)")
    parser.add_argument("--native-pio", action=argparse.BooleanOptionalAction, default=True,
                        help="executor: whitelisted port I/O in machine code, not through "
                             "Python (default: on)")
    parser.add_argument("--exit-trace", action=argparse.BooleanOptionalAction, default=True,
                        help="executor: count the exits KVM handles in the kernel (CPUID, MSRs, "
                             "CR writes ...) through its tracepoints (default: on)")
    parser.add_argument("--foreground", action="store_true", help="keep stdio, log to stderr too")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    return parser


def _options(args: argparse.Namespace) -> DaemonOptions:
    responders: dict[str, str] = {}
    for item in args.responder:
        name, sep, policy = item.partition("=")
        if not sep or not name or policy not in RESPONDER_POLICIES:
            raise DaemonError(f"--responder {item!r}: expected CELL=" + "|".join(RESPONDER_POLICIES))
        responders[name] = policy
    mode = args.debug_console
    if not (mode in ("auto", "none", "uart") or mode.startswith(("file:", "uart:"))):
        raise DaemonError(f"--debug-console {mode!r}: expected auto, none, uart, uart:PORT or file:PATH")
    if mode.startswith("uart:"):
        try:
            int(mode[len("uart:"):], 0)
        except ValueError as exc:
            raise DaemonError(f"--debug-console {mode!r}: bad port") from exc
    return DaemonOptions(
        run_dir=RunDir.from_env(args.run_dir), arch=args.arch, host=args.host,
        debug_console=mode, port_device=args.port_device, responders=responders,
        refresh=args.refresh, kmsg=args.kmsg, foreground=args.foreground, verbose=args.verbose,
        test_device=args.test_device, rebind_pci=args.rebind_pci, native_pio=args.native_pio,
        exit_trace=args.exit_trace,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the daemon; return its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    prog = "jailhouse-daemon"
    try:
        options = _options(args)
    except DaemonError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 2
    daemon = Daemon(options)
    try:
        daemon.install_signal_handlers()
        daemon.start()
    except DaemonError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        daemon.shutdown()
        return EXIT_BUSY if isinstance(exc, DaemonBusy) else 1
    except Exception as exc:  # OSError, or the Arch failing to build: say it, clean up
        LOG.exception("the daemon cannot start")
        sys.stderr.write(f"{prog}: cannot start: {exc}\n")
        daemon.shutdown()
        return 1
    if not options.foreground:
        try:
            sys.stdout.write(f"{READY_LINE} {os.getpid()}\n")
            sys.stdout.flush()
        except OSError:  # the starter is gone: nobody will enable this daemon
            LOG.warning("the starting command went away; ending")
            daemon.stop("starter gone")
        _detach_stdio()
    try:
        reason = daemon.serve()
        LOG.info("stopping: %s", reason)
    finally:
        daemon.shutdown()
    return 0


if __name__ == "__main__":
    # os._exit: the connection a disable came on is closed by the kernel as the process
    # ends, not earlier by interpreter finalization, so "closed" means "gone" for the
    # command waiting on it. Everything else was released by Daemon.shutdown().
    _status = main()
    with contextlib.suppress(OSError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(_status)
