"""The VFIO ABI (``<linux/vfio.h>``): ioctl request numbers, flags and enums, and the
``struct vfio_*`` layouts as :mod:`ctypes` structures, with the capability chains of
region info (sparse mmap areas, MSI-X mappable, region type) and IOMMU info (valid IOVA
ranges, available DMA mappings). Nothing here calls the kernel.

Every VFIO request is ``_IO(VFIO_TYPE, VFIO_BASE + n)``: no size or direction bits, the
kernel reads ``argsz`` from the argument instead. Sizes in the docstrings, field offsets
and numbers are checked against the kernel's headers by
``test_suites/unit/test_vfio_abi.py``.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Mapping
from typing import Final

from ..uapi import io

VFIO_TYPE: Final = ord(";")
VFIO_BASE: Final = 100
VFIO_API_VERSION: Final = 0


def _vfio_io(n: int) -> int:
    return io(VFIO_TYPE, VFIO_BASE + n)


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
# Structures
# ---------------------------------------------------------------------------------------

_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


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
