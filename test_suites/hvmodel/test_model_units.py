"""Building blocks of the model: ABI values, comm region layout, console ring, page
pools and mappings, MMIO table, unit registry, root staging buffers."""

from __future__ import annotations

import pytest

from harness.hvmodel import unit as unit_module
from harness.hvmodel.abi import (
    COMM_REGION_SIZE,
    CellState,
    CommOffset,
    CommRegion,
    CpuStat,
    Hypercall,
    InfoType,
    Ioctl,
    Message,
    Reply,
    state_text,
)
from harness.hvmodel.arch import RootBuffers
from harness.hvmodel.errors import Errno, HvError
from harness.hvmodel.mmio import MmioAccess, MmioResult, MmioTable
from harness.hvmodel.paging import AddressSpace, PagePool
from harness.hvmodel.printk import CONSOLE_RING_SIZE, Console
from harness.hvmodel.unit import LINK_ORDER, UnitRegistry, define_unit


def test_abi_values() -> None:
    """Hypercall codes, states, messages, info types and ioctl numbers of the reference."""
    assert [int(c) for c in Hypercall] == list(range(9))
    assert [(s.name, int(s)) for s in CellState] == [
        ("RUNNING", 0), ("RUNNING_LOCKED", 1), ("SHUT_DOWN", 2), ("FAILED", 3),
        ("FAILED_COMM_REV", 4),
    ]
    assert (Message.SHUTDOWN_REQUEST, Message.RECONFIG_COMPLETED) == (1, 2)
    assert [int(r) for r in (Reply.UNKNOWN, Reply.REQUEST_DENIED, Reply.REQUEST_APPROVED,
                             Reply.RECEIVED)] == [1, 2, 3, 4]
    assert int(InfoType.NUM_CELLS) == 4
    assert int(CpuStat.VMEXITS_MSR_X2APIC_ICR) == 11
    assert (Ioctl.ENABLE, Ioctl.CELL_CREATE, Ioctl.CELL_LOAD) == (0x40080000, 0x40100002,
                                                                  0x40300003)
    assert [state_text(n) for n in range(6)] == [
        "running", "running/locked", "shut down", "failed", "Comm ABI mismatch", "invalid",
    ]


def test_comm_region_layout() -> None:
    """76 packed bytes with the x86 fields at the reference offsets."""
    region = CommRegion(
        signature=b"JHCOMM", revision=2, cell_state=1, msg_to_cell=2, reply_from_cell=3,
        flags=3, console=bytes(range(32)), pci_mmconfig_base=0xB0000000,
        pm_timer_address=0x608, num_cpus=2, tsc_khz=1234, apic_khz=5678,
    )
    data = region.to_bytes()
    assert len(data) == COMM_REGION_SIZE == 76
    assert data[0:8] == b"JHCOMM\x02\x00"
    assert data[CommOffset.CELL_STATE] == 1 and data[CommOffset.REPLY_FROM_CELL] == 3
    assert data[CommOffset.CONSOLE : CommOffset.CONSOLE + 32] == bytes(range(32))
    assert data[CommOffset.PM_TIMER_ADDRESS : CommOffset.PM_TIMER_ADDRESS + 2] == b"\x08\x06"
    assert data[CommOffset.NUM_CPUS] == 2
    assert CommRegion.from_buffer(bytearray(data) + bytes(100)) == region
    with pytest.raises(ValueError):
        CommRegion.from_buffer(data[:70])


def test_console_ring_keeps_the_last_2048_bytes() -> None:
    """The ring the root reads is at most 2048 bytes; lines are kept separately."""
    seen: list[str] = []
    console = Console(sink=seen.append, history=3)
    for n in range(300):
        console.printk("line %03d of the console\n", n)
    assert len(console.content) == CONSOLE_RING_SIZE
    assert console.content.endswith("line 299 of the console\n")
    assert list(console.lines) == [f"line {n} of the console" for n in (297, 298, 299)]
    assert len(seen) == 300
    console.write("par")
    console.write("tial\n")
    assert console.lines[-1] == "partial"


def test_page_pool_enomem() -> None:
    """A pool refuses to go over its size."""
    pool = PagePool("mem", 10)
    pool.alloc(10)
    with pytest.raises(HvError) as info:
        pool.alloc(1)
    assert info.value.errno == Errno.ENOMEM
    pool.free(4)
    assert pool.used == 6


def test_page_table_counting() -> None:
    """Huge leaves where aligned; 4K tables at unaligned edges; NO_HUGEPAGES forces 4K."""
    space = AddressSpace(None)
    space.map(0, 0, 1 << 30, 0x7)  # one 1 GiB leaf: only the PDPT
    assert space.table_pages == 1
    space.unmap(0x200000, 0x1000)  # punch a 4K hole: PD for the GiB, PT for the 2M block
    assert space.table_pages == 3
    space.map(0x200000, 0x200000, 0x1000, 0x7)  # merged back: a 1 GiB leaf again
    assert space.table_pages == 1 and len(space.mappings) == 1
    other = AddressSpace(None)
    other.map(0x200000, 0x3A700000, 0x600000, 0x7)  # misaligned: PD + 3 PTs + PDPT
    assert other.table_pages == 5
    no_huge = AddressSpace(None)
    no_huge.map(0, 0, 0x400000, 0x7 | 0x100)
    assert no_huge.table_pages == 4


def test_address_space_map_replace_unmap_and_rollback() -> None:
    """Mapping over a range replaces it; a failed charge restores the old mappings."""
    pool = PagePool("mem", 3)
    space = AddressSpace(pool)
    space.map(0, 0x1000000, 0x10000, 0x3)
    assert space.lookup(0x8000) is not None
    space.map(0x4000, 0x9000000, 0x1000, 0x1)
    assert [(m.virt, m.phys, m.size) for m in space.mappings] == [
        (0, 0x1000000, 0x4000), (0x4000, 0x9000000, 0x1000), (0x5000, 0x1005000, 0xB000),
    ]
    assert space.covers(0, 0x10000) and not space.covers(0, 0x11000)
    before = space.mappings
    used = pool.used
    with pytest.raises(HvError):
        space.map(1 << 40, 0, 0x1000, 0x3)  # a new PDPT + PD + PT: too many pages
    assert space.mappings == before and pool.used == used
    space.unmap(0, 0x10000)
    assert space.mappings == () and pool.used == 0


def test_mmio_table_sorted_containment_and_unregister() -> None:
    """Binary search with full containment; unregister by start address."""
    console = Console()
    table = MmioTable(3, console)

    def handler(value: int) -> object:
        def run(access: MmioAccess) -> MmioResult:
            access.value = value + access.address
            return MmioResult.HANDLED

        return run

    table.register(0x2000, 0x100, handler(2))  # type: ignore[arg-type]
    table.register(0x1000, 0x100, handler(1))  # type: ignore[arg-type]
    assert table.regions() == [(0x1000, 0x100), (0x2000, 0x100)]
    assert table.dispatch(0x1010, 4, False, 0) == (MmioResult.HANDLED, 0x11)
    assert table.dispatch(0x10FE, 4, False, 0) is None
    assert table.dispatch(0x0FFF, 1, False, 0) is None
    table.unregister(0x1000)
    assert table.dispatch(0x1010, 4, False, 0) is None


class _Unit:
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name = name
        self.log = log
        self.fail = fail

    def init(self) -> None:
        self.log.append(f"init {self.name}")

    def shutdown(self) -> None:
        self.log.append(f"shutdown {self.name}")

    def mmio_count_regions(self, cell: object) -> int:
        return 1

    def cell_init(self, cell: object) -> None:
        if self.fail:
            raise HvError(Errno.EBUSY, self.name)
        self.log.append(f"cell_init {self.name}")

    def cell_exit(self, cell: object) -> None:
        self.log.append(f"cell_exit {self.name}")


def test_unit_registry_unwinds_only_earlier_units() -> None:
    """A failing cell_init unwinds the units before it, in reverse; exit runs reversed."""
    log: list[str] = []
    units = [_Unit("a", log), _Unit("b", log), _Unit("c", log, fail=True), _Unit("d", log)]
    registry = UnitRegistry(units)  # type: ignore[arg-type]
    with pytest.raises(HvError):
        registry.cell_init(None)  # type: ignore[arg-type]
    assert log == ["cell_init a", "cell_init b", "cell_exit b", "cell_exit a"]
    log.clear()
    registry.shutdown()
    assert log == ["shutdown d", "shutdown c", "shutdown b", "shutdown a"]
    assert registry.mmio_count_regions(None) == 4  # type: ignore[arg-type]


def test_units_define_themselves_in_link_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each hypervisor builds the defined units in Jailhouse's link order, skipping the
    ones its build or CPU vendor lacks; a unit outside the order, defined twice or never
    defined is an error that names it."""
    from test_model_configs import qemu_x86

    from harness.hvmodel.arch.oracle import OracleArch
    from harness.hvmodel.control import Hypervisor
    from harness.hvmodel.params import HvParams

    intel = Hypervisor(qemu_x86(), OracleArch(), params=HvParams(test_device=True))
    amd = Hypervisor(qemu_x86(), OracleArch(), params=HvParams(vendor="amd"))
    assert intel.units.names() == ["VT-d", "IOAPIC", "Test device", "Cache Allocation Technology", "PCI"]
    assert amd.units.names() == ["AMD IOMMU", "IOAPIC", "PCI"]
    assert intel.pci is not amd.pci and intel.pci.ivshmem is intel.ivshmem
    assert LINK_ORDER == ("iommu", "ioapic", "testdev", "cat", "pci")
    with pytest.raises(ValueError, match="'vga'"):
        define_unit("vga", lambda host: None)
    with pytest.raises(ValueError, match="'pci' is defined twice"):
        define_unit("pci", lambda host: None)
    monkeypatch.delitem(unit_module._DEFINED, "cat")
    with pytest.raises(LookupError, match=r"harness\.hvmodel\.cat"):
        UnitRegistry.link(intel)


def test_root_buffers() -> None:
    """Page-aligned, lowest-free staging; reads inside one buffer only."""
    buffers = RootBuffers(base=0x10000, limit=0x14000)
    first = buffers.alloc(b"a" * 100)
    second = buffers.alloc(b"b" * 5000)
    assert (first, second) == (0x10000, 0x11000)
    assert buffers.read(first + 50, 60) == b"a" * 50 + bytes(10)
    with pytest.raises(HvError):
        buffers.read(first + 0xFF0, 0x20)
    buffers.free(first)
    assert buffers.alloc(b"c") == 0x10000
    with pytest.raises(HvError):
        buffers.alloc(b"d" * 0x2000)


def test_console_wording() -> None:
    """Jailhouse's exact console lines, formatted by the model's format strings."""
    from harness.hvmodel import printk as p

    assert p.MSG_CREATED % "apic-demo" == 'Created cell "apic-demo"\n'
    assert p.MSG_CLOSING % "apic-demo" == 'Closing cell "apic-demo"\n'
    assert p.MSG_CAN_BE_LOADED % "x" == 'Cell "x" can be loaded\n'
    assert p.MSG_STARTED % "x" == 'Started cell "x"\n'
    assert p.MSG_POOL_USAGE % ("after cell creation", 1, 2, 3, 4) == (
        "Page pool usage after cell creation: mem 1/2, remap 3/4\n"
    )
    assert p.MSG_PARKING % (3, "apic-demo") == 'Parking CPU 3 (Cell: "apic-demo")\n'
    assert p.FATAL_PIO % ("read", 0x3F8, 1) == "FATAL: Invalid PIO read, port: 3f8 size: 1\n"
    assert p.FATAL_MMIO % ("write", 0xFEE00000, 4) == (
        "FATAL: Invalid MMIO/RAM write, addr: 0x00000000fee00000 size: 4\n"
    )
    assert p.MSG_ADD_PCI % (0, 0x1B, 0, "QEMU-VM") == 'Adding PCI device 00:1b.0 to cell "QEMU-VM"\n'
    assert p.MSG_ADD_VPCI % (1, 0x0E, 0, "x") == 'Adding virtual PCI device 01:0e.0 to cell "x"\n'
    assert p.MSG_RELEASING % 2 == " Releasing CPU 2\n"
    assert p.MSG_MMIO_OVERFLOW == "WARNING: Overflow during MMIO region registration!\n"
    assert p.bdf_params(0x0170) == (1, 0x0E, 0)


def test_boot_lines() -> None:
    """Enable prints Jailhouse's boot sequence."""
    from test_model_configs import qemu_x86

    from harness.hvmodel.arch.oracle import OracleArch
    from harness.hvmodel.control import Hypervisor

    hv = Hypervisor(qemu_x86(), OracleArch())
    hv.enable([0, 1, 2, 3], master_cpu=2)
    lines = list(hv.console.lines)
    assert lines[0] == "Initializing Jailhouse hypervisor v0.12 (jhlab) on CPU 2"
    assert lines[1] == "Code location: 0xfffffffff0000050"
    assert lines[2] == "Using x2APIC"
    assert lines[3].startswith("Page pool usage after early setup: mem ")
    assert lines[4:9] == [
        "Initializing processors:",
        " CPU 2... (APIC ID 2) OK",
        " CPU 0... (APIC ID 0) OK",
        " CPU 1... (APIC ID 1) OK",
        " CPU 3... (APIC ID 3) OK",
    ]
    assert lines[9:11] == ["Initializing unit: VT-d", "DMAR unit @0xfed90000/0x1000"]
    assert lines[11:13] == ["Initializing unit: IOAPIC", "Initializing unit: Cache Allocation Technology"]
    assert lines[13] == "Initializing unit: PCI"
    assert lines[14] == 'Adding PCI device 00:01.0 to cell "QEMU-VM"'
    assert lines[-2].startswith("Page pool usage after late setup: mem ")
    assert lines[-1] == "Activating hypervisor"
