"""VFIO binding of the executor; stands where ``hypervisor/arch/x86/vtd.c`` (DMA and
interrupt remapping of cell devices) and the Linux driver's ``driver/pci.c`` (the
``jailhouse-pci-stub`` claim and release) are.

Jailhouse programs VT-d itself and parks a cell's PCI devices on its stub driver in the
root. jhlab's executor asks Linux VFIO (type1 IOMMU, on the lab's intel-iommu) for the
same things. Standard library only (``ctypes``, ``fcntl``, ``mmap``, ``os``, ``select``,
``struct``): it runs in the lab root cell's Debian ``python3`` with nothing installed.
One module per object:

==================  =====================================================================
module              holds
==================  =====================================================================
:mod:`.structs`     ioctl numbers, flags and the ``struct vfio_*`` layouts
:mod:`.ioctl`       :func:`~.ioctl.vfio_ioctl`, :class:`VfioError`, capability chains
:mod:`.stub`        :class:`PciAddress`, the IOMMU group policy, :class:`PciStub`: claim
                    for ``vfio-pci`` through ``driver_override`` (Jailhouse binds
                    ``jailhouse-pci-stub`` through a dynamic ID), release (Jailhouse
                    leaves the device unbound: the default here too)
:mod:`.container`   :class:`Container` (``/dev/vfio/vfio``: IOMMU type, DMA map/unmap)
:mod:`.group`       :class:`Group` (``/dev/vfio/N``)
:mod:`.device`      :class:`Device` (regions by ``pread``/``pwrite`` or mmap, config
                    space, reset)
:mod:`.irq`         :class:`DeviceIrqs` (INTx, MSI, MSI-X: one :class:`EventFd` per
                    vector) and :class:`MsiRouter` (a vector into a KVM VM: GSI route
                    and irqfd)
:mod:`.dma`         :func:`dma_map_regions`: a cell's DMA-flagged memory regions into
                    its container at their ``virt_start`` (the device then sees cell
                    guest-physical addresses)
==================  =====================================================================

**Lifecycle.** claim → :class:`Container` → :meth:`Container.group` →
:meth:`Group.device` → use → close (device, group, container: closing a container
closes its groups and their devices) → release.

Facts measured with this binding in the default lab (Linux 6.1, QEMU 7.2 intel-iommu,
TCG; ``test_suites/e2e/test_vfio.py``): the edu device at 01:01.0 (behind the
pcie-pci-bridge, in one group with that driverless bridge) claims and releases cleanly;
BAR0 mmaps whole (no sparse areas) and reads ``0x010000ed``;
its MSI (1 vector) fires an eventfd, and through :class:`MsiRouter` lands in a KVM vCPU's
APIC IRR; DMA works both ways through an anonymous mmap and through a ``/dev/mem``
window of the ``memmap=`` reserve mapped at a cell's ``virt_start`` (type1 accepts the
PFN-mapped memory); the IOMMU offers 4K/2M/1G pages and all IOVAs but the MSI window
0xfee00000-0xfeefffff. vfio-pci answers ``EINVAL`` for the VGA region and the ERR/REQ
IRQs of a plain PCI device (:meth:`Device.regions` / :meth:`DeviceIrqs.infos` list them
as empty), and edu has no reset method (:meth:`Device.reset` says so).

Errors: every failing step raises :class:`VfioError`, an
:class:`~harness.hvmodel.errors.HvError` that names the device (or group, or container)
and the step, and keeps the kernel's errno (:attr:`VfioError.os_errno`).

The names below are re-exported here (``from harness.hvmodel.arch.vfio import
Container``); the ctypes structures, request numbers and the other flags are imported
from :mod:`.structs`.
"""

from __future__ import annotations

from .container import Container, DmaMapping, IommuInfo
from .device import Device, DeviceInfo, MappedArea, RegionInfo, RegionMapping
from .dma import dma_map_regions
from .group import Group
from .ioctl import VfioError
from .irq import DeviceIrqs, EventFd, IrqInfo, MsiRouter, RoutedVector, default_irqchip_routes
from .structs import PciIrq, PciRegion, RegionFlags
from .stub import DMA_NEUTRAL_DRIVERS, Claim, PciAddress, PciStub, group_policy

__all__ = [
    "DMA_NEUTRAL_DRIVERS",
    "Claim",
    "Container",
    "Device",
    "DeviceInfo",
    "DeviceIrqs",
    "DmaMapping",
    "EventFd",
    "Group",
    "IommuInfo",
    "IrqInfo",
    "MappedArea",
    "MsiRouter",
    "PciAddress",
    "PciIrq",
    "PciRegion",
    "PciStub",
    "RegionFlags",
    "RegionInfo",
    "RegionMapping",
    "RoutedVector",
    "VfioError",
    "default_irqchip_routes",
    "dma_map_regions",
    "group_policy",
]
