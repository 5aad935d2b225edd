"""QMP for the lab, on top of :mod:`qemu.qmp`.

:class:`QmpSession` is a synchronous facade: it owns one asyncio event loop on a private
thread, and every call runs there with a timeout.  Every event QEMU sends is kept by an
:class:`EventRecorder` (with host timestamps, also appended to a JSON-lines log file), so
a test can assert on events that already happened as well as wait for new ones::

    with QmpSession(sock, event_log=logdir / "qmp-events.jsonl") as qmp:
        qmp.execute("cont")
        qmp.events.wait_for("GUEST_PANICKED", timeout=30)
        data = qmp.read_phys(0x3a600000, 4096)

Hardware events from the host are helpers here: :meth:`QmpSession.system_powerdown`
(the ACPI power button: an SCI in the guest), :meth:`~QmpSession.inject_nmi`,
:meth:`~QmpSession.read_phys` / :meth:`~QmpSession.write_phys` (guest-physical
memory), :meth:`~QmpSession.device_del` (PCI hot-unplug, waiting for the guest to let
the device go).  A session on a lab's relay socket (:mod:`harness.qmp.relay`, the way a
second process reaches a running lab) has them all.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.qmp_client import ExecuteError

from harness.errors import QmpError
from harness.runtime import connect_unix

LOG = logging.getLogger(__name__)
T = TypeVar("T")

#: Default deadline of a QMP command (seconds).
COMMAND_TIMEOUT = 30.0
#: Default deadline to connect to QEMU's QMP socket (seconds).
CONNECT_TIMEOUT = 10.0
#: The relay's command that writes guest-physical memory (``address``, ``data`` in base64).
WRITE_PHYS_COMMAND = "jhlab-write-phys"
#: Bytes per qtest write line (a line holds them base64-encoded).
_QTEST_CHUNK = 1 << 16


@dataclass(frozen=True)
class Event:
    """One QMP event as received, with the host's receive time."""

    name: str
    data: Mapping[str, Any]
    #: QEMU's timestamp (seconds since the epoch)
    qemu_time: float
    #: ``time.monotonic()`` on the host when it arrived
    received: float
    seq: int

    def matches(self, name: str, match: Mapping[str, Any] | None) -> bool:
        """True if this is event ``name`` and ``data`` contains ``match`` (recursively)."""
        return self.name == name and _contains(self.data, match or {})

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "event": self.name, "data": dict(self.data),
                "qemu_time": self.qemu_time, "received": self.received}


def config_address(bdf: str, offset: int) -> int:
    """The 0xcf8 value selecting the dword at ``offset`` of ``BB:DD.F``'s config space."""
    bus, _, rest = bdf.partition(":")
    slot, _, function = rest.partition(".")
    return (0x80000000 | int(bus, 16) << 16 | int(slot, 16) << 11 | int(function, 16) << 8
            | offset & 0xFC)


def _contains(data: Any, match: Any) -> bool:
    if isinstance(match, Mapping):
        return isinstance(data, Mapping) and all(
            key in data and _contains(data[key], value) for key, value in match.items()
        )
    return bool(data == match)


@dataclass
class EventRecorder:
    """Keeps every event of a session, in order, and lets threads wait for one.

    Listeners registered with :meth:`subscribe` are called (on the QMP thread) for each
    new event; the lab uses this to abort console waits at once on ``GUEST_PANICKED``.
    """

    log_path: Path | None = None
    history: list[Event] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _subscribers: list[Callable[[Event], None]] = field(default_factory=list)

    def record(self, name: str, data: Mapping[str, Any], qemu_time: float) -> Event:
        with self._cond:
            event = Event(name, data, qemu_time, time.monotonic(), len(self.history))
            self.history.append(event)
            self._cond.notify_all()
        LOG.debug("QMP event %s %s", name, dict(data))
        if self.log_path is not None:
            with open(self.log_path, "a") as log:
                log.write(json.dumps(event.as_json()) + "\n")
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # a broken subscriber must not stop event recording
                LOG.exception("QMP event subscriber failed on %s", name)
        return event

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback(event)`` for every event from now on."""
        self._subscribers.append(callback)

    def mark(self) -> int:
        """A position in the history; pass it as ``since`` to ignore older events."""
        with self._cond:
            return len(self.history)

    def find(self, name: str, match: Mapping[str, Any] | None = None, since: int = 0) -> list[Event]:
        """Recorded events named ``name`` whose data contains ``match``."""
        with self._cond:
            return [e for e in self.history[since:] if e.matches(name, match)]

    def wait_for(
        self,
        name: str,
        match: Mapping[str, Any] | None = None,
        *,
        timeout: float,
        since: int | None = None,
    ) -> Event:
        """Wait for event ``name`` (with data containing ``match``).

        :param since: history position to search from; default: only new events
        :raise QmpError: when it does not arrive within ``timeout`` seconds
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            start = len(self.history) if since is None else since
            while True:
                for event in self.history[start:]:
                    if event.matches(name, match):
                        return event
                start = len(self.history)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = ", ".join(e.name for e in self.history[-8:]) or "none"
                    raise QmpError(
                        f"QMP event {name} {dict(match or {})} did not arrive within "
                        f"{timeout:.1f} s (last events: {seen})"
                    )
                self._cond.wait(remaining)


class QmpSession:
    """A synchronous QMP connection to one QEMU.

    Lifecycle: ``connect()`` → ``execute()``/helpers → ``close()`` (idempotent); usable
    as a context manager.

    :param socket_path: QEMU's QMP unix socket, or a lab's relay socket
    :param event_log: file receiving every event as a JSON line
    :param name: used in log messages
    :param qtest: QEMU's qtest socket, for :meth:`write_phys` (without it, memory writes
        go to the relay's ``jhlab-write-phys`` command)
    """

    def __init__(self, socket_path: Path, *, event_log: Path | None = None,
                 name: str = "qmp", qtest: Path | None = None) -> None:
        self.socket_path = socket_path
        self.name = name
        self.qtest = qtest
        self._qtest_lock = threading.Lock()
        self.events = EventRecorder(log_path=event_log)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: QMPClient | None = None
        self._pump: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        state = "connected" if self._client is not None else "closed"
        return f"QmpSession({self.name!r}, {state})"

    def __enter__(self) -> QmpSession:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
        if self._loop is None:
            coro.close()
            raise QmpError(f"{self.name}: not connected ({what})")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError as exc:
            future.cancel()
            raise QmpError(f"{self.name}: {what} timed out after {timeout:.1f} s") from exc

    def connect(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Connect and negotiate capabilities; start recording events."""
        if self._client is not None:
            return
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"{self.name}-loop", daemon=True
        )
        self._thread.start()
        client = QMPClient(self.name)
        listener = EventListener()
        client.register_listener(listener)

        async def start(sock: socket.socket) -> None:
            await client.connect(sock)
            self._pump = asyncio.ensure_future(self._pump_events(listener))

        deadline = time.monotonic() + timeout
        sock: socket.socket | None = None
        try:
            sock = connect_unix(self.socket_path, timeout)
            self._run(start(sock), max(deadline - time.monotonic(), 0.1), "connect")
        except (QMPError, OSError, QmpError) as exc:
            if sock is not None:
                sock.close()
            self._stop_loop()
            raise QmpError(f"{self.name}: cannot connect to {self.socket_path}: {exc}") from exc
        self._client = client

    async def _pump_events(self, listener: EventListener) -> None:
        async for message in listener:
            stamp = message.get("timestamp")
            data = message.get("data")
            stamp = stamp if isinstance(stamp, Mapping) else {}
            data = data if isinstance(data, Mapping) else {}
            qemu_time = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6
            self.events.record(str(message["event"]), data, qemu_time)

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                *, timeout: float = COMMAND_TIMEOUT) -> Any:
        """Run a QMP command and return its result.

        :raise QmpError: on an error reply, a lost connection or the deadline
        """
        client = self._client
        if client is None:
            raise QmpError(f"{self.name}: not connected (execute {command})")
        try:
            return self._run(client.execute(command, dict(arguments or {})), timeout, command)
        except ExecuteError as exc:
            raise QmpError(f"{self.name}: {command} failed: {exc.error_class}: {exc}") from exc
        except (QMPError, OSError) as exc:
            raise QmpError(f"{self.name}: {command} failed: {exc!r}") from exc

    def reply(self, command: str, arguments: Mapping[str, Any] | None = None,
              *, timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
        """Run a QMP command and return QEMU's reply object as it came (``{"return": ...}``
        or ``{"error": {"class": ..., "desc": ...}}``, without ``id``), for relays and
        command lines that pass errors on rather than raise them.

        :raise QmpError: on a lost connection or the deadline
        """
        client = self._client
        if client is None:
            raise QmpError(f"{self.name}: not connected (execute {command})")
        try:
            value = self._run(client.execute(command, dict(arguments or {})), timeout, command)
        except ExecuteError as exc:
            return {key: val for key, val in exc.received.items() if key != "id"}
        except (QMPError, OSError) as exc:
            raise QmpError(f"{self.name}: {command} failed: {exc!r}") from exc
        return {"return": value}

    def human(self, command_line: str, *, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run an HMP command through ``human-monitor-command``."""
        return str(self.execute("human-monitor-command", {"command-line": command_line},
                                timeout=timeout))

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect (idempotent); recorded events stay available."""
        client, self._client = self._client, None
        if client is not None and self._loop is not None:
            pump = self._pump

            async def finish() -> None:
                try:
                    await client.disconnect()
                except Exception as exc:  # cleanup: QEMU may already be gone
                    LOG.debug("%s: disconnect: %r", self.name, exc)
                if pump is not None:
                    pump.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await pump

            with contextlib.suppress(QmpError):
                self._run(finish(), timeout, "disconnect")
        self._stop_loop()

    def _stop_loop(self) -> None:
        loop, self._loop = self._loop, None
        self._pump = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not loop.is_running():
            loop.close()

    # -- helpers ------------------------------------------------------------------------

    def status(self) -> str:
        """The run state (``running``, ``paused``, ``guest-panicked``, ...)."""
        return str(self.execute("query-status")["status"])

    def read_phys(self, address: int, size: int, *, timeout: float = COMMAND_TIMEOUT) -> bytes:
        """Read ``size`` bytes of guest-physical memory at ``address``."""
        with tempfile.TemporaryDirectory(prefix="jhlab-pmem-") as tmp:
            dump = Path(tmp) / "mem.bin"
            self.execute("pmemsave", {"val": address, "size": size, "filename": str(dump)},
                         timeout=timeout)
            data = dump.read_bytes()
        if len(data) != size:
            raise QmpError(f"pmemsave returned {len(data)} bytes, expected {size}")
        return data

    def write_phys(self, address: int, data: bytes, *, timeout: float = COMMAND_TIMEOUT) -> None:
        """Write ``data`` to guest-physical memory at ``address`` (RAM or device MMIO, as
        a device's DMA would: no CPU sees it happen).

        :raise QmpError: when QEMU refuses, or neither a qtest socket nor a relay is there
        """
        if self.qtest is None:
            self.execute(WRITE_PHYS_COMMAND, {"address": address,
                                              "data": base64.b64encode(data).decode()},
                         timeout=timeout)
            return
        with self._qtest_lock, _qtest_connection(self.qtest, timeout) as qtest:
            for offset in range(0, len(data), _QTEST_CHUNK):
                chunk = data[offset:offset + _QTEST_CHUNK]
                answer = qtest.command(f"b64write {address + offset:#x} {len(chunk):#x} "
                                       f"{base64.b64encode(chunk).decode()}")
                if answer != "OK":
                    raise QmpError(f"{self.name}: writing {len(chunk)} bytes at "
                                   f"{address + offset:#x} failed: qtest said {answer!r}")

    def system_powerdown(self) -> None:
        """Press the ACPI power button: the guest gets an SCI (power button fixed event)
        and QEMU reports ``POWERDOWN``; what happens next is the guest's choice."""
        self.execute("system_powerdown")

    def inject_nmi(self) -> None:
        """Send an NMI to the guest's CPUs (as the NMI button of a board would)."""
        self.execute("inject-nmi")

    def pci_devices(self) -> list[dict[str, Any]]:
        """Every PCI function QEMU emulates, flattened over buses, with ``bdf`` text."""
        found: list[dict[str, Any]] = []

        def walk(devices: list[dict[str, Any]]) -> None:
            for dev in devices:
                bdf = f"{dev['bus']:02x}:{dev['slot']:02x}.{dev['function']:x}"
                found.append({**dev, "bdf": bdf})
                bridge = dev.get("pci_bridge")
                if bridge:
                    walk(bridge.get("devices", []))

        for bus in self.execute("query-pci"):
            walk(bus["devices"])
        return found

    def write_pci_config(self, bdf: str, offset: int, value: int, size: int) -> None:
        """Write ``size`` (1, 2 or 4) bytes at ``offset`` of a PCI function's config space
        through the legacy ports 0xcf8/0xcfc (HMP ``o``), keeping the guest's 0xcf8 latch.
        Only while the guest is stopped: a running guest's own 0xcf8/0xcfc pair could
        interleave with this one.

        :param bdf: ``BB:DD.F``
        """
        width = {1: "b", 2: "h", 4: "w"}[size]
        saved = self._port_in(0xCF8)
        self.human(f"o /w 0xcf8 {config_address(bdf, offset):#x}")
        self.human(f"o /{width} {0xCFC + (offset & 3):#x} {value:#x}")
        self.human(f"o /w 0xcf8 {saved:#x}")

    def _port_in(self, port: int) -> int:
        reply = self.human(f"i /w {port:#x}")
        try:
            return int(reply.rsplit("=", 1)[1], 16)
        except (IndexError, ValueError) as exc:
            raise QmpError(f"{self.name}: reading port {port:#x}: {reply.strip()!r}") from exc

    def device_add(self, driver: str, device_id: str, **props: Any) -> None:
        """Hot-plug a device."""
        self.execute("device_add", {"driver": driver, "id": device_id, **props})

    def device_del(self, device_id: str, *, timeout: float = COMMAND_TIMEOUT) -> None:
        """Unplug a device and wait until QEMU reports it gone (``DEVICE_DELETED``).

        A PCI device in a hot-plug slot (behind the default lab's ``pcie-pci-bridge``,
        edu for example) goes only once the guest's hot-plug driver has released it.
        """
        mark = self.events.mark()
        self.execute("device_del", {"id": device_id})
        self.events.wait_for("DEVICE_DELETED", {"device": device_id}, timeout=timeout,
                             since=mark)


class _QtestLine:
    """One connection to QEMU's qtest socket: a command line out, an answer line in."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rwb")

    def command(self, line: str) -> str:
        self._file.write(line.encode() + b"\n")
        self._file.flush()
        answer = self._file.readline()
        if not answer:
            raise QmpError(f"qtest closed the connection after {line.split()[0]}")
        return answer.decode().strip()


@contextlib.contextmanager
def _qtest_connection(path: Path, timeout: float) -> Iterator[_QtestLine]:
    """A qtest connection (QEMU serves one at a time: a busy socket is waited for)."""
    deadline = time.monotonic() + timeout
    try:
        sock = connect_unix(path, timeout)
    except OSError as exc:
        raise QmpError(f"cannot connect to QEMU's qtest socket {path}: {exc}") from exc
    sock.settimeout(max(deadline - time.monotonic(), 0.1))
    try:
        yield _QtestLine(sock)
    except TimeoutError as exc:
        raise QmpError(f"QEMU's qtest socket {path} did not answer within {timeout:.0f} s") from exc
    finally:
        sock.close()
