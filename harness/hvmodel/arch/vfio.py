"""VFIO binding of the executor; stands where ``hypervisor/arch/x86/vtd.c`` (DMA and
interrupt remapping of cell devices) and the Linux driver's ``driver/pci.c`` (the
``jailhouse-pci-stub`` claim and release) are.

Jailhouse programs VT-d itself and parks a cell's PCI devices on its stub driver in the
root. jhlab's executor asks Linux VFIO (type1 IOMMU, on the lab's intel-iommu) for the
same things. Standard library only (``ctypes``, ``fcntl``, ``mmap``, ``os``, ``select``,
``struct``): it runs in the lab root cell's Debian ``python3`` with nothing installed.

* ioctl numbers (``_IO(VFIO_TYPE, VFIO_BASE + n)``, as ``<linux/vfio.h>`` defines all of
  them) and the ``struct vfio_*`` layouts as :mod:`ctypes` structures, with the capability
  chains of region info (sparse mmap areas, MSI-X mappable, region type) and IOMMU info
  (valid IOVA ranges, available DMA mappings);
* :class:`PciStub`: host-side device management in the root cell. :meth:`PciStub.claim`
  unbinds the current driver and binds ``vfio-pci`` through ``driver_override`` (Jailhouse
  binds ``jailhouse-pci-stub`` through a dynamic ID), remembering the original driver;
  :meth:`PciStub.release` unbinds it again and, on request, rebinds the original driver
  (Jailhouse leaves the device unbound; that is the default here too);
* :class:`Container` (``/dev/vfio/vfio``: IOMMU type, DMA map/unmap), :class:`Group`
  (``/dev/vfio/N``) and :class:`Device` (regions by ``pread``/``pwrite`` or mmap, IRQs with
  one eventfd per vector, reset); :class:`EventFd` for the interrupts;
* the bridge to KVM: :func:`dma_map_regions` puts a cell's DMA-flagged memory regions into
  the container at their ``virt_start`` (the device then sees cell guest-physical
  addresses) and :class:`MsiRouter` routes a device vector's eventfd to a VM through a KVM
  GSI route and irqfd.

**IOMMU groups.** Jailhouse assigns single functions and does not know about groups.
VFIO isolates whole groups: a group can be used only when every member is either bound to
``vfio-pci`` or harmless to DMA ownership (no driver, ``pci-stub``, ``pcieport``). The
policy here: a device is claimed only if its group is *fully claimed*, i.e. every other
member is in the same :meth:`PciStub.claim_all` call, already claimed, or in that harmless
state. The stub never takes devices nobody asked for; it fails and names the group and
what blocks it, e.g. ``00:1f.2: not in its own IOMMU group (group 7 also holds 00:1f.3
(i801_smbus)): cannot pass it through``.

**Lifecycle.** claim → :class:`Container` → :meth:`Container.group` →
:meth:`Group.device` → use → close (device, group, container: closing a container
closes its groups and their devices) → release. :meth:`PciStub.release` refuses while
any process holds the group open: unbinding ``vfio-pci`` from an open device blocks in the
kernel until it is closed, so the stub checks instead of hanging.

**Not modelled by VFIO, the executor's job**: the MSI and MSI-X capabilities in the VFIO
config region are virtualized by ``vfio-pci``; the real MSI address/data are the host's
(remapped) ones, programmed by ``VFIO_DEVICE_SET_IRQS``. The cell's MSI shadow (reference
§4.4) becomes a KVM route (:meth:`MsiRouter.route`), never a config write. Bus mastering
is the device's ``COMMAND`` register, which the cell (or :meth:`Device.set_bus_master`)
sets; without it the device neither DMAs nor sends MSIs.

Facts measured with this binding in the default lab (Linux 6.1, QEMU 7.2 intel-iommu,
TCG; ``test_suites/e2e/test_vfio.py``): the edu device at 01:01.0 (behind the
pcie-pci-bridge, in one group with that driverless bridge) claims and releases cleanly;
BAR0 mmaps whole (no sparse areas) and reads ``0x010000ed``;
its MSI (1 vector) fires an eventfd, and through :class:`MsiRouter` lands in a KVM vCPU's
APIC IRR; DMA works both ways through an anonymous mmap and through a ``/dev/mem``
window of the ``memmap=`` reserve mapped at a cell's ``virt_start`` (type1 accepts the
PFN-mapped memory); the IOMMU offers 4K/2M/1G pages and all IOVAs but the MSI window
0xfee00000-0xfeefffff. vfio-pci answers ``EINVAL`` for the VGA region and the ERR/REQ
IRQs of a plain PCI device (:meth:`Device.regions` / :meth:`Device.irq_infos` list them
as empty), and edu has no reset method (:meth:`Device.reset` says so).

Errors: every failing step raises :class:`VfioError`, an
:class:`~harness.hvmodel.errors.HvError` that names the device (or group, or container)
and the step, and keeps the kernel's errno (:attr:`VfioError.os_errno`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import errno
import fcntl
import logging
import mmap
import os
import re
import select
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Final

from ..abi import (
    MEM_COMM_REGION,
    MEM_DMA,
    MEM_READ,
    MEM_WRITE,
    PCI_CFG_COMMAND,
    PCI_CMD_MASTER,
    PCI_CMD_MEM,
)
from ..errors import Errno, HvError
from . import HOST_PAGE_SIZE
from .kvm import Cap, IrqchipRoute, MsiRoute, Vm

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from ..config import MemoryRegion

LOG = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# ioctl encoding: every VFIO request is _IO(VFIO_TYPE, VFIO_BASE + n) (no size or
# direction bits, the kernel reads argsz from the argument instead)
# ---------------------------------------------------------------------------------------

_IOC_TYPESHIFT: Final = 8
VFIO_TYPE: Final = ord(";")
VFIO_BASE: Final = 100
VFIO_API_VERSION: Final = 0


def _io(kind: int, nr: int) -> int:
    """``_IO(type, nr)`` of ``include/uapi/asm-generic/ioctl.h``."""
    return (kind << _IOC_TYPESHIFT) | nr


def _vfio_io(n: int) -> int:
    return _io(VFIO_TYPE, VFIO_BASE + n)


# container (/dev/vfio/vfio)
VFIO_GET_API_VERSION: Final = _vfio_io(0)  # -> VFIO_API_VERSION
VFIO_CHECK_EXTENSION: Final = _vfio_io(1)  # arg: extension number (value)
VFIO_SET_IOMMU: Final = _vfio_io(2)  # arg: IOMMU type (value)
# group (/dev/vfio/N)
VFIO_GROUP_GET_STATUS: Final = _vfio_io(3)  # struct vfio_group_status
VFIO_GROUP_SET_CONTAINER: Final = _vfio_io(4)  # __s32 *container_fd
VFIO_GROUP_UNSET_CONTAINER: Final = _vfio_io(5)
VFIO_GROUP_GET_DEVICE_FD: Final = _vfio_io(6)  # char *name -> device fd
# device (fd from VFIO_GROUP_GET_DEVICE_FD)
VFIO_DEVICE_GET_INFO: Final = _vfio_io(7)  # struct vfio_device_info
VFIO_DEVICE_GET_REGION_INFO: Final = _vfio_io(8)  # struct vfio_region_info (+ caps)
VFIO_DEVICE_GET_IRQ_INFO: Final = _vfio_io(9)  # struct vfio_irq_info
VFIO_DEVICE_SET_IRQS: Final = _vfio_io(10)  # struct vfio_irq_set + data[]
VFIO_DEVICE_RESET: Final = _vfio_io(11)
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: Final = _vfio_io(12)  # struct vfio_pci_hot_reset_info
VFIO_DEVICE_PCI_HOT_RESET: Final = _vfio_io(13)  # struct vfio_pci_hot_reset + group fds
# type1 IOMMU (container, after VFIO_SET_IOMMU; same numbers as the PCI hot reset pair)
VFIO_IOMMU_GET_INFO: Final = _vfio_io(12)  # struct vfio_iommu_type1_info (+ caps)
VFIO_IOMMU_MAP_DMA: Final = _vfio_io(13)  # struct vfio_iommu_type1_dma_map
VFIO_IOMMU_UNMAP_DMA: Final = _vfio_io(14)  # struct vfio_iommu_type1_dma_unmap

#: Every request above by name (numbers repeat across fd kinds, so not the reverse).
IOCTLS: Final[Mapping[str, int]] = {
    name: value
    for name, value in dict(globals()).items()
    if name.startswith("VFIO_")
    and name not in ("VFIO_TYPE", "VFIO_BASE", "VFIO_API_VERSION")
    and isinstance(value, int)
}


class Extension(enum.IntEnum):
    """``VFIO_CHECK_EXTENSION`` arguments (IOMMU types and container features)."""

    TYPE1_IOMMU = 1
    SPAPR_TCE_IOMMU = 2
    TYPE1v2_IOMMU = 3
    DMA_CC_IOMMU = 4
    EEH = 5
    TYPE1_NESTING_IOMMU = 6
    SPAPR_TCE_v2_IOMMU = 7
    NOIOMMU_IOMMU = 8
    UNMAP_ALL = 9
    UPDATE_VADDR = 10


class GroupFlags(enum.IntFlag):
    """``VFIO_GROUP_FLAGS_*``."""

    VIABLE = 1 << 0
    CONTAINER_SET = 1 << 1


class DeviceFlags(enum.IntFlag):
    """``VFIO_DEVICE_FLAGS_*``."""

    RESET = 1 << 0
    PCI = 1 << 1
    PLATFORM = 1 << 2
    AMBA = 1 << 3
    CCW = 1 << 4
    AP = 1 << 5
    FSL_MC = 1 << 6
    CAPS = 1 << 7


class RegionFlags(enum.IntFlag):
    """``VFIO_REGION_INFO_FLAG_*``."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionCap(enum.IntEnum):
    """``VFIO_REGION_INFO_CAP_*`` ids of the region-info capability chain."""

    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3


class IrqInfoFlags(enum.IntFlag):
    """``VFIO_IRQ_INFO_*``."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlags(enum.IntFlag):
    """``VFIO_IRQ_SET_*``: one DATA kind and one ACTION."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


class PciRegion(enum.IntEnum):
    """``VFIO_PCI_*_REGION_INDEX``: vfio-pci's fixed region indexes."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


VFIO_PCI_NUM_REGIONS: Final = 9


class PciIrq(enum.IntEnum):
    """``VFIO_PCI_*_IRQ_INDEX``: vfio-pci's fixed IRQ indexes."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


VFIO_PCI_NUM_IRQS: Final = 5


class IommuInfoFlags(enum.IntFlag):
    """``VFIO_IOMMU_INFO_*``."""

    PGSIZES = 1 << 0
    CAPS = 1 << 1


class IommuCap(enum.IntEnum):
    """Capability ids of the type1 IOMMU info chain."""

    IOVA_RANGE = 1  # VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE
    MIGRATION = 2  # VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION
    DMA_AVAIL = 3  # VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL


VFIO_DMA_MAP_FLAG_READ: Final = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE: Final = 1 << 1
VFIO_DMA_MAP_FLAG_VADDR: Final = 1 << 2
VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: Final = 1 << 0
VFIO_DMA_UNMAP_FLAG_ALL: Final = 1 << 1
VFIO_DMA_UNMAP_FLAG_VADDR: Final = 1 << 2

# ---------------------------------------------------------------------------------------
# Structures (sizes in the docstrings are checked by test_suites/unit/test_vfio_abi.py)
# ---------------------------------------------------------------------------------------

_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_s32 = ctypes.c_int32
_u64 = ctypes.c_uint64
_sz = ctypes.sizeof


class VfioInfoCapHeader(ctypes.Structure):
    """``struct vfio_info_cap_header`` (8 bytes): id, version, offset of the next cap."""

    _fields_ = [("id", _u16), ("version", _u16), ("next", _u32)]


class VfioGroupStatus(ctypes.Structure):
    """``struct vfio_group_status`` (8 bytes)."""

    _fields_ = [("argsz", _u32), ("flags", _u32)]


class VfioDeviceInfo(ctypes.Structure):
    """``struct vfio_device_info`` (20 bytes)."""

    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("num_regions", _u32),
        ("num_irqs", _u32),
        ("cap_offset", _u32),
    ]


class VfioRegionInfo(ctypes.Structure):
    """``struct vfio_region_info`` (32 bytes); capabilities follow at ``cap_offset``."""

    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("index", _u32),
        ("cap_offset", _u32),
        ("size", _u64),
        ("offset", _u64),
    ]


class VfioRegionSparseMmapArea(ctypes.Structure):
    """``struct vfio_region_sparse_mmap_area`` (16 bytes)."""

    _fields_ = [("offset", _u64), ("size", _u64)]


class VfioRegionInfoCapSparseMmap(ctypes.Structure):
    """``struct vfio_region_info_cap_sparse_mmap`` header (16 bytes); ``areas[]`` follow."""

    _fields_ = [("header", VfioInfoCapHeader), ("nr_areas", _u32), ("reserved", _u32)]


class VfioRegionInfoCapType(ctypes.Structure):
    """``struct vfio_region_info_cap_type`` (16 bytes)."""

    _fields_ = [("header", VfioInfoCapHeader), ("type", _u32), ("subtype", _u32)]


class VfioIrqInfo(ctypes.Structure):
    """``struct vfio_irq_info`` (16 bytes)."""

    _fields_ = [("argsz", _u32), ("flags", _u32), ("index", _u32), ("count", _u32)]


class VfioIrqSet(ctypes.Structure):
    """``struct vfio_irq_set`` header (20 bytes); ``data[]`` follows (``__s32`` eventfds
    for DATA_EVENTFD, ``__u8`` for DATA_BOOL)."""

    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("index", _u32),
        ("start", _u32),
        ("count", _u32),
    ]


class VfioPciDependentDevice(ctypes.Structure):
    """``struct vfio_pci_dependent_device`` (8 bytes)."""

    _fields_ = [("group_id", _u32), ("segment", _u16), ("bus", _u8), ("devfn", _u8)]


class VfioPciHotResetInfo(ctypes.Structure):
    """``struct vfio_pci_hot_reset_info`` header (12 bytes); ``devices[]`` follow."""

    _fields_ = [("argsz", _u32), ("flags", _u32), ("count", _u32)]


class VfioPciHotReset(ctypes.Structure):
    """``struct vfio_pci_hot_reset`` header (12 bytes); ``__s32 group_fds[]`` follow."""

    _fields_ = [("argsz", _u32), ("flags", _u32), ("count", _u32)]


class VfioIommuType1Info(ctypes.Structure):
    """``struct vfio_iommu_type1_info`` (24 bytes); capabilities follow at ``cap_offset``."""

    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("iova_pgsizes", _u64),
        ("cap_offset", _u32),
    ]


class VfioIovaRange(ctypes.Structure):
    """``struct vfio_iova_range`` (16 bytes; ``end`` inclusive)."""

    _fields_ = [("start", _u64), ("end", _u64)]


class VfioIommuType1InfoCapIovaRange(ctypes.Structure):
    """``struct vfio_iommu_type1_info_cap_iova_range`` header (16 bytes); ranges follow."""

    _fields_ = [("header", VfioInfoCapHeader), ("nr_iovas", _u32), ("reserved", _u32)]


class VfioIommuType1InfoDmaAvail(ctypes.Structure):
    """``struct vfio_iommu_type1_info_dma_avail`` (12 bytes)."""

    _fields_ = [("header", VfioInfoCapHeader), ("avail", _u32)]


class VfioIommuType1DmaMap(ctypes.Structure):
    """``struct vfio_iommu_type1_dma_map`` (32 bytes)."""

    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("vaddr", _u64),
        ("iova", _u64),
        ("size", _u64),
    ]


class VfioIommuType1DmaUnmap(ctypes.Structure):
    """``struct vfio_iommu_type1_dma_unmap`` (24 bytes; the kernel returns the unmapped
    size in ``size``)."""

    _fields_ = [("argsz", _u32), ("flags", _u32), ("iova", _u64), ("size", _u64)]


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


class VfioError(HvError):
    """A VFIO step failed, for one device, group or container.

    ``str()`` reads ``"<who>: <message>"``, e.g. ``"01:01.0: VFIO_DEVICE_SET_IRQS failed:
    EINVAL (Invalid argument): enable MSI, 2 vectors"``.

    :param who: the device (``01:01.0``), ``group 5`` or ``container``
    :param message: the step and what went wrong
    :param os_errno: the kernel's errno (0 when the failure was detected here)
    :param code: the Jailhouse errno (default: ``os_errno`` when Jailhouse has it, else EIO)
    """

    def __init__(self, who: str, message: str, *, os_errno: int = 0, code: Errno | None = None) -> None:
        self.who = who
        self.text = message
        self.os_errno = os_errno
        if code is None:
            known = {int(e) for e in Errno}
            code = Errno(os_errno) if os_errno in known else Errno.EIO
        super().__init__(code, message)

    def __str__(self) -> str:
        return f"{self.who}: {self.text}" if self.who else self.text


def _failed(op: str, os_errno: int, detail: str = "") -> str:
    """``"OP failed: ENAME (text): detail"``."""
    text = f"{op} failed"
    if os_errno:
        text += f": {errno.errorcode.get(os_errno, str(os_errno))} ({os.strerror(os_errno)})"
    return f"{text}: {detail}" if detail else text


def _ioctl(fd: int, request: int, arg: int | WriteableBuffer, *, op: str, who: str, detail: str = "") -> int:
    """``ioctl(2)`` raising :class:`VfioError` that names ``who`` and ``op``.

    Buffers must be mutable (``bytearray``, ctypes objects): :func:`fcntl.ioctl` then
    returns the ioctl's result (a new fd for ``VFIO_GROUP_GET_DEVICE_FD``).
    """
    if fd < 0:
        raise VfioError(
            who, _failed(op, errno.EBADF, f"{detail} (already closed)".strip()), os_errno=errno.EBADF
        )
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        code = exc.errno or 0
        raise VfioError(who, _failed(op, code, detail), os_errno=code) from exc


def _cap_chain(buf: bytes | bytearray, first: int) -> Iterator[tuple[int, int, int]]:
    """(id, version, offset) of every capability in a VFIO info buffer's chain."""
    seen: set[int] = set()
    offset = first
    while offset and offset not in seen and offset + _sz(VfioInfoCapHeader) <= len(buf):
        seen.add(offset)
        header = VfioInfoCapHeader.from_buffer_copy(buf, offset)
        yield int(header.id), int(header.version), offset
        offset = int(header.next)


# ---------------------------------------------------------------------------------------
# PCI addresses and the host side (the stub driver)
# ---------------------------------------------------------------------------------------

_PCI_NAME = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<slot>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])$"
)


@dataclasses.dataclass(frozen=True, order=True, slots=True)
class PciAddress:
    """A PCI function: ``domain:bus:slot.function``.

    ``str()`` is the sysfs name (``0000:01:01.0``); :attr:`short` is Jailhouse's way of
    printing it (``01:01.0``, with the domain only when it is not 0).
    """

    domain: int
    bus: int
    slot: int
    function: int

    def __post_init__(self) -> None:
        if not (
            0 <= self.domain <= 0xFFFF
            and 0 <= self.bus <= 0xFF
            and 0 <= self.slot <= 0x1F
            and 0 <= self.function <= 7
        ):
            raise ValueError(f"bad PCI address {self.domain:x}:{self.bus:x}:{self.slot:x}.{self.function:x}")

    @classmethod
    def parse(cls, text: str | PciAddress) -> PciAddress:
        """From ``0000:01:01.0`` or ``01:01.0`` (or an address, returned as is)."""
        if isinstance(text, PciAddress):
            return text
        match = _PCI_NAME.match(text.strip())
        if match is None:
            raise ValueError(f"not a PCI address: {text!r} (want DDDD:BB:SS.F or BB:SS.F)")
        return cls(
            int(match["domain"] or "0", 16), int(match["bus"], 16), int(match["slot"], 16), int(match["fn"])
        )

    @classmethod
    def from_bdf(cls, bdf: int, domain: int = 0) -> PciAddress:
        """From Jailhouse's 16-bit ``bdf`` (bus << 8 | device << 3 | function)."""
        return cls(domain, (bdf >> 8) & 0xFF, (bdf >> 3) & 0x1F, bdf & 7)

    @property
    def bdf(self) -> int:
        return self.bus << 8 | self.slot << 3 | self.function

    @property
    def short(self) -> str:
        text = f"{self.bus:02x}:{self.slot:02x}.{self.function:x}"
        return f"{self.domain:04x}:{text}" if self.domain else text

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"


#: Drivers that leave a group's DMA ownership free (the kernel's ``driver_managed_dma``).
DMA_NEUTRAL_DRIVERS: Final = frozenset({"vfio-pci", "pci-stub", "pcieport"})


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """A device bound to ``vfio-pci`` by :meth:`PciStub.claim`, and what it had before.

    :param address: the device
    :param group: its IOMMU group (``/dev/vfio/<group>``)
    :param original_driver: the driver bound before the claim (None: unbound)
    :param original_override: ``driver_override`` before the claim (None: unset)
    """

    address: PciAddress
    group: int
    original_driver: str | None
    original_override: str | None

    @property
    def group_path(self) -> str:
        return f"/dev/vfio/{self.group}"


def group_policy(
    address: PciAddress,
    group: int,
    members: Mapping[PciAddress, str | None],
    claiming: Iterable[PciAddress] = (),
) -> None:
    """Check that ``address`` may be passed through: its IOMMU group is fully claimed.

    :param members: every device of the group (``address`` included) and its driver
    :param claiming: devices claimed together with ``address`` (or before it)
    :raise VfioError: ``EBUSY``, naming the group and the devices that block it
    """
    together = set(claiming) | {address}
    blocking = [
        (other, driver)
        for other, driver in sorted(members.items())
        if other not in together and driver is not None and driver not in DMA_NEUTRAL_DRIVERS
    ]
    if not blocking:
        return
    others = sorted(other for other in members if other != address)
    listed = ", ".join(
        f"{other.short} ({members[other]})" if members[other] else other.short for other in others
    )
    names = " ".join(other.short for other, _ in blocking)
    raise VfioError(
        address.short,
        f"not in its own IOMMU group (group {group} also holds {listed}): cannot pass it through; "
        f"claim the whole group together or unbind {names} first",
        code=Errno.EBUSY,
    )


class PciStub:
    """The root cell's side of passthrough: claim devices for VFIO, release them.

    Models the Linux driver's ``jailhouse_pci_claim_release`` (reference §6.2): on cell
    create each PCI device of the cell is taken from its root driver and bound to a stub;
    on destroy it is released (Jailhouse leaves it unbound). The stub here is
    ``vfio-pci``, bound through ``driver_override`` (``drivers_probe`` then picks it), so
    the device becomes usable through ``/dev/vfio/<group>``.

    One instance keeps the claims it made (:attr:`claims`); release what you claimed with
    the same instance. Every step is a sysfs write; errors name the device and the step.

    :param sysfs: the sysfs mount (``/sys``)
    :param dev_vfio: where the group nodes appear (``/dev/vfio``)
    :param proc: procfs (to find processes holding a group open)
    :param driver: the stub driver (``vfio-pci``)
    :param timeout: seconds to wait for a group node to appear
    """

    def __init__(
        self,
        *,
        sysfs: str = "/sys",
        dev_vfio: str = "/dev/vfio",
        proc: str = "/proc",
        driver: str = "vfio-pci",
        timeout: float = 5.0,
    ) -> None:
        self.sysfs = sysfs
        self.dev_vfio = dev_vfio
        self.proc = proc
        self.driver = driver
        self.timeout = timeout
        self.claims: dict[PciAddress, Claim] = {}

    # --- sysfs reading ---------------------------------------------------------------------

    def _device_dir(self, address: PciAddress) -> str:
        return os.path.join(self.sysfs, "bus", "pci", "devices", str(address))

    def _driver_dir(self, driver: str) -> str:
        return os.path.join(self.sysfs, "bus", "pci", "drivers", driver)

    def exists(self, address: str | PciAddress) -> bool:
        return os.path.isdir(self._device_dir(PciAddress.parse(address)))

    def driver_of(self, address: str | PciAddress) -> str | None:
        """The bound driver's name, or None."""
        link = os.path.join(self._device_dir(PciAddress.parse(address)), "driver")
        try:
            return os.path.basename(os.readlink(link))
        except FileNotFoundError:
            return None

    def override_of(self, address: str | PciAddress) -> str | None:
        """``driver_override`` (None when unset; the kernel shows that as ``(null)``)."""
        path = os.path.join(self._device_dir(PciAddress.parse(address)), "driver_override")
        try:
            with open(path) as file:
                value = file.read().strip()
        except FileNotFoundError:
            return None
        return None if value in ("", "(null)") else value

    def group_of(self, address: str | PciAddress) -> int:
        """The device's IOMMU group number.

        :raise VfioError: ``ENODEV`` when the device or its group is missing
        """
        address = PciAddress.parse(address)
        self._require_device(address)
        link = os.path.join(self._device_dir(address), "iommu_group")
        try:
            return int(os.path.basename(os.readlink(link)))
        except (FileNotFoundError, ValueError) as exc:
            raise VfioError(
                address.short,
                "has no IOMMU group: the IOMMU is off (boot with intel_iommu=on) or the device is "
                "not behind one: cannot pass it through",
                os_errno=errno.ENODEV,
            ) from exc

    def group_members(self, group: int) -> dict[PciAddress, str | None]:
        """Every device of IOMMU group ``group`` and its driver."""
        folder = os.path.join(self.sysfs, "kernel", "iommu_groups", str(group), "devices")
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError as exc:
            raise VfioError(
                f"group {group}", f"no such IOMMU group ({folder})", os_errno=errno.ENOENT
            ) from exc
        members: dict[PciAddress, str | None] = {}
        for name in names:
            try:
                member = PciAddress.parse(name)
            except ValueError:
                continue  # not PCI (cannot happen on x86 today)
            members[member] = self.driver_of(member)
        return members

    def holders(self, group: int) -> list[tuple[int, str]]:
        """(pid, command) of every process with ``/dev/vfio/<group>`` open."""
        target = os.path.join(self.dev_vfio, str(group))
        found: list[tuple[int, str]] = []
        try:
            pids = [int(entry) for entry in os.listdir(self.proc) if entry.isdigit()]
        except FileNotFoundError:
            return found
        for pid in pids:
            fd_dir = os.path.join(self.proc, str(pid), "fd")
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue  # gone, or not ours to look at
            for fd in fds:
                try:
                    if os.readlink(os.path.join(fd_dir, fd)) == target:
                        found.append((pid, self._comm(pid)))
                        break
                except OSError:
                    continue
        return found

    def _comm(self, pid: int) -> str:
        try:
            with open(os.path.join(self.proc, str(pid), "comm")) as file:
                return file.read().strip()
        except OSError:
            return "?"

    def _require_device(self, address: PciAddress) -> None:
        if not os.path.isdir(self._device_dir(address)):
            raise VfioError(
                address.short, "no such PCI device in /sys/bus/pci/devices", os_errno=errno.ENODEV
            )

    def _write(self, address: PciAddress, path: str, value: str, step: str) -> None:
        """One sysfs write; ``step`` says what it was for."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            code = exc.errno or 0
            raise VfioError(address.short, _failed(step, code, f"open {path}"), os_errno=code) from exc
        try:
            os.write(fd, value.encode())
        except OSError as exc:
            code = exc.errno or 0
            raise VfioError(
                address.short, _failed(step, code, f"write {value.strip()!r} to {path}"), os_errno=code
            ) from exc
        finally:
            os.close(fd)

    def _ensure_driver_loaded(self, address: PciAddress) -> None:
        if os.path.isdir(self._driver_dir(self.driver)):
            return
        module = self.driver.replace("-", "_")
        try:
            result = subprocess.run(
                ["modprobe", module], capture_output=True, text=True, timeout=30, check=False
            )
            problem = result.stderr.strip() or f"exit status {result.returncode}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            problem = str(exc)
        if not os.path.isdir(self._driver_dir(self.driver)):
            raise VfioError(
                address.short,
                f"the {self.driver} driver is not available (modprobe {module}: {problem})",
                os_errno=errno.ENODEV,
            )

    def _wait_group_node(self, address: PciAddress, group: int) -> None:
        path = os.path.join(self.dev_vfio, str(group))
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while not os.path.exists(path):
            if time.monotonic() >= deadline:
                raise VfioError(
                    address.short,
                    f"bound to {self.driver} but {path} did not appear within {self.timeout:g} s",
                    os_errno=errno.ENOENT,
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    # --- claim and release -------------------------------------------------------------------

    def check(self, address: str | PciAddress, claiming: Iterable[str | PciAddress] = ()) -> int:
        """Check that ``address`` can be claimed (with ``claiming``); return its group.

        :raise VfioError: the device or its group is missing, or the group is not fully
            claimed (see :func:`group_policy`)
        """
        address = PciAddress.parse(address)
        group = self.group_of(address)
        together = {PciAddress.parse(other) for other in claiming} | set(self.claims)
        group_policy(address, group, self.group_members(group), together)
        return group

    def claim(self, address: str | PciAddress) -> Claim:
        """Bind ``address`` to the stub driver (idempotent for a device claimed here).

        Steps: the device exists; the stub driver is loaded (``modprobe``); the group
        policy holds; ``driver_override`` is set to the stub; the current driver is
        unbound; ``drivers_probe`` binds the stub; ``/dev/vfio/<group>`` appears. A failed
        step undoes the earlier ones (override restored, original driver rebound).

        :raise VfioError: naming the device and the failed step
        """
        return self.claim_all([address])[0]

    def claim_all(self, addresses: Iterable[str | PciAddress]) -> list[Claim]:
        """Claim several devices, checking every group against the whole set first.

        All or nothing: when one claim fails, the ones made by this call are released
        (rebinding their original drivers).
        """
        wanted = [PciAddress.parse(address) for address in addresses]
        for address in wanted:
            self._require_device(address)
        if wanted:
            self._ensure_driver_loaded(wanted[0])
        groups = {address: self.check(address, wanted) for address in wanted if address not in self.claims}
        made: list[Claim] = []
        try:
            for address in wanted:
                if address in self.claims:
                    continue
                made.append(self._claim_one(address, groups[address]))
        except BaseException:
            for claim in reversed(made):
                try:
                    self.release(claim.address, rebind=True)
                except Exception:
                    LOG.exception("%s: undoing the claim failed", claim.address.short)
            raise
        return [self.claims[address] for address in wanted]

    def _claim_one(self, address: PciAddress, group: int) -> Claim:
        device_dir = self._device_dir(address)
        driver = self.driver_of(address)
        claim = Claim(address, group, driver, self.override_of(address))
        if driver != self.driver:
            LOG.info(
                "%s: claiming for VFIO (driver %s, IOMMU group %d)", address.short, driver or "none", group
            )
            self._write(
                address,
                os.path.join(device_dir, "driver_override"),
                self.driver,
                f"set driver_override to {self.driver}",
            )
            try:
                if driver is not None:
                    self._write(
                        address,
                        os.path.join(device_dir, "driver", "unbind"),
                        str(address),
                        f"unbind {driver}",
                    )
                self._write(
                    address,
                    os.path.join(self.sysfs, "bus", "pci", "drivers_probe"),
                    str(address),
                    f"bind {self.driver}",
                )
                bound = self.driver_of(address)
                if bound != self.driver:
                    raise VfioError(
                        address.short,
                        f"bind {self.driver} failed: driver is now {bound or 'none'} (see dmesg)",
                        os_errno=errno.ENODEV,
                    )
            except BaseException:
                self._undo_claim(claim)
                raise
        self._wait_group_node(address, group)
        self.claims[address] = claim
        return claim

    def _undo_claim(self, claim: Claim) -> None:
        address = claim.address
        device_dir = self._device_dir(address)
        try:
            if self.driver_of(address) == self.driver:
                self._write(
                    address,
                    os.path.join(self._driver_dir(self.driver), "unbind"),
                    str(address),
                    f"unbind {self.driver}",
                )
            self._write(
                address,
                os.path.join(device_dir, "driver_override"),
                (claim.original_override or "") + "\n",
                "restore driver_override",
            )
            if claim.original_driver and self.driver_of(address) is None:
                self._write(
                    address,
                    os.path.join(self._driver_dir(claim.original_driver), "bind"),
                    str(address),
                    f"rebind {claim.original_driver}",
                )
        except VfioError:
            LOG.exception("%s: undoing a failed claim", address.short)

    def release(self, address: str | PciAddress, *, rebind: bool = False) -> None:
        """Give a claimed device back to the root.

        Steps: nobody holds its group open (else unbinding would block in the kernel);
        ``vfio-pci`` unbound; ``driver_override`` restored; with ``rebind``, the original
        driver bound again (Jailhouse does not rebind; ``rebind=False`` is its behaviour).

        :raise VfioError: ``ENOENT`` when the device was not claimed here, ``EBUSY`` when
            its group is open, or the failed sysfs step
        """
        address = PciAddress.parse(address)
        claim = self.claims.get(address)
        if claim is None:
            raise VfioError(address.short, "release: not claimed by this stub", os_errno=errno.ENOENT)
        holders = self.holders(claim.group)
        if holders:
            who = ", ".join(f"pid {pid} ({comm})" for pid, comm in holders)
            raise VfioError(
                address.short,
                f"release: {claim.group_path} is still open by {who}: close the VFIO device and group first",
                code=Errno.EBUSY,
            )
        device_dir = self._device_dir(address)
        if self.driver_of(address) == self.driver and claim.original_driver != self.driver:
            self._write(
                address,
                os.path.join(self._driver_dir(self.driver), "unbind"),
                str(address),
                f"unbind {self.driver}",
            )
        self._write(
            address,
            os.path.join(device_dir, "driver_override"),
            (claim.original_override or "") + "\n",
            "restore driver_override",
        )
        del self.claims[address]
        original = claim.original_driver
        if rebind and original and original != self.driver and self.driver_of(address) is None:
            self._write(
                address, os.path.join(self._driver_dir(original), "bind"), str(address), f"rebind {original}"
            )
            bound = self.driver_of(address)
            if bound != original:
                raise VfioError(
                    address.short,
                    f"rebind {original} failed: driver is now {bound or 'none'}",
                    os_errno=errno.ENODEV,
                )
        LOG.info("%s: released (driver %s)", address.short, self.driver_of(address) or "none")

    def release_all(self, *, rebind: bool = False) -> None:
        """Release every claim (reverse order); errors are logged, the first re-raised."""
        first: VfioError | None = None
        for address in reversed(list(self.claims)):
            try:
                self.release(address, rebind=rebind)
            except VfioError as exc:
                LOG.error("%s", exc)
                first = first or exc
        if first is not None:
            raise first


# ---------------------------------------------------------------------------------------
# eventfd
# ---------------------------------------------------------------------------------------


class EventFd:
    """A non-blocking ``eventfd(2)``: the signal of one interrupt vector.

    VFIO writes it when the device's vector fires; KVM's irqfd consumes it (then a
    :meth:`wait` here never sees the count). Lifecycle: open on construction, :meth:`close`.
    """

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def fileno(self) -> int:
        return self.fd

    def read(self) -> int:
        """Take the counter (0 when nothing is pending)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def write(self, value: int = 1) -> None:
        """Add ``value`` (signal it from user space, e.g. in tests)."""
        os.eventfd_write(self.fd, value)

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for a signal; take and return the counter (0: timed out)."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            count = self.read()
            if count:
                return count
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return 0
            poller.poll(max(1, int(remaining * 1000)))

    def close(self) -> None:
        """Close; idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventFd({self.fd})"


# ---------------------------------------------------------------------------------------
# Container
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class IommuInfo:
    """``VFIO_IOMMU_GET_INFO``: page sizes, valid IOVA ranges (``end`` inclusive) and how
    many more DMA mappings the container may make (None when the kernel does not say)."""

    pgsizes: int
    iova_ranges: tuple[tuple[int, int], ...]
    dma_avail: int | None

    @property
    def min_page(self) -> int:
        """The smallest IOMMU page (the alignment of every mapping)."""
        return self.pgsizes & -self.pgsizes if self.pgsizes else HOST_PAGE_SIZE


@dataclasses.dataclass(eq=False)
class DmaMapping:
    """One IOVA range of a :class:`Container`, backed by host memory at ``vaddr``.

    ``anchor`` pins the buffer (a ctypes view holding a buffer export) while the mapping
    exists, so an mmap behind it cannot be closed under the device; unmapping drops it.
    """

    iova: int
    size: int
    vaddr: int
    read: bool
    write: bool
    anchor: ctypes.Array[ctypes.c_char] | None = dataclasses.field(repr=False, default=None)

    @property
    def end(self) -> int:
        return self.iova + self.size


class Container:
    """A VFIO container (``/dev/vfio/vfio``): one IOMMU address space for its groups.

    Lifecycle: open (API version and type1 support checked) → :meth:`group` (the first
    group sets the IOMMU type) → :meth:`dma_map` / :meth:`dma_unmap` → :meth:`close`, which
    unmaps everything and closes the groups (and their devices) before the container.

    :param path: the container device
    :raise VfioError: when it cannot be opened, speaks another API or lacks type1
    """

    def __init__(self, path: str = "/dev/vfio/vfio") -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            code = exc.errno or 0
            raise VfioError(
                "container", _failed(f"open {path}", code, "is vfio loaded?"), os_errno=code
            ) from exc
        self.groups: dict[int, Group] = {}
        self.mappings: dict[int, DmaMapping] = {}
        self.iommu_type: Extension | None = None
        self._info: IommuInfo | None = None
        try:
            version = _ioctl(self.fd, VFIO_GET_API_VERSION, 0, op="VFIO_GET_API_VERSION", who="container")
            if version != VFIO_API_VERSION:
                raise VfioError(
                    "container",
                    f"VFIO API version {version}, expected {VFIO_API_VERSION}",
                    os_errno=errno.EINVAL,
                )
            if not self.check_extension(Extension.TYPE1v2_IOMMU) and not self.check_extension(
                Extension.TYPE1_IOMMU
            ):
                raise VfioError(
                    "container",
                    "no type1 IOMMU (VFIO_TYPE1_IOMMU): is vfio_iommu_type1 loaded?",
                    os_errno=errno.ENODEV,
                )
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def check_extension(self, extension: int) -> int:
        """``VFIO_CHECK_EXTENSION``: nonzero when supported."""
        return _ioctl(
            self.fd,
            VFIO_CHECK_EXTENSION,
            int(extension),
            op="VFIO_CHECK_EXTENSION",
            who="container",
            detail=f"extension {int(extension)}",
        )

    def group(self, number: int, *, dev_vfio: str = "/dev/vfio") -> Group:
        """Open ``/dev/vfio/<number>`` and add it (the first group sets the IOMMU type).

        Idempotent: a group already in this container is returned as is.
        """
        existing = self.groups.get(number)
        if existing is not None:
            return existing
        group = Group(number, path=os.path.join(dev_vfio, str(number)))
        try:
            group.set_container(self)
            if self.iommu_type is None:
                self.set_iommu()
        except BaseException:
            group.close()
            raise
        self.groups[number] = group
        return group

    def device(self, address: str | PciAddress, *, stub: PciStub | None = None) -> Device:
        """Open the device of a (claimed) PCI function: its group, then the device fd."""
        address = PciAddress.parse(address)
        number = (stub or PciStub()).group_of(address)
        return self.group(number).device(address)

    def set_iommu(self, kind: Extension | None = None) -> None:
        """``VFIO_SET_IOMMU`` (default: type1 v2 when supported, else type1)."""
        if kind is None:
            kind = (
                Extension.TYPE1v2_IOMMU
                if self.check_extension(Extension.TYPE1v2_IOMMU)
                else Extension.TYPE1_IOMMU
            )
        _ioctl(self.fd, VFIO_SET_IOMMU, int(kind), op="VFIO_SET_IOMMU", who="container", detail=kind.name)
        self.iommu_type = kind

    def iommu_info(self) -> IommuInfo:
        """``VFIO_IOMMU_GET_INFO`` with its capabilities (cached after the first call)."""
        if self._info is not None:
            return self._info
        buf = bytearray(_sz(VfioIommuType1Info))
        for _ in range(4):
            info = VfioIommuType1Info.from_buffer(buf)
            info.argsz = len(buf)
            _ioctl(self.fd, VFIO_IOMMU_GET_INFO, buf, op="VFIO_IOMMU_GET_INFO", who="container")
            wanted = int(info.argsz)
            del info
            if wanted <= len(buf):
                break
            buf = bytearray(wanted)
        info = VfioIommuType1Info.from_buffer_copy(buf)
        ranges: list[tuple[int, int]] = []
        avail: int | None = None
        if info.flags & IommuInfoFlags.CAPS:
            for cap_id, _, offset in _cap_chain(buf, int(info.cap_offset)):
                if cap_id == IommuCap.IOVA_RANGE:
                    head = VfioIommuType1InfoCapIovaRange.from_buffer_copy(buf, offset)
                    start = offset + _sz(VfioIommuType1InfoCapIovaRange)
                    for i in range(int(head.nr_iovas)):
                        item = VfioIovaRange.from_buffer_copy(buf, start + i * _sz(VfioIovaRange))
                        ranges.append((int(item.start), int(item.end)))
                elif cap_id == IommuCap.DMA_AVAIL:
                    avail = int(VfioIommuType1InfoDmaAvail.from_buffer_copy(buf, offset).avail)
        pgsizes = int(info.iova_pgsizes) if info.flags & IommuInfoFlags.PGSIZES else 0
        self._info = IommuInfo(pgsizes, tuple(ranges), avail)
        return self._info

    def dma_map(
        self,
        iova: int,
        buffer: WriteableBuffer | int,
        size: int | None = None,
        *,
        offset: int = 0,
        read: bool = True,
        write: bool = True,
    ) -> DmaMapping:
        """``VFIO_IOMMU_MAP_DMA``: let the devices reach ``size`` bytes at ``iova``.

        :param buffer: writable mmap-backed memory (an anonymous mmap, a ``/dev/mem``
            mapping's ``mmap``), pinned until :meth:`dma_unmap`; or a host virtual address
            (the caller keeps that memory mapped)
        :param size: bytes (default: the rest of the buffer); a multiple of the IOMMU page
        :param offset: where in ``buffer`` the range starts
        :param read: the device may read (``VFIO_DMA_MAP_FLAG_READ``)
        :param write: the device may write (``VFIO_DMA_MAP_FLAG_WRITE``)
        :raise VfioError: ``EINVAL`` for misaligned or out-of-range arguments (named), else
            the kernel's error (``EEXIST`` for an overlap, ``ENOSPC`` out of mappings)
        """
        anchor: ctypes.Array[ctypes.c_char] | None = None
        if isinstance(buffer, int):
            if size is None:
                raise VfioError(
                    "container", "dma_map: size is required with a host address", os_errno=errno.EINVAL
                )
            vaddr = buffer + offset
        else:
            view = memoryview(buffer)
            total = view.nbytes
            view.release()
            if size is None:
                size = total - offset
            if offset < 0 or size <= 0 or offset + size > total:
                raise VfioError(
                    "container",
                    f"dma_map: IOVA {iova:#x}+{size:#x}: outside the buffer "
                    f"({total:#x} bytes at offset {offset:#x})",
                    os_errno=errno.EINVAL,
                )
            anchor = (ctypes.c_char * size).from_buffer(buffer, offset)
            vaddr = ctypes.addressof(anchor)
        where = f"IOVA {iova:#x}+{size:#x}"
        if self.iommu_type is None:
            raise VfioError(
                "container", f"dma_map {where}: no IOMMU set (add a group first)", os_errno=errno.EINVAL
            )
        if not (read or write):
            raise VfioError("container", f"dma_map {where}: neither read nor write", os_errno=errno.EINVAL)
        info = self.iommu_info()
        page = info.min_page
        misaligned = [
            name for name, value in (("IOVA", iova), ("size", size), ("host address", vaddr)) if value % page
        ]
        if misaligned:
            raise VfioError(
                "container",
                f"dma_map {where}: {', '.join(misaligned)} not aligned to the IOMMU page ({page:#x})",
                os_errno=errno.EINVAL,
            )
        if info.iova_ranges and not any(lo <= iova and iova + size - 1 <= hi for lo, hi in info.iova_ranges):
            valid = ", ".join(f"{lo:#x}-{hi:#x}" for lo, hi in info.iova_ranges)
            raise VfioError(
                "container",
                f"dma_map {where}: outside the valid IOVA ranges ({valid})",
                os_errno=errno.EINVAL,
            )
        raw = VfioIommuType1DmaMap(
            argsz=_sz(VfioIommuType1DmaMap),
            flags=(VFIO_DMA_MAP_FLAG_READ if read else 0) | (VFIO_DMA_MAP_FLAG_WRITE if write else 0),
            vaddr=vaddr,
            iova=iova,
            size=size,
        )
        _ioctl(
            self.fd,
            VFIO_IOMMU_MAP_DMA,
            raw,
            op="VFIO_IOMMU_MAP_DMA",
            who="container",
            detail=f"{where} at host {vaddr:#x}",
        )
        mapping = DmaMapping(iova, size, vaddr, read, write, anchor)
        self.mappings[iova] = mapping
        LOG.debug("DMA map %s at host %#x (%s%s)", where, vaddr, "r" if read else "", "w" if write else "")
        return mapping

    def dma_unmap(self, mapping: DmaMapping | int, size: int | None = None) -> int:
        """``VFIO_IOMMU_UNMAP_DMA`` of a mapping (or of ``iova``, ``size``); return bytes unmapped."""
        if isinstance(mapping, DmaMapping):
            iova, length = mapping.iova, mapping.size
        else:
            known = self.mappings.get(mapping)
            iova = mapping
            length = size if size is not None else (known.size if known else 0)
        raw = VfioIommuType1DmaUnmap(argsz=_sz(VfioIommuType1DmaUnmap), iova=iova, size=length)
        _ioctl(
            self.fd,
            VFIO_IOMMU_UNMAP_DMA,
            raw,
            op="VFIO_IOMMU_UNMAP_DMA",
            who="container",
            detail=f"IOVA {iova:#x}+{length:#x}",
        )
        for start in [start for start, m in self.mappings.items() if iova <= start < iova + length]:
            self.mappings.pop(start).anchor = None
        return int(raw.size)

    def close(self) -> None:
        """Unmap all DMA, close the groups (and their devices), close the container; idempotent.

        Errors on the way are logged: closing must not stop half-way.
        """
        for mapping in list(self.mappings.values()):
            try:
                self.dma_unmap(mapping)
            except VfioError as exc:
                LOG.warning("%s", exc)
                mapping.anchor = None
        self.mappings.clear()
        for group in list(self.groups.values()):
            group.close()
        self.groups.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Container(fd={self.fd}, groups={sorted(self.groups)}, mappings={len(self.mappings)})"


# ---------------------------------------------------------------------------------------
# Group
# ---------------------------------------------------------------------------------------


class Group:
    """A VFIO group (``/dev/vfio/N``).

    Lifecycle: open → :meth:`set_container` (by :meth:`Container.group`) →
    :meth:`device` → :meth:`close` (closes its devices first; the kernel then drops it
    from the container).

    :raise VfioError: ``ENOENT`` when the node is missing (no device of the group is
        bound to vfio-pci), ``EBUSY`` when another process has it open
    """

    def __init__(self, number: int, *, path: str | None = None) -> None:
        self.number = number
        self.path = path or f"/dev/vfio/{number}"
        self.who = f"group {number}"
        self.container: Container | None = None
        self.devices: dict[str, Device] = {}
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            code = exc.errno or 0
            hint = {
                errno.ENOENT: "no device of the group is bound to vfio-pci (claim it first)",
                errno.EBUSY: "another process or container has the group open",
            }.get(code, "")
            raise VfioError(self.who, _failed(f"open {self.path}", code, hint), os_errno=code) from exc

    def status(self) -> GroupFlags:
        """``VFIO_GROUP_GET_STATUS``."""
        raw = VfioGroupStatus(argsz=_sz(VfioGroupStatus))
        _ioctl(self.fd, VFIO_GROUP_GET_STATUS, raw, op="VFIO_GROUP_GET_STATUS", who=self.who)
        return GroupFlags(raw.flags)

    @property
    def viable(self) -> bool:
        """Every device of the group is bound to VFIO or harmless (nothing else DMAs in it)."""
        return GroupFlags.VIABLE in self.status()

    def set_container(self, container: Container) -> None:
        """``VFIO_GROUP_SET_CONTAINER`` (after checking that the group is viable)."""
        if not self.viable:
            raise VfioError(
                self.who,
                "not viable: a device of the group is still bound to a host driver (claim the whole group)",
                code=Errno.EBUSY,
            )
        arg = bytearray(struct.pack("=i", container.fd))
        _ioctl(self.fd, VFIO_GROUP_SET_CONTAINER, arg, op="VFIO_GROUP_SET_CONTAINER", who=self.who)
        self.container = container

    def unset_container(self) -> None:
        """``VFIO_GROUP_UNSET_CONTAINER`` (the devices must be closed)."""
        if self.container is None:
            return
        _ioctl(self.fd, VFIO_GROUP_UNSET_CONTAINER, 0, op="VFIO_GROUP_UNSET_CONTAINER", who=self.who)
        self.container = None

    def device(self, address: str | PciAddress) -> Device:
        """``VFIO_GROUP_GET_DEVICE_FD`` (idempotent per device)."""
        address = PciAddress.parse(address)
        name = str(address)
        existing = self.devices.get(name)
        if existing is not None:
            return existing
        if self.container is None:
            raise VfioError(
                address.short,
                f"{self.who} has no container: add it to a Container first",
                os_errno=errno.EINVAL,
            )
        arg = bytearray(name.encode() + b"\0")
        fd = _ioctl(
            self.fd,
            VFIO_GROUP_GET_DEVICE_FD,
            arg,
            op="VFIO_GROUP_GET_DEVICE_FD",
            who=address.short,
            detail=f"in {self.who}",
        )
        try:
            device = Device(self, address, fd)
        except BaseException:
            os.close(fd)
            raise
        self.devices[name] = device
        return device

    def close(self) -> None:
        """Close the devices, then the group; idempotent."""
        for device in list(self.devices.values()):
            device.close()
        self.devices.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.container is not None:
            self.container.groups.pop(self.number, None)
            self.container = None

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Group({self.number}, fd={self.fd}, devices={sorted(self.devices)})"


# ---------------------------------------------------------------------------------------
# Device
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceInfo:
    """``VFIO_DEVICE_GET_INFO``."""

    flags: DeviceFlags
    num_regions: int
    num_irqs: int

    @property
    def can_reset(self) -> bool:
        return DeviceFlags.RESET in self.flags


@dataclasses.dataclass(frozen=True, slots=True)
class RegionInfo:
    """``VFIO_DEVICE_GET_REGION_INFO`` with its capabilities.

    :param offset: where the region starts in the device fd (for pread/pwrite/mmap)
    :param sparse_areas: (offset, size) of the mmap-able parts, when the kernel restricts
        mmap (a BAR holding an MSI-X table); None when the whole region may be mapped
    :param msix_mappable: the MSI-X table may be mapped too (``MSIX_MAPPABLE`` cap)
    :param type: (type, subtype) of a device-specific region (``TYPE`` cap)
    """

    index: int
    flags: RegionFlags
    size: int
    offset: int
    sparse_areas: tuple[tuple[int, int], ...] | None = None
    msix_mappable: bool = False
    type: tuple[int, int] | None = None

    @property
    def mmap_areas(self) -> tuple[tuple[int, int], ...]:
        """The (offset, size) ranges to mmap: the sparse areas, or the whole region."""
        if RegionFlags.MMAP not in self.flags or not self.size:
            return ()
        if self.sparse_areas is not None:
            return tuple(area for area in self.sparse_areas if area[1])
        return ((0, self.size),)


@dataclasses.dataclass(frozen=True, slots=True)
class IrqInfo:
    """``VFIO_DEVICE_GET_IRQ_INFO``: ``count`` vectors of IRQ index ``index``."""

    index: int
    flags: IrqInfoFlags
    count: int


_VALUE_TYPES: Final[Mapping[int, type[ctypes._SimpleCData[int]]]] = {1: _u8, 2: _u16, 4: _u32, 8: _u64}


@dataclasses.dataclass(eq=False)
class MappedArea:
    """One mmap'd part of a region: ``size`` bytes at ``offset`` in the region."""

    offset: int
    size: int
    mmap: mmap.mmap = dataclasses.field(repr=False)


class RegionMapping:
    """A BAR mmap'd from the device fd, honoring the sparse mmap areas.

    :meth:`read_value` / :meth:`write_value` do one load or store of 1, 2, 4 or 8 bytes
    (devices such as QEMU's edu accept only 4- and 8-byte accesses); offsets outside
    the mapped areas (an MSI-X table) go through ``pread``/``pwrite`` on the device fd.
    For a KVM memory slot, pass ``area.mmap`` of an area (:meth:`area_at`) to
    :meth:`~harness.hvmodel.arch.kvm.Vm.add_memory`.

    Lifecycle: made by :meth:`Device.mmap_region`; :meth:`close` (or the device's close)
    unmaps; a KVM slot or DMA mapping still using an area makes :meth:`close` fail with
    :class:`BufferError`.
    """

    def __init__(self, device: Device, info: RegionInfo, areas: list[MappedArea]) -> None:
        self.device = device
        self.info = info
        self.areas = areas

    @property
    def index(self) -> int:
        return self.info.index

    @property
    def size(self) -> int:
        return self.info.size

    def area_at(self, offset: int, size: int = 1) -> MappedArea | None:
        """The mapped area holding ``offset .. offset + size``, if any."""
        for area in self.areas:
            if area.offset <= offset and offset + size <= area.offset + area.size:
                return area
        return None

    def read_value(self, offset: int, size: int) -> int:
        kind = _value_type(size)
        area = self.area_at(offset, size)
        if area is None:
            return self.device.read_value(self.index, offset, size)
        cell = kind.from_buffer(area.mmap, offset - area.offset)
        try:
            return int(cell.value)
        finally:
            del cell

    def write_value(self, offset: int, size: int, value: int) -> None:
        kind = _value_type(size)
        area = self.area_at(offset, size)
        if area is None:
            self.device.write_value(self.index, offset, size, value)
            return
        cell = kind.from_buffer(area.mmap, offset - area.offset)
        try:
            cell.value = value & ((1 << (8 * size)) - 1)
        finally:
            del cell

    def close(self) -> None:
        """Unmap every area; idempotent."""
        for area in self.areas:
            if not area.mmap.closed:
                area.mmap.close()
        self.device.mappings.pop(self.index, None)

    def __repr__(self) -> str:
        parts = ", ".join(f"{a.offset:#x}+{a.size:#x}" for a in self.areas)
        return f"RegionMapping({self.device.who} region {self.index}: {parts})"


def _value_type(size: int) -> type[ctypes._SimpleCData[int]]:
    kind = _VALUE_TYPES.get(size)
    if kind is None:
        raise ValueError(f"access size {size}: must be 1, 2, 4 or 8")
    return kind


class Device:
    """A VFIO device (a PCI function bound to ``vfio-pci``).

    Lifecycle: made by :meth:`Group.device`; regions read and written with
    :meth:`read`/:meth:`write` (any region, the config space included) or mapped with
    :meth:`mmap_region`; interrupts with :meth:`enable_irqs` (one eventfd per vector) and
    :meth:`disable_irqs`; :meth:`close` disables interrupts, unmaps and closes the fd
    (the group closes its devices).
    """

    def __init__(self, group: Group, address: PciAddress, fd: int) -> None:
        self.group = group
        self.address = address
        self.who = address.short
        self.fd = fd
        self.mappings: dict[int, RegionMapping] = {}
        #: eventfds of enabled IRQ indexes (those this object created are closed with them)
        self.irqs: dict[int, list[EventFd]] = {}
        self._owned_irqs: dict[int, list[EventFd]] = {}
        self._region_cache: dict[int, RegionInfo] = {}
        self.info = self._get_info()

    # --- information -------------------------------------------------------------------------

    def _get_info(self) -> DeviceInfo:
        raw = VfioDeviceInfo(argsz=_sz(VfioDeviceInfo))
        _ioctl(self.fd, VFIO_DEVICE_GET_INFO, raw, op="VFIO_DEVICE_GET_INFO", who=self.who)
        return DeviceInfo(DeviceFlags(raw.flags), int(raw.num_regions), int(raw.num_irqs))

    def region_info(self, index: int) -> RegionInfo:
        """``VFIO_DEVICE_GET_REGION_INFO`` with the capability chain (cached)."""
        cached = self._region_cache.get(index)
        if cached is not None:
            return cached
        buf = bytearray(_sz(VfioRegionInfo))
        for _ in range(4):
            raw = VfioRegionInfo.from_buffer(buf)
            raw.argsz = len(buf)
            raw.index = index
            del raw
            _ioctl(
                self.fd,
                VFIO_DEVICE_GET_REGION_INFO,
                buf,
                op="VFIO_DEVICE_GET_REGION_INFO",
                who=self.who,
                detail=f"region {index}",
            )
            wanted = int(VfioRegionInfo.from_buffer_copy(buf).argsz)
            if wanted <= len(buf):
                break
            buf = bytearray(wanted)
        raw_info = VfioRegionInfo.from_buffer_copy(buf)
        sparse: list[tuple[int, int]] | None = None
        msix = False
        kind: tuple[int, int] | None = None
        if raw_info.flags & RegionFlags.CAPS:
            for cap_id, _, offset in _cap_chain(buf, int(raw_info.cap_offset)):
                if cap_id == RegionCap.SPARSE_MMAP:
                    head = VfioRegionInfoCapSparseMmap.from_buffer_copy(buf, offset)
                    start = offset + _sz(VfioRegionInfoCapSparseMmap)
                    sparse = []
                    for i in range(int(head.nr_areas)):
                        area = VfioRegionSparseMmapArea.from_buffer_copy(
                            buf, start + i * _sz(VfioRegionSparseMmapArea)
                        )
                        sparse.append((int(area.offset), int(area.size)))
                elif cap_id == RegionCap.MSIX_MAPPABLE:
                    msix = True
                elif cap_id == RegionCap.TYPE:
                    cap = VfioRegionInfoCapType.from_buffer_copy(buf, offset)
                    kind = (int(cap.type), int(cap.subtype))
        info = RegionInfo(
            index=index,
            flags=RegionFlags(raw_info.flags & 0xF),
            size=int(raw_info.size),
            offset=int(raw_info.offset),
            sparse_areas=tuple(sparse) if sparse is not None else None,
            msix_mappable=msix,
            type=kind,
        )
        self._region_cache[index] = info
        return info

    def regions(self) -> list[RegionInfo]:
        """Every region (``num_regions``); unimplemented ones have size 0.

        vfio-pci refuses to describe the VGA region of a non-VGA device (``EINVAL``):
        it is listed as an empty region.
        """
        found: list[RegionInfo] = []
        for index in range(self.info.num_regions):
            try:
                found.append(self.region_info(index))
            except VfioError as exc:
                if exc.os_errno != errno.EINVAL:
                    raise
                found.append(RegionInfo(index, RegionFlags(0), 0, 0))
        return found

    def irq_info(self, index: int) -> IrqInfo:
        """``VFIO_DEVICE_GET_IRQ_INFO``."""
        raw = VfioIrqInfo(argsz=_sz(VfioIrqInfo), index=index)
        _ioctl(
            self.fd,
            VFIO_DEVICE_GET_IRQ_INFO,
            raw,
            op="VFIO_DEVICE_GET_IRQ_INFO",
            who=self.who,
            detail=f"IRQ index {index}",
        )
        return IrqInfo(index, IrqInfoFlags(raw.flags), int(raw.count))

    def irq_infos(self) -> list[IrqInfo]:
        """Every IRQ index (``num_irqs``); ones the device lacks have count 0.

        vfio-pci refuses ERR and REQ on devices without PCIe/AER (``EINVAL``): they are
        listed with count 0.
        """
        found: list[IrqInfo] = []
        for index in range(self.info.num_irqs):
            try:
                found.append(self.irq_info(index))
            except VfioError as exc:
                if exc.os_errno != errno.EINVAL:
                    raise
                found.append(IrqInfo(index, IrqInfoFlags(0), 0))
        return found

    # --- region access ------------------------------------------------------------------------

    def _span(self, index: int, offset: int, size: int, op: str) -> RegionInfo:
        info = self.region_info(index)
        if offset < 0 or size < 0 or offset + size > info.size:
            raise VfioError(
                self.who,
                f"{op} region {index} at {offset:#x}+{size:#x}: outside the region ({info.size:#x} bytes)",
                os_errno=errno.EINVAL,
            )
        return info

    def read(self, index: int, offset: int, size: int) -> bytes:
        """``pread`` ``size`` bytes at ``offset`` of region ``index`` (vfio-pci splits it into
        naturally aligned accesses of up to 4 bytes)."""
        info = self._span(index, offset, size, "read")
        try:
            data = os.pread(self.fd, size, info.offset + offset)
        except OSError as exc:
            code = exc.errno or 0
            raise VfioError(
                self.who, _failed("read", code, f"region {index} at {offset:#x}+{size:#x}"), os_errno=code
            ) from exc
        if len(data) != size:
            raise VfioError(
                self.who,
                f"read region {index} at {offset:#x}+{size:#x}: got {len(data)} bytes",
                os_errno=errno.EIO,
            )
        return data

    def write(self, index: int, offset: int, data: bytes) -> None:
        """``pwrite`` ``data`` at ``offset`` of region ``index``."""
        info = self._span(index, offset, len(data), "write")
        try:
            done = os.pwrite(self.fd, data, info.offset + offset)
        except OSError as exc:
            code = exc.errno or 0
            raise VfioError(
                self.who,
                _failed("write", code, f"region {index} at {offset:#x}+{len(data):#x}"),
                os_errno=code,
            ) from exc
        if done != len(data):
            raise VfioError(
                self.who,
                f"write region {index} at {offset:#x}+{len(data):#x}: wrote {done} bytes",
                os_errno=errno.EIO,
            )

    def read_value(self, index: int, offset: int, size: int) -> int:
        """One little-endian ``size``-byte (1, 2, 4) read of region ``index``."""
        _value_type(size)
        return int.from_bytes(self.read(index, offset, size), "little")

    def write_value(self, index: int, offset: int, size: int, value: int) -> None:
        """One little-endian ``size``-byte (1, 2, 4) write to region ``index``."""
        _value_type(size)
        self.write(index, offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def config_read(self, offset: int, size: int) -> int:
        """Read the PCI config space (VFIO's view: BARs and MSI/MSI-X virtualized)."""
        return self.read_value(PciRegion.CONFIG, offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Write the PCI config space through VFIO's filter."""
        self.write_value(PciRegion.CONFIG, offset, size, value)

    def set_bus_master(self, enable: bool = True) -> None:
        """Set (or clear) ``COMMAND.MASTER`` and ``COMMAND.MEMORY``; a device DMAs and sends
        MSIs only with bus mastering on."""
        command = self.config_read(PCI_CFG_COMMAND, 2)
        if enable:
            command |= PCI_CMD_MASTER | PCI_CMD_MEM
        else:
            command &= ~PCI_CMD_MASTER
        self.config_write(PCI_CFG_COMMAND, 2, command)

    def mmap_region(self, index: int) -> RegionMapping:
        """mmap region ``index`` (a BAR) as far as VFIO allows: the sparse areas, or all of it.

        :raise VfioError: ``EINVAL`` when the region cannot be mapped at all, else mmap's error
        """
        existing = self.mappings.get(index)
        if existing is not None:
            return existing
        info = self.region_info(index)
        areas = info.mmap_areas
        if not areas:
            raise VfioError(
                self.who,
                f"mmap region {index}: not mappable (flags {info.flags!r}, size {info.size:#x})",
                os_errno=errno.EINVAL,
            )
        prot = (mmap.PROT_READ if RegionFlags.READ in info.flags else 0) | (
            mmap.PROT_WRITE if RegionFlags.WRITE in info.flags else 0
        )
        mapped: list[MappedArea] = []
        try:
            for area_offset, area_size in areas:
                try:
                    raw = mmap.mmap(
                        self.fd, area_size, mmap.MAP_SHARED, prot, offset=info.offset + area_offset
                    )
                except OSError as exc:
                    code = exc.errno or 0
                    raise VfioError(
                        self.who,
                        _failed("mmap", code, f"region {index} at {area_offset:#x}+{area_size:#x}"),
                        os_errno=code,
                    ) from exc
                mapped.append(MappedArea(area_offset, area_size, raw))
        except BaseException:
            for area in mapped:
                area.mmap.close()
            raise
        mapping = RegionMapping(self, info, mapped)
        self.mappings[index] = mapping
        return mapping

    # --- interrupts ---------------------------------------------------------------------------

    def _set_irqs(self, index: int, flags: int, start: int, count: int, data: bytes, detail: str) -> None:
        buf = bytearray(_sz(VfioIrqSet) + len(data))
        header = VfioIrqSet.from_buffer(buf)
        header.argsz = len(buf)
        header.flags = flags
        header.index = index
        header.start = start
        header.count = count
        del header
        buf[_sz(VfioIrqSet) :] = data
        _ioctl(self.fd, VFIO_DEVICE_SET_IRQS, buf, op="VFIO_DEVICE_SET_IRQS", who=self.who, detail=detail)

    def enable_irqs(self, index: int, eventfds: int | Sequence[EventFd | int]) -> list[EventFd]:
        """Signal IRQ index ``index`` (:class:`PciIrq`) through eventfds, one per vector
        (``DATA_EVENTFD | ACTION_TRIGGER``, vectors 0..n-1). This enables MSI/MSI-X on
        the device (VFIO programs the host's remapped address/data).

        :param eventfds: a vector count (eventfds are made here and closed by
            :meth:`disable_irqs`), or the caller's eventfds (kept open)
        :return: the eventfds of the enabled vectors (made here, or wrapped)
        :raise VfioError: ``EINVAL`` when the device has fewer vectors, else the kernel's error
        """
        info = self.irq_info(index)
        name = _irq_name(index)
        owned = isinstance(eventfds, int)
        if isinstance(eventfds, int):
            count = eventfds
            fds: list[EventFd] = []
            try:
                for _ in range(count):
                    fds.append(EventFd())
            except BaseException:
                for fd in fds:
                    fd.close()
                raise
        else:
            fds = [fd if isinstance(fd, EventFd) else _BorrowedEventFd(fd) for fd in eventfds]
            count = len(fds)
        try:
            if count < 1 or count > info.count:
                raise VfioError(
                    self.who,
                    f"enable {name}: {count} vectors asked, the device has {info.count}",
                    os_errno=errno.EINVAL,
                )
            if IrqInfoFlags.EVENTFD not in info.flags:
                raise VfioError(
                    self.who, f"enable {name}: index cannot signal eventfds", os_errno=errno.EINVAL
                )
            if index in self.irqs:
                self.disable_irqs(index)
            data = struct.pack(f"={count}i", *(fd.fileno() for fd in fds))
            self._set_irqs(
                index,
                IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER,
                0,
                count,
                data,
                f"enable {name}, {count} vector{'s' if count != 1 else ''}",
            )
        except BaseException:
            if owned:
                for fd in fds:
                    fd.close()
            raise
        self.irqs[index] = fds
        if owned:
            self._owned_irqs[index] = fds
        LOG.debug("%s: %s enabled, eventfds %s", self.who, name, [fd.fileno() for fd in fds])
        return fds

    def enable_msi(self, eventfds: int | Sequence[EventFd | int] = 1) -> list[EventFd]:
        """:meth:`enable_irqs` for MSI."""
        return self.enable_irqs(PciIrq.MSI, eventfds)

    def enable_msix(self, eventfds: int | Sequence[EventFd | int]) -> list[EventFd]:
        """:meth:`enable_irqs` for MSI-X (Linux 6.1 cannot add vectors later: enable all
        the vectors the cell may use, or disable and enable again)."""
        return self.enable_irqs(PciIrq.MSIX, eventfds)

    def disable_irqs(self, index: int) -> None:
        """Disable IRQ index ``index`` (``DATA_NONE | ACTION_TRIGGER``, count 0); close the
        eventfds :meth:`enable_irqs` made."""
        try:
            self._set_irqs(
                index,
                IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER,
                0,
                0,
                b"",
                f"disable {_irq_name(index)}",
            )
        finally:
            self.irqs.pop(index, None)
            for fd in self._owned_irqs.pop(index, []):
                fd.close()

    def trigger_irq(self, index: int, vector: int = 0) -> None:
        """Fire a vector from software (``DATA_NONE | ACTION_TRIGGER``, count 1): VFIO's
        loopback test; the vector's eventfd is signalled as if the device had fired."""
        self._set_irqs(
            index,
            IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER,
            vector,
            1,
            b"",
            f"trigger {_irq_name(index)} vector {vector}",
        )

    def unmask_intx(self) -> None:
        """Unmask INTx after an interrupt (INTx is automasked by VFIO)."""
        self._set_irqs(
            PciIrq.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 1, b"", "unmask INTx"
        )

    # --- reset --------------------------------------------------------------------------------

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET`` (function-level, PM or slot/bus reset, as the kernel can).

        :raise VfioError: ``ENOTTY``-like when the device has no reset method
        """
        if not self.info.can_reset:
            raise VfioError(
                self.who,
                "VFIO_DEVICE_RESET: the device has no reset method (no FLR, PM or bus reset available)",
                os_errno=errno.ENOTTY,
            )
        _ioctl(self.fd, VFIO_DEVICE_RESET, 0, op="VFIO_DEVICE_RESET", who=self.who)

    def hot_reset_info(self) -> list[tuple[int, PciAddress]]:
        """``VFIO_DEVICE_GET_PCI_HOT_RESET_INFO``: (group, device) of every function a bus
        reset of this device would reset too."""
        count = 8
        while True:
            buf = bytearray(_sz(VfioPciHotResetInfo) + count * _sz(VfioPciDependentDevice))
            header = VfioPciHotResetInfo.from_buffer(buf)
            header.argsz = len(buf)
            del header
            try:
                _ioctl(
                    self.fd,
                    VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
                    buf,
                    op="VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
                    who=self.who,
                )
            except VfioError as exc:
                if exc.os_errno == errno.ENOSPC and count < 1024:
                    count = max(count * 2, int(VfioPciHotResetInfo.from_buffer_copy(buf).count))
                    continue
                raise
            found = int(VfioPciHotResetInfo.from_buffer_copy(buf).count)
            result = []
            for i in range(found):
                dep = VfioPciDependentDevice.from_buffer_copy(
                    buf, _sz(VfioPciHotResetInfo) + i * _sz(VfioPciDependentDevice)
                )
                result.append(
                    (
                        int(dep.group_id),
                        PciAddress(int(dep.segment), int(dep.bus), dep.devfn >> 3, dep.devfn & 7),
                    )
                )
            return result

    def hot_reset(self, groups: Sequence[Group]) -> None:
        """``VFIO_DEVICE_PCI_HOT_RESET``: a bus reset; ``groups`` must cover every group
        :meth:`hot_reset_info` names (the kernel proves ownership by their fds)."""
        data = struct.pack(f"={len(groups)}i", *(group.fd for group in groups))
        buf = bytearray(_sz(VfioPciHotReset) + len(data))
        header = VfioPciHotReset.from_buffer(buf)
        header.argsz = len(buf)
        header.count = len(groups)
        del header
        buf[_sz(VfioPciHotReset) :] = data
        _ioctl(
            self.fd,
            VFIO_DEVICE_PCI_HOT_RESET,
            buf,
            op="VFIO_DEVICE_PCI_HOT_RESET",
            who=self.who,
            detail=f"groups {[group.number for group in groups]}",
        )

    # --- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Disable interrupts, unmap regions, close the fd; idempotent. Errors are logged."""
        for index in list(self.irqs):
            try:
                self.disable_irqs(index)
            except VfioError as exc:
                LOG.warning("%s", exc)
        for mapping in list(self.mappings.values()):
            try:
                mapping.close()
            except BufferError:
                LOG.warning("%s: region %d still in use (KVM slot?): left mapped", self.who, mapping.index)
        self.mappings.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.group.devices.pop(str(self.address), None)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Device({self.who}, fd={self.fd}, {self.info.num_regions} regions, {self.info.num_irqs} IRQs)"


class _BorrowedEventFd(EventFd):
    """An eventfd the caller owns, wrapped (never closed here)."""

    def __init__(self, fd: int) -> None:  # no os.eventfd here: the caller's fd
        self.fd = fd

    def close(self) -> None:
        """Not ours to close."""


def _irq_name(index: int) -> str:
    try:
        return PciIrq(index).name
    except ValueError:
        return f"IRQ index {index}"


# ---------------------------------------------------------------------------------------
# Bridge to the executor: cell memory into the IOMMU, device vectors into KVM
# ---------------------------------------------------------------------------------------



def dma_map_regions(
    container: Container,
    regions: Iterable[MemoryRegion],
    backing: Callable[[MemoryRegion], tuple[WriteableBuffer, int] | None],
) -> list[DmaMapping]:
    """Map a cell's DMA-flagged memory regions into ``container`` at their ``virt_start``.

    The device then reaches the cell's RAM at the cell's guest-physical addresses, as
    with Jailhouse's VT-d mapping (reference §3.5 step 14: "plus IOMMU if DMA"); the
    device may read a region the config marks READ and write one marked WRITE.
    Regions without ``JAILHOUSE_MEM_DMA``, the comm region and empty ones are skipped.
    All or nothing: on an error the mappings made here are undone.

    :param backing: gives the host memory of a region: e.g. the executor's ``/dev/mem``
        :class:`~harness.hvmodel.arch.kvm.PhysMapping` of it, ``(mapping.mmap,
        mapping.offset)``; None skips the region
    :raise VfioError: naming the region, for a sub-page region or the container's refusal
    """
    made: list[DmaMapping] = []
    try:
        for region in regions:
            flags = int(region.flags)
            if not flags & MEM_DMA or flags & MEM_COMM_REGION or region.size == 0:
                continue
            where = f"memory region {region.phys_start:#x}->{region.virt_start:#x}+{region.size:#x}"
            if (region.virt_start | region.size) % HOST_PAGE_SIZE:
                raise VfioError(
                    "container",
                    f"DMA map {where}: sub-page regions cannot be mapped for DMA",
                    os_errno=errno.EINVAL,
                )
            source = backing(region)
            if source is None:
                continue
            buffer, offset = source
            try:
                made.append(
                    container.dma_map(
                        region.virt_start,
                        buffer,
                        region.size,
                        offset=offset,
                        read=bool(flags & MEM_READ),
                        write=bool(flags & MEM_WRITE),
                    )
                )
            except VfioError as exc:
                raise VfioError(
                    exc.who, f"{exc.text} ({where})", os_errno=exc.os_errno, code=exc.errno
                ) from exc
    except BaseException:
        for mapping in reversed(made):
            try:
                container.dma_unmap(mapping)
            except VfioError as exc:
                LOG.warning("%s", exc)
        raise
    return made


def default_irqchip_routes() -> list[IrqchipRoute]:
    """KVM's default GSI routes of a full in-kernel irqchip (``default_routing`` of
    ``arch/x86/kvm/irq_comm.c``): GSI 0-15 to the PICs and the IOAPIC, 16-23 to the IOAPIC."""
    routes: list[IrqchipRoute] = []
    for gsi in range(24):
        if gsi < 16:
            routes.append(IrqchipRoute(gsi, 0 if gsi < 8 else 1, gsi % 8))
        routes.append(IrqchipRoute(gsi, 2, gsi))
    return routes


@dataclasses.dataclass(frozen=True, slots=True)
class RoutedVector:
    """A device vector delivered to a VM: its eventfd feeds GSI ``gsi``, routed as an MSI."""

    gsi: int
    eventfd: int
    address: int
    data: int


class MsiRouter:
    """The GSI routing table of one KVM VM, for passed-through devices' MSIs.

    KVM replaces the whole table on every ``KVM_SET_GSI_ROUTING``, and
    :class:`~harness.hvmodel.arch.kvm.Vm` does not remember it; this object keeps it.
    Each routed vector gets a GSI (from ``first_gsi``; below it the IOAPIC pins of the
    split irqchip), an MSI route with the cell's address and data, and an irqfd: VFIO
    signals the eventfd, KVM injects the MSI, no exit to user space.

    Lifecycle: one router per VM; :meth:`route` / :meth:`update` / :meth:`unroute`;
    :meth:`close` deassigns every irqfd and clears the routes (before the VM closes).

    :param vm: the cell's VM
    :param first_gsi: lowest GSI to hand out (24: above the IOAPIC pins)
    :param irqchip_defaults: keep KVM's default PIC/IOAPIC routes in the table (needed
        with a full in-kernel irqchip; default: ``vm.has_irqchip``)
    :raise KvmError: when KVM lacks GSI routing or irqfd
    """

    def __init__(self, vm: Vm, *, first_gsi: int = 24, irqchip_defaults: bool | None = None) -> None:
        vm.kvm.require(Cap.IRQ_ROUTING, Cap.IRQFD)
        self.vm = vm
        self.first_gsi = first_gsi
        keep = vm.has_irqchip if irqchip_defaults is None else irqchip_defaults
        self._base: list[MsiRoute | IrqchipRoute] = list(default_irqchip_routes()) if keep else []
        self.vectors: dict[int, RoutedVector] = {}

    def _commit(self) -> None:
        routes: list[MsiRoute | IrqchipRoute] = list(self._base)
        routes += [
            MsiRoute(v.gsi, v.address, v.data) for v in sorted(self.vectors.values(), key=lambda v: v.gsi)
        ]
        self.vm.set_gsi_routing(routes)

    def route(self, eventfd: EventFd | int, address: int, data: int) -> RoutedVector:
        """Deliver ``eventfd``'s signals as the MSI (``address``, ``data``) in the VM.

        :return: the vector with its GSI
        """
        fd = eventfd.fileno() if isinstance(eventfd, EventFd) else eventfd
        gsi = self.first_gsi
        while gsi in self.vectors:
            gsi += 1
        vector = RoutedVector(gsi, fd, address, data)
        self.vectors[gsi] = vector
        try:
            self._commit()
            self.vm.irqfd(fd, gsi)
        except BaseException:
            del self.vectors[gsi]
            self._commit()
            raise
        LOG.debug("eventfd %d -> GSI %d -> MSI address %#x data %#x", fd, gsi, address, data)
        return vector

    def update(self, vector: RoutedVector, address: int, data: int) -> RoutedVector:
        """The cell reprogrammed the vector: change its route (the irqfd stays)."""
        new = dataclasses.replace(vector, address=address, data=data)
        self.vectors[vector.gsi] = new
        self._commit()
        return new

    def unroute(self, vector: RoutedVector) -> None:
        """Deassign the irqfd and drop the route."""
        self.vm.irqfd(vector.eventfd, vector.gsi, deassign=True)
        self.vectors.pop(vector.gsi, None)
        self._commit()

    def close(self) -> None:
        """Unroute everything (errors logged); the VM must still be open."""
        for vector in list(self.vectors.values()):
            try:
                self.vm.irqfd(vector.eventfd, vector.gsi, deassign=True)
            except HvError as exc:
                LOG.warning("GSI %d: %s", vector.gsi, exc)
        self.vectors.clear()
        if self.vm.fd >= 0:
            try:
                self._commit()
            except HvError as exc:
                LOG.warning("%s", exc)
