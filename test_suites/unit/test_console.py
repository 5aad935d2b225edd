"""Serial consoles over a real unix socket (a stand-in QEMU chardev server)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.console import ROOT_FAILURES, ConsoleFailure, SerialConsole
from harness.errors import ConsoleError, ConsoleTimeout, GuestPanic
from harness.fake import FakeChardev

Pair = tuple[FakeChardev, SerialConsole]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    transcript = tmp_path / "serial0.log"
    transcript.touch()
    chardev = FakeChardev(tmp_path / "s.sock", transcript)
    console = SerialConsole("serial0", tmp_path / "s.sock", transcript, ROOT_FAILURES)
    console.connect(timeout=5)
    yield chardev, console
    console.close()
    chardev.close()


def test_expect_sees_output_sent_before_and_during_the_wait(pair: Pair) -> None:
    chardev, console = pair
    chardev.emit(b"booting\r\njhlab: cpu features: svm npt\r\n")
    match = console.expect(r"cpu features: ([^\r\n]*)", timeout=5)
    assert match.group(1) == "svm npt"
    threading.Timer(0.2, chardev.emit, args=(b"jhlab: root cell ready\r\n",)).start()
    console.expect("root cell ready", timeout=5)


def test_timeout_names_the_pattern_and_shows_the_tail(pair: Pair) -> None:
    chardev, console = pair
    chardev.emit(b"line one\r\nline two\r\n")
    started = time.monotonic()
    with pytest.raises(ConsoleTimeout) as info:
        console.expect("never", timeout=0.5)
    assert 0.4 < time.monotonic() - started < 3
    assert info.value.pattern == "never" and "line two" in info.value.tail


def test_failure_pattern_ends_the_wait(pair: Pair) -> None:
    chardev, console = pair
    chardev.emit(b"[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n")
    with pytest.raises(ConsoleFailure, match="Unable to mount root fs"):
        console.expect("login:", timeout=10)


def test_abort_ends_a_running_wait_at_once(pair: Pair) -> None:
    _chardev, console = pair
    error = GuestPanic("guest panicked", "tail")
    threading.Timer(0.2, console.abort, args=(error,)).start()
    started = time.monotonic()
    with pytest.raises(GuestPanic):
        console.expect("never", timeout=30)
    assert time.monotonic() - started < 5


def test_closed_port_is_reported(pair: Pair) -> None:
    chardev, console = pair
    chardev.emit(b"bye\r\n")
    chardev.close()
    with pytest.raises(ConsoleError, match="closed the port"):
        console.expect("never", timeout=10)


def test_sendline_reaches_the_guest(pair: Pair) -> None:
    chardev, console = pair
    chardev.emit(b"")
    console.sendline("uname -r")
    assert chardev.received(100) == b"uname -r\r"


def test_connect_to_a_missing_socket_fails_in_time(tmp_path: Path) -> None:
    console = SerialConsole("serial9", tmp_path / "none.sock", tmp_path / "none.log")
    with pytest.raises(ConsoleError, match="cannot connect"):
        console.connect(timeout=0.3)
