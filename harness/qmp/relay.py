"""A QMP relay: the lab's QMP for any number of further clients, through its owner's
own connection.

QEMU serves a QMP socket to one client at a time, and a lab's owner (the supervisor of
``jhlab up``, a pytest session) holds it for the lab's life: a second client would wait
for the greeting forever. So the owner runs a relay on the lab's run directory
(``qmp.sock``, mode 0600 in a 0700 directory) that speaks QMP to each client:

* the greeting (QEMU's version, no capabilities) and ``qmp_capabilities`` negotiation;
* every command forwarded on the owner's connection, QEMU's reply (return, or error
  with its class) sent back with the client's ``id``;
* every event QEMU sends, to every client that has negotiated;
* jhlab's own commands, for what the owner holds and QMP lacks:
  ``jhlab-write-phys`` (``address``, ``data`` in base64: guest-physical memory through
  QEMU's qtest socket) and ``jhlab-console-send`` (``console``: ``root`` or ``cell``,
  ``text``: typed into that serial console).

Clients send JSON objects one after another (qemu.qmp sends no newlines, a person at
``socat`` ends each with one); the relay answers one per line.  No out-of-band
execution.  Lifecycle: ``start()`` → ``follow(session)`` (again after the owner
replaced its QEMU, e.g. a reset) → ``close()`` (idempotent).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from harness.errors import QmpError
from harness.qmp import WRITE_PHYS_COMMAND, Event, QmpSession

LOG = logging.getLogger(__name__)

#: The relay's command that types into a serial console (``console``, ``text``).
CONSOLE_SEND_COMMAND = "jhlab-console-send"
#: Largest message a client may send (a memory write carries its data base64-encoded).
LINE_LIMIT = 64 * 2**20
#: The greeting's version while no QEMU is followed.
_NO_VERSION = {"qemu": {"major": 0, "minor": 0, "micro": 0}, "package": ""}


def _error(error_class: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


def event_message(event: Event) -> dict[str, Any]:
    """A recorded event as QEMU sent it (name, data, timestamp)."""
    seconds = int(event.qemu_time)
    return {"event": event.name, "data": dict(event.data),
            "timestamp": {"seconds": seconds,
                          "microseconds": round((event.qemu_time - seconds) * 1e6)}}


class _Splitter:
    """Cuts a client's input into top-level JSON texts, as QEMU's JSON streamer does: an
    object or array ends where its brackets close (strings and escapes respected); any
    other text ends with its line (it then fails to parse, and the client is told)."""

    def __init__(self) -> None:
        self._buffer = ""
        self._scanned = 0
        self._depth = 0
        self._in_string = False
        self._escape = False

    @property
    def pending(self) -> int:
        """Characters of an incomplete message held."""
        return len(self._buffer)

    def feed(self, text: str) -> list[str]:
        """Add ``text``; return the messages it completed."""
        self._buffer += text
        done: list[str] = []
        start, index = 0, self._scanned
        buffer = self._buffer
        while index < len(buffer):
            char = buffer[index]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif char == "\\":
                    self._escape = True
                elif char == '"':
                    self._in_string = False
            elif self._depth == 0 and char.isspace():
                if start == index:
                    start += 1  # whitespace between messages
            elif self._depth == 0 and char not in "{[":
                end = buffer.find("\n", index)
                if end < 0:
                    index = len(buffer)
                    break  # the rest of this line is still coming
                done.append(buffer[start:end])
                start = index = end + 1
                continue
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    done.append(buffer[start:index + 1])
                    start = index + 1
            index += 1
        self._buffer = buffer[start:]
        self._scanned = index - start
        return done


class _Client:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False

    def send(self, message: Mapping[str, Any]) -> None:
        self.writer.write(json.dumps(message).encode() + b"\r\n")


class QmpRelay:
    """The relay of one lab (see the module docstring).

    :param socket_path: where to listen (in the lab's run directory)
    :param name: used in log messages and thread names
    :param console_send: types ``text`` into console ``"root"`` or ``"cell"``
    """

    def __init__(self, socket_path: Path, *, name: str = "qmp-relay",
                 console_send: Callable[[str, str], None] | None = None) -> None:
        self.socket_path = socket_path
        self.name = name
        self._console_send = console_send
        self._upstream: QmpSession | None = None
        self._version: Mapping[str, Any] = _NO_VERSION
        self._clients: set[_Client] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    def __repr__(self) -> str:
        return f"QmpRelay({self.socket_path}, {len(self._clients)} clients)"

    def start(self, timeout: float = 10.0) -> None:
        """Listen on :attr:`socket_path` (mode 0600)."""
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name=f"{self.name}-loop", daemon=True)
        self._thread.start()
        self._loop = loop

        async def listen() -> asyncio.AbstractServer:
            return await asyncio.start_unix_server(self._serve, path=str(self.socket_path))

        try:
            self._server = asyncio.run_coroutine_threadsafe(listen(), loop).result(timeout)
        except (OSError, TimeoutError) as exc:
            self.close()
            raise QmpError(f"{self.name}: cannot listen on {self.socket_path}: {exc}") from exc
        os.chmod(self.socket_path, 0o600)

    def follow(self, upstream: QmpSession) -> None:
        """Relay to ``upstream`` (the owner's connected session) from now on, and pass its
        events on."""
        version = upstream.execute("query-version")
        self._upstream = upstream
        self._version = version if isinstance(version, Mapping) else _NO_VERSION

        def on_event(event: Event) -> None:
            loop = self._loop
            if upstream is self._upstream and loop is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # the loop is closing
                    loop.call_soon_threadsafe(self._broadcast, event_message(event))

        upstream.events.subscribe(on_event)

    @property
    def clients(self) -> int:
        """How many clients are connected."""
        return len(self._clients)

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening, drop the clients, remove the socket (idempotent)."""
        loop, self._loop = self._loop, None
        self._upstream = None
        if loop is not None:
            async def finish() -> None:
                if self._server is not None:
                    self._server.close()
                for client in list(self._clients):
                    client.writer.close()
                self._clients.clear()

            with contextlib.suppress(TimeoutError, RuntimeError):
                asyncio.run_coroutine_threadsafe(finish(), loop).result(timeout)
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout)
            if not loop.is_running():
                loop.close()
        self._thread = None
        self._server = None
        self.socket_path.unlink(missing_ok=True)

    # -- on the relay's loop ------------------------------------------------------------------

    def _broadcast(self, message: Mapping[str, Any]) -> None:
        for client in list(self._clients):
            if client.negotiated:
                client.send(message)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(writer)
        self._clients.add(client)
        splitter = _Splitter()
        text = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            client.send({"QMP": {"version": dict(self._version), "capabilities": []}})
            while chunk := await reader.read(65536):
                for piece in splitter.feed(text.decode(chunk)):
                    try:
                        message = json.loads(piece)
                    except ValueError as exc:
                        client.send(_error("GenericError", f"JSON parse error: {exc}"))
                        continue
                    client.send(await self._answer(client, message))
                if splitter.pending > LINE_LIMIT:
                    client.send(_error("GenericError", f"a message over {LINE_LIMIT} bytes: dropped"))
                    splitter = _Splitter()
                await writer.drain()
        except (ConnectionError, OSError) as exc:
            LOG.debug("%s: client dropped: %r", self.name, exc)
        finally:
            self._clients.discard(client)
            writer.close()

    async def _answer(self, client: _Client, message: Any) -> dict[str, Any]:
        if not isinstance(message, dict):
            return _error("GenericError", "QMP input must be a JSON object")
        reply = await self._execute(client, message)
        if "id" in message:
            reply["id"] = message["id"]
        return reply

    async def _execute(self, client: _Client, message: dict[str, Any]) -> dict[str, Any]:
        if "exec-oob" in message:
            return _error("GenericError", "this relay offers no out-of-band execution")
        command = message.get("execute")
        arguments = message.get("arguments", {})
        if not isinstance(command, str) or not isinstance(arguments, dict):
            return _error("GenericError", "QMP input needs 'execute' (a string) and, optionally, "
                          "'arguments' (an object)")
        if command == "qmp_capabilities":
            if client.negotiated:
                return _error("CommandNotFound",
                              "Capabilities negotiation is already complete, command ignored")
            if arguments.get("enable"):
                return _error("GenericError", "this relay offers no capabilities to enable")
            client.negotiated = True
            return {"return": {}}
        if not client.negotiated:
            return _error("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._dispatch, command, arguments)

    # -- in a worker thread --------------------------------------------------------------------

    def _dispatch(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        upstream = self._upstream
        if upstream is None:
            return _error("GenericError", f"{self.name}: the lab has no QEMU right now "
                          "(it is being reset or going down)")
        try:
            if command == WRITE_PHYS_COMMAND:
                address, data = _write_phys_arguments(arguments)
                upstream.write_phys(address, data)
                return {"return": {}}
            if command == CONSOLE_SEND_COMMAND:
                which, text = arguments.get("console"), arguments.get("text")
                if which not in ("root", "cell") or not isinstance(text, str):
                    raise ValueError(f"{CONSOLE_SEND_COMMAND} needs 'console' (\"root\" or "
                                     "\"cell\") and 'text' (a string)")
                if self._console_send is None:
                    raise QmpError("this lab's owner offers no console input")
                self._console_send(which, text)
                return {"return": {}}
            return upstream.reply(command, arguments)
        except ValueError as exc:
            return _error("GenericError", str(exc))
        except Exception as exc:  # any failure goes back to the client, not into the relay
            LOG.debug("%s: %s failed: %r", self.name, command, exc)
            return _error("GenericError", f"{command}: {exc}")


def _write_phys_arguments(arguments: Mapping[str, Any]) -> tuple[int, bytes]:
    address, data = arguments.get("address"), arguments.get("data")
    if not isinstance(address, int) or address < 0 or not isinstance(data, str):
        raise ValueError(f"{WRITE_PHYS_COMMAND} needs 'address' (a non-negative integer) and "
                         "'data' (base64)")
    try:
        return address, base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"{WRITE_PHYS_COMMAND}: 'data' is not base64: {exc}") from exc
