"""DMA mapping of a cell: :func:`dma_map_regions` puts a cell's DMA-flagged memory regions
into a VFIO container (its IOMMU domain) at their ``virt_start``, so the device sees
cell guest-physical addresses; stands where the DMA side of ``hypervisor/arch/x86/vtd.c``
(the cell's IOMMU page tables) is. The mapping itself is
:meth:`Container.dma_map <.container.Container.dma_map>`.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ...abi import MEM_COMM_REGION, MEM_DMA, MEM_READ, MEM_WRITE
from .. import HOST_PAGE_SIZE
from .container import Container, DmaMapping
from .ioctl import VfioError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from ...config import MemoryRegion

__all__ = ["dma_map_regions"]

LOG = logging.getLogger(__name__)


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
        :class:`~harness.hvmodel.arch.hostmem.PhysMapping` of it, ``(mapping.mmap,
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
