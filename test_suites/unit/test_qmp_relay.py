"""The QMP relay (harness.qmp.relay) in front of a real QEMU (paused, no guest booted):
any number of clients, QEMU's replies and error classes, events for every client,
the QMP negotiation rules, and jhlab's own commands (memory writes through qtest,
console input)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.errors import QmpError
from harness.qmp import QmpSession
from harness.qmp.relay import QmpRelay

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="needs qemu-system-x86_64")


@dataclass
class Relayed:
    owner: QmpSession
    relay: QmpRelay
    typed: list[tuple[str, str]]

    @property
    def socket(self) -> Path:
        return self.relay.socket_path


@pytest.fixture
def relayed(tmp_path: Path) -> Iterator[Relayed]:
    """A paused q35 QEMU (64 MiB), its owner's session (with qtest) and a relay."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "64", "-nodefaults",
         "-display", "none", "-S",
         "-qmp", f"unix:{run / 'qemu-qmp.sock'},server=on,wait=off",
         "-qtest", f"unix:{run / 'qtest.sock'},server=on,wait=off", "-qtest-log", "/dev/null"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        owner = QmpSession(run / "qemu-qmp.sock", name="owner", qtest=run / "qtest.sock")
        owner.connect(timeout=15)  # waits for QEMU to create the socket and listen on it
        typed: list[tuple[str, str]] = []
        relay = QmpRelay(run / "qmp.sock", console_send=lambda which, text: typed.append((which, text)))
        relay.start()
        relay.follow(owner)
        yield Relayed(owner, relay, typed)
        relay.close()
        owner.close()
    finally:
        qemu.kill()
        qemu.wait(10)


def client(path: Path, name: str = "client") -> QmpSession:
    session = QmpSession(path, name=name)
    session.connect()
    return session


class RawClient:
    """QMP by hand: lines out, lines in."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self.greeting = self.receive()

    def receive(self) -> dict[str, object]:
        line = self.file.readline()
        assert line, "the relay hung up"
        value = json.loads(line)
        assert isinstance(value, dict)
        return value

    def send(self, text: str) -> dict[str, object]:
        self.file.write(text.encode() + b"\n")
        self.file.flush()
        return self.receive()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_many_clients_at_once_get_qemus_answers(relayed: Relayed) -> None:
    """Three clients beside the owner, all connected at the same time, each with its
    own answers; the socket is the owner's alone (0600)."""
    clients = [client(relayed.socket, f"c{n}") for n in range(3)]
    try:
        assert relayed.relay.clients == 3
        for session in clients:
            assert session.status() == "prelaunch"
            assert session.execute("query-version")["qemu"]["major"] >= 7
        assert relayed.socket.stat().st_mode & 0o777 == 0o600
    finally:
        for session in clients:
            session.close()


def test_errors_keep_qemus_class(relayed: Relayed) -> None:
    """An error reply comes back as QEMU gave it (class and description), with the id."""
    raw = RawClient(relayed.socket)
    try:
        assert raw.greeting["QMP"]["version"]["qemu"]["major"] >= 7  # type: ignore[index]
        assert raw.send('{"execute": "qmp_capabilities"}') == {"return": {}}
        reply = raw.send('{"execute": "device_del", "arguments": {"id": "nope"}, "id": 7}')
        assert reply["id"] == 7
        assert reply["error"]["class"] == "DeviceNotFound"  # type: ignore[index]
        assert "nope" in reply["error"]["desc"]  # type: ignore[index]
        other = client(relayed.socket)
        with pytest.raises(QmpError, match="CommandNotFound"):
            other.execute("no-such-command")
        other.close()
    finally:
        raw.close()


def test_negotiation_and_bad_input(relayed: Relayed) -> None:
    """Commands before qmp_capabilities, a second negotiation, broken JSON and non-objects
    are refused as QEMU refuses them; the connection stays usable."""
    raw = RawClient(relayed.socket)
    try:
        early = raw.send('{"execute": "query-status"}')
        assert early["error"]["class"] == "CommandNotFound"  # type: ignore[index]
        assert "qmp_capabilities" in early["error"]["desc"]  # type: ignore[index]
        assert raw.send('{"execute": "qmp_capabilities"}') == {"return": {}}
        again = raw.send('{"execute": "qmp_capabilities"}')
        assert "already complete" in again["error"]["desc"]  # type: ignore[index]
        assert "JSON" in raw.send("{not json}")["error"]["desc"]  # type: ignore[index]
        assert "JSON" in raw.send("garbage")["error"]["desc"]  # type: ignore[index]
        assert raw.send("[1, 2]")["error"]["class"] == "GenericError"  # type: ignore[index]
        assert "out-of-band" in raw.send('{"exec-oob": "query-status"}')["error"]["desc"]  # type: ignore[index]
        assert raw.send('{"execute": "query-status"}')["return"]["status"] == "prelaunch"  # type: ignore[index]
    finally:
        raw.close()


def test_input_is_cut_as_qemu_cuts_it() -> None:
    """Objects without newlines, split anywhere (inside strings too), several in one
    chunk, pretty-printed over lines: each becomes one message."""
    from harness.qmp.relay import _Splitter

    splitter = _Splitter()
    text = '{"execute": "a", "arguments": {"s": "}{\\"x"}}{"execute": "b"}\n{\n "execute": "c"\n}'
    pieces = [piece for index in range(0, len(text), 3) for piece in splitter.feed(text[index:index + 3])]
    assert [json.loads(piece)["execute"] for piece in pieces] == ["a", "b", "c"]
    assert json.loads(pieces[0])["arguments"]["s"] == '}{"x'
    assert splitter.feed("junk") == [] and splitter.feed(" here\n") == ["junk here"]
    assert splitter.pending == 0


def test_events_reach_every_negotiated_client(relayed: Relayed) -> None:
    """An event QEMU sends (caused by one client) reaches the others, with QEMU's
    timestamp; a client that has not negotiated gets none."""
    watcher = client(relayed.socket, "watcher")
    actor = client(relayed.socket, "actor")
    shy = RawClient(relayed.socket)
    try:
        mark = watcher.events.mark()
        actor.execute("cont")
        actor.execute("stop")
        event = watcher.events.wait_for("STOP", timeout=10, since=mark)
        assert abs(event.qemu_time - time.time()) < 60
        assert watcher.events.find("RESUME", since=mark)
        assert actor.events.wait_for("STOP", timeout=10, since=0)
        assert "error" in shy.send('{"execute": "query-status"}')  # the answer, not an event
    finally:
        shy.close()
        watcher.close()
        actor.close()


def test_memory_written_through_the_relay_is_read_back(relayed: Relayed) -> None:
    """write_phys from a relay client (jhlab-write-phys, qtest in the owner) and from the
    owner itself; read_phys (pmemsave) sees both, over more than one qtest chunk."""
    data = os.urandom(70000)
    remote = client(relayed.socket)
    try:
        remote.write_phys(0x100000, data)
        assert relayed.owner.read_phys(0x100000, len(data)) == data
        relayed.owner.write_phys(0x200000, b"owner")
        assert remote.read_phys(0x200000, 5) == b"owner"
        with pytest.raises(QmpError, match="address"):
            remote.execute("jhlab-write-phys", {"address": -1, "data": ""})
        with pytest.raises(QmpError, match="base64"):
            remote.execute("jhlab-write-phys", {"address": 0, "data": "!!"})
    finally:
        remote.close()


def test_console_input_goes_to_the_owner(relayed: Relayed) -> None:
    """jhlab-console-send types into the owner's console; bad arguments are refused."""
    remote = client(relayed.socket)
    try:
        remote.execute("jhlab-console-send", {"console": "cell", "text": "hello\r"})
        assert relayed.typed == [("cell", "hello\r")]
        with pytest.raises(QmpError, match="console"):
            remote.execute("jhlab-console-send", {"console": "serial7", "text": "x"})
    finally:
        remote.close()


def test_close_drops_clients_and_the_socket(relayed: Relayed) -> None:
    """After close() the socket is gone and a client's next command fails at once."""
    remote = client(relayed.socket)
    relayed.relay.close()
    assert not relayed.socket.exists()
    with pytest.raises(QmpError):
        remote.execute("query-status", timeout=5)
    remote.close()
