"""Reset points: the root cell's report, which devices QEMU does not migrate, when a
snapshot is refused, and the command a restore runs in the root cell."""

from __future__ import annotations

import json
import subprocess
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from harness.errors import MachineError, QmpError
from harness.images import ImageSet, Kernel
from harness.labfile import load_lab, parse_lab
from harness.machine import AccelChoice, Machine, MachineState, Snapshot
from harness.qmp import EventRecorder, config_address
from harness.resetpoint import (
    GuestView,
    ResetPoint,
    has_migration_state,
    refusal,
    stateless_pci_devices,
)

#: QEMU 7.2's types with a VMState among the default lab's (edu and pvpanic have none)
WITH_STATE = frozenset({"VGA", "e1000e", "pcie-pci-bridge", "intel-hda", "hda-duplex",
                        "virtio-net-device"})
#: query-pci of the default lab, flattened (what QmpSession.pci_devices returns), abridged
PCI: list[dict[str, Any]] = [
    {"bdf": "00:01.0", "qdev_id": ""},
    {"bdf": "00:02.0", "qdev_id": ""},
    {"bdf": "00:03.0", "qdev_id": "pcibr1", "pci_bridge": {"bus": {"number": 1}}},
    {"bdf": "01:01.0", "qdev_id": "edu"},
    {"bdf": "00:1b.0", "qdev_id": "hda"},
    {"bdf": "00:1f.7", "qdev_id": "mgmt"},
]
EDU_HEADER = bytes(range(64))


def _report(edu_driver: str | None = None, stopped: tuple[int, ...] = ()) -> str:
    functions: dict[str, dict[str, str | None]] = {
        f"0000:{dev['bdf']}": {"config": EDU_HEADER.hex(), "driver": None} for dev in PCI}
    functions["0000:01:01.0"]["driver"] = edu_driver
    return json.dumps({"stopped": [{"pid": pid, "name": "python3", "cmdline": f"python3 -m x{pid}"}
                                   for pid in stopped], "pci": functions})


def test_edu_is_the_default_labs_only_pci_device_without_migration_state() -> None:
    """Found by its id; devices without an id are found by bus and slot."""
    assert stateless_pci_devices(load_lab("default"), PCI, WITH_STATE) == {"01:01.0": "edu"}
    spec = parse_lab('name = "x"\n[[device]]\ndriver = "edu"\naddr = "05.0"\n'
                     '[[device]]\ndriver = "edu"\nbus = "pcibr1"\naddr = "02.0"\n'
                     '[[device]]\ndriver = "pvpanic"\n')
    devices = [*PCI, {"bdf": "00:05.0", "qdev_id": ""}, {"bdf": "01:02.0", "qdev_id": ""}]
    assert stateless_pci_devices(spec, devices, WITH_STATE) == {"00:05.0": "edu", "01:02.0": "edu"}


def test_virtio_pci_proxies_carry_their_devices_state() -> None:
    assert has_migration_state("virtio-net-pci", WITH_STATE)
    assert has_migration_state("virtio-net-pci-non-transitional", WITH_STATE)
    assert not has_migration_state("virtio-blk-pci", WITH_STATE)
    assert not has_migration_state("edu", WITH_STATE)


def test_a_bound_device_without_migration_state_refuses_the_snapshot() -> None:
    """The reason names the device, where it is, its driver, and what to do."""
    stateless = {"01:01.0": "edu"}
    assert refusal(GuestView.parse(_report()), stateless) is None
    reason = refusal(GuestView.parse(_report("vfio-pci")), stateless)
    assert reason is not None
    assert "edu at 01:01.0 (bound to vfio-pci)" in reason and "jailhouse cell destroy" in reason


def test_a_restore_continues_the_kvm_users_stopped_for_the_save() -> None:
    assert GuestView.parse(_report(stopped=(231, 407))).resume_command() == "kill -CONT 231 407"
    assert GuestView.parse(_report()).resume_command() is None


def test_config_headers_go_back_with_the_command_register_last(tmp_path: Path) -> None:
    """Decoding goes on only once the BARs are back."""
    header = bytearray(64)
    header[0x10:0x14] = (0xFE800000).to_bytes(4, "little")
    header[0x04:0x06] = (0x0107).to_bytes(2, "little")
    header[0x3C] = 11
    report = json.loads(_report())
    report["pci"]["0000:01:01.0"]["config"] = header.hex()
    point = ResetPoint(Snapshot(tmp_path / "s", tmp_path / "i", 1), "10:00:00",
                       GuestView.parse(json.dumps(report)), {}, {})
    writes = point.config_writes("01:01.0")
    assert writes[0] == (0x10, 4, 0xFE800000)
    assert (0x3C, 1, 11) in writes and (0x30, 4, 0) in writes
    assert writes[-1] == (0x04, 2, 0x0107)
    assert [offset for offset, _, _ in writes[:6]] == [0x10, 0x14, 0x18, 0x1C, 0x20, 0x24]


def test_config_addresses_select_the_dword() -> None:
    """Configuration mechanism #1: enable bit, bus, device, function, dword offset."""
    assert config_address("01:01.0", 0x10) == 0x80010810
    assert config_address("00:1f.7", 0x3C) == 0x8000FF3C
    assert config_address("00:1f.7", 0x3E) == 0x8000FF3C


def test_a_report_that_is_not_json_is_a_clear_error() -> None:
    with pytest.raises(MachineError, match="jhlab-snapshot prepare"):
        GuestView.parse("Traceback (most recent call last): ...")


def test_a_refused_restore_says_a_vcpu_was_inside_a_nested_guest(tmp_path: Path) -> None:
    """QEMU's reason for refusing a migration stream is in its output (it exits at
    once); the error quotes it and, for a vCPU saved in SVM guest mode, says why."""
    kernel = Kernel("linux-image-6.1.0-99-amd64", "6.1.1-1", tmp_path / "kernel")
    images = ImageSet(kernel=kernel, initramfs=tmp_path / "initrd", rootfs=tmp_path / "root.img")
    machine = Machine(load_lab("default"), images, AccelChoice("tcg", "max", "t"), log_dir=tmp_path)
    (tmp_path / "qemu.log").write_text(
        "qemu-system-x86_64: terminating on signal 15 from pid 1\n"
        "qemu-system-x86_64: vCPU set in guest-mode inconsistent with migrated kernel nested state\n"
        "qemu-system-x86_64: error while loading state for instance 0x3 of device 'cpu'\n"
        "qemu-system-x86_64: load of migration failed: Invalid argument\n")
    machine.process = subprocess.Popen(["true"])
    text = machine._migration_error("restore")
    assert text.startswith("vCPU set in guest-mode inconsistent")
    assert "instance 0x3 of device 'cpu'" in text and "terminating" not in text
    assert "inside a nested guest" in text and "Lab.snapshot" in text


class _FinishingSave:
    """QMP as QEMU 7.2 answers a save to a file: the MIGRATION ``completed`` event comes
    while the run state is still ``finish-migrate`` (for ``finishing`` more queries), and
    until it leaves that state ``cont`` is refused.  Stands in for the moment that is
    only hit under load."""

    def __init__(self, finishing: int) -> None:
        self.finishing = finishing
        self.saved = False
        self.events = EventRecorder()
        self.commands: list[str] = []

    def status(self) -> str:
        if not self.saved:
            return "running"
        if self.finishing:
            self.finishing -= 1
            return "finish-migrate"
        return "postmigrate"

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        self.commands.append(command)
        if command == "migrate":
            Path(str((arguments or {})["uri"]).split("> ", 1)[1]).write_bytes(b"state")
            self.saved = True
            self.events.record("MIGRATION", {"status": "completed"}, 0.0)
        elif command == "cont" and self.saved and self.finishing:
            raise QmpError("cont failed: GenericError: Migration is not finalized yet")


def test_a_save_continues_the_guest_once_qemu_has_finished_it(tmp_path: Path) -> None:
    """After "completed", the guest is continued only when QEMU has left finish-migrate
    (a `cont` right after the event failed a session's reset point under load)."""
    kernel = Kernel("linux-image-6.1.0-99-amd64", "6.1.1-1", tmp_path / "kernel")
    images = ImageSet(kernel=kernel, initramfs=tmp_path / "initrd", rootfs=tmp_path / "root.img")
    machine = Machine(load_lab("default"), images, AccelChoice("tcg", "max", "t"), log_dir=tmp_path)
    qmp = _FinishingSave(finishing=3)
    machine.qmp = qmp  # type: ignore[assignment]
    machine.run_dir = tmp_path / "run"
    machine.run_dir.mkdir()
    (machine.run_dir / "initrd.img").write_bytes(b"initrd")
    machine.state = MachineState.RUNNING
    machine.process = subprocess.Popen(["sleep", "60"])
    try:
        snapshot = machine.save_snapshot(tmp_path / "snap")
    finally:
        machine.process.kill()
        machine.process.wait()
    assert snapshot.size == len(b"state")
    assert qmp.finishing == 0 and qmp.commands[-1] == "cont"
    assert qmp.commands.count("cont") == 1


def _guest_tool() -> ModuleType:
    path = Path(__file__).parents[2] / "images" / "guest" / "bin" / "jhlab-snapshot"
    loader = SourceFileLoader("jhlab_snapshot", str(path))
    module = ModuleType(loader.name)
    loader.exec_module(module)
    return module


def test_the_guest_tool_stops_kvm_users_until_continued(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``jhlab-snapshot prepare`` on a process of our own standing in for a KVM user: it
    returns once every thread of it is stopped, and reports it; SIGCONT continues it."""
    tool = _guest_tool()
    child = subprocess.Popen(["sleep", "60"])
    try:
        monkeypatch.setattr(tool, "kvm_users", lambda: [child.pid])
        monkeypatch.setattr(tool, "pci_functions", dict)
        assert tool.prepare(timeout=10) == 0
        view = GuestView.parse(capsys.readouterr().out)
        assert [user.pid for user in view.stopped] == [child.pid]
        assert set(tool.thread_states(child.pid).values()) <= {"T", "t"}
        subprocess.run(["sh", "-c", view.resume_command() or "false"], check=True)  # as in the root cell
        assert not set(tool.thread_states(child.pid).values()) & {"T", "t"}
    finally:
        child.kill()
        child.wait()
