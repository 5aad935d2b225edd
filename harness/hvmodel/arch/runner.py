"""Stand-alone inmate runner (no Jailhouse counterpart): one cell on KVM, no control plane.

The test vehicle for inmates until the executor exists: it does by hand what
``jailhouse cell create/load/start`` arrange for one cell (reference §3.3, §5.1-§5.5):

* cell RAM at guest-physical 0, from anonymous memory or from ``/dev/mem`` at a
  physical address (``--phys``); the image loaded at 0, a command line at 0x1000;
* the comm region page at 0x100000: signature JHCOMM, ABI revision 2, cell state
  RUNNING, console 8250 PIO at the UART port, PM timer 0x608, ``num_cpus``,
  ``tsc_khz`` and ``apic_khz``;
* every vCPU (APIC IDs 0..N-1) in Jailhouse's start state, all released at once, one
  thread each;
* exits: the UART is emulated and its output goes to stdout; whitelisted ports
  (``--forward-pio``, by default the PM timer) go to the real ports through
  ``/dev/port`` when it exists, otherwise the PM timer is emulated from
  :func:`time.monotonic` (3.579545 MHz, 24 bits); port 0x80 is ignored; anything else
  prints a Jailhouse-style ``FATAL:`` line and a register dump, and parks that CPU;
* with ``--test-device``, Jailhouse's test device (the cell flag TEST_DEVICE): accesses
  to 0x101ff8..0x101fff reach bytes 0xff8..0xfff of the comm page.

Usage: ``python3 -m harness.hvmodel.arch.runner run IMAGE [options]`` (``--help``).
Exit status: 0 when the run ended by ``--timeout`` or ``--exit-on`` matched, 1 when a
CPU failed, the cell left RUNNING, or ``--exit-on`` was not seen, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Final, TextIO

from ..abi import (
    COMM_PAGE_SIZE,
    COMM_REGION_ABI_REVISION,
    COMM_REGION_BASE,
    COMM_REGION_SIGNATURE,
    CONSOLE,
    PAGE_SIZE,
    TEST_DEVICE_REGISTER,
    CellState,
    CommOffset,
    CommRegion,
    ConsoleType,
    comm_read_u32,
    comm_write_u32,
)
from . import HOST_PAGE_SIZE
from .hostmem import PhysMapping, anonymous_memory
from .kvm import Cap, IntrExit, IoExit, Kvm, KvmError, MmioExit, Vcpu, Vm, describe_exit, install_kick_handler
from .portio import DevPort
from .vcpu import apic_khz, format_state, jailhouse_vcpu_reset, jailhouse_vcpu_setup, measure_tsc_khz
from .xsave import limit_xsave, usable_xcr0

LOG = logging.getLogger(__name__)

CMDLINE_ADDRESS: Final = 0x1000
#: the test device page: the page after the comm region (``testdev_get_mmio_base``)
TEST_DEVICE_BASE: Final = COMM_REGION_BASE + PAGE_SIZE
PM_TIMER_PORT: Final = 0x608
PM_TIMER_HZ: Final = 3_579_545
DEFAULT_UART: Final = 0x2F8
DEFAULT_TIMEOUT: Final = 10.0


def comm_region(
    *,
    console_port: int,
    num_cpus: int,
    tsc_khz: int,
    apic_khz: int,
    pm_timer_address: int = PM_TIMER_PORT,
    pci_mmconfig_base: int = 0,
    flags: int = 0,
    console_divider: int = 0,
) -> bytes:
    """The 76-byte ``struct jailhouse_comm_region`` of a cell at start (cell RUNNING).

    The console is 8250, PIO, 1-byte register distance, at ``console_port``; a divider
    of 0 tells the inmate not to program the UART.
    """
    # console: address, size, type, flags (0: ACCESS_PIO | REGDIST_1), divider, gate, clock
    console = CONSOLE.pack(console_port, 0, ConsoleType.UART_8250, 0, console_divider, 0, 0)
    return CommRegion(
        signature=COMM_REGION_SIGNATURE,
        revision=COMM_REGION_ABI_REVISION,
        cell_state=CellState.RUNNING,
        flags=flags,
        console=console,
        pci_mmconfig_base=pci_mmconfig_base,
        pm_timer_address=pm_timer_address,
        num_cpus=num_cpus,
        tsc_khz=tsc_khz,
        apic_khz=apic_khz,
    ).to_bytes()


class Uart8250:
    """Just enough of a 16550 for inmates' ``uart-8250.c``: always ready to send.

    :param emit: called with each transmitted byte
    """

    def __init__(self, emit: Callable[[int], None]) -> None:
        self._emit = emit
        self._regs = bytearray(8)
        self._divisor = bytearray(2)

    def write(self, offset: int, value: int) -> None:
        dlab = self._regs[3] & 0x80
        if offset == 0 and not dlab:
            self._emit(value)
        elif offset in (0, 1) and dlab:
            self._divisor[offset] = value
        else:
            self._regs[offset] = value

    def read(self, offset: int) -> int:
        dlab = self._regs[3] & 0x80
        if offset in (0, 1) and dlab:
            return self._divisor[offset]
        if offset == 0:
            return 0  # RBR: nothing received
        if offset == 2:
            return 0x01  # IIR: no interrupt pending
        if offset == 5:
            return 0x60  # LSR: THR empty, transmitter empty
        if offset == 6:
            return 0xB0  # MSR: DCD, DSR, CTS
        return self._regs[offset]


def parse_int(text: str) -> int:
    """An integer with optional 0x/0o/0b prefix."""
    return int(text, 0)


def parse_size(text: str) -> int:
    """A size like ``1M``, ``64K``, ``0x100000`` or ``4096``."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text, 0)


def parse_ports(text: str) -> list[range]:
    """Port ranges ``0x608-0x60b,0x2f8+8,0x80`` (inclusive ``a-b``, ``base+count``)."""
    ranges: list[range] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "-" in item:
            first, last = (parse_int(x) for x in item.split("-", 1))
            ranges.append(range(first, last + 1))
        elif "+" in item:
            first, count = (parse_int(x) for x in item.split("+", 1))
            ranges.append(range(first, first + count))
        else:
            port = parse_int(item)
            ranges.append(range(port, port + 1))
    for r in ranges:
        if not r or r.start < 0 or r.stop > 0x10000:
            raise ValueError(f"bad port range {r.start:#x}-{r.stop - 1:#x}")
    return ranges


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    """What to run and how.

    :param image: the inmate binary, loaded at guest-physical 0
    :param ram_size: bytes of cell RAM at 0 (at most 1 MiB: the comm region follows)
    :param phys: back RAM with ``/dev/mem`` at this host-physical address (None: anonymous)
    :param mem_device: the file ``phys`` is an offset into (``/dev/mem``)
    :param cmdline: NUL-terminated string loaded at 0x1000 (None: leave the image's)
    :param cpus: number of vCPUs (APIC IDs 0..cpus-1)
    :param uart: base port of the emulated 8250 (also the comm region's console)
    :param forward_pio: ports passed to ``/dev/port`` (None: the PM timer if possible)
    :param reset_address: ``cpu_reset_address``
    :param exit_on: stop successfully once the UART output contains this text
    :param test_device: emulate Jailhouse's test device page after the comm region
    """

    image: bytes
    ram_size: int = COMM_REGION_BASE
    phys: int | None = None
    mem_device: str = "/dev/mem"
    cmdline: str | None = None
    cpus: int = 1
    uart: int = DEFAULT_UART
    forward_pio: Sequence[range] | None = None
    reset_address: int = 0
    exit_on: str | None = None
    test_device: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.ram_size <= COMM_REGION_BASE or self.ram_size % HOST_PAGE_SIZE:
            raise ValueError(
                f"RAM size {self.ram_size:#x}: must be page-aligned and at most "
                f"{COMM_REGION_BASE:#x} (the comm region is at {COMM_REGION_BASE:#x})"
            )
        if len(self.image) > self.ram_size:
            raise ValueError(f"image ({len(self.image)} bytes) larger than RAM ({self.ram_size})")
        if self.cmdline is not None and CMDLINE_ADDRESS + len(self.cmdline) + 1 > self.ram_size:
            raise ValueError("command line does not fit in RAM")
        if not 1 <= self.cpus <= 255:
            raise ValueError(f"cpus {self.cpus}: must be 1..255")
        if self.phys is not None and self.phys % HOST_PAGE_SIZE:
            raise ValueError(f"phys {self.phys:#x}: must be page-aligned for a memory slot")


@dataclasses.dataclass
class _Cpu:
    vcpu: Vcpu
    thread: threading.Thread | None = None
    failed: bool = False
    exits: Counter[str] = dataclasses.field(default_factory=Counter)


class StopReason(enum.Enum):
    TIMEOUT = "timeout"
    EXIT_ON = "exit-on text seen"
    ALL_FAILED = "all CPUs failed"
    CELL_STATE = "cell left RUNNING"
    INTERRUPTED = "interrupted"


class InmateRunner:
    """Run one inmate on KVM.

    Lifecycle: construct (opens KVM, builds the VM, loads the image, resets the vCPUs)
    -> :meth:`start` (one thread per vCPU, all released at once) -> :meth:`wait` ->
    :meth:`stop` (kicks and joins the threads) -> :meth:`close`. The ``with`` block
    does stop and close. :func:`~harness.hvmodel.arch.kvm.vcpu.install_kick_handler` must
    have been called in the main thread.

    :param config: what to run
    :param output: receives UART bytes (default: stdout, ``\\r`` dropped); called with
        ``b""`` to flush before a report
    :param report: receives FATAL lines and dumps (default: stderr)
    """

    def __init__(
        self,
        config: RunnerConfig,
        *,
        output: Callable[[bytes], None] | None = None,
        report: TextIO | None = None,
    ) -> None:
        self.config = config
        self._output = output or _stdout_writer
        self._report = report or sys.stderr
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._released = threading.Event()
        self._text = bytearray()
        self._ports: DevPort | None = None
        self._pm_emulated = False
        self._t0 = time.monotonic()
        self.stop_reason: StopReason | None = None
        self.cpus: list[_Cpu] = []
        self.phys_ram: PhysMapping | None = None
        self.kvm = Kvm()
        try:
            self.vm = Vm(self.kvm)
            self._build()
        except BaseException:
            self.close()
            raise

    # --- construction ----------------------------------------------------------------------

    def _build(self) -> None:
        cfg = self.config
        vm: Vm = self.vm
        vm.create_irqchip()
        if self.kvm.check_extension(Cap.SET_TSS_ADDR):
            # Intel without unrestricted guest needs it for real mode; above any cell RAM.
            vm.set_tss_addr(0xFFFBD000)
        if cfg.phys is not None:
            self.phys_ram = PhysMapping(cfg.phys, cfg.ram_size, path=cfg.mem_device)
            vm.add_memory(0, self.phys_ram.mmap, offset=self.phys_ram.offset, size=cfg.ram_size)
            self.phys_ram.write(0, bytes(cfg.ram_size))
            ram = self.phys_ram.mmap
            base = self.phys_ram.offset
        else:
            ram = anonymous_memory(cfg.ram_size)
            vm.add_memory(0, ram, size=cfg.ram_size)
            base = 0
        ram[base : base + len(cfg.image)] = cfg.image
        if cfg.cmdline is not None:
            text = cfg.cmdline.encode() + b"\0"
            start = base + CMDLINE_ADDRESS
            ram[start : start + len(text)] = text
        self.ram = ram
        self.comm_page = anonymous_memory(COMM_PAGE_SIZE)
        vm.add_memory(COMM_REGION_BASE, self.comm_page)
        self._setup_ports()
        supported = self.kvm.supported_cpuid()
        supported = limit_xsave(supported, usable_xcr0(self.kvm, supported))
        for cpu_id in range(cfg.cpus):
            vcpu = vm.create_vcpu(cpu_id)
            jailhouse_vcpu_setup(vcpu, supported)
            jailhouse_vcpu_reset(vcpu, cfg.reset_address)
            self.cpus.append(_Cpu(vcpu))
        region = comm_region(
            console_port=cfg.uart,
            num_cpus=cfg.cpus,
            tsc_khz=measure_tsc_khz(self.cpus[0].vcpu),
            apic_khz=apic_khz(self.kvm),
        )
        self.comm_page[: len(region)] = region
        self._uart = Uart8250(self._emit)

    def _setup_ports(self) -> None:
        pm_timer = range(PM_TIMER_PORT, PM_TIMER_PORT + 4)
        wanted = self.config.forward_pio
        explicit = wanted is not None
        self._forward: list[range] = list(wanted) if wanted is not None else [pm_timer]
        if not self._forward:
            self._pm_emulated = True
            return
        try:
            self._ports = DevPort()
        except KvmError as exc:
            if explicit and any(r != pm_timer for r in self._forward):
                raise
            LOG.info("%s; emulating the PM timer", exc)
            self._forward = []
            self._pm_emulated = True

    # --- running ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start one thread per vCPU; they enter the guest together."""
        for cpu in self.cpus:
            cpu.thread = threading.Thread(
                target=self._cpu_main, args=(cpu,), name=f"vcpu{cpu.vcpu.id}", daemon=True
            )
            cpu.thread.start()
        self._t0 = time.monotonic()
        self._released.set()

    def wait(self, timeout: float) -> StopReason:
        """Run until ``timeout`` seconds pass or a stop condition holds; then :meth:`stop`."""
        deadline = time.monotonic() + timeout
        reason = StopReason.TIMEOUT
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.wait(min(remaining, 0.05))
                self._wake.clear()
                found = self._check_stop()
                if found is not None:
                    reason = found
                    break
        except KeyboardInterrupt:
            reason = StopReason.INTERRUPTED
        self.stop_reason = reason
        self.stop()
        return reason

    def _check_stop(self) -> StopReason | None:
        exit_on = self.config.exit_on
        if exit_on is not None:
            with self._lock:
                if exit_on.encode() in self._text:
                    return StopReason.EXIT_ON
        if self.cpus and all(cpu.failed for cpu in self.cpus):
            return StopReason.ALL_FAILED
        if self.cell_state not in (CellState.RUNNING, CellState.RUNNING_LOCKED):
            return StopReason.CELL_STATE
        return None

    @property
    def cell_state(self) -> int:
        """``cell_state`` of the comm region, as the inmate left it."""
        return comm_read_u32(self.comm_page, CommOffset.CELL_STATE)

    @property
    def output(self) -> bytes:
        """All UART output so far."""
        with self._lock:
            return bytes(self._text)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every vCPU thread (kick, then join); idempotent.

        :raise KvmError: when a vCPU thread does not stop within ``timeout``
        """
        self._stop.set()
        self._released.set()
        deadline = time.monotonic() + timeout
        for cpu in self.cpus:
            if cpu.thread is None:
                continue
            while cpu.thread.is_alive() and time.monotonic() < deadline:
                cpu.vcpu.kick()
                cpu.thread.join(0.05)
            if cpu.thread.is_alive():
                raise KvmError("stop", 0, f"vCPU {cpu.vcpu.id} thread did not stop")
            cpu.thread = None

    def close(self) -> None:
        """Release the VM, memory and devices; idempotent (after :meth:`stop`)."""
        vm = getattr(self, "vm", None)
        if vm is not None:
            vm.close()
        if self.phys_ram is not None:
            self.phys_ram.close()
            self.phys_ram = None
        if self._ports is not None:
            self._ports.close()
            self._ports = None
        self.kvm.close()

    def __enter__(self) -> InmateRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.close()

    def exit_counts(self) -> Counter[str]:
        """Exits per kind, summed over the CPUs."""
        total: Counter[str] = Counter()
        for cpu in self.cpus:
            total.update(cpu.exits)
        return total

    # --- vCPU threads ----------------------------------------------------------------------

    def _cpu_main(self, cpu: _Cpu) -> None:
        self._released.wait()
        try:
            self._cpu_loop(cpu)
        except Exception as exc:  # the thread must not die silently
            self._fatal(cpu, f"FATAL: executor error: {exc}")
        finally:
            self._wake.set()

    def _cpu_loop(self, cpu: _Cpu) -> None:
        vcpu = cpu.vcpu
        while not self._stop.is_set():
            exit_ = vcpu.run()
            kind = type(exit_).__name__
            cpu.exits[kind] += 1
            if isinstance(exit_, IntrExit):
                continue
            if isinstance(exit_, IoExit) and self._handle_pio(exit_):
                continue
            if isinstance(exit_, MmioExit) and self._handle_mmio(cpu, exit_):
                continue
            self._fatal(cpu, f"FATAL: {describe_exit(exit_)}")
            return

    def _handle_pio(self, exit_: IoExit) -> bool:
        port, size = exit_.port, exit_.size
        if exit_.count != 1:
            return False  # string or REP I/O: Jailhouse refuses it too
        if self._ports is not None and any(port in r and port + size - 1 in r for r in self._forward):
            if exit_.is_write:
                self._ports.write(port, exit_.data)
            else:
                exit_.set_data(self._ports.read(port, size))
            return True
        uart = self.config.uart
        if uart <= port and port + size <= uart + 8:
            for i in range(size):
                if exit_.is_write:
                    self._uart.write(port - uart + i, (exit_.value() >> (8 * i)) & 0xFF)
            if not exit_.is_write:
                value = 0
                for i in range(size):
                    value |= self._uart.read(port - uart + i) << (8 * i)
                exit_.set_value(value)
            return True
        if self._pm_emulated and port >= PM_TIMER_PORT and port + size <= PM_TIMER_PORT + 4:
            if not exit_.is_write:
                ticks = int((time.monotonic() - self._t0) * PM_TIMER_HZ) & 0xFFFFFF
                exit_.set_value(ticks >> (8 * (port - PM_TIMER_PORT)))
            return True
        return port == 0x80 and size == 1  # POST code port: ignored, as Jailhouse does

    def _handle_mmio(self, cpu: _Cpu, exit_: MmioExit) -> bool:
        """The test device (``hypervisor/arch/x86/test-device.c``), when enabled."""
        offset = exit_.addr - TEST_DEVICE_BASE
        if not self.config.test_device or not 0 <= offset < PAGE_SIZE:
            return False
        if (
            offset < TEST_DEVICE_REGISTER
            or offset + exit_.length > PAGE_SIZE
            or exit_.length not in (1, 2, 4, 8)
        ):
            direction = "write" if exit_.is_write else "read"
            self._fatal(
                cpu,
                f"testdev: invalid {direction} at offset {offset:#x}, size {exit_.length}",
            )
            return True
        if exit_.is_write:
            self.comm_page[offset : offset + exit_.length] = exit_.data
        else:
            exit_.set_data(self.comm_page[offset : offset + exit_.length])
        return True

    def _emit(self, byte: int) -> None:
        with self._lock:
            self._text.append(byte)
            self._output(bytes((byte,)))
        if byte == 0x0A:
            self._wake.set()

    def _fatal(self, cpu: _Cpu, message: str) -> None:
        lines = [message]
        try:
            lines.append(format_state(cpu.vcpu))
        except KvmError as exc:
            lines.append(f"(no register dump: {exc})")
        lines.append(f'Parking CPU {cpu.vcpu.id} (Cell: "runner")')
        with self._lock:
            self._output(b"")  # flush pending output before the report
            self._report.write("\n".join(lines) + "\n")
            self._report.flush()
            cpu.failed = True
            if all(c.failed for c in self.cpus):
                comm_write_u32(self.comm_page, CommOffset.CELL_STATE, CellState.FAILED)
        self._wake.set()


def _stdout_writer(data: bytes) -> None:
    """Write UART bytes to stdout without carriage returns, flushing at line ends."""
    out = sys.stdout.buffer
    out.write(data.replace(b"\r", b""))
    if not data or b"\n" in data:
        out.flush()


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m harness.hvmodel.arch.runner",
        description="Run a Jailhouse inmate on KVM as a one-cell test vehicle.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an inmate image")
    run.add_argument("image", help="flat inmate binary, loaded at guest-physical 0")
    run.add_argument("--ram-size", type=parse_size, default=COMM_REGION_BASE, help="cell RAM (1M)")
    run.add_argument("--phys", type=parse_int, help="back RAM with /dev/mem at this physical address")
    run.add_argument("--mem-device", default="/dev/mem", help="device or file --phys refers to (/dev/mem)")
    run.add_argument("--cmdline", help="command line loaded at 0x1000")
    run.add_argument("--cpus", type=int, default=1, help="number of CPUs (1)")
    run.add_argument("--uart", type=parse_int, default=DEFAULT_UART, help="UART port (0x2f8)")
    run.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to run (10)")
    run.add_argument(
        "--forward-pio",
        type=parse_ports,
        help="ports to pass to /dev/port, e.g. 0x608-0x60b,0x2f8+8 (default: PM timer, "
        "if /dev/port exists; '' for none)",
    )
    run.add_argument("--reset-address", type=parse_int, default=0, help="cpu_reset_address")
    run.add_argument("--exit-on", help="stop (status 0) once the output contains this text")
    run.add_argument("--test-device", action="store_true", help="emulate the test device at 0x101000")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The runner's command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        with open(args.image, "rb") as image:
            data = image.read()
        config = RunnerConfig(
            image=data,
            ram_size=args.ram_size,
            phys=args.phys,
            mem_device=args.mem_device,
            cmdline=args.cmdline,
            cpus=args.cpus,
            uart=args.uart,
            forward_pio=args.forward_pio,
            reset_address=args.reset_address,
            exit_on=args.exit_on,
            test_device=args.test_device,
        )
    except (OSError, ValueError) as exc:
        print(f"runner: {exc}", file=sys.stderr)
        return 2
    try:
        install_kick_handler()
        with InmateRunner(config) as runner:
            runner.start()
            reason = runner.wait(args.timeout)
            counts = ", ".join(f"{k}={v}" for k, v in sorted(runner.exit_counts().items()))
            state = runner.cell_state
            failed = [cpu.vcpu.id for cpu in runner.cpus if cpu.failed]
    except KvmError as exc:
        print(f"runner: {exc}", file=sys.stderr)
        return 1
    try:
        state_name = CellState(state).name
    except ValueError:
        state_name = str(state)
    print(
        f"runner: stopped ({reason.value}); cell state {state_name}; "
        f"failed CPUs {failed or 'none'}; exits: {counts or 'none'}",
        file=sys.stderr,
    )
    if reason is StopReason.EXIT_ON:
        return 0
    if failed or state not in (CellState.RUNNING, CellState.RUNNING_LOCKED):
        return 1
    if config.exit_on is not None or reason is StopReason.INTERRUPTED:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
