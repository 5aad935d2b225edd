"""The state files of running labs (harness.runtime): written whole, stale ones removed,
removed only by their owner."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import runtime
from harness.runtime import RunningLab


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path / "jhlab"


def record(name: str = "default", supervisor: int | None = None) -> RunningLab:
    return RunningLab(name=name, supervisor=os.getpid() if supervisor is None else supervisor,
                      qemu=12345, summary={"name": name, "ssh_port": 2222, "log_dir": "/tmp/logs",
                                           "accel": "tcg"},
                      key=Path("/keys/id_rsa"), lab=name, run_dir=Path("/tmp/jhlab-default-x"))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_registered_lab_reads_back(private_runtime_dir: Path) -> None:
    """register then read: the same record; the folder is private (0700)."""
    path = runtime.register(record())
    assert path == private_runtime_dir / "default.json"
    assert private_runtime_dir.stat().st_mode & 0o777 == 0o700
    again = runtime.read("default")
    assert again == record()
    assert again is not None and again.ssh_port == 2222 and again.log_dir == Path("/tmp/logs")
    assert runtime.running() == {"default": record()}


def test_the_file_keeps_the_jhlab_up_format() -> None:
    """Keys a state file had before (supervisor, qemu, summary, key, lab) stay, run_dir joins."""
    data = json.loads(runtime.register(record()).read_text())
    assert set(data) == {"supervisor", "qemu", "summary", "key", "lab", "run_dir"}
    older = {k: v for k, v in data.items() if k != "run_dir"}
    assert RunningLab.from_json("default", older).run_dir is None


def test_a_dead_owner_makes_the_file_stale() -> None:
    """A lab whose supervisor is gone is not up, and its file goes."""
    path = runtime.register(record(supervisor=dead_pid()))
    assert runtime.read("default") is None
    assert not path.exists()


def test_a_broken_file_is_removed(private_runtime_dir: Path) -> None:
    """An unreadable state file is not a running lab."""
    assert runtime.runtime_dir() == private_runtime_dir
    (private_runtime_dir / "broken.json").write_text("{not json")
    (private_runtime_dir / "partial.json").write_text(json.dumps({"supervisor": os.getpid()}))
    assert runtime.running() == {}
    assert list(private_runtime_dir.glob("*.json")) == []


def test_only_the_owner_unregisters() -> None:
    """unregister(supervisor=PID) leaves a lab of the same name that another process owns."""
    runtime.register(record())
    runtime.unregister("default", supervisor=os.getppid())
    assert runtime.read("default") is not None
    runtime.unregister("default", supervisor=os.getpid())
    assert runtime.read("default") is None


def test_a_lab_that_is_not_up_cannot_be_registered() -> None:
    """record_of needs a lab with a summary and a QEMU."""
    from harness.errors import MachineError
    from harness.lab import Lab

    with pytest.raises(MachineError, match="only a lab that is up"):
        runtime.record_of(Lab("default"))


# -- run directories -------------------------------------------------------------------------


def owner_file(path: Path, pid: int, start: int | None) -> Path:
    path.mkdir(mode=0o700)
    (path / runtime.OWNER_FILE).write_text(json.dumps({"pid": pid, "start": start}))
    return path


def test_a_new_run_dir_is_private_and_names_its_owner(tmp_path: Path) -> None:
    """new_run_dir: 0700, jhlab-<label>-..., an owner file with this process's pid and start."""
    path = runtime.new_run_dir("mylab", base=tmp_path)
    assert path.parent == tmp_path and path.name.startswith("jhlab-mylab-")
    assert path.stat().st_mode & 0o777 == 0o700
    owner = json.loads((path / runtime.OWNER_FILE).read_text())
    assert owner == {"pid": os.getpid(), "start": runtime.process_start(os.getpid())}
    assert runtime.run_dir_owner_alive(path) is True
    assert runtime.reap_run_dirs(tmp_path) == []
    assert path.exists()


def test_reaping_removes_dead_owners_dirs_only(tmp_path: Path) -> None:
    """A dead owner's directory goes, with its sockets and files; a live one's stays;
    a reused pid (same number, other start time) counts as dead."""
    dead = owner_file(tmp_path / "jhlab-a-dead", dead_pid(), 1)
    (dead / "initrd.img").write_bytes(b"x" * 100)
    reused = owner_file(tmp_path / "jhlab-b-reused", os.getpid(),
                        (runtime.process_start(os.getpid()) or 0) + 1)
    live = owner_file(tmp_path / "jhlab-c-live", os.getpid(), runtime.process_start(os.getpid()))
    other = tmp_path / "not-jhlab"
    other.mkdir()
    assert runtime.run_dir_owner_alive(dead) is False
    assert runtime.run_dir_owner_alive(reused) is False
    assert sorted(runtime.reap_run_dirs(tmp_path)) == [dead, reused]
    assert not dead.exists() and not reused.exists()
    assert live.exists() and other.exists()


def test_a_sigkilled_owner_leaves_a_dir_the_next_reap_removes(tmp_path: Path) -> None:
    """The real sequence: a process makes its run dir and is killed with SIGKILL; the
    directory stays (no cleanup ran) until a reap, which keeps this process's own."""
    script = ("import sys, time; from pathlib import Path; from harness import runtime\n"
              f"print(runtime.new_run_dir('victim', base=Path({str(tmp_path)!r})), flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    victim = Path(proc.stdout.readline().strip())
    mine = runtime.new_run_dir("mine", base=tmp_path)
    assert runtime.reap_run_dirs(tmp_path) == []  # both owners live
    proc.kill()
    proc.wait(10)
    assert victim.exists()
    assert runtime.reap_run_dirs(tmp_path) == [victim]
    assert mine.exists()


def test_legacy_dirs_are_reaped_only_when_surely_dead(tmp_path: Path) -> None:
    """Without an owner file: only an old directory with QEMU's QMP socket that no live
    process names goes; a young one, one a process names, or one without a socket stays."""
    old = time.time() - runtime.LEGACY_GRACE - 60

    def legacy(name: str, *, socket: bool = True, age: float = old) -> Path:
        path = tmp_path / name
        path.mkdir()
        if socket:
            (path / "qmp.sock").touch()
        os.utime(path, (age, age))
        return path

    stale = legacy("jhlab-default-stale")
    young = legacy("jhlab-default-young", age=time.time())
    runtime_folder = legacy("jhlab-0", socket=False)
    named = legacy("jhlab-default-named")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(named / "qmp.sock")])
    try:
        deadline = time.monotonic() + 10
        while str(named).encode() not in Path(f"/proc/{holder.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the holder's command line never appeared"
            time.sleep(0.01)
        os.utime(named, (old, old))
        assert runtime.reap_run_dirs(tmp_path) == [stale]
    finally:
        holder.kill()
        holder.wait(10)
    assert young.exists() and runtime_folder.exists() and named.exists()


def test_stop_terminates_then_kills(tmp_path: Path) -> None:
    """stop(): SIGTERM first; an owner that ignores it is killed after the deadline; the
    state file goes either way."""
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    runtime.register(record("polite", supervisor=polite.pid))
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                 "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    runtime.register(record("stubborn", supervisor=stubborn.pid))
    try:
        polite_record = runtime.read("polite")
        stubborn_record = runtime.read("stubborn")
        assert polite_record is not None and stubborn_record is not None
        # the children are our zombies once they end: reap them as they go
        threading.Thread(target=polite.wait, daemon=True).start()
        threading.Thread(target=stubborn.wait, daemon=True).start()
        assert runtime.stop(polite_record, timeout=10) is True
        assert runtime.stop(stubborn_record, timeout=0.5) is False
        assert polite.wait(5) == -signal.SIGTERM and stubborn.wait(5) == -signal.SIGKILL
        assert runtime.running() == {}
    finally:
        polite.kill()
        stubborn.kill()


def test_a_zombie_owner_is_dead() -> None:
    """A killed owner not yet reaped by its parent (a zombie) no longer runs the lab."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert not runtime.pid_alive(child.pid)
        runtime.register(record(supervisor=child.pid))
        assert runtime.read("default") is None
    finally:
        child.wait()


def _bound_then_listening(path: Path, delay: float) -> tuple[threading.Thread, list[bytes]]:
    """A server that does what QEMU does with its sockets: bind (the file appears), then
    only ``delay`` seconds later listen; it accepts one client and keeps what it sends."""
    received: list[bytes] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))

    def serve() -> None:
        time.sleep(delay)
        server.listen(1)
        conn, _ = server.accept()
        with conn, server:
            received.append(conn.recv(16))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, received


def test_connect_unix_waits_until_the_server_listens(tmp_path: Path) -> None:
    """Between QEMU's bind and listen a connect is refused (the race that failed a lab's
    launch under load); connect_unix waits for the listen, within its deadline."""
    path = tmp_path / "qmp.sock"
    thread, received = _bound_then_listening(path, 0.5)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as early, \
            pytest.raises(ConnectionRefusedError):
        early.connect(str(path))
    with runtime.connect_unix(path, timeout=10) as sock:
        assert sock.gettimeout() is None
        sock.sendall(b"hello")
        thread.join(10)
    assert received == [b"hello"]


def test_connect_unix_gives_up_at_its_deadline(tmp_path: Path) -> None:
    """Nobody ever listens: the last error, after the deadline and not much later."""
    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(path))
        start = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            runtime.connect_unix(path, timeout=0.3)
        assert 0.3 <= time.monotonic() - start < 2.0
    with pytest.raises(FileNotFoundError):
        runtime.connect_unix(tmp_path / "missing.sock", timeout=0.1)
