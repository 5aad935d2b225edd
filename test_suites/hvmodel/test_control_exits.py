"""Exit dispatch: port I/O (§4.3), PCI config moderation (§4.4), MMIO (§4.5), IOAPIC
(§4.6), ivshmem (§4.8), statistics (§4.9), panic_park (§3.11)."""

from __future__ import annotations

import dataclasses

import pytest
from test_control_errors import Bench
from test_model_configs import (
    apic_demo,
    ivshmem_demo,
    linux_x86_demo,
    pci_demo,
    tiny_demo,
)

from harness.hvmodel.abi import CellState, CpuStat, Hypercall
from harness.hvmodel.arch.oracle import OracleArch
from harness.hvmodel.config import Irqchip, MemoryRegion, PciDevice
from harness.hvmodel.control import HvParams
from harness.hvmodel.percpu import EXIT_DONE, ExitResult


def started(config: object, cell_id: int = 1) -> Bench:
    bench = Bench()
    bench.running(config, cell_id)  # type: ignore[arg-type]
    return bench


def last(bench: Bench, count: int = 2) -> list[str]:
    return list(bench.hv.console.lines)[-count:]


# --- port I/O ----------------------------------------------------------------------------


def test_whitelisted_ports_pass_through_without_statistics() -> None:
    """A cell's own UART goes to the hardware; nothing is counted (no exit in Jailhouse)."""
    bench = started(tiny_demo())
    bench.arch.ports[0x3FD] = 0x60
    assert bench.hv.handle_pio(2, 0x3FD, 1, False) == ExitResult(True, 0x60)
    assert bench.hv.handle_pio(2, 0x3F8, 1, True, ord("A")) == EXIT_DONE
    assert bench.arch.ports[0x3F8] == ord("A")
    assert bench.hv.cpus[2].stats[CpuStat.VMEXITS_PIO] == 0


def test_root_loses_the_cells_ports_and_gets_back_only_its_own() -> None:
    """Closed in the root on create; on destroy only the root-configured part returns."""
    bench = Bench()
    root = bench.hv.root
    assert root.pio_open[0x2F8] and not root.pio_open[0x3F8] and not root.pio_open[0xE010]
    bench.create(apic_demo(), 1)
    assert not root.pio_open[0x2F8]
    assert bench.hv.handle_pio(0, 0x2F8, 1, True, 0).handled is False
    bench.call(Hypercall.CELL_DESTROY, 1)
    assert root.pio_open[0x2F8] and not root.pio_open[0x3F8] and not root.pio_open[0xE010]


def test_pm_timer_open_and_i8042_command_port_trapped() -> None:
    """Every cell reads the PM timer directly; 0x64 always exits."""
    bench = started(tiny_demo())
    cell = bench.hv.cell_by_id(1)
    assert cell is not None
    assert all(cell.pio_open[0x608 + n] for n in range(4))
    assert all(bench.hv.root.pio_open[0x608 + n] for n in range(4))
    assert not bench.hv.root.pio_open[0x64]
    assert bench.hv.root.pio_open[0x60]


def test_i8042_filter_in_the_root() -> None:
    """Reads and harmless writes pass; 0xD1 and pulse commands are FATAL."""
    bench = Bench()
    hv = bench.hv
    bench.arch.ports[0x64] = 0x1C
    assert hv.handle_pio(1, 0x64, 1, False) == ExitResult(True, 0x1C)
    assert hv.handle_pio(1, 0x64, 1, True, 0xAE) == EXIT_DONE
    assert hv.cpus[1].stats[CpuStat.VMEXITS_PIO] == 2
    assert not hv.handle_pio(1, 0x64, 1, True, 0xFE).handled
    assert last(bench) == [
        "FATAL: Invalid write to i8042 controller port",
        'Parking CPU 1 (Cell: "QEMU-VM")',
    ]
    assert not hv.handle_pio(2, 0x64, 1, True, 0xD1).handled
    assert not hv.handle_pio(3, 0x64, 2, False).handled
    assert last(bench)[0] == "FATAL: Invalid PIO read, port: 64 size: 2"


def test_i8042_port_without_whitelist_is_invalid() -> None:
    """A cell that does not whitelist 0x64 gets the generic FATAL."""
    bench = started(tiny_demo())
    assert not bench.hv.handle_pio(2, 0x64, 1, False).handled
    assert last(bench) == [
        "FATAL: Invalid PIO read, port: 64 size: 1",
        'Parking CPU 2 (Cell: "tiny-demo")',
    ]


def test_port_0x80_is_ignored_and_rep_io_is_fatal() -> None:
    """Byte accesses to 0x80 are skipped; string I/O always fails."""
    bench = started(tiny_demo())
    assert bench.hv.handle_pio(2, 0x80, 1, True, 0x12) == EXIT_DONE
    assert bench.hv.handle_pio(2, 0x80, 1, False) == ExitResult(True, None)
    assert not bench.hv.handle_pio(2, 0x80, 2, True, 0).handled
    assert last(bench)[0] == "FATAL: Invalid PIO write, port: 80 size: 2"
    bench2 = started(tiny_demo())
    assert not bench2.hv.handle_pio(2, 0x70, 1, False, rep=True).handled
    assert last(bench2)[0] == "FATAL: Invalid PIO read, port: 70 size: 1"


def test_pci_address_port_shadow_and_size_rule() -> None:
    """0xCF8 is a per-cell shadow, 4-byte accesses only."""
    bench = started(pci_demo())
    hv = bench.hv
    assert hv.handle_pio(2, 0xCF8, 4, True, 0x8000D800) == EXIT_DONE
    assert hv.handle_pio(2, 0xCF8, 4, False) == ExitResult(True, 0x8000D800)
    assert hv.root.pci_addr_port_val == 0
    assert not hv.handle_pio(2, 0xCF8, 2, True, 0).handled
    assert last(bench)[0] == "FATAL: Invalid PCI config write, port: 0xcf8, size: 2"


def test_pci_data_port_beyond_0xd00_is_fatal() -> None:
    """An access running past 0xCFF fails."""
    bench = started(pci_demo())
    assert not bench.hv.handle_pio(2, 0xCFE, 4, False).handled
    assert last(bench)[0] == "FATAL: Invalid PCI config read, port: 0xcfe, size: 4"


# --- PCI config moderation ------------------------------------------------------------------


def pci_bench() -> Bench:
    bench = Bench()
    space = bytearray(b"\xff" * 4096)
    space[0:4] = (0x293E8086).to_bytes(4, "little")
    space[0x10:0x14] = (0xFEA94000).to_bytes(4, "little")
    bench.arch.pci_config[0x00D8] = space
    bench.running(pci_demo(), 1)
    return bench


def cfg(bench: Bench, reg: int, size: int = 4, write: int | None = None, cpu: int = 2) -> object:
    hv = bench.hv
    hv.handle_pio(cpu, 0xCF8, 4, True, 0x80000000 | (0x00D8 << 8) | (reg & 0xFC))
    port = 0xCFC + (reg & 3)
    if write is None:
        return hv.handle_pio(cpu, port, size, False).value
    return hv.handle_pio(cpu, port, size, True, write).handled


def test_config_reads_of_foreign_devices_return_all_ones() -> None:
    """The root no longer sees the device it gave away; the cell sees the hardware."""
    bench = pci_bench()
    assert cfg(bench, 0x00, cpu=0) == 0xFFFFFFFF
    assert cfg(bench, 0x00) == 0x293E8086
    assert cfg(bench, 0x02, size=2) == 0x293E


def test_config_writes_to_foreign_devices_are_fatal() -> None:
    """The root writing the cell's device parks the root CPU."""
    bench = pci_bench()
    assert cfg(bench, 0x04, size=2, write=0x6, cpu=0) is False
    assert last(bench)[0] == "FATAL: Invalid PCI config write, device 00:1b.0, reg: 0x4, size: 2"


def test_bar_writes_hit_the_shadow_only() -> None:
    """The cell reads the BAR the firmware gave the device even with a bar_mask of 0
    (pci-demo.cell's: Jailhouse shadows all six BARs from the hardware); writes change
    the shadow only under the mask (here nothing sticks); the ROM BAR reads 0."""
    bench = pci_bench()
    assert cfg(bench, 0x10) == 0xFEA94000
    assert cfg(bench, 0x12, size=2) == 0xFEA9
    assert cfg(bench, 0x10, write=0xFFFFFFFF) is True
    assert cfg(bench, 0x10) == 0xFEA94000
    assert bench.arch.pci_config[0x00D8][0x10:0x14] == (0xFEA94000).to_bytes(4, "little")
    assert cfg(bench, 0x14) == 0xFFFFFFFF  # BAR1 as the (fake) hardware has it
    assert cfg(bench, 0x30) == 0


def test_bars_are_shadowed_before_the_device_is_assigned() -> None:
    """The shadow holds the BARs as they were before ``arch_pci_add_device`` (which may
    reset the device, as VFIO does), as ``pci_add_physical_device`` reads them first."""

    class ResettingArch(OracleArch):
        def pci_add_device(self, cell_id: int, device: PciDevice) -> None:
            super().pci_add_device(cell_id, device)
            space = self.pci_config.get(device.bdf)
            if space is not None and cell_id != 0:
                space[0x10:0x28] = bytes(0x18)  # a reset that lost the BARs

    bench = Bench(arch_class=ResettingArch)
    space = bytearray(b"\xff" * 4096)
    space[0x10:0x14] = (0xFEA94000).to_bytes(4, "little")
    bench.arch.pci_config[0x00D8] = space
    bench.running(pci_demo(), 1)
    assert cfg(bench, 0x10) == 0xFEA94000


def test_header_write_rules_for_endpoints() -> None:
    """Command and interrupt line pass; vendor ID and partial-mask writes are rejected."""
    bench = pci_bench()
    assert cfg(bench, 0x04, size=2, write=0x0406) is True
    assert bench.arch.pci_config[0x00D8][4:6] == b"\x06\x04"
    assert cfg(bench, 0x3C, size=1, write=0x0B) is True
    assert cfg(bench, 0x30, write=0x12345678) is True
    assert bench.arch.pci_config[0x00D8][0x30] == 0xFF
    assert cfg(bench, 0x3D, size=1, write=1) is False
    assert last(bench)[0] == "FATAL: Invalid PCI config write, device 00:1b.0, reg: 0x3d, size: 1"


def test_vendor_id_write_is_rejected() -> None:
    """Dword 0x00 is not in the endpoint write table."""
    bench = pci_bench()
    assert cfg(bench, 0x00, write=0) is False


def test_msi_capability_is_shadowed_and_checked() -> None:
    """MSI address/data are emulated; an enabled vector outside the cell is rejected."""
    bench = pci_bench()
    assert cfg(bench, 0x64, write=0xFEE02000) is True
    assert cfg(bench, 0x6C, size=2, write=0x41) is True
    assert cfg(bench, 0x64) == 0xFEE02000
    # disabled MSI: emulated only; enabling it writes the vector to the device
    assert bench.arch.pci_config[0x00D8][0x64:0x68] == b"\xff" * 4
    assert cfg(bench, 0x62, size=2, write=0x0081) is True
    assert bench.arch.pci_config[0x00D8][0x64:0x68] == (0xFEE02000).to_bytes(4, "little")
    assert bench.arch.pci_config[0x00D8][0x62:0x64] == b"\x81\x00"
    # retarget to APIC id 0 (root's): rejected
    assert cfg(bench, 0x64, write=0xFEE00000) is False


def test_writes_outside_writable_capabilities_are_rejected() -> None:
    """Offsets >= 0x40 must be in a capability marked writable."""
    bench = pci_bench()
    assert cfg(bench, 0x80, write=1) is False


def test_msix_table_of_the_root_device() -> None:
    """The e1000e MSI-X table is intercepted: shadowed address/data, checked writes."""
    bench = Bench()
    hv = bench.hv
    base = 0xFEA90000
    assert hv.handle_mmio(0, base, 4, True, 0xFEE01000) == EXIT_DONE
    assert hv.handle_mmio(0, base, 4, False) == ExitResult(True, 0xFEE01000)
    assert hv.handle_mmio(0, base + 12, 4, True, 0) == EXIT_DONE
    assert not hv.handle_mmio(0, base + 5 * 16, 4, True, 0).handled
    assert last(bench)[0] == "FATAL: Invalid PCI MSI-X table/PBA access, device 00:02.0"
    assert not hv.handle_mmio(1, base + 2, 4, False).handled


def test_mmconfig_access_goes_through_the_same_moderation() -> None:
    """MMCONFIG reads of foreign devices give all ones, wider accesses are fatal."""
    bench = pci_bench()
    hv = bench.hv
    address = 0xB0000000 + (0x00D8 << 12)
    assert hv.handle_mmio(0, address, 4, False) == ExitResult(True, 0xFFFFFFFF)
    assert hv.handle_mmio(2, address, 4, False) == ExitResult(True, 0x293E8086)
    assert not hv.handle_mmio(2, address, 8, False).handled
    assert not hv.handle_mmio(0, address + 4, 2, True, 0).handled
    assert last(bench)[0] == "FATAL: Invalid PCI MMCONFIG write, device 00:1b.0, reg: 0x4, size: 2"


def test_device_returns_to_the_root_only_if_listed() -> None:
    """HDA goes back to the root; a device the root does not list does not."""
    bench = pci_bench()
    bench.call(Hypercall.CELL_DESTROY, 1)
    assert bench.hv.root.assigned_device(0x00D8) is not None
    lines = list(bench.hv.console.lines)
    assert 'Removing PCI device 00:1b.0 from cell "pci-demo"' in lines
    assert lines.count('Adding PCI device 00:1b.0 to cell "QEMU-VM"') == 2


# --- MMIO ------------------------------------------------------------------------------


def test_mmio_requires_full_containment() -> None:
    """An access straddling the end of an intercepted region is unhandled."""
    bench = started(linux_x86_demo())
    hv = bench.hv
    assert hv.handle_mmio(2, 0xFEC00000, 4, True, 0x10) == EXIT_DONE
    assert not hv.handle_mmio(2, 0xFEC00FFE, 4, False).handled
    assert last(bench)[0] == "FATAL: Invalid MMIO/RAM read, addr: 0x00000000fec00ffe size: 4"


def test_ram_of_the_cell_is_memory_not_mmio() -> None:
    """Accesses to mapped RAM do not exit: no statistics, data in memory."""
    bench = started(tiny_demo())
    hv = bench.hv
    assert hv.handle_mmio(2, 0x1000, 4, True, 0xCAFE) == EXIT_DONE
    assert bench.arch.phys_read(0x3EE01000, 4) == (0xCAFE).to_bytes(4, "little")
    assert hv.cpus[2].stats[CpuStat.VMEXITS_MMIO] == 0
    assert hv.handle_mmio(2, 0x100000, 4, False) == ExitResult(
        True, int.from_bytes(b"JHCO", "little")
    )


def subpage_cell(flags: int) -> object:
    region = MemoryRegion(phys_start=0xFED00000, virt_start=0xFED00000, size=0x100, flags=flags)
    base = tiny_demo()
    return dataclasses.replace(base, memory_regions=(*base.memory_regions, region))


@pytest.mark.parametrize(
    ("flags", "size", "offset", "write", "ok"),
    [
        (0x3 | 0x40000, 4, 0x10, False, True),
        (0x3 | 0x40000, 4, 0x10, True, True),
        (0x1 | 0x40000, 4, 0x10, True, False),
        (0x3 | 0x40000, 2, 0x10, False, False),
        (0x3 | 0x40000, 4, 0x12, False, False),
        (0x3 | 0x40000 | 0x8000, 4, 0x12, False, True),
    ],
    ids=["read", "write", "read-only", "width", "misaligned", "unaligned-allowed"],
)
def test_subpage_region_checks(flags: int, size: int, offset: int, write: bool, ok: bool) -> None:
    """Sub-page regions: permission, access width flag, alignment (unless IO_UNALIGNED)."""
    bench = started(subpage_cell(flags))
    result = bench.hv.handle_mmio(2, 0xFED00000 + offset, size, write, 1)
    assert result.handled is ok
    if not ok:
        direction = "write" if write else "read"
        assert last(bench)[0] == (
            f"FATAL: Invalid MMIO {direction}, address: {0xFED00000 + offset:x}, size: {size:x}"
        )


def test_mmio_table_overflow_warning() -> None:
    """Registering beyond the counted capacity warns and drops the region."""
    bench = started(tiny_demo())
    cell = bench.hv.cell_by_id(1)
    assert cell is not None
    capacity = cell.mmio.capacity
    while len(cell.mmio) < capacity:
        cell.mmio.register(0x1000000 * (len(cell.mmio) + 1), 0x1000, lambda a: 1)  # type: ignore
    assert not cell.mmio.register(0x90000000, 0x1000, lambda a: 1)  # type: ignore
    assert last(bench, 1) == ["WARNING: Overflow during MMIO region registration!"]


# --- test device (CONFIG_TEST_DEVICE) --------------------------------------------------

TEST_PAGE = 0x101000


def with_test_device() -> Bench:
    bench = Bench(params=HvParams(test_device=True))
    bench.running(tiny_demo(), 1)
    return bench


def test_test_device_is_off_by_default() -> None:
    """Without CONFIG_TEST_DEVICE the TEST_DEVICE flag gives nothing: the page after the
    comm region is not there (FATAL), and no unit says so at enable."""
    bench = started(tiny_demo())
    assert "Test device" not in bench.hv.units.names()
    assert not bench.hv.handle_mmio(2, TEST_PAGE + 0xFF8, 8, True, 1).handled
    assert last(bench) == ["FATAL: Invalid MMIO/RAM write, addr: 0x0000000000101ff8 size: 8",
                           'Parking CPU 2 (Cell: "tiny-demo")']


def test_test_device_unit_order_and_region() -> None:
    """The unit sits after the IOAPIC (link order), prints its line at enable and
    intercepts one page after the comm region of a flagged cell only."""
    bench = with_test_device()
    hv = bench.hv
    assert hv.units.names() == ["VT-d", "IOAPIC", "Test device", "Cache Allocation Technology", "PCI"]
    assert "Initializing unit: Test device" in hv.console.lines
    cell = hv.cell_by_id(1)
    assert cell is not None and (TEST_PAGE, 0x1000) in cell.mmio.regions()
    assert (TEST_PAGE, 0x1000) not in hv.root.mmio.regions()
    assert bench.create(apic_demo(), 2) == 0      # no TEST_DEVICE flag
    other = hv.cell_by_id(2)
    assert other is not None and all(start != TEST_PAGE for start, _ in other.mmio.regions())
    assert bench.call(Hypercall.CELL_DESTROY, 1) == 0
    assert (TEST_PAGE, 0x1000) not in cell.mmio.regions()


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_test_device_register_is_the_comm_page_tail(size: int) -> None:
    """Offsets 0xff8..0xfff of the test page are bytes 0xff8..0xfff of the comm page
    (which the cell sees as memory at 0x100ff8); the exits are counted as MMIO."""
    bench = with_test_device()
    hv = bench.hv
    value = 0x8877665544332211 & ((1 << (8 * size)) - 1)
    offset = 0x1000 - size
    assert hv.handle_mmio(2, TEST_PAGE + offset, size, True, value) == EXIT_DONE
    cell = hv.cell_by_id(1)
    assert cell is not None
    assert bytes(cell.comm_page[offset:0x1000]) == value.to_bytes(size, "little")
    assert hv.handle_mmio(2, TEST_PAGE + offset, size, False) == ExitResult(True, value)
    assert hv.handle_mmio(2, 0x100000 + offset, size, False) == ExitResult(True, value)
    assert hv.cpus[2].stats[CpuStat.VMEXITS_MMIO] == 2


@pytest.mark.parametrize(
    ("offset", "size", "write", "line"),
    [
        (0x0, 4, False, "testdev: invalid read, register 0, size 4"),
        (0xFF4, 4, True, "testdev: invalid write, register ff4, size 4"),
        # not inside the intercepted page at all: the MMIO dispatcher's FATAL
        (0xFFC, 8, False, "FATAL: Invalid MMIO/RAM read, addr: 0x0000000000101ffc size: 8"),
    ],
    ids=["page-start", "below-window", "beyond-page"],
)
def test_test_device_rejects_other_offsets(offset: int, size: int, write: bool, line: str) -> None:
    """Inside the page but not in its last 8 bytes: the device's own message (no
    Invalid MMIO line); either way the CPU is parked."""
    bench = with_test_device()
    assert not bench.hv.handle_mmio(2, TEST_PAGE + offset, size, write, 1).handled
    assert last(bench) == [line, 'Parking CPU 2 (Cell: "tiny-demo")']


# --- IOAPIC ----------------------------------------------------------------------------


def ioapic(bench: Bench, cpu: int, index: int, value: int | None = None) -> ExitResult:
    hv = bench.hv
    hv.handle_mmio(cpu, 0xFEC00000, 4, True, index)
    if value is None:
        return hv.handle_mmio(cpu, 0xFEC00010, 4, False)
    return hv.handle_mmio(cpu, 0xFEC00010, 4, True, value)


def test_ioapic_pins_move_and_come_back() -> None:
    """linux-x86-demo takes pins 3 and 4 from the root and returns them."""
    bench = Bench()
    root_view = bench.hv.root.ioapics[0]
    assert root_view.pin_bitmap == 0xFFFFFF
    bench.running(linux_x86_demo(), 1)
    assert root_view.pin_bitmap == 0xFFFFFF & ~0x18
    # the cell sees its pin, not the root's
    assert ioapic(bench, 2, 0x10 + 2 * 3, 0x31) == EXIT_DONE
    assert ioapic(bench, 2, 0x10 + 2 * 3) == ExitResult(True, 0x31)
    assert ioapic(bench, 2, 0x10 + 2 * 5) == ExitResult(True, 0)
    assert ioapic(bench, 2, 0x10 + 2 * 5, 0x99) == EXIT_DONE
    assert bench.arch.ioapic_regs.get((0xFEC00000, 0x10 + 2 * 5)) is None
    assert ioapic(bench, 2, 0x01) == ExitResult(True, 0x170011)
    assert not ioapic(bench, 2, 0x00, 0x5).handled
    assert not ioapic(bench, 3, 0x10 + 2 * 24).handled
    bench.call(Hypercall.CELL_DESTROY, 1)
    assert root_view.pin_bitmap == 0xFFFFFF


def test_ioapic_pins_masked_at_start() -> None:
    """Starting a cell masks the pins it owns."""
    bench = Bench()
    bench.create(linux_x86_demo(), 1)
    bench.arch.ioapic_regs.clear()
    bench.call(Hypercall.CELL_SET_LOADABLE, 1)
    bench.call(Hypercall.CELL_START, 1)
    phys = bench.hv.ioapic.phys[0xFEC00000]
    assert phys.shadow[3] & 0x10000 and phys.shadow[4] & 0x10000


def test_ioapic_eoi_needs_an_owned_pin() -> None:
    """EOI writes pass only for cells owning pins."""
    bench = started(linux_x86_demo())
    assert bench.hv.handle_mmio(2, 0xFEC00040, 4, True, 3) == EXIT_DONE
    chip = Irqchip(address=0xFEC00000, id=0xFF00, pin_bitmap=(0, 0, 0, 0))
    bench2 = started(dataclasses.replace(tiny_demo(), irqchips=(chip,)))
    assert not bench2.hv.handle_mmio(2, 0xFEC00040, 4, True, 3).handled
    assert last(bench2)[0].startswith("FATAL: Invalid IOAPIC write")


# --- ivshmem ------------------------------------------------------------------------------


def ivshmem_cfg(bench: Bench, cpu: int, reg: int, size: int = 4, write: int | None = None) -> object:
    hv = bench.hv
    hv.handle_pio(cpu, 0xCF8, 4, True, 0x80000000 | (0x0170 << 8) | (reg & 0xFC))
    port = 0xCFC + (reg & 3)
    if write is None:
        return hv.handle_pio(cpu, port, size, False).value
    return hv.handle_pio(cpu, port, size, True, write).handled


def test_ivshmem_config_space() -> None:
    """Vendor/device, class with the protocol, capabilities, shared memory description."""
    bench = started(ivshmem_demo())
    assert ivshmem_cfg(bench, 1, 0x00) == 0x4106110A
    assert ivshmem_cfg(bench, 1, 0x08) == 0xFF000000
    assert ivshmem_cfg(bench, 1, 0x2C) == 0x4106110A
    assert ivshmem_cfg(bench, 1, 0x34) == 0x40
    assert ivshmem_cfg(bench, 1, 0x40) == 0x00206009
    assert ivshmem_cfg(bench, 1, 0x44) == 0x1000
    assert ivshmem_cfg(bench, 1, 0x48) == 0x9000
    assert ivshmem_cfg(bench, 1, 0x50) == 0x2000
    assert ivshmem_cfg(bench, 1, 0x58) == 0x3F0F0000
    assert ivshmem_cfg(bench, 1, 0x60) == 0x000F0011
    assert ivshmem_cfg(bench, 1, 0x68) == 0x101
    assert ivshmem_cfg(bench, 1, 0x80) == 0xFFFFFFFF


def enable_ivshmem(bench: Bench, cpu: int, bar0: int, bar1: int, vector_dest: int) -> None:
    hv = bench.hv
    assert ivshmem_cfg(bench, cpu, 0x10, write=bar0) is True
    assert ivshmem_cfg(bench, cpu, 0x14, write=bar1) is True
    assert ivshmem_cfg(bench, cpu, 0x04, size=2, write=0x6) is True
    assert ivshmem_cfg(bench, cpu, 0x62, size=2, write=0x8000) is True
    assert hv.handle_mmio(cpu, bar1, 4, True, 0xFEE00000 | (vector_dest << 12)).handled
    assert hv.handle_mmio(cpu, bar1 + 8, 4, True, 0x41).handled
    assert hv.handle_mmio(cpu, bar1 + 12, 4, True, 0).handled
    assert hv.handle_mmio(cpu, bar0 + 8, 4, True, 1).handled


def test_ivshmem_registers_state_and_doorbell() -> None:
    """ID, peers, state table, doorbell interrupts between ivshmem-demo and the root."""
    bench = started(ivshmem_demo())
    hv = bench.hv
    enable_ivshmem(bench, 1, 0x80000000, 0x80001000, vector_dest=1)
    assert hv.handle_mmio(1, 0x80000000, 4, False) == ExitResult(True, 1)
    assert hv.handle_mmio(1, 0x80000004, 4, False) == ExitResult(True, 3)
    # the root (peer 0) enables its endpoint and rings peer 1
    enable_ivshmem(bench, 0, 0xC0000000, 0xC0001000, vector_dest=0)
    assert hv.handle_mmio(0, 0xC000000C, 4, True, (1 << 16) | 0).handled
    assert bench.arch.msis[-1] == (1, 0xFEE01000, 0x41)
    # a state write lands in the state table and interrupts the other peers (vector 0)
    msis = len(bench.arch.msis)
    assert hv.handle_mmio(1, 0x80000010, 4, True, 7).handled
    assert bench.arch.phys_read(0x3F0F0000 + 4, 4) == (7).to_bytes(4, "little")
    assert bench.arch.msis[msis:] == [(0, 0xFEE00000, 0x41)]
    # the doorbell to a peer that is not there does nothing
    assert hv.handle_mmio(1, 0x8000000C, 4, True, (2 << 16) | 0).handled
    assert len(bench.arch.msis) == msis + 1


def test_ivshmem_msix_target_outside_cell_is_fatal() -> None:
    """A vector aimed at a foreign CPU fails the writing CPU."""
    bench = started(ivshmem_demo())
    hv = bench.hv
    assert ivshmem_cfg(bench, 1, 0x14, write=0x80001000) is True
    assert ivshmem_cfg(bench, 1, 0x04, size=2, write=0x6) is True
    assert ivshmem_cfg(bench, 1, 0x62, size=2, write=0x8000) is True
    assert hv.handle_mmio(1, 0x8000100C, 4, True, 0).handled
    assert not hv.handle_mmio(1, 0x80001000, 4, True, 0xFEE03000).handled
    assert last(bench)[0] == "FATAL: ivshmem MSI-X target outside of cell"


def test_ivshmem_exit_clears_state_and_link() -> None:
    """Destroying a peer writes state 0; the last peer frees the link."""
    bench = started(ivshmem_demo())
    hv = bench.hv
    enable_ivshmem(bench, 1, 0x80000000, 0x80001000, vector_dest=1)
    hv.handle_mmio(1, 0x80000010, 4, True, 5)
    bench.call(Hypercall.CELL_DESTROY, 1)
    assert bench.arch.phys_read(0x3F0F0004, 4) == bytes(4)
    assert hv.ivshmem.to_dict()["0000:0170"]["endpoints"] == {"0": "QEMU-VM"}


# --- statistics, CPU info, panic ---------------------------------------------------------------


def test_statistics_counters_and_cpu_info() -> None:
    """Exits count per CPU; CPU_GET_INFO reads them (31 bits); moves clear them."""
    bench = started(tiny_demo())
    hv = bench.hv
    hv.handle_pio(2, 0x80, 1, True, 0)
    hv.count_exit(2, CpuStat.VMEXITS_CPUID)
    # plus the two management exits of load and start (see the next test)
    assert bench.call(Hypercall.CPU_GET_INFO, 2, 1000 + CpuStat.VMEXITS_TOTAL) == 4
    assert bench.call(Hypercall.CPU_GET_INFO, 2, 1000 + CpuStat.VMEXITS_PIO) == 1
    assert bench.call(Hypercall.CPU_GET_INFO, 2, 1000 + CpuStat.VMEXITS_CPUID) == 1
    # the hypercall itself is counted before it reads the counter
    assert bench.call(Hypercall.CPU_GET_INFO, 2, 1000 + CpuStat.VMEXITS_HYPERCALL, cpu=2) == 1
    assert bench.call(Hypercall.CPU_GET_INFO, 2, 0, cpu=2) == 0
    hv.cpus[2].stats[CpuStat.VMEXITS_MMIO] = 0xFFFFFFFF
    assert bench.call(Hypercall.CPU_GET_INFO, 2, 1000 + CpuStat.VMEXITS_MMIO) == 0x7FFFFFFF
    bench.call(Hypercall.CELL_DESTROY, 1)
    assert hv.cpus[2].stats == [0] * 12


def test_each_suspension_of_a_cell_cpu_is_a_management_exit() -> None:
    """arch_suspend_cpu sends an NMI to a CPU that is not suspended yet: a management exit
    (cell_set_loadable and cell_start each suspend the cell; create clears the counters);
    the root's CPUs run natively and count nothing."""
    bench = Bench()
    assert bench.create(linux_x86_demo(), 1) == 0
    info = (Hypercall.CPU_GET_INFO, 2, 1000 + CpuStat.VMEXITS_MANAGEMENT)
    assert bench.call(*info) == 0
    assert bench.call(Hypercall.CELL_SET_LOADABLE, 1) == 0
    assert bench.call(*info) == 1
    assert bench.call(Hypercall.CELL_START, 1) == 0
    hv = bench.hv
    for cpu in (2, 3):
        assert hv.cpus[cpu].stats[CpuStat.VMEXITS_MANAGEMENT] == 2
        assert hv.cpus[cpu].stats[CpuStat.VMEXITS_TOTAL] == 2
    assert hv.cpus[1].stats == [0] * 12


def test_exits_the_machine_handled_are_added_to_the_counters() -> None:
    """CPU_GET_INFO adds what the Arch counted below the model (an executor's KVM handles
    CPUID, MSRs ... in the kernel) to the model's own counts; the root's CPUs have none."""

    class CountingArch(OracleArch):
        def cpu_exit_counts(self, cpu: int) -> dict[CpuStat, int]:
            return {CpuStat.VMEXITS_CPUID: 500, CpuStat.VMEXITS_TOTAL: 510 + 0xFFFFFFFF}

    bench = Bench(arch_class=CountingArch)
    bench.running(tiny_demo(), 1)
    call = bench.call
    assert call(Hypercall.CPU_GET_INFO, 2, 1000 + CpuStat.VMEXITS_CPUID) == 500
    # u32 counters: 2 management exits + 510 + 2**32 - 1 wraps to 511
    assert call(Hypercall.CPU_GET_INFO, 2, 1000 + CpuStat.VMEXITS_TOTAL) == 511
    assert call(Hypercall.CPU_GET_INFO, 2, 1000 + CpuStat.VMEXITS_PIO) == 0
    assert call(Hypercall.CPU_GET_INFO, 1, 1000 + CpuStat.VMEXITS_CPUID) == 0


def test_cell_fails_only_when_all_cpus_failed() -> None:
    """panic_park: failed flag per CPU, FAILED state once all CPUs of the cell failed."""
    bench = started(linux_x86_demo())
    hv = bench.hv
    hv.panic_park(2, "Unhandled MSR read: 1234")
    assert last(bench) == [
        "FATAL: Unhandled MSR read: 1234",
        'Parking CPU 2 (Cell: "linux-x86-demo")',
    ]
    assert bench.call(Hypercall.CPU_GET_INFO, 2, 0) == 2
    assert bench.call(Hypercall.CELL_GET_STATE, 1) == CellState.RUNNING
    hv.panic_park(3)
    assert bench.call(Hypercall.CELL_GET_STATE, 1) == CellState.FAILED
    # set-loadable and start clear the failed flags
    bench.call(Hypercall.CELL_SET_LOADABLE, 1)
    assert bench.call(Hypercall.CPU_GET_INFO, 3, 0) == 0


def test_putc_goes_to_the_console() -> None:
    """Hypercall 8 prints a character for cells with VIRTUAL_CONSOLE_PERMITTED."""
    bench = started(tiny_demo())
    for char in "hi\n":
        assert bench.call(Hypercall.DEBUG_CONSOLE_PUTC, ord(char), cpu=2) == 0
    assert last(bench, 1) == ["hi"]
    assert bench.call(Hypercall.HYPERVISOR_GET_INFO, 4, cpu=2) == 2


def test_comm_region_contents_at_start() -> None:
    """Start fills the comm region: signature, revision, flags, console, x86 fields."""
    from harness.hvmodel.abi import CommRegion

    bench = started(tiny_demo())
    cell = bench.hv.cell_by_id(1)
    assert cell is not None
    region = CommRegion.from_buffer(cell.comm_page)
    assert region.signature == b"JHCOMM" and region.revision == 2
    assert region.cell_state == CellState.RUNNING and region.flags == 1
    assert region.console == tiny_demo().console.to_bytes()
    assert region.pci_mmconfig_base == 0xB0000000
    assert (region.pm_timer_address, region.num_cpus) == (0x608, 1)


def test_cpuid_view_of_the_cpu() -> None:
    """The Jailhouse leaves, VMX/SVM hidden and HYPERVISOR set for non-root cells."""
    bench = started(tiny_demo())
    hv = bench.hv
    assert hv.handle_cpuid(2, 0x40000000, (0, 0, 0, 0)) == (
        0x40000001, 0x6C69614A, 0x73756F68, 0x00000065,
    )
    assert hv.handle_cpuid(0, 0x40000001, (1, 2, 3, 4)) == (0, 0, 0, 0)
    vmx_osxsave = (1 << 5) | (1 << 27)
    assert hv.handle_cpuid(2, 1, (0, 0, vmx_osxsave, 0)) == (0, 0, 1 << 31, 0)
    assert hv.handle_cpuid(0, 1, (0, 0, 1 << 5, 0), osxsave=True) == (0, 0, vmx_osxsave, 0)
    assert hv.handle_cpuid(2, 0x80000001, (0, 0, 0x4, 0)) == (0, 0, 0, 0)
    assert hv.handle_cpuid(2, 0, (0xD, 1, 2, 3)) == (0xD, 1, 2, 3)
    assert hv.cpus[2].stats[CpuStat.VMEXITS_CPUID] == 4
