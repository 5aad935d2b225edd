"""The Linux driver's checks (reference §6.2), in order, with the ioctl's errno."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

import pytest
from test_model_configs import apic_demo, ivshmem_demo, qemu_x86, tiny_demo

from harness.hvmodel.abi import CellState
from harness.hvmodel.arch.oracle import OracleArch
from harness.hvmodel.config import MemoryRegion
from harness.hvmodel.driver import Driver, HostInfo, Image
from harness.hvmodel.errors import Errno, HvError


def patched(data: bytes, offset: int, fmt: str, value: int | bytes) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


SYSTEM = qemu_x86().to_bytes()


def enabled(host: HostInfo | None = None) -> Driver:
    driver = Driver(OracleArch(), host)
    driver.enable(SYSTEM)
    return driver


def system_with(**fields: object) -> bytes:
    return dataclasses.replace(qemu_x86(), **fields).to_bytes()  # type: ignore[arg-type]


EnableCase = tuple[str, HostInfo, bytes, Errno]
ENABLE_CASES: list[EnableCase] = [
    ("no VMX or SVM", HostInfo(cpu_vendor=""), SYSTEM, Errno.ENODEV),
    ("not a system config", HostInfo(), tiny_demo().to_bytes(), Errno.EINVAL),
    ("short", HostInfo(), SYSTEM[:100], Errno.EINVAL),
    ("revision", HostInfo(), patched(SYSTEM, 6, "<H", 13), Errno.EINVAL),
    ("architecture", HostInfo(), patched(SYSTEM, 5, "<B", 1), Errno.EINVAL),
    ("empty root CPU set", HostInfo(), patched(SYSTEM, 488, "<Q", 0), Errno.EINVAL),
    ("VT-x disabled by BIOS", HostInfo(vmx_allowed=False), SYSTEM, Errno.ENODEV),
    ("missing firmware", HostInfo(firmware=False), SYSTEM, Errno.ENOENT),
    (
        "hypervisor memory too small",
        HostInfo(),
        system_with(hypervisor_memory=MemoryRegion(phys_start=0x3A000000, size=0x40000)),
        Errno.EINVAL,
    ),
    ("memory not reserved", HostInfo(reserved=((0x30000000, 0x1000000),)), SYSTEM, Errno.EINVAL),
    ("online CPUs beyond the root set", HostInfo(online_cpus=frozenset({0, 1, 2, 3, 4})),
     SYSTEM, Errno.EINVAL),
    ("online CPUs fewer than the root set", HostInfo(online_cpus=frozenset({0, 1, 2})),
     SYSTEM, Errno.EINVAL),
]


@pytest.mark.parametrize(
    ("host", "data", "errno"), [c[1:] for c in ENABLE_CASES], ids=[c[0] for c in ENABLE_CASES]
)
def test_enable_checks(host: HostInfo, data: bytes, errno: Errno) -> None:
    """``jailhouse enable`` fails with the driver's (or the hypervisor's) errno."""
    driver = Driver(OracleArch(), host)
    with pytest.raises(HvError) as info:
        driver.enable(data)
    assert info.value.errno == errno
    assert not driver.enabled


def test_enable_twice_is_busy_and_reserved_memory_is_accepted() -> None:
    """A second enable gives EBUSY; a memmap= reservation covering the hypervisor works."""
    driver = enabled(HostInfo(reserved=((0x3A000000, 82 << 20),)))
    with pytest.raises(HvError) as info:
        driver.enable(SYSTEM)
    assert info.value.errno == Errno.EBUSY
    assert driver.kernel_log == ["The Jailhouse is opening."]


def test_enable_fills_in_timer_frequencies() -> None:
    """tsc_khz/apic_khz of 0 are taken from Linux and reach the comm region."""
    driver = enabled(HostInfo(tsc_khz=2_500_000, apic_khz=1_000_000))
    assert driver.system is not None
    assert (driver.system.x86.tsc_khz, driver.system.x86.apic_khz) == (2_500_000, 1_000_000)
    driver.cell_create(tiny_demo().to_bytes())
    driver.cell_load(1, [Image(b"\xf4", 0)])
    driver.cell_start(1)
    cell = driver.hv.cell_by_id(1)  # type: ignore[union-attr]
    assert cell is not None
    assert struct.unpack_from("<II", cell.comm_page, 68) == (2_500_000, 1_000_000)


CELL = tiny_demo().to_bytes()

CreateCase = tuple[str, Callable[[Driver], object], Errno]
CREATE_CASES: list[CreateCase] = [
    ("short config", lambda d: d.cell_create(CELL[:100]), Errno.EINVAL),
    ("system config as cell", lambda d: d.cell_create(SYSTEM), Errno.EINVAL),
    ("revision", lambda d: d.cell_create(patched(CELL, 6, "<H", 12)), Errno.EINVAL),
    ("name taken", lambda d: (d.cell_create(CELL), d.cell_create(CELL)), Errno.EEXIST),
    ("root name", lambda d: d.cell_create(
        dataclasses.replace(tiny_demo(), name="QEMU-VM").to_bytes()), Errno.EEXIST),
    ("CPUs outside the root", lambda d: (d.cell_create(CELL), d.cell_create(
        dataclasses.replace(apic_demo(), cpu_set=b"\x0c" + bytes(7)).to_bytes())), Errno.EBUSY),
    ("CPU beyond the machine", lambda d: d.cell_create(
        dataclasses.replace(tiny_demo(), cpu_set=b"\x10" + bytes(7)).to_bytes()), Errno.EBUSY),
    ("CPU 0", lambda d: d.cell_create(
        dataclasses.replace(tiny_demo(), cpu_set=b"\x03" + bytes(7)).to_bytes()), Errno.EINVAL),
    ("hypervisor refuses (ivshmem id taken)", lambda d: d.cell_create(
        dataclasses.replace(
            ivshmem_demo(),
            pci_devices=(dataclasses.replace(ivshmem_demo().pci_devices[0], shmem_dev_id=0),),
        ).to_bytes()), Errno.EBUSY),
]


@pytest.mark.parametrize(
    ("action", "errno"), [c[1:] for c in CREATE_CASES], ids=[c[0] for c in CREATE_CASES]
)
def test_cell_create_checks(action: Callable[[Driver], object], errno: Errno) -> None:
    """``jailhouse cell create`` fails with the right errno and leaves the root whole."""
    driver = enabled()
    with pytest.raises(HvError) as info:
        action(driver)
    assert info.value.errno == errno
    hv = driver.hv
    assert hv is not None
    assert driver.root.cpus_assigned == hv.root.cpus == driver.online


def test_cell_create_before_enable() -> None:
    """Not enabled: EINVAL (after the config checks)."""
    driver = Driver(OracleArch())
    with pytest.raises(HvError) as info:
        driver.cell_create(CELL)
    assert info.value.errno == Errno.EINVAL


def test_cell_create_architecture_mismatch_returns_0_without_a_cell() -> None:
    """Jailhouse's quirk: the error is printed but the ioctl returns 0."""
    driver = enabled()
    assert driver.cell_create(patched(CELL, 5, "<B", 2)) is None
    assert Driver.ioctl_result(lambda: driver.cell_create(patched(CELL, 5, "<B", 2))) == 0
    assert sorted(driver.cells) == [0]


def test_cell_create_takes_cpus_offline_and_destroy_brings_them_back() -> None:
    """The driver offlines the cell's CPUs; destroy returns them; ids are lowest free."""
    driver = enabled()
    assert driver.cell_create(ivshmem_demo().to_bytes()) == 1
    assert driver.cell_create(apic_demo().to_bytes()) == 2
    assert driver.online == {0, 2}
    driver.cell_destroy("ivshmem-demo")
    assert driver.online == {0, 1, 2}
    assert driver.cell_create(tiny_demo().to_bytes()) == 1
    assert driver.kernel_log[-1] == 'Created Jailhouse cell "tiny-demo"'


def test_pci_devices_claimed_and_released() -> None:
    """DEVICE entries are bound to the stub on create, released on destroy."""
    from test_model_configs import pci_demo

    driver = enabled()
    driver.cell_create(pci_demo().to_bytes())
    assert driver.claimed == {0x00D8}
    assert "claimed for use in non-root cell" in driver.kernel_log[-2]
    driver.cell_destroy("pci-demo")
    assert driver.claimed == set()
    assert driver.kernel_log[-1] == 'Destroyed Jailhouse cell "pci-demo"'


def test_a_device_linux_lacks_is_not_claimed() -> None:
    """jailhouse_pci_claim_release finds no Linux device for a configured BDF the machine
    lacks (e1000-demo.cell's 00:19.0 on QEMU) and does nothing: no claim, no log line."""
    from test_model_configs import pci_demo

    driver = enabled(HostInfo(pci_devices=frozenset({(0, 0x0008)})))
    driver.cell_create(pci_demo().to_bytes())
    assert driver.claimed == set()
    assert not any("claimed for use" in line for line in driver.kernel_log)
    assert driver.kernel_log[-1] == 'Created Jailhouse cell "pci-demo"'


LoadCase = tuple[str, list[Image], Errno]
LOAD_CASES: list[LoadCase] = [
    ("outside every region", [Image(b"x", 0x200000)], Errno.EINVAL),
    ("does not fit", [Image(b"x" * 0x100001, 0)], Errno.EINVAL),
    ("runs past the region end", [Image(b"xx", 0xFFFFF)], Errno.EINVAL),
    ("comm region is not loadable", [Image(b"x", 0x100000)], Errno.EINVAL),
]


@pytest.mark.parametrize(
    ("images", "errno"), [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES]
)
def test_cell_load_checks(images: list[Image], errno: Errno) -> None:
    """Images must land in one WRITE|LOADABLE region and fit."""
    driver = enabled()
    driver.cell_create(CELL)
    with pytest.raises(HvError) as info:
        driver.cell_load("tiny-demo", images)
    assert info.value.errno == errno


def test_cell_load_writes_the_image_at_the_region() -> None:
    """The image lands at phys_start + (target - virt_start), the string at 0x1000."""
    driver = enabled()
    arch = driver.arch
    assert isinstance(arch, OracleArch)
    driver.cell_create(CELL)
    driver.cell_load("tiny-demo", [Image(b"\xfa\xf4", 0), Image(b"con-base=0x2f8\0", 0x1000)])
    assert arch.phys_read(0x3EE00000, 2) == b"\xfa\xf4"
    assert arch.phys_read(0x3EE01000, 15) == b"con-base=0x2f8\0"


@pytest.mark.parametrize("command", ["cell_load", "cell_start", "cell_destroy", "cell_shutdown"])
def test_unknown_cell_is_enoent(command: str) -> None:
    """Commands on an unknown id or name give ENOENT."""
    driver = enabled()
    for ref in (5, "nope"):
        with pytest.raises(HvError) as info:
            getattr(driver, command)(ref)
        assert info.value.errno == Errno.ENOENT


def test_root_cell_cannot_be_managed() -> None:
    """Start or destroy of the root by name reaches the hypervisor and fails with EINVAL."""
    driver = enabled()
    for command in (driver.cell_start, driver.cell_destroy, driver.cell_shutdown):
        with pytest.raises(HvError) as info:
            command("QEMU-VM")
        assert info.value.errno == Errno.EINVAL


def test_disable_checks() -> None:
    """Not enabled: EINVAL; with cells: they are destroyed first; afterwards disabled."""
    driver = Driver(OracleArch())
    with pytest.raises(HvError) as info:
        driver.disable()
    assert info.value.errno == Errno.EINVAL
    driver.enable(SYSTEM)
    driver.cell_create(CELL)
    driver.disable()
    assert not driver.enabled and driver.online == {0, 1, 2, 3}
    assert driver.kernel_log[-2:] == ['Destroyed Jailhouse cell "tiny-demo"',
                                      "The Jailhouse was closed."]
    driver.enable(SYSTEM)
    assert driver.enabled


def test_disable_busy_when_cpus_are_offline() -> None:
    """Root CPUs taken offline outside the driver make disable fail with EBUSY."""
    driver = enabled()
    driver.online.discard(3)
    with pytest.raises(HvError) as info:
        driver.disable()
    assert info.value.errno == Errno.EBUSY


def test_ioctl_result_is_negative_errno() -> None:
    """The ioctl boundary turns HvError into the negative code."""
    driver = enabled()
    assert Driver.ioctl_result(lambda: driver.cell_start(9)) == -Errno.ENOENT
    assert Driver.ioctl_result(lambda: driver.cell_create(CELL)) == 0


def test_state_of_a_failed_comm_rev_cell() -> None:
    """An inmate's FAILED_COMM_REV reaches sysfs as 'Comm ABI mismatch'."""
    from harness.hvmodel.sysfs import sysfs_tree

    driver = enabled()
    driver.cell_create(CELL)
    driver.cell_load(1, [Image(b"\xf4", 0)])
    driver.cell_start(1)
    hv = driver.hv
    assert hv is not None
    hv.handle_mmio(2, 0x100008, 4, True, CellState.FAILED_COMM_REV)
    assert sysfs_tree(driver)["cells/1/state"] == "Comm ABI mismatch\n"
    hv.handle_mmio(2, 0x100008, 4, True, 77)
    assert sysfs_tree(driver)["cells/1/state"] == "invalid\n"


