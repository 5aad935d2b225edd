"""Cache Allocation Technology; models ``hypervisor/arch/x86/cat.c`` (the CAT unit).

Intel CAT splits the L3 cache by capacity bitmask (CBM) per class of service (COS).
The root starts with COS 0 and the full mask; a cell with a cache region gets a free
COS and the bits it names, which leave the root's mask unless the region is
ROOTSHARED. Without CAT (QEMU, AMD) the cache regions are ignored.

Checks at cell creation: exactly one region, of type L3, non-empty, inside the CBM
length, else ``EINVAL``; no free COS gives ``EBUSY``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .abi import CacheFlags, CacheType
from .errors import Errno, HvError
from .unit import define_unit

if TYPE_CHECKING:
    from .cell import Cell
    from .params import CatHardware
    from .unit import UnitHost



class CatUnit:
    """The CAT unit (``DEFINE_UNIT(cat, "Cache Allocation Technology")``), built on Intel
    only (AMD links ``cat-stubs.c``); a no-op when ``hardware`` is None.

    :param host: what the unit may use of its hypervisor
    :param hardware: CAT capabilities, or None when CAT is absent
    """

    name = "Cache Allocation Technology"

    def __init__(self, host: UnitHost, hardware: CatHardware | None) -> None:
        self.host = host
        self.hardware = hardware
        #: cell id -> (cos, mask, rootshared)
        self.assignments: dict[int, tuple[int, int, bool]] = {}
        self.root_mask = 0

    @property
    def full_mask(self) -> int:
        """All CBM bits."""
        return (1 << self.hardware.cbm_length) - 1 if self.hardware else 0

    def init(self) -> None:
        """Give the root COS 0 with every bit."""
        if self.hardware is not None:
            self.root_mask = self.full_mask
            self.host.root.cat_cos = 0

    def shutdown(self) -> None:
        """Nothing to restore beyond the root's COS 0 (the mask is reset to full)."""
        self.root_mask = self.full_mask

    def mmio_count_regions(self, cell: Cell) -> int:
        """CAT has no MMIO."""
        return 0

    def cell_init(self, cell: Cell) -> None:
        """Assign a COS and mask to the cell.

        :raise HvError: ``EINVAL`` for a bad region set, ``EBUSY`` with no free COS
        """
        hardware = self.hardware
        regions = cell.config.cache_regions
        if hardware is None or not regions:
            if hardware is not None:
                cell.cat_cos = 0
            return
        if len(regions) != 1:
            raise HvError(Errno.EINVAL, "CAT: more than one cache region")
        region = regions[0]
        if (
            region.type != CacheType.L3
            or region.size == 0
            or region.start + region.size > hardware.cbm_length
        ):
            raise HvError(Errno.EINVAL, "CAT: invalid cache region")
        used = {cos for cos, _, _ in self.assignments.values()} | {0}
        free = [cos for cos in range(hardware.num_cos) if cos not in used]
        if not free:
            raise HvError(Errno.EBUSY, "CAT: no free class of service")
        mask = ((1 << region.size) - 1) << region.start
        shared = bool(region.flags & CacheFlags.ROOTSHARED)
        self.assignments[cell.id] = (free[0], mask, shared)
        cell.cat_cos = free[0]
        self._update_root()

    def cell_exit(self, cell: Cell) -> None:
        """Release the cell's COS; the root regains the bits."""
        if self.assignments.pop(cell.id, None) is not None:
            self._update_root()
        cell.cat_cos = None

    def _update_root(self) -> None:
        mask = self.full_mask
        for _, bits, shared in self.assignments.values():
            if not shared:
                mask &= ~bits
        self.root_mask = mask

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly snapshot."""
        return {
            "present": self.hardware is not None,
            "root_mask": self.root_mask,
            "cells": {str(k): list(v) for k, v in self.assignments.items()},
        }


def cat_state(unit: CatUnit | None) -> dict[str, object]:
    """JSON-friendly snapshot of CAT; a hypervisor without the unit (AMD) shows it absent."""
    if unit is None:
        return {"present": False, "root_mask": 0, "cells": {}}
    return unit.to_dict()


def _link(host: UnitHost) -> CatUnit | None:
    return CatUnit(host, host.params.cat) if host.params.vendor == "intel" else None


define_unit("cat", _link)
