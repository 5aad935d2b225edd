"""``Hypervisor.pio_bitmap``: the I/O bitmap an Arch may check itself (the executor's I/O
bitmap loop) instead of calling ``handle_pio`` for every port access (§4.3)."""

from __future__ import annotations

from test_control_errors import Bench
from test_model_configs import tiny_demo

from harness.hvmodel.abi import CpuStat, Hypercall
from harness.hvmodel.percpu import EXIT_DONE

#: tiny-demo runs on CPU 2; qemu-x86's PM timer
CPU = 2
PM_TIMER = 0x608


def test_bitmap_opens_exactly_what_handle_pio_passes_through() -> None:
    """A cell CPU's bitmap has the whitelist and the PM timer open, the i8042 command port
    and everything else closed; every open port passes handle_pio without an exit."""
    config = tiny_demo()
    bench = Bench()
    bench.running(config, 1)
    bitmap = bench.hv.pio_bitmap(CPU)
    assert bitmap is not None and len(bitmap) == 0x10000
    whitelist = {port for pio in config.pio_regions for port in range(pio.base, pio.base + pio.length)}
    opened = {port for port in range(0x10000) if bitmap[port]}
    assert opened == whitelist | set(range(PM_TIMER, PM_TIMER + 4))
    for port in sorted(opened):
        assert bench.hv.handle_pio(CPU, port, 1, True, 0) == EXIT_DONE
    assert bench.hv.cpus[CPU].stats[CpuStat.VMEXITS_PIO] == 0
    assert not bitmap[0x64] and not bitmap[0xCF8]


def test_root_cpus_have_no_bitmap() -> None:
    """Root CPUs run natively: there is nothing to check; a destroyed cell's CPU is the
    root's again."""
    bench = Bench()
    assert bench.hv.pio_bitmap(0) is None
    bench.running(tiny_demo(), 1)
    assert bench.hv.pio_bitmap(CPU) is not None
    assert bench.call(Hypercall.CELL_DESTROY, 1) == 0
    assert bench.hv.pio_bitmap(CPU) is None
