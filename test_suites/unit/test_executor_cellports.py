"""What a cell's I/O bitmap loop answers without the model
(:mod:`harness.hvmodel.arch.executor.cellports`): the loop's bitmap, the UARTs whose
output is kept, and how the model is kept in step (the latched address first, the
loop's answers counted as PIO exits)."""

from __future__ import annotations

import dataclasses
import types

from harness.hvmodel.abi import CpuStat
from harness.hvmodel.arch import portio
from harness.hvmodel.arch.executor.cellports import (
    CellPortsSync,
    cell_ports,
    console_ports,
    console_tail,
    loop_bitmap,
)
from harness.hvmodel.arch.executor.cells import CellCpu
from harness.hvmodel.config import CellConfig, Console, PciDevice, PioRegion
from harness.hvmodel.percpu import EXIT_DONE, ExitResult


def _config(**fields: object) -> CellConfig:
    base = CellConfig(name="cell", pio_regions=(PioRegion(base=0x2F8, length=8),
                                               PioRegion(base=0x3F8, length=4)))
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def test_the_bitmap_marks_the_configuration_ports_and_the_open_uart_registers() -> None:
    """0xCF8-0xCFF become configuration ports where the model traps them; a UART's
    transmit register is captured only where the model opens it; the rest is the model's."""
    model = bytearray(0x10000)
    model[0x2F8:0x300] = b"\1" * 8
    model[0x3F8:0x3FC] = b"\1" * 4
    model[0xCFC] = 1  # a root cell may whitelist a data port: left as it is
    bitmap = loop_bitmap(model, _config())
    assert bitmap[0x2F8] == portio.PORT_CAPTURED and bitmap[0x3F8] == portio.PORT_CAPTURED
    assert bitmap[0x2F9] == portio.PORT_OPEN and bitmap[0x3FC] == portio.PORT_TRAPPED
    assert [bitmap[port] for port in range(0xCF8, 0xD00)] == [3, 3, 3, 3, 1, 3, 3, 3]
    assert model[0xCF8] == 0  # a copy: the model's bitmap is not changed


def test_console_ports_are_the_whitelisted_pc_uarts_and_the_pio_console() -> None:
    assert console_ports(_config()) == {0x2F8, 0x3F8}
    assert console_ports(_config(pio_regions=(PioRegion(base=0x3E8, length=1),))) == {0x3E8}
    console = Console(address=0x2E8, type=2)
    assert console_ports(_config(pio_regions=(), console=console)) == {0x2E8}
    mmio = Console(address=0xFE000000, type=2, flags=1)
    assert console_ports(_config(pio_regions=(), console=mmio)) == frozenset()


def test_the_cell_devices_are_the_models() -> None:
    """The loop hands configuration accesses of the cell's devices to the model."""
    ports = cell_ports(_config(pci_devices=(PciDevice(type=1, bdf=0x10), PciDevice(type=3, bdf=0x160))))
    assert ports._data.devices[0x10] == 1 and ports._data.devices[0x160] == 1
    assert sum(ports._data.devices) == 2


class _Model:
    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def handle_pio(self, cpu: int, port: int, size: int, is_write: bool, value: int = 0, *,
                   rep: bool = False) -> ExitResult:
        self.calls.append(("pio", cpu, port, size, is_write, value))
        return EXIT_DONE

    def count_exit(self, cpu: int, stat: CpuStat, count: int = 1) -> None:
        self.calls.append(("count", cpu, stat, count))


def test_the_model_gets_the_latched_address_before_a_port_exit_and_the_answers_as_pio_exits() -> None:
    """The latch goes to the model as the write it was (counted as one of the answers),
    only before a port exit; the other answers are counted once."""
    ports = portio.CellPorts()
    ports._data.latch, ports._data.latch_native = 0x80001004, 1
    sync = CellPortsSync(2, ports)
    model = _Model()
    sync.before_exit(model, 5, port_exit=False)
    assert model.calls == [("count", 2, CpuStat.VMEXITS_PIO, 5)]
    sync.before_exit(model, 7, port_exit=True)
    assert model.calls[1:] == [("pio", 2, 0xCF8, 4, True, 0x80001004),
                               ("count", 2, CpuStat.VMEXITS_PIO, 1)]
    assert ports.take_latch() is None
    sync.before_exit(model, 7, port_exit=True)
    assert len(model.calls) == 3  # nothing new
    sync.new_loop()
    sync.before_exit(model, 2, port_exit=False)
    assert model.calls[3:] == [("count", 2, CpuStat.VMEXITS_PIO, 2)]


def test_console_tail_is_text_without_control_characters() -> None:
    """Carriage returns and the divisor byte a driver writes to the transmit register's
    port (DLAB set) are dropped; line feeds and tabs stay."""
    ports = portio.CellPorts()
    text = b"\x01line one\r\nline\ttwo\r\n"
    ports._data.capture[: len(text)] = text
    ports._data.capture_head = len(text)
    assert console_tail(ports, 1000) == "line one\nline\ttwo\n"
    assert console_tail(ports, 10) == "line\ttwo\n"


def test_answers_not_yet_counted_show_in_the_cpus_statistics() -> None:
    """A cell that reads configuration ports and then only halts makes no exit that would
    hand the loop's answers to the model: ``cell stats`` still counts them (as PIO exits
    and in the total), once, and no more after the model counted them at an exit."""
    ports = portio.CellPorts()
    sync = CellPortsSync(2, ports)
    loop = types.SimpleNamespace(pci_served=2000, served=0)
    cpu = CellCpu(id=2, cell=None, vcpu=None, ports_sync=sync, io_loop=loop)  # type: ignore[arg-type]
    assert cpu.uncounted_exits() == {CpuStat.VMEXITS_PIO: 2000, CpuStat.VMEXITS_TOTAL: 2000}
    sync.before_exit(_Model(), loop.pci_served, port_exit=False)
    assert cpu.uncounted_exits() == {}
    loop.pci_served = 2010
    assert cpu.uncounted_exits() == {CpuStat.VMEXITS_PIO: 10, CpuStat.VMEXITS_TOTAL: 10}
