"""The shipped stand-ins (harness.fake) behave like the real things they stand for."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from harness.console import ConsoleFailure
from harness.errors import CommandError, ConsoleError, ConsoleTimeout, QmpError
from harness.fake import FileConsole, LocalRootCell
from harness.protocol import Console, LabChannels, ProgramRunner


def test_file_console_waits_for_text_written_later(tmp_path: Path) -> None:
    """A pattern written by another thread ends the wait; before, mark and since work."""
    console: Console = FileConsole("c", tmp_path / "c.log")
    mark = console.mark()
    with open(tmp_path / "c.log", "a") as out:
        out.write("booting\r\n")
    threading.Timer(0.2, lambda: (tmp_path / "c.log").open("a").write("ready 42\r\n")).start()
    match = console.expect(r"ready (\d+)", timeout=5)
    assert match.group(1) == "42" and "booting" in console.before
    assert console.since(mark) == "booting\nready 42\n"


def test_file_console_failures_and_timeouts(tmp_path: Path) -> None:
    """The earliest match wins, a failure pattern raises, nothing new times out with the tail."""
    console = FileConsole("c", tmp_path / "c.log", failures=[r"FATAL:[^\n]*"])
    (tmp_path / "c.log").write_text("FATAL: bad\nok\n")
    with pytest.raises(ConsoleFailure, match="FATAL: bad"):
        console.expect("ok", timeout=1)
    assert console.expect("ok", timeout=1).group(0) == "ok"
    with pytest.raises(ConsoleTimeout) as caught:
        console.expect("never", timeout=0.2)
    assert "FATAL: bad" in caught.value.tail
    console.discard()
    (tmp_path / "c.log").open("a").write("fresh\n")
    assert console.expect("fresh|ok", timeout=1).group(0) == "fresh"


def test_local_root_cell_runs_commands_and_moves_files(tmp_path: Path) -> None:
    """Commands run here with sh -c; check raises; files are local; there is no QMP."""
    root: LabChannels = LocalRootCell(tmp_path / "root")
    assert root.run("echo out; echo err >&2; exit 3").output == "out\nerr\n"
    with pytest.raises(CommandError, match="exited with status 3"):
        root.run("exit 3", check=True)
    assert root.run("cat", stdin="fed").stdout == "fed"
    root.put(b"\x00data", str(tmp_path / "f"), 0o600)
    assert root.get(str(tmp_path / "f")) == b"\x00data"
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o600
    with pytest.raises(QmpError, match="no QEMU"):
        root.qmp.execute("query-status")


def test_local_programs_answer_lines_and_say_why_they_stopped(tmp_path: Path) -> None:
    """A started program answers line by line while it runs; one that ends or stays
    silent fails the wait with its status and standard error; close ends it."""
    root: ProgramRunner = LocalRootCell(tmp_path / "root")
    echo = root.start("while read -r line; do echo \"got $line\"; done")
    for word in ("one", "two"):
        echo.send(word)
        assert echo.receive(timeout=5) == f"got {word}"
    echo.close()
    assert not echo.alive
    echo.close()  # idempotent

    broken = root.start("read -r line; echo \"no $line here\" >&2; exit 3")
    broken.send("answer")
    with pytest.raises(ConsoleError, match=r"ended \(status 3\) without an answer:\nno answer here"):
        broken.receive(timeout=5)
    broken.close()

    silent = root.start("sleep 30")
    with pytest.raises(ConsoleError, match="answered nothing within 0 s"):
        silent.receive(timeout=0.3)
    silent.close()  # its input closes, sleep does not care: killed
    assert not silent.alive
