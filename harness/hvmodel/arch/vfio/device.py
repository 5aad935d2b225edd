"""A VFIO device (a PCI function bound to ``vfio-pci``): its regions (BARs, ROM, config
space) read and written through the device fd or mmap'd (:class:`RegionMapping`,
honouring sparse mmap areas), its interrupts (:class:`~.irq.DeviceIrqs`), its reset.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import mmap
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Protocol

from ...abi import PCI_CFG_COMMAND, PCI_CMD_MASTER, PCI_CMD_MEM
from .ioctl import VfioError, cap_chain, failed, vfio_ioctl
from .irq import DeviceIrqs
from .structs import (
    VFIO_DEVICE_GET_INFO,
    VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DEVICE_PCI_HOT_RESET,
    VFIO_DEVICE_RESET,
    DeviceFlags,
    PciRegion,
    RegionCap,
    RegionFlags,
    VfioDeviceInfo,
    VfioPciDependentDevice,
    VfioPciHotReset,
    VfioPciHotResetInfo,
    VfioRegionInfo,
    VfioRegionInfoCapSparseMmap,
    VfioRegionInfoCapType,
    VfioRegionSparseMmapArea,
)
from .stub import PciAddress

__all__ = ["Device", "DeviceInfo", "MappedArea", "RegionInfo", "RegionMapping"]

LOG = logging.getLogger(__name__)

_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64
_sz = ctypes.sizeof


class OpenGroup(Protocol):
    """What a bus reset needs of a group the caller holds open."""

    number: int
    fd: int


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
    :meth:`Vm.add_memory <harness.hvmodel.arch.kvm.vm.Vm.add_memory>`.

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

    Lifecycle: made by :meth:`Group.device <.group.Group.device>`; regions read and
    written with :meth:`read`/:meth:`write` (any region, the config space included) or
    mapped with :meth:`mmap_region`; interrupts through :attr:`irqs` (one eventfd per
    vector); :meth:`close` disables interrupts, unmaps and closes the fd (the group closes
    its devices).

    :param address: the PCI function
    :param fd: the device fd, owned from now on
    :param on_close: called once by :meth:`close` (the group forgets the device)
    """

    def __init__(self, address: PciAddress, fd: int, *, on_close: Callable[[], object] | None = None) -> None:
        self.address = address
        self.who = address.short
        self.fd = fd
        self.mappings: dict[int, RegionMapping] = {}
        self._on_close = on_close
        self._region_cache: dict[int, RegionInfo] = {}
        self.info = self._get_info()
        #: the IRQ indexes (INTx, MSI, MSI-X, ...)
        self.irqs = DeviceIrqs(fd, self.who, self.info.num_irqs)

    # --- information -------------------------------------------------------------------------

    def _get_info(self) -> DeviceInfo:
        raw = VfioDeviceInfo(argsz=_sz(VfioDeviceInfo))
        vfio_ioctl(self.fd, VFIO_DEVICE_GET_INFO, raw, op="VFIO_DEVICE_GET_INFO", who=self.who)
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
            vfio_ioctl(
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
            for cap_id, _, offset in cap_chain(buf, int(raw_info.cap_offset)):
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
                self.who, failed("read", code, f"region {index} at {offset:#x}+{size:#x}"), os_errno=code
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
                failed("write", code, f"region {index} at {offset:#x}+{len(data):#x}"),
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
                        failed("mmap", code, f"region {index} at {area_offset:#x}+{area_size:#x}"),
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
        vfio_ioctl(self.fd, VFIO_DEVICE_RESET, 0, op="VFIO_DEVICE_RESET", who=self.who)

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
                vfio_ioctl(
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

    def hot_reset(self, groups: Sequence[OpenGroup]) -> None:
        """``VFIO_DEVICE_PCI_HOT_RESET``: a bus reset; ``groups`` must cover every group
        :meth:`hot_reset_info` names (the kernel proves ownership by their fds)."""
        data = struct.pack(f"={len(groups)}i", *(group.fd for group in groups))
        buf = bytearray(_sz(VfioPciHotReset) + len(data))
        header = VfioPciHotReset.from_buffer(buf)
        header.argsz = len(buf)
        header.count = len(groups)
        del header
        buf[_sz(VfioPciHotReset) :] = data
        vfio_ioctl(
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
        self.irqs.close()
        for mapping in list(self.mappings.values()):
            try:
                mapping.close()
            except BufferError:
                LOG.warning("%s: region %d still in use (KVM slot?): left mapped", self.who, mapping.index)
        self.mappings.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Device({self.who}, fd={self.fd}, {self.info.num_regions} regions, {self.info.num_irqs} IRQs)"
