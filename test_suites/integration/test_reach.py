"""Reaching a running lab from another process, as a user of ``jhlab up`` does: the lab
is brought up by the real supervisor (``jhlab up``), and this test process drives it
through ``jhlab qmp/events/cp/run`` and ``Lab.attach``: QMP beside the supervisor's own
connection, the event log followed live, files both ways, hardware events from the host
(ACPI power button, NMI, guest memory writes, PCI hot-unplug), and no leftovers when a
supervisor is killed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import runtime
from harness.errors import MachineError
from harness.lab import Lab
from harness.runtime import RunningLab

pytestmark = [pytest.mark.lab, pytest.mark.slow]

WINDOW = 0x3A000000  # the default lab's reserved window
UP_TIMEOUT = 900.0  # a boot on a loaded machine, images already built


@dataclass
class Supervised:
    """The lab brought up with ``jhlab up`` for this module, and how to call jhlab."""

    env: dict[str, str]
    runtime_dir: Path
    accel: str

    def jhlab(self, *args: str, timeout: float = 120.0, check: bool = True,
              stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "harness.cli", *args], env=self.env, input=stdin,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"jhlab {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def record(self) -> RunningLab:
        state = runtime.read("default")
        assert state is not None, "the lab is not up"
        return state

    def run(self, command: str) -> str:
        return self.jhlab("run", "--", command).stdout


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory,
               request: pytest.FixtureRequest) -> Iterator[Supervised]:
    """The default lab, brought up by ``jhlab up`` (its supervisor owns QEMU), in a runtime
    directory of its own (so no other lab of the same name is in the way)."""
    runtime_dir = tmp_path_factory.mktemp("runtime")
    accel = request.config.getoption("--accel") or "auto"
    lab = Supervised(env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime_dir)), runtime_dir=runtime_dir,
                     accel=accel)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_RUNTIME_DIR", str(runtime_dir))
        up = lab.jhlab("up", "--accel", accel, "--json", timeout=UP_TIMEOUT, check=False)
        assert up.returncode == 0, f"jhlab up failed:\n{up.stdout}\n{up.stderr}"
        try:
            yield lab
        finally:
            lab.jhlab("down", check=False)


@pytest.fixture
def attached(supervised: Supervised) -> Iterator[Lab]:
    """This process attached to the supervised lab."""
    with Lab.attach("default") as lab:
        yield lab


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)


def test_qmp_from_other_processes_beside_the_supervisor(supervised: Supervised) -> None:
    """jhlab qmp answers while the supervisor keeps its connection, several at once;
    QEMU's errors come back with their class and a failure status."""
    assert json.loads(supervised.jhlab("qmp", "query-status").stdout)["status"] == "running"
    together = [supervised.popen("qmp", "default", "query-name") for _ in range(3)]
    for proc in together:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and json.loads(out) == {"name": "jhlab-default"}, out
    failed = supervised.jhlab("qmp", "device_del", '{"id": "no-such-device"}', check=False)
    assert failed.returncode == 1 and failed.stderr.startswith("DeviceNotFound:"), failed
    record = supervised.record()
    assert record.run_dir is not None
    assert (record.run_dir / "qmp.sock").stat().st_mode & 0o777 == 0o600
    assert record.run_dir.stat().st_mode & 0o777 == 0o700


def test_events_follow_sees_an_event_caused_meanwhile(supervised: Supervised) -> None:
    """jhlab events -f prints an event that happens while it follows; --since MARK shows
    only what came after the mark."""
    mark = int(supervised.jhlab("events", "--mark").stdout)
    follower = supervised.popen("events", "-f", "--since", str(mark))
    try:
        supervised.jhlab("qmp", "stop")
        supervised.jhlab("qmp", "cont")
        assert follower.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while "RESUME" not in seen and time.monotonic() < deadline:
            line = follower.stdout.readline()
            assert line, "jhlab events -f ended early"
            seen.append(line.split()[2])
        assert seen[:2] == ["STOP", "RESUME"], seen
    finally:
        follower.terminate()
        follower.wait(10)
    since = [json.loads(line) for line in
             supervised.jhlab("events", "--since", str(mark), "--json").stdout.splitlines()]
    assert [e["event"] for e in since][:2] == ["STOP", "RESUME"]
    assert since[0]["index"] == mark


def test_cp_both_ways_keeps_content_and_modes(supervised: Supervised, tmp_path: Path) -> None:
    """jhlab cp: a file in and out (content checked on both sides), a tree with -r."""
    data = secrets.token_bytes(300_000)
    local = tmp_path / "blob.bin"
    local.write_bytes(data)
    local.chmod(0o750)
    supervised.jhlab("cp", str(local), "default:/root/")
    digest = supervised.run("sha256sum /root/blob.bin; stat -c %a /root/blob.bin").split()
    assert digest == [hashlib.sha256(data).hexdigest(), "/root/blob.bin", "750"]
    back = tmp_path / "back"
    back.mkdir()
    supervised.jhlab("cp", ":/root/blob.bin", f"{back}/")
    assert (back / "blob.bin").read_bytes() == data
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "leaf.txt").write_text("leaf\n")
    supervised.jhlab("cp", "-r", str(tree), "default:/root/tree")
    assert supervised.run("cat /root/tree/sub/leaf.txt") == "leaf\n"
    supervised.jhlab("cp", "-r", "default:/root/tree", str(tmp_path / "tree-back"))
    assert (tmp_path / "tree-back" / "sub" / "leaf.txt").read_text() == "leaf\n"
    missing = supervised.jhlab("cp", "default:/root/no-such-file", str(tmp_path), check=False)
    assert missing.returncode == 1 and "no such file" in " ".join(missing.stderr.split())


def test_attach_runs_moves_files_and_types(supervised: Supervised, attached: Lab) -> None:
    """Lab.attach: the summary of jhlab up, commands, put/get, both consoles (typing goes
    through the supervisor, output comes from the transcripts)."""
    record = supervised.record()
    assert attached.attached and attached.summary is not None
    expected = dict(record.summary) | {"cpu_features": attached.summary.cpu_features}
    assert attached.summary.as_dict() == expected
    assert attached.run("uname -r", check=True).stdout.strip() == attached.summary.kernel
    payload = secrets.token_bytes(4096)
    attached.put(payload, "/root/attached.bin", 0o600)
    assert attached.get("/root/attached.bin") == payload
    token = secrets.token_hex(4)
    attached.console.sendline(f"echo typed-from-afar-{token}")
    attached.console.expect(f"typed-from-afar-{token}\r?\n", timeout=60)
    attached.run(f"echo cell-line-{token} > /dev/ttyS1", check=True)
    attached.cell_console.expect(f"cell-line-{token}", timeout=30)


def test_an_attached_lab_does_not_stop_or_reset_it(supervised: Supervised, attached: Lab) -> None:
    """down() of an attached lab is refused (and so are reset and snapshot); after
    detach the lab still runs."""
    with pytest.raises(MachineError, match="refusing to stop a lab this process does not own"):
        attached.down()
    with pytest.raises(MachineError, match="belongs to the lab's owner"):
        attached.reset()
    attached.detach()
    with pytest.raises(MachineError, match="detached"):
        attached.run("true")
    assert runtime.pid_alive(supervised.record().supervisor)
    assert json.loads(supervised.jhlab("qmp", "query-status").stdout)["status"] == "running"


def test_memory_written_from_the_host_is_seen_by_the_guest(attached: Lab) -> None:
    """write_phys (through the relay, QEMU's qtest in the supervisor) lands in guest RAM:
    the root cell reads it through /dev/mem, read_phys reads it back."""
    data = secrets.token_bytes(256)
    address = WINDOW + 0x7000
    attached.qmp.write_phys(address, data)
    assert attached.qmp.read_phys(address, len(data)) == data
    script = (f"import mmap, os\nfd = os.open('/dev/mem', os.O_RDONLY)\n"
              f"m = mmap.mmap(fd, 0x8000, mmap.MAP_SHARED, mmap.PROT_READ, offset={WINDOW:#x})\n"
              f"print(m[0x7000:0x7000 + {len(data)}].hex())\n")
    assert attached.run("python3 -", stdin=script, check=True).stdout.strip() == data.hex()


def _count(text: str, label: str) -> int:
    """The sum over CPUs of the /proc/interrupts line ``label``."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0].rstrip(":") == label:
            return sum(int(f) for f in fields[1:] if f.isdigit())
    raise AssertionError(f"no {label} line in /proc/interrupts:\n{text}")


def test_power_button_reaches_the_root_cells_acpi(supervised: Supervised, attached: Lab) -> None:
    """system_powerdown from another process: QEMU reports POWERDOWN, the root cell's
    ACPI takes the SCI (its power-button fixed event and the acpi interrupt count go up,
    the button driver reports the press), and the lab keeps running (nothing there
    powers off on it)."""
    def counters() -> tuple[int, int]:
        out = attached.run("cat /sys/firmware/acpi/interrupts/ff_pwr_btn; cat /proc/interrupts",
                           check=True).stdout
        return int(out.split()[0]), _count(out, "9")  # IRQ 9: the SCI on q35

    button, sci = counters()
    mark = attached.qmp.events.mark()
    supervised.jhlab("qmp", "system_powerdown")
    attached.qmp.events.wait_for("POWERDOWN", timeout=30, since=mark)
    wait_until("the root cell counting the power button", lambda: counters()[0] > button)
    assert counters()[1] > sci
    assert "Power Button" in attached.run("cat /proc/bus/input/devices", check=True).stdout
    assert attached.qmp.status() == "running"


def test_nmi_reaches_the_root_cell(attached: Lab) -> None:
    """inject-nmi: the root cell's CPUs count NMIs and its kernel reports one it did not
    expect."""
    def nmis() -> int:
        return _count(attached.run("cat /proc/interrupts", check=True).stdout, "NMI")

    before = nmis()
    attached.qmp.inject_nmi()
    wait_until("the root cell counting the NMI", lambda: nmis() > before)
    assert re.search(r"NMI received for unknown reason", attached.run("dmesg", check=True).stdout)


def test_pci_hot_unplug_of_a_root_device(attached: Lab) -> None:
    """device_del of edu (behind the pcie-pci-bridge, a hot-plug slot the root owns): the
    root cell's hot-plug driver lets it go, QEMU reports DEVICE_DELETED, the device is
    gone on both sides; plugged back, the root cell finds it again."""
    sysfs = "/sys/bus/pci/devices/0000:01:01.0"
    assert attached.run(f"test -e {sysfs}").status == 0
    attached.qmp.device_del("edu", timeout=120)
    assert "01:01.0" not in {d["bdf"] for d in attached.qmp.pci_devices()}
    wait_until("edu gone from the root cell", lambda: attached.run(f"test -e {sysfs}").status != 0)
    attached.qmp.device_add("edu", "edu", bus="pcibr1", addr="01.0")
    wait_until("edu back in the root cell", lambda: attached.run(f"test -e {sysfs}").status == 0,
               timeout=120)
    assert attached.run(f"cat {sysfs}/device", check=True).stdout.strip() == "0x11e8"


def _qemu_run_dir(qemu: int) -> Path:
    """QEMU's run directory, from its command line (where its QMP socket is)."""
    args = Path(f"/proc/{qemu}/cmdline").read_bytes().decode().split("\0")
    chardev = next(a for a in args if a.startswith("socket,id=qmp,path="))
    return Path(chardev.split("path=", 1)[1].split(",", 1)[0]).parent


def _gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_killed_supervisors_leave_nothing_after_the_next_up(supervised: Supervised) -> None:
    """SIGKILL of jhlab up's supervisor: QEMU dies with it, its run directories stay
    until the next jhlab up (here --foreground), which removes them and not its own;
    SIGKILL of that one too, and a reap removes its directories as well."""
    first = supervised.record()
    assert first.run_dir is not None
    dirs = [first.run_dir, _qemu_run_dir(first.qemu)]
    os.kill(first.supervisor, signal.SIGKILL)
    assert _gone(first.qemu), "QEMU outlived its supervisor"
    assert runtime.read("default") is None  # even while its zombie waits to be reaped
    assert all(d.exists() for d in dirs), "nothing to reap: the test would prove nothing"
    foreground = supervised.popen("up", "--foreground", "--accel", supervised.accel)
    try:
        def second_up() -> bool:
            if foreground.poll() is not None:
                out = foreground.stdout.read() if foreground.stdout else ""
                raise AssertionError(f"jhlab up --foreground ended ({foreground.returncode}):\n{out}")
            state = runtime.read("default")
            return state is not None and state.supervisor == foreground.pid
        wait_until("jhlab up --foreground", second_up, timeout=UP_TIMEOUT)
        second = supervised.record()
        assert second.run_dir is not None
        live = [second.run_dir, _qemu_run_dir(second.qemu)]
        assert not any(d.exists() for d in dirs), f"left behind: {[d for d in dirs if d.exists()]}"
        assert all(d.exists() for d in live)
        reaped_now = runtime.reap_run_dirs()  # the running lab's are not its to take
        assert not set(live) & set(reaped_now) and all(d.exists() for d in live)
        foreground.send_signal(signal.SIGKILL)
        foreground.wait(30)
        assert _gone(second.qemu), "QEMU outlived jhlab up --foreground"
        reaped = runtime.reap_run_dirs()
        assert set(live) <= set(reaped) and not any(d.exists() for d in live)
    finally:
        foreground.kill()
        foreground.wait(30)
