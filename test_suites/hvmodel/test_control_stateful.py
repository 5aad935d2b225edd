"""Random management sequences against the model, with Jailhouse's invariants.

A hypothesis state machine drives the driver model (create, load, start, shutdown,
destroy) and the cells' own actions (lock, unlock, a CPU failing) over the qemu-x86
demo cells, predicts each command's result, and after every step checks:

* every CPU belongs to exactly one cell, in the hypervisor and in the driver alike;
* no host memory is mapped by two cells unless their configs share it (ROOTSHARED),
  or it is a loadable region lent to the root for loading;
* a physical PCI device belongs to exactly one cell;
* destroying a cell gives the root back exactly what creating it took (mappings, ports,
  devices, IOAPIC pins, MMIO regions, pools);
* cell count and ids agree between hypervisor, driver, GET_INFO and ``cell list``.
"""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from test_model_configs import (
    apic_demo,
    ivshmem_demo,
    linux_x86_demo,
    pci_demo,
    qemu_x86,
    relocated,
    tiny_demo,
)

from harness.hvmodel.abi import CellState, Hypercall, InfoType
from harness.hvmodel.arch.oracle import OracleArch
from harness.hvmodel.cell import Cell
from harness.hvmodel.config import CellConfig
from harness.hvmodel.control import Hypervisor
from harness.hvmodel.core import COMM_PAGE_PHYS_BASE
from harness.hvmodel.driver import Driver, Image
from harness.hvmodel.errors import Errno, HvError
from harness.hvmodel.sysfs import cell_list

RS, LOADABLE = 0x80, 0x40


def _ivshmem_demo_moved() -> CellConfig:
    base = ivshmem_demo()
    regions = tuple(
        dataclasses.replace(r, phys_start=0x3F200000) if r.flags & LOADABLE else r
        for r in base.memory_regions
    )
    return dataclasses.replace(base, memory_regions=regions)


# RAM: linux-x86-demo 0x3a600000-0x3ee00000, tiny-demo 0x3ee00000, apic-demo 0x3ef00000,
# ivshmem-demo and pci-demo moved into the root's RAM above 0x3f200000 (real configs
# overlap, and Jailhouse does not check overlaps between non-root cells).
CONFIGS: dict[str, CellConfig] = {
    "apic-demo": apic_demo(),
    "tiny-demo": tiny_demo(),
    "ivshmem-demo": _ivshmem_demo_moved(),
    "linux-x86-demo": linux_x86_demo(),
    "pci-demo": relocated(pci_demo(), "pci-demo", 0x3F300000),
}
NAMES = sorted(CONFIGS)

Interval = tuple[int, int]


def _merge(intervals: list[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[0] < i[1]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    out = [(max(s1, s2), min(e1, e2)) for s1, e1 in a for s2, e2 in b]
    return _merge([i for i in out if i[0] < i[1]])


def _subtract(a: list[Interval], b: list[Interval]) -> list[Interval]:
    result = _merge(a)
    for bs, be in _merge(b):
        pieces: list[Interval] = []
        for s, e in result:
            if be <= s or e <= bs:
                pieces.append((s, e))
                continue
            if s < bs:
                pieces.append((s, bs))
            if be < e:
                pieces.append((be, e))
        result = pieces
    return result


def _mapped(cell: Cell) -> list[Interval]:
    return _merge(
        [(m.phys, m.phys + m.size) for m in cell.ept.mappings if m.phys < COMM_PAGE_PHYS_BASE]
    )


def _regions(config: CellConfig, mask: int) -> list[Interval]:
    return _merge(
        [(r.phys_start, r.phys_start + r.size) for r in config.memory_regions if r.flags & mask]
    )


def _taken(config: CellConfig) -> list[Interval]:
    """Host ranges a cell takes from the root: all regions but COMM_REGION and ROOTSHARED."""
    return _merge(
        [
            (r.phys_start, r.phys_start + r.size)
            for r in config.memory_regions
            if not r.flags & (RS | 0x20)
        ]
    )


def _root_footprint(hv: Hypervisor) -> tuple[object, ...]:
    root = hv.root
    return (
        hv.pool_usage(),
        sorted(root.cpus),
        root.ept.mappings,
        None if root.iommu is None else root.iommu.mappings,
        bytes(root.pio_open),
        [(dev.bdf, dev.cell is root) for dev in root.owned_devices()],
        [view.pin_bitmap for view in root.ioapics],
        root.mmio.regions(),
    )


class ModelMachine(RuleBasedStateMachine):
    """Driver + hypervisor on the oracle, with a shadow of what should happen."""

    @initialize()
    def enable(self) -> None:
        self.arch = OracleArch(record=False)
        self.driver = Driver(self.arch)
        self.driver.enable(qemu_x86().to_bytes())
        hv = self.driver.hv
        assert hv is not None
        self.hv = hv
        self.initial = _root_footprint(hv)
        #: name -> (footprint before its create, structural change counter then)
        self.created: dict[str, tuple[tuple[object, ...], int]] = {}
        self.changes = 0

    # -- helpers --------------------------------------------------------------------------

    def _cell(self, name: str) -> Cell | None:
        return self.hv.cell_by_name(name)

    def _locked_others(self, name: str | None) -> bool:
        return any(c.is_locked() for c in self.hv.cells[1:] if c.name != name)

    def _expect(self, expected: Errno | None, action: object) -> None:
        try:
            action()  # type: ignore[operator]
        except HvError as err:
            assert expected is not None, f"unexpected {err}"
            assert err.errno == expected, f"expected {expected.name}, got {err}"
        else:
            assert expected is None, f"expected {expected}, got success"

    # -- rules ----------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES))
    def create(self, name: str) -> None:
        config = CONFIGS[name]
        free = self.hv.root.cpus
        if self._cell(name) is not None:
            expected: Errno | None = Errno.EEXIST
        elif not config.cpus <= free:
            expected = Errno.EBUSY
        elif self._locked_others(None):
            expected = Errno.EPERM
        else:
            expected = None
        before = _root_footprint(self.hv)
        self._expect(expected, lambda: self.driver.cell_create(config.to_bytes()))
        if expected is None:
            self.changes += 1
            self.created[name] = (before, self.changes)

    @rule(name=st.sampled_from(NAMES))
    def load(self, name: str) -> None:
        expected = None if self._cell(name) is not None else Errno.ENOENT
        self._expect(expected, lambda: self.driver.cell_load(name, [Image(b"\xf4" * 8, 0)]))
        if expected is None:
            self.changes += 1
            cell = self._cell(name)
            assert cell is not None and cell.loadable and cell.state == CellState.SHUT_DOWN

    @rule(name=st.sampled_from(NAMES))
    def shutdown(self, name: str) -> None:
        expected = None if self._cell(name) is not None else Errno.ENOENT
        self._expect(expected, lambda: self.driver.cell_shutdown(name))
        self.changes += 1

    @rule(name=st.sampled_from(NAMES))
    def start(self, name: str) -> None:
        expected = None if self._cell(name) is not None else Errno.ENOENT
        self._expect(expected, lambda: self.driver.cell_start(name))
        if expected is None:
            self.changes += 1
            cell = self._cell(name)
            assert cell is not None and cell.state == CellState.RUNNING and not cell.loadable
            assert not any(self.hv.cpus[cpu].failed for cpu in cell.cpus)

    @rule(name=st.sampled_from(NAMES))
    def destroy(self, name: str) -> None:
        if self._cell(name) is None:
            expected: Errno | None = Errno.ENOENT
        elif self._locked_others(name):
            expected = Errno.EPERM
        else:
            expected = None
        self._expect(expected, lambda: self.driver.cell_destroy(name))
        if expected is None:
            before, counter = self.created.pop(name)
            if counter == self.changes:
                after = _root_footprint(self.hv)
                assert after[:4] + after[5:] == before[:4] + before[5:]
                # Ports: the root gets back the cell's whitelist clipped to the root's
                # configured one, even where another cell still uses them (Jailhouse).
                ports = bytearray(before[4])  # type: ignore[arg-type]
                for pio in CONFIGS[name].pio_regions:
                    for root_pio in self.hv.root.config.pio_regions:
                        lo = max(pio.base, root_pio.base)
                        hi = min(pio.base + pio.length, root_pio.base + root_pio.length)
                        ports[lo:hi] = b"\x01" * max(hi - lo, 0)
                ports[0x64] = 0
                assert after[4] == bytes(ports)
            self.changes += 1

    @rule(name=st.sampled_from(NAMES), lock=st.booleans())
    def lock(self, name: str, lock: bool) -> None:
        cell = self._cell(name)
        if cell is None:
            return
        want, from_state = (
            (CellState.RUNNING_LOCKED, CellState.RUNNING)
            if lock
            else (CellState.RUNNING, CellState.RUNNING_LOCKED)
        )
        runners = [cpu for cpu in sorted(cell.cpus) if not self.hv.cpus[cpu].parked]
        if cell.state != from_state or not runners:
            return
        assert self.hv.handle_mmio(runners[0], 0x100008, 4, True, want).handled
        assert cell.state == want

    @rule(name=st.sampled_from(NAMES), pick=st.integers(0, 1))
    def fail_cpu(self, name: str, pick: int) -> None:
        cell = self._cell(name)
        if cell is None:
            return
        runners = [cpu for cpu in sorted(cell.cpus) if not self.hv.cpus[cpu].parked]
        if not runners:
            return
        cpu = runners[pick % len(runners)]
        before = cell.state
        assert not self.hv.handle_pio(cpu, 0x70, 1, True, 0).handled
        # panic_park: FAILED once every CPU of the cell failed, else the state stays.
        all_failed = all(self.hv.cpus[c].failed for c in cell.cpus)
        assert cell.state == (CellState.FAILED if all_failed else before)

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def cpus_in_exactly_one_cell(self) -> None:
        seen: dict[int, str] = {}
        for cell in self.hv.cells:
            for cpu in cell.cpus:
                assert cpu not in seen, f"CPU {cpu} in {seen[cpu]} and {cell.name}"
                seen[cpu] = cell.name
                assert self.hv.cpus[cpu].cell is cell
        assert sorted(seen) == sorted(self.hv.cpus)
        for cell_id, dcell in self.driver.cells.items():
            hv_cell = self.hv.cell_by_id(cell_id)
            assert hv_cell is not None and hv_cell.cpus == dcell.cpus_assigned
        assert self.driver.online == self.hv.root.cpus

    @invariant()
    def memory_owned_once(self) -> None:
        root = self.hv.root
        root_mapped = _mapped(root)
        cells = self.hv.cells[1:]
        for cell in cells:
            mapped = _mapped(cell)
            allowed = _regions(cell.config, RS)
            if cell.loadable:
                allowed = _merge(allowed + _regions(cell.config, LOADABLE))
            shared = _intersect(root_mapped, mapped)
            assert not _subtract(shared, allowed), f"root and {cell.name} share {shared}"
            taken = _subtract(_taken(cell.config), allowed)
            assert not _intersect(root_mapped, taken), f"root still maps {cell.name}'s memory"
        for n, a in enumerate(cells):
            for b in cells[n + 1 :]:
                shared = _intersect(_mapped(a), _mapped(b))
                ok = _intersect(_regions(a.config, RS), _regions(b.config, RS))
                assert not _subtract(shared, ok), f"{a.name} and {b.name} share {shared}"

    @invariant()
    def pci_device_in_one_cell(self) -> None:
        owners: dict[int, str] = {}
        for cell in self.hv.cells:
            for dev in cell.owned_devices():
                if dev.ivshmem is not None:
                    continue
                assert dev.bdf not in owners, f"{dev.bdf:#x} in {owners[dev.bdf]} and {cell.name}"
                owners[dev.bdf] = cell.name
                assert dev.cell is cell
        root_bdfs = {d.bdf for d in self.hv.root.config.pci_devices if d.type != 3}
        assert root_bdfs <= set(owners)

    @invariant()
    def root_whole_again(self) -> None:
        if len(self.hv.cells) == 1:
            assert _root_footprint(self.hv) == self.initial

    @invariant()
    def cell_count_and_ids(self) -> None:
        hv = self.hv
        assert hv.cells[0] is hv.root and hv.root.id == 0
        assert len({c.id for c in hv.cells}) == len(hv.cells)
        assert sorted(c.id for c in hv.cells) == sorted(self.driver.cells)
        for cell in hv.cells:
            assert self.driver.cells[cell.id].name == cell.name
        assert hv.hypercall(0, Hypercall.HYPERVISOR_GET_INFO, InfoType.NUM_CELLS) == len(hv.cells)
        listing = cell_list(self.driver)
        assert len(listing.splitlines()) == len(hv.cells) + 1
        assert hv.mem_pool.used <= hv.mem_pool.size and hv.mem_pool.used > 0
        assert len(set(hv.cells)) == len(hv.cells) == len({c.name for c in hv.cells})


TestModelMachine = ModelMachine.TestCase
TestModelMachine.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
