"""A cell's IOAPIC pins (:mod:`harness.hvmodel.arch.executor.pins`) on this machine's
/dev/kvm: a tiny real-mode guest with a split irqchip takes the interrupts a pin's KVM
route delivers, ends them with an x2APIC EOI, and the EOI comes back as
``KVM_EXIT_IOAPIC_EOI`` for :meth:`CellPins.eoi`.

The line behind the pin is :class:`LevelLine`, a level-triggered line with the masking
the real sources have (VFIO's INTx, ``jhlab_gsi``): it signals its eventfd when it
rises or is unmasked while high, and masks itself after each signal. The real sources
are exercised in a lab (``test_suites/e2e/test_probes.py``: ``test_intx``, ``test_sci``).

Every run is bounded: a watchdog kicks the vCPU, so "no interrupt" is an ``IntrExit``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

import pytest

from harness.hvmodel.abi import IOAPIC_REDIR_MASK
from harness.hvmodel.arch import hostmem, kvm
from harness.hvmodel.arch.executor.pins import CellPins, redir_entry_msi
from harness.hvmodel.arch.vcpu import jailhouse_vcpu_reset, jailhouse_vcpu_setup
from harness.hvmodel.arch.vfio import EventFd, MsiRouter

pytestmark = [
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="/dev/kvm not available"),
    pytest.mark.usefixtures("kick_handler"),
]

UART = 0x2F8
IOAPIC = 0xFEC00000
PIN = 9
VECTOR = 0x40
LEVEL = 1 << 15
#: a quiet guest: how long to wait before calling it quiet
QUIET = 0.5

# Real mode at 0: x2APIC software-enabled, "ready" (0xff) on the UART, then sti; hlt forever.
MAIN = bytes([
    0x66, 0xB9, 0x0F, 0x08, 0x00, 0x00,  # mov ecx, 0x80f   (x2APIC SVR)
    0x66, 0xB8, 0xFF, 0x01, 0x00, 0x00,  # mov eax, 0x1ff   (APIC enabled)
    0x66, 0x31, 0xD2,                    # xor edx, edx
    0x0F, 0x30,                          # wrmsr
    0xBA, 0xF8, 0x02,                    # mov dx, 0x2f8
    0xB0, 0xFF,                          # mov al, 0xff
    0xEE,                                # out dx, al       (ready)
    0xFB,                                # sti
    0xF4,                                # 1: hlt
    0xEB, 0xFD,                          #    jmp 1b
])  # fmt: skip
# At 0x200, IVT entry VECTOR: "I" on the UART, x2APIC EOI, iret.
HANDLER = bytes([
    0xBA, 0xF8, 0x02,                    # mov dx, 0x2f8
    0xB0, 0x49,                          # mov al, 'I'
    0xEE,                                # out dx, al
    0x66, 0xB9, 0x0B, 0x08, 0x00, 0x00,  # mov ecx, 0x80b   (x2APIC EOI)
    0x66, 0x31, 0xC0,                    # xor eax, eax
    0x66, 0x31, 0xD2,                    # xor edx, edx
    0x0F, 0x30,                          # wrmsr
    0xCF,                                # iret
])  # fmt: skip


class LevelLine:
    """A level-triggered line that masks itself after each interrupt (module docstring)."""

    name = "test line"

    def __init__(self) -> None:
        self.eventfd = EventFd()
        self.high = False
        self.masked = False
        self.unmasks = 0
        self.closed = False

    def fileno(self) -> int:
        return self.eventfd.fileno()

    def drain(self) -> None:
        self.eventfd.read()

    def rise(self) -> None:
        self.high = True
        self._fire()

    def fall(self) -> None:
        self.high = False

    def _fire(self) -> None:
        if self.high and not self.masked:
            self.masked = True
            self.eventfd.write(1)

    def unmask(self) -> None:
        self.unmasks += 1
        self.masked = False
        self._fire()

    def close(self) -> None:
        self.closed = True
        self.eventfd.close()


@pytest.fixture
def cell() -> Iterator[tuple[kvm.Vcpu, CellPins]]:
    """A split-irqchip VM running :data:`MAIN` until its "ready", with pin 9 of the IOAPIC."""
    with kvm.Kvm() as dev:
        vm = kvm.Vm(dev)
        try:
            if not dev.check_extension(kvm.Cap.SPLIT_IRQCHIP):
                pytest.skip("KVM has no split irqchip")
            vm.create_split_irqchip(24)
            memory = hostmem.anonymous_memory(0x10000)
            memory[0 : len(MAIN)] = MAIN
            memory[0x200 : 0x200 + len(HANDLER)] = HANDLER
            memory[VECTOR * 4 : VECTOR * 4 + 4] = b"\x00\x02\x00\x00"  # IVT: 0000:0200
            vm.add_memory(0, memory)
            vcpu = vm.create_vcpu(0)
            jailhouse_vcpu_setup(vcpu)
            jailhouse_vcpu_reset(vcpu, 0)
            pins = CellPins(vm, MsiRouter(vm, irqchip_defaults=False), [(IOAPIC, PIN)], "test")
            with watchdog(vcpu, 10.0):
                assert outputs(vcpu) == [0xFF]
            yield vcpu, pins
            pins.close()
        finally:
            vm.close()


@contextlib.contextmanager
def watchdog(vcpu: kvm.Vcpu, seconds: float) -> Iterator[None]:
    timer = threading.Timer(seconds, vcpu.kick)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def outputs(vcpu: kvm.Vcpu) -> list[int]:
    """Run until the guest's next UART byte; [] when a kick came first."""
    while True:
        exit_ = vcpu.run()
        if isinstance(exit_, kvm.IntrExit):
            return []
        assert isinstance(exit_, kvm.IoExit) and exit_.port == UART, exit_
        return [exit_.value()]


def interrupt_and_eoi(vcpu: kvm.Vcpu, pins: CellPins, seconds: float = 10.0) -> bool:
    """Run until the guest took the pin's interrupt ("I") and ended it (the EOI exit,
    passed to the pins); False when nothing came within ``seconds``."""
    with watchdog(vcpu, seconds):
        if outputs(vcpu) != [ord("I")]:
            return False
        exit_ = vcpu.run()
    assert isinstance(exit_, kvm.IoapicEoiExit), exit_
    assert exit_.vector == VECTOR
    pins.eoi(exit_.vector)
    return True


def write_entry(pins: CellPins, entry: int) -> None:
    """The cell writes a redirection entry of pin 9: high half first, as a cell does."""
    pins.write(IOAPIC, PIN, True, entry >> 32)
    pins.write(IOAPIC, PIN, False, entry & 0xFFFFFFFF)


def test_redirection_entries_become_level_messages() -> None:
    """Vector, delivery mode and destination (physical, or logical with the redirection
    hint) go into the MSI; the message is level-triggered whatever the entry says."""
    assert redir_entry_msi(0x02 << 56 | LEVEL | 0x42) == (0xFEE02000, 0xC042)
    assert redir_entry_msi(0x02 << 56 | 0x42) == (0xFEE02000, 0xC042)  # edge entry
    assert redir_entry_msi(0x0F << 56 | 1 << 11 | 1 << 8 | 0x51) == (0xFEE0F00C, 0xC151)
    assert redir_entry_msi(0x01 << 56 | 4 << 8 | 0x02) == (0xFEE01000, 0xC402)  # NMI


def test_a_level_line_interrupts_again_after_each_eoi_while_high(
        cell: tuple[kvm.Vcpu, CellPins]) -> None:
    """An unmasked entry routes the line: each EOI unmasks it, and a line still high is
    delivered again; once low it stays quiet (no storm)."""
    vcpu, pins = cell
    line = LevelLine()
    assert pins.add_source(IOAPIC, PIN, line)
    write_entry(pins, LEVEL | VECTOR)
    line.rise()
    assert interrupt_and_eoi(vcpu, pins)
    assert interrupt_and_eoi(vcpu, pins)  # still high: again after the EOI
    line.fall()
    assert interrupt_and_eoi(vcpu, pins)  # the one the last EOI's unmask signalled
    assert not interrupt_and_eoi(vcpu, pins, QUIET)
    assert line.unmasks >= 3


def test_a_masked_entry_holds_a_high_line_until_unmasked(cell: tuple[kvm.Vcpu, CellPins]) -> None:
    """A masked entry delivers nothing; unmasking it delivers a line still high, once."""
    vcpu, pins = cell
    line = LevelLine()
    pins.add_source(IOAPIC, PIN, line)
    write_entry(pins, IOAPIC_REDIR_MASK | LEVEL | VECTOR)
    line.rise()
    assert not interrupt_and_eoi(vcpu, pins, QUIET)
    write_entry(pins, LEVEL | VECTOR)
    assert interrupt_and_eoi(vcpu, pins)
    line.fall()
    assert interrupt_and_eoi(vcpu, pins)  # signalled by the EOI's unmask while still high
    assert not interrupt_and_eoi(vcpu, pins, QUIET)


def test_a_line_that_fell_while_masked_is_not_delivered(cell: tuple[kvm.Vcpu, CellPins]) -> None:
    """What the line signalled while the entry was masked is dropped at the unmask: a
    line that is low by then is not delivered (a level-triggered pin's behaviour)."""
    vcpu, pins = cell
    line = LevelLine()
    pins.add_source(IOAPIC, PIN, line)
    write_entry(pins, IOAPIC_REDIR_MASK | LEVEL | VECTOR)
    line.rise()
    line.fall()
    write_entry(pins, LEVEL | VECTOR)
    assert not interrupt_and_eoi(vcpu, pins, QUIET)


def test_a_source_added_to_a_routed_pin_is_connected(cell: tuple[kvm.Vcpu, CellPins]) -> None:
    """A line that joins a pin whose entry is already unmasked is delivered at once."""
    vcpu, pins = cell
    write_entry(pins, LEVEL | VECTOR)
    line = LevelLine()
    line.rise()  # high before it joins (it signalled nobody)
    pins.add_source(IOAPIC, PIN, line)
    line.fall()
    assert interrupt_and_eoi(vcpu, pins)
    assert not interrupt_and_eoi(vcpu, pins, QUIET)


def test_removed_and_closed_sources(cell: tuple[kvm.Vcpu, CellPins]) -> None:
    """A removed source no longer reaches the cell; close() releases what is left."""
    vcpu, pins = cell
    gone, kept = LevelLine(), LevelLine()
    pins.add_source(IOAPIC, PIN, gone)
    pins.add_source(IOAPIC, PIN, kept)
    write_entry(pins, LEVEL | VECTOR)
    assert pins.remove_sources(lambda s: s is gone) == [gone]
    gone.rise()
    assert not interrupt_and_eoi(vcpu, pins, QUIET)
    pins.close()
    assert kept.closed and not gone.closed
    assert pins.router.pins == {}


def test_pins_kvm_cannot_deliver_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    """Pins at or above the split irqchip's IOAPIC routes, and a second IOAPIC's pin with
    a number the first one has, are not delivered, with a warning; the router keeps pins
    below its first MSI GSI only."""
    with kvm.Kvm() as dev:
        vm = kvm.Vm(dev)
        try:
            router = MsiRouter(vm, irqchip_defaults=False)
            with caplog.at_level(logging.WARNING):
                pins = CellPins(vm, router, [(IOAPIC, 3), (IOAPIC, 30), (IOAPIC + 0x1000, 3)], "x")
            assert list(pins.pins) == [(IOAPIC, 3)]
            assert not pins.add_source(IOAPIC, 30, LevelLine())
            assert "IOAPIC 0xfec00000 pin 30 not delivered" in caplog.text
            assert "IOAPIC 0xfec01000 pin 3 not delivered" in caplog.text
            with pytest.raises(ValueError, match="below GSI 24"):
                router.set_pin(24, 0xFEE00000, 0x40)
        finally:
            vm.close()
