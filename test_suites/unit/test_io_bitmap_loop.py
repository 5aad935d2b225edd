"""The executor's I/O bitmap loop (:class:`harness.hvmodel.arch.portio.IoBitmapLoop`): the
machine-code KVM_RUN loop that performs the port accesses a cell's I/O bitmap opens and
hands every other exit back to Python.

The checks that run guests on a real port (``io_bitmap_checks.py``) need /dev/kvm and
``ioperm``: here they run where the host allows both, and are skipped, saying so, where it
does not (a PVM host refuses ``ioperm``); ``test_suites/integration/test_io_bitmap_in_lab.py``
runs the same checks in the lab VM, where they always can.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest
from io_bitmap_checks import (
    bitmap,
    check_a_kick_ends_the_loop_with_an_interrupt_exit,
    check_auto_backend_is_native,
    check_open_ports_are_served_and_the_rest_come_back,
    expect_io,
    ioperm_works,
    native_ports,
    watchdog,
)

from harness.hvmodel.arch import hostmem, kvm, portio
from harness.hvmodel.arch.kvm import structs
from harness.hvmodel.arch.vcpu import jailhouse_vcpu_reset, jailhouse_vcpu_setup

needs_ioperm = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK) or not ioperm_works(),
    reason="needs /dev/kvm and ioperm, which this host refuses; the lab runs these checks "
    "(integration/test_io_bitmap_in_lab.py)",
)


def test_open_ranges_are_the_runs_of_open_ports() -> None:
    """Runs of open bytes (1, or 2: open and captured), in order, as (first port,
    length); the configuration-port mark (3) and other values are not open."""
    data = bitmap(0x2F8, 0x2F9, 0x2FA, 0x608, 0xFFFF)
    data[0x609] = 2  # open, captured
    data[0xCF8:0xD00] = b"\3" * 8  # the loop answers, but never touches the real port
    data[0x70] = 7
    assert portio.open_ranges(data) == [(0x2F8, 3), (0x608, 2), (0xFFFF, 1)]
    assert portio.open_ranges(bytes(0x10000)) == []
    assert portio.open_ranges(b"\1" * 0x10000) == [(0, 0x10000)]


def test_the_loop_is_assembled_with_the_abi_constants() -> None:
    """The machine code calls ioctl (x86-64 syscall 16) with KVM_RUN and ends in RET."""
    code = portio._IO_BITMAP_LOOP
    assert code[9:14] == b"\xb8" + (16).to_bytes(4, "little")
    assert code[14:19] == b"\xbe" + structs.KVM_RUN.to_bytes(4, "little")
    assert code[-1:] == b"\xc3"
    assert portio._LOOP_OFFSET >= 6 * portio._STUB_SLOT
    assert portio._LOOP_OFFSET + len(code) <= 4096


def test_a_bitmap_of_the_wrong_size_is_refused() -> None:
    native = portio.NativePorts()
    try:
        with pytest.raises(ValueError, match="0x10000"):
            native.io_bitmap_loop(-1, None, bytearray(16))  # type: ignore[arg-type]
    finally:
        native.close()


def test_a_loop_keeps_the_machine_code_mapped_after_close() -> None:
    """A loop made before NativePorts.close keeps the stub page (a vCPU thread may still
    be on its way out of the loop); the page goes with the last loop. (No port is open,
    so nothing needs ioperm here.)"""
    native = portio.NativePorts()
    run_page = mmap.mmap(-1, mmap.PAGESIZE)
    loop = native.io_bitmap_loop(-1, run_page, bytes(0x10000))
    unmap = loop._page.unmap  # the finalizer, not the page: it does not keep it alive
    native.close()
    assert unmap.alive
    with pytest.raises(ValueError, match="closed"):
        native.io_bitmap_loop(-1, run_page, bytes(0x10000))
    del loop
    assert not unmap.alive
    run_page.close()  # the loop held no export of the run page


@pytest.mark.usefixtures("kick_handler")
@needs_ioperm
def test_open_ports_are_served_and_the_rest_come_back() -> None:
    """The open port is served in the loop; a wide access reaching a closed port, closed
    ports and string I/O come back as exits (see the check)."""
    check_open_ports_are_served_and_the_rest_come_back()


@pytest.mark.usefixtures("kick_handler")
@needs_ioperm
def test_a_kick_ends_the_loop_with_an_interrupt_exit() -> None:
    """A guest spinning on the open port stays in the loop until kicked (see the check)."""
    check_a_kick_ends_the_loop_with_an_interrupt_exit()


@needs_ioperm
def test_auto_backend_is_native_where_ioperm_works() -> None:
    """With ``ioperm`` the executor's automatic port backend is the native one."""
    check_auto_backend_is_native()


# Real mode at 0: the PCI configuration ports, for a device outside the cell (00:02.0),
# one of the cell's (00:03.0) and a data write to another outside one (00:04.0).
PCI_GUEST = bytes.fromhex(
    "baf80c"  # mov dx, 0xcf8
    "66b804100080"  # mov eax, 0x80001004     (00:02.0, register 4)
    "66ef"  # out dx, eax                      latched by the loop
    "66ed"  # in eax, dx                       read back by the loop
    "66a30080"  # mov [0x8000], eax
    "bafc0c"  # mov dx, 0xcfc
    "66ed"  # in eax, dx                       all ones from the loop
    "66a30480"  # mov [0x8004], eax
    "bafe0c"  # mov dx, 0xcfe
    "ed"  # in ax, dx                          all ones from the loop
    "a30880"  # mov [0x8008], ax
    "baf80c"  # mov dx, 0xcf8
    "66b800180080"  # mov eax, 0x80001800     (00:03.0, the cell's)
    "66ef"  # out dx, eax                      -> the caller
    "bafc0c"  # mov dx, 0xcfc
    "66ed"  # in eax, dx                       -> the caller (the model holds the address)
    "baf80c"  # mov dx, 0xcf8
    "66b800200080"  # mov eax, 0x80002000     (00:04.0)
    "66ef"  # out dx, eax                      latched by the loop
    "bafc0c"  # mov dx, 0xcfc
    "66ef"  # out dx, eax                      a data write: -> the caller
    "baf90c"  # mov dx, 0xcf9
    "ee"  # out dx, al                         not a configuration access: -> the caller
    "f4"  # hlt
)

CELL_DEVICE = 0x0018  # 00:03.0


@pytest.fixture
def native() -> Iterator[portio.NativePorts]:
    with native_ports() as ports:
        yield ports


def pci_bitmap() -> bytearray:
    data = bytearray(0x10000)
    data[0xCF8:0xD00] = bytes([portio.PORT_PCI_CONFIG]) * 8
    return data


def pci_guest(vm: kvm.Vm) -> tuple[kvm.Vcpu, mmap.mmap]:
    """:data:`PCI_GUEST` on a vCPU, and its memory (it touches no real port: /dev/kvm is
    enough, no ioperm)."""
    memory = hostmem.anonymous_memory(0x10000)
    memory[: len(PCI_GUEST)] = PCI_GUEST
    vm.add_memory(0, memory)
    vcpu = vm.create_vcpu(0)
    jailhouse_vcpu_setup(vcpu)
    jailhouse_vcpu_reset(vcpu, 0)
    return vcpu, memory


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")
def test_configuration_ports_of_devices_outside_the_cell_are_answered_by_the_loop(
        vm: kvm.Vm, native: portio.NativePorts) -> None:
    """x86_pci_config_handler for a device the cell does not have, in the loop: the
    address is latched and read back, data reads are all ones of their size, each counted;
    the cell's own device, a data write and a non-configuration port come back, and the
    latch the caller must give the model is handed over once."""
    vcpu, memory = pci_guest(vm)
    cell = portio.CellPorts([CELL_DEVICE])
    loop = native.io_bitmap_loop(vcpu.fd, vcpu.run_page, pci_bitmap(), cell)
    with watchdog(vcpu):
        assert expect_io(vcpu.run_native(loop), 0xCF8, 4, True).value() == 0x80001800
        assert loop.pci_served == 4
        assert int.from_bytes(memory[0x8000:0x8004], "little") == 0x80001004
        assert int.from_bytes(memory[0x8004:0x8008], "little") == 0xFFFFFFFF
        assert int.from_bytes(memory[0x8008:0x800A], "little") == 0xFFFF
        assert cell.take_latch() == 0x80001004
        assert cell.take_latch() is None
        expect_io(vcpu.run_native(loop), 0xCFC, 4, False).set_value(0x12345678)
        assert expect_io(vcpu.run_native(loop), 0xCFC, 4, True).value() == 0x80002000
        assert cell.take_latch() == 0x80002000
        expect_io(vcpu.run_native(loop), 0xCF9, 1, True)
    assert loop.pci_served == 5
    assert loop.served == 0  # no real port was touched
    assert vcpu.get_regs().rax & 0xFFFFFFFF == 0x80002000


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")
def test_without_cell_state_every_configuration_access_comes_back(
        vm: kvm.Vm, native: portio.NativePorts) -> None:
    """A loop given no CellPorts answers nothing itself: the first access exits."""
    vcpu, _memory = pci_guest(vm)
    loop = native.io_bitmap_loop(vcpu.fd, vcpu.run_page, pci_bitmap())
    with watchdog(vcpu):
        assert expect_io(vcpu.run_native(loop), 0xCF8, 4, True).value() == 0x80001004
    assert loop.pci_served == 0


def test_captured_bytes_wrap_in_the_ring() -> None:
    """The ring keeps the last CAPTURE_SIZE bytes: reads from an old position start at
    the oldest byte still there; the position moves on."""
    cell = portio.CellPorts()
    data = cell._data
    text = bytes(range(256)) * 20  # 5120 bytes, more than the ring
    for index, byte in enumerate(text):
        data.capture[index % portio.CAPTURE_SIZE] = byte
    data.capture_head = len(text)
    got, head = cell.captured(0)
    assert head == len(text)
    assert got == text[-portio.CAPTURE_SIZE:]
    assert cell.captured(len(text) - 10) == (text[-10:], len(text))
    assert cell.captured(len(text)) == (b"", len(text))


def capture(cell: portio.CellPorts, text: bytes, at: int) -> int:
    """Write ``text`` into the ring as the loop does, from position ``at``; the new head."""
    data = cell._data
    for index, byte in enumerate(text, at):
        data.capture[index % portio.CAPTURE_SIZE] = byte
    data.capture_head = at + len(text)
    return at + len(text)


def test_the_start_of_the_output_is_kept_apart_from_the_ring() -> None:
    """keep_start copies the first CAPTURE_START bytes as they arrive; what follows, even
    a burst that wraps the ring, leaves them as they were."""
    cell = portio.CellPorts()
    head = capture(cell, b"Hypervisor detected: Jailhouse\n", 0)
    cell.keep_start()
    assert bytes(cell.start) == b"Hypervisor detected: Jailhouse\n"
    head = capture(cell, b"x" * 3000, head)
    cell.keep_start()
    assert bytes(cell.start) == b"Hypervisor detected: Jailhouse\n" + b"x" * 3000
    head = capture(cell, b"y" * 2000, head)
    cell.keep_start()  # full: up to CAPTURE_START, not beyond
    assert bytes(cell.start) == (b"Hypervisor detected: Jailhouse\n" + b"x" * 3000
                                 + b"y" * 2000)[:portio.CAPTURE_START]
    kept = bytes(cell.start)
    capture(cell, b"z" * 3 * portio.CAPTURE_SIZE, head)
    cell.keep_start()  # the burst that wraps the ring leaves it alone
    assert bytes(cell.start) == kept


def test_bytes_lost_before_a_look_end_the_start() -> None:
    """When the ring wrapped past the part not yet copied, keep_start keeps what it has
    and stops (no gap is glued over)."""
    cell = portio.CellPorts()
    head = capture(cell, b"first\n", 0)
    cell.keep_start()
    capture(cell, b"z" * (portio.CAPTURE_SIZE + 100), head)
    cell.keep_start()
    assert bytes(cell.start) == b"first\n"
    capture(cell, b"late", portio.CAPTURE_SIZE * 3)
    cell.keep_start()
    assert bytes(cell.start) == b"first\n"
