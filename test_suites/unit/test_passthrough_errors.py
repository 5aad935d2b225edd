"""Error paths of the executor's PCI passthrough (:mod:`harness.hvmodel.arch.passthrough`);
the capability itself is tested in a real lab (``test_suites/e2e/test_passthrough.py``)."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest

from harness.hvmodel.arch import passthrough as passthrough_module
from harness.hvmodel.arch.executor.cells import CellTable
from harness.hvmodel.arch.executor.devices import DeviceAccess
from harness.hvmodel.arch.executor.memory import MmioWindows
from harness.hvmodel.arch.passthrough import PassedDevice, Passthrough
from harness.hvmodel.arch.vfio import Claim, MsiRouter, PciAddress, PciStub, VfioError
from harness.hvmodel.config import PciDevice
from harness.hvmodel.errors import Errno, HvError

EDU = PciAddress.parse("01:01.0")


class RecordingStub(PciStub):
    """A stub that claims and releases on paper only."""

    def __init__(self, fail_release: bool = False) -> None:
        super().__init__()
        self.released: list[tuple[PciAddress, bool]] = []
        self.fail_release = fail_release

    def claim(self, address: str | PciAddress) -> Claim:
        address = PciAddress.parse(address)
        claim = Claim(address, 3, None, None)
        self.claims[address] = claim
        return claim

    def release(self, address: str | PciAddress, *, rebind: bool = False) -> None:
        address = PciAddress.parse(address)
        if self.fail_release:
            raise VfioError(address.short, "release: /dev/vfio/3 is still open by pid 1 (x)")
        del self.claims[address]
        self.released.append((address, rebind))


def edu_device() -> PciDevice:
    return PciDevice(type=1, bdf=0x108, bar_mask=(0xFFF00000, 0, 0, 0, 0, 0), num_msi_vectors=1,
                     msi_64bits=True)


def test_a_failed_attach_gives_the_device_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the container cannot be opened, the claim is undone and nothing is kept."""
    def no_container() -> None:
        raise VfioError("container", "open /dev/vfio/vfio failed: ENOENT (is vfio loaded?)")

    monkeypatch.setattr(passthrough_module, "Container", no_container)
    stub = RecordingStub()
    passthrough = Passthrough(stub, rebind=True)
    with pytest.raises(HvError, match="is vfio loaded"):
        passthrough.attach(1, object(), edu_device())  # type: ignore[arg-type]
    assert stub.released == [(EDU, True)]
    assert passthrough.device(0x108) is None and passthrough.devices_of(1) == []
    assert not passthrough.has_domain(1)


def test_a_failed_release_is_logged_and_the_rest_go_on(caplog: pytest.LogCaptureFixture) -> None:
    """Releases after an operation never raise: a refused one is logged with its cause."""
    stub = RecordingStub(fail_release=True)
    passthrough = Passthrough(stub)
    stub.claim(EDU)
    passthrough._detached.append(EDU)
    with caplog.at_level(logging.ERROR):
        passthrough.release_detached()
    assert "01:01.0: release: /dev/vfio/3 is still open" in caplog.text
    assert passthrough._detached == []


def test_detaching_an_unknown_device_does_nothing() -> None:
    stub = RecordingStub()
    passthrough = Passthrough(stub)
    passthrough.detach(0x108)
    passthrough.release_detached()
    assert stub.released == []


def test_a_configured_device_the_machine_lacks_is_added_without_passthrough(
    tmp_path: Path,
) -> None:
    """As Jailhouse's hypervisor adds an absent device without looking and its driver skips
    it (e1000-demo.cell's NIC at 00:19.0 on the QEMU machine): no VFIO claim, the cell
    owns it, its config space reads all ones; a present device is passed through."""
    (tmp_path / "bus" / "pci" / "devices" / "0000:01:01.0").mkdir(parents=True)
    stub = RecordingStub()
    stub.sysfs = str(tmp_path)
    attached: list[int] = []

    class CountingPassthrough(Passthrough):
        def attach(self, cell_id: int, router: MsiRouter, info: PciDevice) -> PassedDevice:
            attached.append(info.bdf)
            raise HvError(Errno.EIO, "stop here: attach was called")

    table = CellTable()
    table.cells[1] = types.SimpleNamespace(router=object())  # type: ignore[assignment]
    devices = DeviceAccess(
        table, MmioWindows("/dev/null"), None, CountingPassthrough(stub),  # type: ignore[arg-type]
        pci_sysfs=str(tmp_path / "bus" / "pci" / "devices"), pci_domain=lambda: 0)
    nic = PciDevice(type=1, bdf=0xC8, bar_mask=(0xFFFE0000, 0, 0, 0, 0, 0))  # 00:19.0
    devices.pci_add_device(1, nic, root=False)
    assert attached == []
    assert devices.pci_read_config(0xC8, 0, 4) == 0xFFFFFFFF
    assert devices.pci_read_config(0xC8, 0x10, 2) == 0xFFFF
    devices.pci_remove_device(1, nic, root=False)
    with pytest.raises(HvError, match="attach was called"):
        devices.pci_add_device(1, edu_device(), root=False)
    assert attached == [0x108]
