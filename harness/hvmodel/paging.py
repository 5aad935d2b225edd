"""Page pools and guest mappings; models ``hypervisor/paging.c`` and ``paging.h``.

Two things Jailhouse's paging code does that the control plane can observe:

* **Page pools.** ``mem_pool`` (hypervisor memory) and ``remap_pool`` (hypervisor
  virtual address space for device and guest-page mappings). Every allocation the model
  makes is charged to them, and ``HYPERVISOR_GET_INFO``, sysfs and the ``Page pool usage
  ...`` lines report them. :class:`PagePool` raises ``ENOMEM`` when one runs dry.
* **Guest mappings.** For every cell, which guest-physical ranges map which host-physical
  ranges with which flags (:class:`AddressSpace`), plus the page-table pages those
  mappings need on a 4-level x86 table (1 GiB and 2 MiB leaves where virtual and physical
  addresses are aligned alike and ``NO_HUGEPAGES`` is not set).

Model choices (documented differences): page-table pages are counted as if the tables
were built from the current mappings, so adjacent identical mappings merge and a region
given back to the root costs exactly what it cost before; Jailhouse keeps huge pages it
once split. Pool figures are therefore the model's own, identical in oracle and guest.
"""

from __future__ import annotations

import bisect
from typing import Final, NamedTuple

from .abi import MEM_NO_HUGEPAGES, PAGE_SIZE
from .errors import Errno, HvError

PAGE_MASK: Final = ~(PAGE_SIZE - 1)
#: pages per CPU in the remap pool reserved for temporary mappings (x86)
NUM_TEMPORARY_PAGES: Final = 16
#: remap pool bitmap pages on x86; the pool has 8 * PAGE_SIZE pages per bitmap page
NUM_REMAP_BITMAP_PAGES: Final = 4

_SIZE_2M: Final = 1 << 21
_SIZE_1G: Final = 1 << 30


def pages(size: int) -> int:
    """``PAGES(size)``: pages needed for ``size`` bytes."""
    return (size + PAGE_SIZE - 1) // PAGE_SIZE


class PagePool:
    """A page allocator's accounting: ``pages`` in total, ``used`` of them allocated.

    :param name: ``mem`` or ``remap``
    :param size: total pages
    """

    __slots__ = ("name", "size", "used")

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.used = 0

    def alloc(self, count: int) -> None:
        """Take ``count`` pages.

        :raise HvError: ``ENOMEM`` when fewer than ``count`` pages are free
        """
        if self.used + count > self.size:
            raise HvError(Errno.ENOMEM, f"{self.name} pool exhausted ({self.used}/{self.size})")
        self.used += count

    def free(self, count: int) -> None:
        """Give back ``count`` pages (``page_free``)."""
        self.used -= count

    def to_dict(self) -> dict[str, int]:
        """JSON-friendly snapshot."""
        return {"size": self.size, "used": self.used}


class Mapping(NamedTuple):
    """One contiguous guest mapping: ``[virt, end)`` -> ``phys``, with memory flags."""

    virt: int
    end: int
    phys: int
    flags: int

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self.end - self.virt


def _table_keys(virt: int, end: int, phys: int, flags: int, gbpages: bool) -> tuple[int, ...]:
    """Keys of the page-table pages (below the root) one mapping needs.

    A key is ``level << 56 | index``: level 3 = a PDPT per 512 GiB, level 2 = a PD per
    1 GiB not covered by a 1 GiB leaf, level 1 = a PT per 2 MiB not covered by a leaf.
    """
    keys: list[int] = []
    last = end - 1
    keys.extend((3 << 56) | n for n in range(virt >> 39, (last >> 39) + 1))
    huge = not flags & MEM_NO_HUGEPAGES
    ok_2m = huge and (virt - phys) % _SIZE_2M == 0
    ok_1g = ok_2m and gbpages and (virt - phys) % _SIZE_1G == 0

    def leaf_1g(block: int) -> bool:
        return ok_1g and virt <= block << 30 and (block + 1) << 30 <= end

    for block in range(virt >> 30, (last >> 30) + 1):
        if not leaf_1g(block):
            keys.append((2 << 56) | block)
    first_2m, last_2m = virt >> 21, last >> 21
    if ok_2m:
        candidates: tuple[int, ...] | range = (first_2m,) if first_2m == last_2m else (first_2m, last_2m)
    else:
        candidates = range(first_2m, last_2m + 1)
    for block in candidates:
        if ok_2m and virt <= block << 21 and (block + 1) << 21 <= end:
            continue
        if leaf_1g(block >> 9):
            continue
        keys.append((1 << 56) | block)
    return tuple(keys)


#: mapping tuple ``(virt, end, phys, flags)`` -> table keys; one dict per gbpages setting
_KEYS_CACHE: dict[bool, dict[tuple[int, int, int, int], tuple[int, ...]]] = {True: {}, False: {}}

#: internal form of a mapping: ``(virt, end, phys, flags)``
_Map = tuple[int, int, int, int]


class AddressSpace:
    """Guest-physical mappings of one cell (its EPT/NPT, or its IOMMU tables).

    Mapping over an existing range replaces it, unmapping punches holes, neighbours
    with the same flags and a contiguous physical range merge. Page-table pages are
    charged to ``pool`` (the root table page is charged by the owner). The table pages
    are reference-counted per table (a table lives while a mapping needs it), so each
    operation only touches the mappings it changes.

    :param pool: the pool to charge, or None for free bookkeeping
    :param gbpages: whether 1 GiB leaves are available (CPU feature)
    """

    def __init__(self, pool: PagePool | None, gbpages: bool = True) -> None:
        self._pool = pool
        self._gbpages = gbpages
        self._cache = _KEYS_CACHE[gbpages]
        self._maps: list[_Map] = []
        self._starts: list[int] = []
        self._refs: dict[int, int] = {}

    # -- page-table accounting -----------------------------------------------------------

    def _keys(self, mapping: _Map) -> tuple[int, ...]:
        keys = self._cache.get(mapping)
        if keys is None:
            if len(self._cache) > 65536:
                self._cache.clear()
            keys = _table_keys(*mapping, self._gbpages)
            self._cache[mapping] = keys
        return keys

    def _add(self, mapping: _Map) -> None:
        refs = self._refs
        keys = self._cache.get(mapping) or self._keys(mapping)
        for key in keys:
            refs[key] = refs.get(key, 0) + 1

    def _sub(self, mapping: _Map) -> None:
        refs = self._refs
        keys = self._cache.get(mapping) or self._keys(mapping)
        for key in keys:
            count = refs[key] - 1
            if count:
                refs[key] = count
            else:
                del refs[key]

    @property
    def table_pages(self) -> int:
        """Page-table pages the current mappings need (root table not included)."""
        return len(self._refs)

    def _charge(self, before: int, saved: list[_Map]) -> None:
        delta = len(self._refs) - before
        if self._pool is None or delta == 0:
            return
        if delta < 0:
            self._pool.free(-delta)
            return
        try:
            self._pool.alloc(delta)
        except HvError:
            self._maps = saved
            self._starts = [m[0] for m in saved]
            self._refs = {}
            for mapping in saved:
                self._add(mapping)
            raise

    # -- mapping operations --------------------------------------------------------------

    def _cut(self, start: int, end: int) -> int:
        """Remove ``[start, end)`` from the mappings; return the insertion index."""
        maps = self._maps
        index = bisect.bisect_right(self._starts, start) - 1
        if index < 0 or maps[index][1] <= start:
            index += 1
        pos = index
        count = len(maps)
        if index >= count or maps[index][0] >= end:
            return pos
        pieces: list[_Map] = []
        while index < count and maps[index][0] < end:
            old = maps[index]
            self._sub(old)
            o_virt, o_end, o_phys, o_flags = old
            if o_virt < start:
                pieces.append((o_virt, start, o_phys, o_flags))
            if o_end > end:
                pieces.append((end, o_end, o_phys + (end - o_virt), o_flags))
            index += 1
        for piece in pieces:
            self._add(piece)
        maps[pos:index] = pieces
        self._starts[pos:index] = [piece[0] for piece in pieces]
        if pieces and pieces[0][0] < start:
            return pos + 1
        return pos

    def map(self, virt: int, phys: int, size: int, flags: int) -> None:
        """Map ``[virt, virt+size)`` to ``phys`` (``paging_create``), replacing overlaps.

        :raise HvError: ``ENOMEM`` when the page tables cannot be allocated
        """
        if size <= 0:
            return
        before = len(self._refs)
        maps = self._maps
        saved = maps[:]
        pos = self._cut(virt, virt + size)
        starts = self._starts
        n_virt, n_end, n_phys = virt, virt + size, phys
        if pos > 0:
            left = maps[pos - 1]
            if left[1] == virt and left[3] == flags and left[2] + (virt - left[0]) == phys:
                self._sub(left)
                n_virt, n_phys = left[0], left[2]
                del maps[pos - 1]
                del starts[pos - 1]
                pos -= 1
        if pos < len(maps):
            right = maps[pos]
            if right[0] == n_end and right[3] == flags and right[2] == n_phys + (n_end - n_virt):
                self._sub(right)
                n_end = right[1]
                del maps[pos]
                del starts[pos]
        new = (n_virt, n_end, n_phys, flags)
        maps.insert(pos, new)
        starts.insert(pos, n_virt)
        self._add(new)
        if len(self._refs) != before:
            self._charge(before, saved)

    def unmap(self, virt: int, size: int) -> None:
        """Unmap ``[virt, virt+size)`` (``paging_destroy``); unmapped parts are ignored."""
        if size <= 0:
            return
        before = len(self._refs)
        saved = self._maps[:]
        self._cut(virt, virt + size)
        if len(self._refs) != before:
            self._charge(before, saved)

    def clear(self) -> None:
        """Drop every mapping and give all table pages back."""
        if self._pool is not None:
            self._pool.free(len(self._refs))
        self._maps = []
        self._starts = []
        self._refs = {}

    # -- queries -----------------------------------------------------------------------

    def lookup(self, virt: int) -> Mapping | None:
        """The mapping containing ``virt``, or None."""
        index = bisect.bisect_right(self._starts, virt) - 1
        if index >= 0 and self._maps[index][1] > virt:
            return Mapping(*self._maps[index])
        return None

    def covers(self, virt: int, size: int) -> bool:
        """Whether ``[virt, virt+size)`` is mapped without a hole."""
        position = virt
        end = virt + size
        while position < end:
            mapping = self.lookup(position)
            if mapping is None:
                return False
            position = mapping.end
        return True

    @property
    def mappings(self) -> tuple[Mapping, ...]:
        """All mappings, sorted by guest address."""
        return tuple(Mapping(*m) for m in self._maps)

    def phys_ranges(self) -> list[tuple[int, int]]:
        """Host-physical ``(start, end)`` ranges mapped, merged and sorted."""
        ranges = sorted((m[2], m[2] + m[1] - m[0]) for m in self._maps)
        merged: list[tuple[int, int]] = []
        for start, end in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        return merged

    def to_list(self) -> list[dict[str, int]]:
        """JSON-friendly snapshot."""
        return [{"virt": m[0], "phys": m[2], "size": m[1] - m[0], "flags": m[3]} for m in self._maps]
