"""The VFIO binding's ABI, and its parts that need no VFIO: ``arch/vfio`` offline.

The reference values come from the kernel's own headers: a C program including
``<linux/vfio.h>`` prints ``sizeof``/``offsetof`` and the macros, compiled at test time
(gcc and ``linux-libc-dev`` needed; only those tests skip without them). Request numbers
and sizes are also checked against literal values, independent of this machine.

The rest runs anywhere: PCI address parsing, the IOMMU group policy and its message, the
stub driver's claim/release sequence against a simulated sysfs, capability-chain parsing,
eventfds, and the default KVM routes the MSI router keeps.
"""

from __future__ import annotations

import ctypes
import enum
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from cheaders import header_values

from harness.hvmodel.arch import vfio
from harness.hvmodel.arch.kvm import IrqchipRoute
from harness.hvmodel.arch.vfio import ioctl as vfio_ioctl
from harness.hvmodel.arch.vfio import structs
from harness.hvmodel.errors import Errno, HvError

# (ctypes class, C type, renames of Python field names to C member paths)
STRUCTS: list[tuple[type[ctypes.Structure], str, dict[str, str]]] = [
    (structs.VfioInfoCapHeader, "struct vfio_info_cap_header", {}),
    (structs.VfioGroupStatus, "struct vfio_group_status", {}),
    (structs.VfioDeviceInfo, "struct vfio_device_info", {}),
    (structs.VfioRegionInfo, "struct vfio_region_info", {}),
    (structs.VfioRegionSparseMmapArea, "struct vfio_region_sparse_mmap_area", {}),
    (structs.VfioRegionInfoCapSparseMmap, "struct vfio_region_info_cap_sparse_mmap", {}),
    (structs.VfioRegionInfoCapType, "struct vfio_region_info_cap_type", {}),
    (structs.VfioIrqInfo, "struct vfio_irq_info", {}),
    (structs.VfioIrqSet, "struct vfio_irq_set", {}),
    (structs.VfioPciDependentDevice, "struct vfio_pci_dependent_device", {}),
    (structs.VfioPciHotResetInfo, "struct vfio_pci_hot_reset_info", {}),
    (structs.VfioPciHotReset, "struct vfio_pci_hot_reset", {}),
    (structs.VfioIommuType1Info, "struct vfio_iommu_type1_info", {}),
    (structs.VfioIovaRange, "struct vfio_iova_range", {}),
    (structs.VfioIommuType1InfoCapIovaRange, "struct vfio_iommu_type1_info_cap_iova_range", {}),
    (structs.VfioIommuType1InfoDmaAvail, "struct vfio_iommu_type1_info_dma_avail", {}),
    (structs.VfioIommuType1DmaMap, "struct vfio_iommu_type1_dma_map", {}),
    (structs.VfioIommuType1DmaUnmap, "struct vfio_iommu_type1_dma_unmap", {}),
]

# Flexible array members: the binding puts them right after the ctypes header.
FLEXIBLE = [
    (structs.VfioIrqSet, "struct vfio_irq_set", "data"),
    (structs.VfioRegionInfoCapSparseMmap, "struct vfio_region_info_cap_sparse_mmap", "areas"),
    (structs.VfioIommuType1InfoCapIovaRange, "struct vfio_iommu_type1_info_cap_iova_range", "iova_ranges"),
    (structs.VfioPciHotResetInfo, "struct vfio_pci_hot_reset_info", "devices"),
    (structs.VfioPciHotReset, "struct vfio_pci_hot_reset", "group_fds"),
    (structs.VfioIommuType1DmaUnmap, "struct vfio_iommu_type1_dma_unmap", "data"),
]

KNOWN_SIZES = {
    structs.VfioInfoCapHeader: 8,
    structs.VfioGroupStatus: 8,
    structs.VfioDeviceInfo: 20,
    structs.VfioRegionInfo: 32,
    structs.VfioRegionSparseMmapArea: 16,
    structs.VfioRegionInfoCapSparseMmap: 16,
    structs.VfioIrqInfo: 16,
    structs.VfioIrqSet: 20,
    structs.VfioIommuType1Info: 24,
    structs.VfioIommuType1DmaMap: 32,
    structs.VfioIommuType1DmaUnmap: 24,
}

# _IO(';', 100 + n) = 0x3b00 | (100 + n), as every VFIO user (QEMU, crosvm, DPDK) hardcodes
KNOWN_IOCTLS = {
    "VFIO_GET_API_VERSION": 0x3B64,
    "VFIO_CHECK_EXTENSION": 0x3B65,
    "VFIO_SET_IOMMU": 0x3B66,
    "VFIO_GROUP_GET_STATUS": 0x3B67,
    "VFIO_GROUP_SET_CONTAINER": 0x3B68,
    "VFIO_GROUP_GET_DEVICE_FD": 0x3B6A,
    "VFIO_DEVICE_GET_INFO": 0x3B6B,
    "VFIO_DEVICE_GET_REGION_INFO": 0x3B6C,
    "VFIO_DEVICE_GET_IRQ_INFO": 0x3B6D,
    "VFIO_DEVICE_SET_IRQS": 0x3B6E,
    "VFIO_DEVICE_RESET": 0x3B6F,
    "VFIO_IOMMU_GET_INFO": 0x3B70,
    "VFIO_IOMMU_MAP_DMA": 0x3B71,
    "VFIO_IOMMU_UNMAP_DMA": 0x3B72,
}


def _fields(
    struct_type: type[ctypes.Structure | ctypes.Union], c_prefix: str, renames: dict[str, str]
) -> Iterator[tuple[str, int, int]]:
    """(C member path, offset, size) of every field, nested ones included."""
    for name, field_type, *_ in struct_type._fields_:
        descriptor = getattr(struct_type, name)
        c_path = ".".join(part for part in (c_prefix, renames.get(name, name)) if part)
        yield c_path, descriptor.offset, descriptor.size
        if isinstance(field_type, type) and issubclass(field_type, (ctypes.Structure, ctypes.Union)):
            for sub_c, offset, size in _fields(field_type, c_path, {}):
                yield sub_c, descriptor.offset + offset, size


def _expected_layout() -> dict[str, int]:
    expected: dict[str, int] = {}
    for struct_type, c_type, renames in STRUCTS:
        expected[f"sizeof({c_type})"] = ctypes.sizeof(struct_type)
        for c_path, offset, size in _fields(struct_type, "", renames):
            expected[f"offsetof({c_type}, {c_path})"] = offset
            expected[f"sizeof((({c_type} *)0)->{c_path})"] = size
    for struct_type, c_type, member in FLEXIBLE:
        expected[f"offsetof({c_type}, {member})"] = ctypes.sizeof(struct_type)
    return expected


IOMMU_CAP_NAMES = {
    structs.IommuCap.IOVA_RANGE: "VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE",
    structs.IommuCap.MIGRATION: "VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION",
    structs.IommuCap.DMA_AVAIL: "VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL",
}


def _expected_constants() -> dict[str, int]:
    constants: dict[str, int] = dict(structs.IOCTLS)
    prefixes: list[tuple[type[enum.Enum], str, str]] = [
        (structs.Extension, "VFIO_", ""),
        (structs.GroupFlags, "VFIO_GROUP_FLAGS_", ""),
        (structs.DeviceFlags, "VFIO_DEVICE_FLAGS_", ""),
        (structs.RegionFlags, "VFIO_REGION_INFO_FLAG_", ""),
        (structs.RegionCap, "VFIO_REGION_INFO_CAP_", ""),
        (structs.IrqInfoFlags, "VFIO_IRQ_INFO_", ""),
        (structs.IrqSetFlags, "VFIO_IRQ_SET_", ""),
        (structs.PciRegion, "VFIO_PCI_", "_REGION_INDEX"),
        (structs.PciIrq, "VFIO_PCI_", "_IRQ_INDEX"),
        (structs.IommuInfoFlags, "VFIO_IOMMU_INFO_", ""),
    ]
    for enum_type, prefix, suffix in prefixes:
        for member in enum_type:
            constants[f"{prefix}{member.name}{suffix}"] = int(member.value)
    constants.update({name: int(cap) for cap, name in IOMMU_CAP_NAMES.items()})
    for name in (
        "VFIO_API_VERSION",
        "VFIO_TYPE",
        "VFIO_BASE",
        "VFIO_PCI_NUM_REGIONS",
        "VFIO_PCI_NUM_IRQS",
        "VFIO_DMA_MAP_FLAG_READ",
        "VFIO_DMA_MAP_FLAG_WRITE",
        "VFIO_DMA_MAP_FLAG_VADDR",
        "VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP",
        "VFIO_DMA_UNMAP_FLAG_ALL",
        "VFIO_DMA_UNMAP_FLAG_VADDR",
    ):
        constants[name] = getattr(structs, name)
    return constants


def _c_program(layout: dict[str, int], constants: dict[str, int]) -> str:
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <linux/vfio.h>", "int main(void) {"]
    for expr in [*layout, *constants]:
        lines.append(f'    printf("%s=%llu\\n", "{expr}", (unsigned long long)({expr}));')
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """What the kernel headers say, from a C program compiled now."""
    return header_values("linux/vfio.h", _c_program(_expected_layout(), _expected_constants()),
                         tmp_path_factory.mktemp("vfio_abi"))


def test_struct_layouts_match_kernel_headers(kernel_values: dict[str, int]) -> None:
    """Every struct size, field offset and field size, and where each flexible array
    starts, equals what gcc computes from <linux/vfio.h>."""
    expected = _expected_layout()
    mismatches = {
        expr: (value, kernel_values.get(expr))
        for expr, value in expected.items()
        if kernel_values.get(expr) != value
    }
    assert not mismatches, f"ctypes vs <linux/vfio.h> (ours, kernel's): {mismatches}"
    assert len(expected) > 150


def test_constants_match_kernel_headers(kernel_values: dict[str, int]) -> None:
    """ioctl numbers, flags, capability ids and the vfio-pci indexes equal the header's."""
    expected = _expected_constants()
    mismatches = {
        name: (value, kernel_values.get(name))
        for name, value in expected.items()
        if kernel_values.get(name) != value
    }
    assert not mismatches, f"ours vs <linux/vfio.h>: {mismatches}"
    assert set(structs.IOCTLS) <= set(kernel_values)
    assert len(structs.IOCTLS) == 17


@pytest.mark.parametrize(("struct_type", "size"), list(KNOWN_SIZES.items()))
def test_struct_sizes_known_values(struct_type: type[ctypes.Structure], size: int) -> None:
    """Sizes the kernel ABI fixes, independent of any compiler on this machine."""
    assert ctypes.sizeof(struct_type) == size


@pytest.mark.parametrize(("name", "number"), list(KNOWN_IOCTLS.items()))
def test_ioctl_numbers_known_values(name: str, number: int) -> None:
    """Request numbers as every VFIO user writes them, independent of the headers here."""
    assert getattr(structs, name) == number
    assert structs.IOCTLS[name] == number


# ---------------------------------------------------------------------------------------
# PCI addresses and the IOMMU group policy
# ---------------------------------------------------------------------------------------


def test_pci_address_forms() -> None:
    """sysfs names, Jailhouse's short form and 16-bit BDFs all meet in PciAddress."""
    edu = vfio.PciAddress.parse("00:05.0")
    assert edu == vfio.PciAddress.parse("0000:00:05.0") == vfio.PciAddress.from_bdf(0x28)
    assert str(edu) == "0000:00:05.0"
    assert edu.short == "00:05.0"
    assert edu.bdf == 0x28
    assert vfio.PciAddress.parse("0001:02:1f.7").short == "0001:02:1f.7"
    for bad in ("00:05", "zz:05.0", "00:20.0", "00:05.8"):
        with pytest.raises(ValueError):
            vfio.PciAddress.parse(bad)


def _ich9() -> dict[vfio.PciAddress, str | None]:
    names = {"00:1f.0": None, "00:1f.2": "ahci", "00:1f.3": "i801_smbus"}
    return {vfio.PciAddress.parse(name): driver for name, driver in names.items()}


def test_group_policy_names_the_group_and_the_blockers() -> None:
    """A device sharing its group with a bound device is refused, clearly."""
    with pytest.raises(vfio.VfioError) as caught:
        vfio.group_policy(vfio.PciAddress.parse("00:1f.2"), 7, _ich9())
    error = caught.value
    assert isinstance(error, HvError)
    assert error.errno is Errno.EBUSY
    assert str(error) == (
        "00:1f.2: not in its own IOMMU group (group 7 also holds 00:1f.0, 00:1f.3 (i801_smbus)): "
        "cannot pass it through; claim the whole group together or unbind 00:1f.3 first"
    )


def test_group_policy_accepts_a_fully_claimed_group() -> None:
    """Alone, claimed together, or with unbound/VFIO/bridge peers: allowed."""
    edu = vfio.PciAddress.parse("00:05.0")
    vfio.group_policy(edu, 5, {edu: None})
    vfio.group_policy(edu, 5, {edu: "e1000e"})  # the device's own driver is unbound by the claim
    members = _ich9()
    vfio.group_policy(vfio.PciAddress.parse("00:1f.2"), 7, members, claiming=list(members))
    peers = {
        vfio.PciAddress.parse("00:1f.2"): "ahci",
        vfio.PciAddress.parse("00:1f.3"): "vfio-pci",
        vfio.PciAddress.parse("00:1c.0"): "pcieport",
        vfio.PciAddress.parse("00:1f.0"): None,
    }
    vfio.group_policy(vfio.PciAddress.parse("00:1f.2"), 7, peers)


# ---------------------------------------------------------------------------------------
# The stub driver against a simulated sysfs
# ---------------------------------------------------------------------------------------


class FakeSysfs:
    """A sysfs tree whose writes behave like the kernel's PCI driver core."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sys = root / "sys"
        self.dev_vfio = root / "dev" / "vfio"
        self.proc = root / "proc"
        self.dev_vfio.mkdir(parents=True)
        self.proc.mkdir()
        for driver in ("vfio-pci", "e1000e", "ahci", "i801_smbus"):
            (self.sys / "bus" / "pci" / "drivers" / driver).mkdir(parents=True)
        self.writes: list[tuple[str, str]] = []

    def add(self, name: str, group: int, driver: str | None) -> None:
        device = self.sys / "bus" / "pci" / "devices" / name
        device.mkdir(parents=True)
        (device / "driver_override").write_text("(null)\n")
        group_dir = self.sys / "kernel" / "iommu_groups" / str(group)
        (group_dir / "devices").mkdir(parents=True, exist_ok=True)
        (group_dir / "devices" / name).symlink_to(device)
        (device / "iommu_group").symlink_to(group_dir)
        if driver:
            self.bind(name, driver)

    def bind(self, name: str, driver: str) -> None:
        (self.sys / "bus" / "pci" / "devices" / name / "driver").symlink_to(
            self.sys / "bus" / "pci" / "drivers" / driver
        )
        if driver == "vfio-pci":
            group = os.path.basename(os.readlink(self.sys / "bus" / "pci" / "devices" / name / "iommu_group"))
            (self.dev_vfio / group).touch()

    def unbind(self, name: str) -> None:
        link = self.sys / "bus" / "pci" / "devices" / name / "driver"
        if link.is_symlink():
            link.unlink()

    def write(self, address: vfio.PciAddress, path: str, value: str, step: str) -> None:
        """Stands in for PciStub._write: the driver core's reaction to each file."""
        rel = os.path.relpath(path, self.sys)
        self.writes.append((rel, value.strip()))
        name = value.strip()
        if rel.endswith("driver_override"):
            Path(path).write_text((value.strip() or "(null)") + "\n")
        elif rel.endswith("/unbind"):
            self.unbind(name)
        elif rel == "bus/pci/drivers_probe":
            override = (self.sys / "bus" / "pci" / "devices" / name / "driver_override").read_text().strip()
            if override != "(null)":
                self.bind(name, override)
        elif rel.endswith("/bind"):
            self.bind(name, rel.split("/")[-2])
        else:
            raise AssertionError(f"unexpected write {rel}")

    def stub(self, monkeypatch: pytest.MonkeyPatch) -> vfio.PciStub:
        stub = vfio.PciStub(
            sysfs=str(self.sys), dev_vfio=str(self.dev_vfio), proc=str(self.proc), timeout=0.5
        )
        monkeypatch.setattr(stub, "_write", self.write)
        return stub


@pytest.fixture
def fake(tmp_path: Path) -> FakeSysfs:
    sysfs = FakeSysfs(tmp_path)
    sysfs.add("0000:00:02.0", 2, "e1000e")
    sysfs.add("0000:00:05.0", 5, None)
    sysfs.add("0000:00:1f.0", 7, None)
    sysfs.add("0000:00:1f.2", 7, "ahci")
    sysfs.add("0000:00:1f.3", 7, "i801_smbus")
    return sysfs


def test_claim_and_release_without_rebind(fake: FakeSysfs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claim: override, unbind, probe; release: unbind, override cleared, left unbound."""
    stub = fake.stub(monkeypatch)
    claim = stub.claim("00:02.0")
    assert claim == vfio.Claim(vfio.PciAddress.parse("00:02.0"), 2, "e1000e", None)
    assert stub.driver_of("00:02.0") == "vfio-pci"
    assert stub.override_of("00:02.0") == "vfio-pci"
    assert fake.writes == [
        ("bus/pci/devices/0000:00:02.0/driver_override", "vfio-pci"),
        ("bus/pci/devices/0000:00:02.0/driver/unbind", "0000:00:02.0"),
        ("bus/pci/drivers_probe", "0000:00:02.0"),
    ]
    assert stub.claim("0000:00:02.0") is claim  # idempotent
    stub.release("00:02.0")
    assert stub.driver_of("00:02.0") is None  # Jailhouse's behaviour: left unbound
    assert stub.override_of("00:02.0") is None
    assert not stub.claims


def test_release_with_rebind(fake: FakeSysfs, monkeypatch: pytest.MonkeyPatch) -> None:
    """rebind=True gives the device back to its original driver."""
    stub = fake.stub(monkeypatch)
    stub.claim("00:02.0")
    stub.release("00:02.0", rebind=True)
    assert stub.driver_of("00:02.0") == "e1000e"
    assert fake.writes[-1] == ("bus/pci/drivers/e1000e/bind", "0000:00:02.0")


def test_claim_refuses_a_shared_group_and_touches_nothing(
    fake: FakeSysfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """00:1f.2 shares group 7: refused before any write; claim_all of the group works."""
    stub = fake.stub(monkeypatch)
    with pytest.raises(vfio.VfioError, match=r"^00:1f.2: not in its own IOMMU group \(group 7 also holds"):
        stub.claim("00:1f.2")
    assert fake.writes == []
    claims = stub.claim_all(["00:1f.0", "00:1f.2", "00:1f.3"])
    assert [c.original_driver for c in claims] == [None, "ahci", "i801_smbus"]
    stub.release_all(rebind=True)
    assert [stub.driver_of(f"00:1f.{f}") for f in (0, 2, 3)] == [None, "ahci", "i801_smbus"]


def test_release_refuses_while_the_group_is_open(fake: FakeSysfs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unbinding an open VFIO device blocks in the kernel: the stub says who holds it."""
    stub = fake.stub(monkeypatch)
    claim = stub.claim("00:05.0")
    fd_dir = fake.proc / "4242" / "fd"
    fd_dir.mkdir(parents=True)
    (fake.proc / "4242" / "comm").write_text("python3\n")
    (fd_dir / "7").symlink_to(fake.dev_vfio / str(claim.group))
    with pytest.raises(vfio.VfioError) as caught:
        stub.release("00:05.0")
    assert str(caught.value) == (
        f"00:05.0: release: {claim.group_path} is still open by pid 4242 (python3): "
        "close the VFIO device and group first"
    )
    assert caught.value.errno is Errno.EBUSY
    assert stub.driver_of("00:05.0") == "vfio-pci"


def test_claim_errors_name_device_and_step(fake: FakeSysfs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unknown devices, missing groups and failed binds are reported with the step."""
    stub = fake.stub(monkeypatch)
    with pytest.raises(vfio.VfioError, match=r"^00:09.0: no such PCI device"):
        stub.claim("00:09.0")
    (fake.sys / "bus" / "pci" / "devices" / "0000:00:05.0" / "iommu_group").unlink()
    with pytest.raises(vfio.VfioError, match=r"^00:05.0: has no IOMMU group"):
        stub.claim("00:05.0")
    with pytest.raises(vfio.VfioError, match=r"^00:02.0: release: not claimed"):
        stub.release("00:02.0")

    def no_probe(address: vfio.PciAddress, path: str, value: str, step: str) -> None:
        if path.endswith("drivers_probe"):
            return  # the kernel found no match: nothing bound
        fake.write(address, path, value, step)

    monkeypatch.setattr(stub, "_write", no_probe)
    with pytest.raises(vfio.VfioError, match=r"^00:02.0: bind vfio-pci failed: driver is now none"):
        stub.claim("00:02.0")
    assert stub.driver_of("00:02.0") == "e1000e"  # undone: original driver back
    assert stub.override_of("00:02.0") is None


# ---------------------------------------------------------------------------------------
# Buffers, eventfds and routes
# ---------------------------------------------------------------------------------------


def test_capability_chain_walk() -> None:
    """Caps are found by following ``next`` offsets; a loop ends the walk."""
    buf = bytearray(64)
    struct.pack_into("=HHI", buf, 32, structs.RegionCap.SPARSE_MMAP, 1, 48)
    struct.pack_into("=HHI", buf, 48, structs.RegionCap.MSIX_MAPPABLE, 1, 32)  # loops back
    assert list(vfio_ioctl.cap_chain(buf, 32)) == [(1, 1, 32), (3, 1, 48)]
    assert list(vfio_ioctl.cap_chain(buf, 0)) == []


def test_region_mmap_areas() -> None:
    """Sparse areas restrict the mmap; no MMAP flag means nothing to map."""
    flags = structs.RegionFlags.READ | structs.RegionFlags.WRITE
    whole = vfio.RegionInfo(0, flags | structs.RegionFlags.MMAP, 0x100000, 0)
    assert whole.mmap_areas == ((0, 0x100000),)
    sparse = vfio.RegionInfo(
        0, flags | structs.RegionFlags.MMAP, 0x4000, 0, sparse_areas=((0, 0x2000), (0x3000, 0))
    )
    assert sparse.mmap_areas == ((0, 0x2000),)
    assert vfio.RegionInfo(7, flags, 0x100, 7 << 40).mmap_areas == ()


def test_eventfd_wait_has_a_deadline() -> None:
    """wait() returns the count when signalled, 0 at the deadline."""
    with vfio.EventFd() as event:
        assert event.wait(0.01) == 0
        event.write(2)
        assert event.wait(1.0) == 2
        assert event.read() == 0
    assert event.fd == -1


def test_default_irqchip_routes_match_kvm() -> None:
    """GSI 0-15 to a PIC and the IOAPIC, 16-23 to the IOAPIC only (KVM's default table)."""
    routes = vfio.default_irqchip_routes()
    assert len(routes) == 40
    assert IrqchipRoute(9, 1, 1) in routes and IrqchipRoute(9, 2, 9) in routes
    assert [r for r in routes if r.gsi == 20] == [IrqchipRoute(20, 2, 20)]


def test_vfio_error_text() -> None:
    """Kernel failures read 'who: OP failed: ENAME (text): detail' and keep the errno."""
    error = vfio.VfioError(
        "00:05.0", vfio_ioctl.failed("VFIO_DEVICE_SET_IRQS", 22, "enable MSI, 1 vector"), os_errno=22
    )
    assert (
        str(error) == "00:05.0: VFIO_DEVICE_SET_IRQS failed: EINVAL (Invalid argument): enable MSI, 1 vector"
    )
    assert error.errno is Errno.EINVAL and error.code == -22
    assert vfio.VfioError("group 5", "x", os_errno=25).errno is Errno.EIO  # ENOTTY: not a Jailhouse errno
