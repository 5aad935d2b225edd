"""A VFIO container (``/dev/vfio/vfio``): one IOMMU address space for its groups, with the
type1 IOMMU's DMA mappings; stands where ``hypervisor/arch/x86/vtd.c`` keeps a cell's
IOMMU domain.

Lifecycle: open (API version and type1 support checked) → :meth:`Container.group` (the
first group sets the IOMMU type) → :meth:`Container.dma_map` /
:meth:`Container.dma_unmap` → :meth:`Container.close`, which unmaps everything and
closes the groups (and their devices) before the container.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
from typing import TYPE_CHECKING

from .. import HOST_PAGE_SIZE
from .device import Device
from .group import Group
from .ioctl import VfioError, cap_chain, failed, vfio_ioctl
from .structs import (
    VFIO_API_VERSION,
    VFIO_CHECK_EXTENSION,
    VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_GET_API_VERSION,
    VFIO_IOMMU_GET_INFO,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_UNMAP_DMA,
    VFIO_SET_IOMMU,
    Extension,
    IommuCap,
    IommuInfoFlags,
    VfioIommuType1DmaMap,
    VfioIommuType1DmaUnmap,
    VfioIommuType1Info,
    VfioIommuType1InfoCapIovaRange,
    VfioIommuType1InfoDmaAvail,
    VfioIovaRange,
)
from .stub import PciAddress, PciStub

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["Container", "DmaMapping", "IommuInfo"]

LOG = logging.getLogger(__name__)

_sz = ctypes.sizeof


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
                "container", failed(f"open {path}", code, "is vfio loaded?"), os_errno=code
            ) from exc
        self.groups: dict[int, Group] = {}
        self.mappings: dict[int, DmaMapping] = {}
        self.iommu_type: Extension | None = None
        self._info: IommuInfo | None = None
        try:
            version = vfio_ioctl(self.fd, VFIO_GET_API_VERSION, 0, op="VFIO_GET_API_VERSION", who="container")
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
        return vfio_ioctl(
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
            group.set_container(self.fd)
            if self.iommu_type is None:
                self.set_iommu()
        except BaseException:
            group.close()
            raise
        group.on_close = lambda: self.groups.pop(number, None)
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
        vfio_ioctl(self.fd, VFIO_SET_IOMMU, int(kind), op="VFIO_SET_IOMMU", who="container", detail=kind.name)
        self.iommu_type = kind

    def iommu_info(self) -> IommuInfo:
        """``VFIO_IOMMU_GET_INFO`` with its capabilities (cached after the first call)."""
        if self._info is not None:
            return self._info
        buf = bytearray(_sz(VfioIommuType1Info))
        for _ in range(4):
            info = VfioIommuType1Info.from_buffer(buf)
            info.argsz = len(buf)
            vfio_ioctl(self.fd, VFIO_IOMMU_GET_INFO, buf, op="VFIO_IOMMU_GET_INFO", who="container")
            wanted = int(info.argsz)
            del info
            if wanted <= len(buf):
                break
            buf = bytearray(wanted)
        info = VfioIommuType1Info.from_buffer_copy(buf)
        ranges: list[tuple[int, int]] = []
        avail: int | None = None
        if info.flags & IommuInfoFlags.CAPS:
            for cap_id, _, offset in cap_chain(buf, int(info.cap_offset)):
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
        vfio_ioctl(
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
        vfio_ioctl(
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
