"""The executor (:mod:`harness.hvmodel.arch.executor`) under the real control plane, on
this machine's /dev/kvm: the model's Driver and Hypervisor drive an ExecutorArch whose
"physical memory" is a sparse file and whose ports are a fake UART plus a PM timer from
``time.monotonic``. No /dev/mem, no cpuset, no pinning here: the lab test
(test_suites/e2e/test_executor.py) has those.

Skipped without /dev/kvm or without the inmate toolchain (gcc, ld, objcopy, make). Every
wait is bounded.
"""

from __future__ import annotations

import dataclasses
import gc
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.hvmodel.abi import CellState, CommOffset, CpuStat, Message, Reply, comm_write_u32
from harness.hvmodel.arch import executor as ex
from harness.hvmodel.arch.executor import host
from harness.hvmodel.arch.executor.cells import CellCpu
from harness.hvmodel.arch.executor.exits import ExitDispatcher, fatal_text
from harness.hvmodel.arch.kvm import FailEntryExit, ShutdownExit, UnknownExit, XenExit
from harness.hvmodel.arch.kvm.exits import decode_exit
from harness.hvmodel.arch.kvm.structs import RUN_EXIT_INFO, RUN_EXIT_REASON, ExitReason
from harness.hvmodel.config import CellConfig, MemoryRegion, load_source
from harness.hvmodel.driver import Driver, HostInfo, Image
from harness.hvmodel.errors import Errno
from harness.recipes import CONFIGS, build_inmates, find_recipes, missing_build_tools

pytestmark = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="/dev/kvm not available"
)

CELLS = find_recipes().cells
WAIT = 20.0
UART = 0x2F8
HV_UART = 0x3F8
PM_TIMER = 0x608
HELLO_RAM = 0x3EE00000


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """hello.bin and rogue.bin, built once."""
    missing = missing_build_tools()
    if missing:
        pytest.skip(f"missing build tools: {', '.join(missing)}")
    out = tmp_path_factory.mktemp("inmates")
    build_inmates(out, "hello", "rogue")
    return {name: (out / f"{name}.bin").read_bytes() for name in ("hello", "rogue")}


class FakePorts:
    """Two always-ready 8250s (cell UART, hypervisor UART) and a PM timer."""

    mode = "fake"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.uart = bytearray()
        self.hv_uart = bytearray()
        self.t0 = time.monotonic()
        self.reads: dict[int, int] = {}

    def read(self, port: int, size: int) -> int:
        with self.lock:
            self.reads[port] = self.reads.get(port, 0) + 1
        if port in (UART + 5, HV_UART + 5):
            return 0x60
        if PM_TIMER <= port < PM_TIMER + 4:
            return int((time.monotonic() - self.t0) * 3_579_545) & 0xFFFFFF
        return (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> None:
        with self.lock:
            if port == UART:
                self.uart.append(value & 0xFF)
            elif port == HV_UART:
                self.hv_uart.append(value & 0xFF)

    def close(self) -> None:
        pass

    def text(self) -> str:
        with self.lock:
            return self.uart.decode("latin-1").replace("\r", "")

    def hv_text(self) -> str:
        with self.lock:
            return self.hv_uart.decode("latin-1").replace("\r", "")


@dataclasses.dataclass
class Rig:
    arch: ex.ExecutorArch
    driver: Driver
    ports: FakePorts
    mem: Path

    @property
    def hv(self):  # type: ignore[no-untyped-def]
        assert self.driver.hv is not None
        return self.driver.hv

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}\n--- cell UART ---\n{self.ports.text()}"
                    f"\n--- hypervisor ---\n{self.ports.hv_text()}"
                )
            time.sleep(0.01)

    def wait_text(self, text: str, timeout: float = WAIT) -> None:
        self.wait(lambda: text in self.ports.text(), repr(text), timeout)

    def phys(self, address: int, size: int) -> bytes:
        with open(self.mem, "rb") as handle:
            handle.seek(address)
            return handle.read(size)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """An enabled hypervisor (qemu-x86 config) on an executor with fake memory and ports."""
    mem = tmp_path / "mem"
    with open(mem, "wb") as handle:
        handle.truncate(0x1_0000_1000)  # sparse: up to the IOAPIC page at 0xfec00000
    ports = FakePorts()
    arch = ex.ExecutorArch(
        mem_device=str(mem), ports=ports, isolate=False, pin_cpus=False,
        pci_sysfs=str(tmp_path / "no-pci"), console_port=HV_UART, vendor="amd",
        reply_wait_limit=10.0,
    )  # fmt: skip
    driver = Driver(arch, HostInfo(tsc_khz=2_000_000, apic_khz=1_000_000))
    arch.attach(lambda: driver.hv)
    driver.enable(load_source(CONFIGS / "qemu-x86.toml").to_bytes())
    try:
        yield Rig(arch, driver, ports, mem)
    finally:
        try:
            if driver.hv is not None:
                driver.disable()
        finally:
            arch.shutdown()


def cell(name: str, **changes: object) -> CellConfig:
    config = load_source(CELLS / f"{name}.toml")
    assert isinstance(config, CellConfig)
    return dataclasses.replace(config, **changes) if changes else config  # type: ignore[arg-type]


def passive(config: CellConfig) -> CellConfig:
    return dataclasses.replace(config, flags=config.flags | 1)


def run_cell(rig: Rig, config: CellConfig, *images: Image) -> int:
    cell_id = rig.driver.cell_create(config.to_bytes())
    assert cell_id is not None
    rig.driver.cell_load(cell_id, images)
    rig.driver.cell_start(cell_id)
    return cell_id


def cpu_state(rig: Rig, cpu: int) -> str:
    cpus = rig.arch.status()["cpus"]
    assert isinstance(cpus, dict)
    return str(cpus[cpu]["state"])


# --- a whole cell life ---------------------------------------------------------------------


def test_hello_runs_answers_shutdown_and_leaves_nothing(rig: Rig, images: dict[str, bytes]) -> None:
    """create, load, start: the greeting and ten PM-timer lines; shutdown is approved by
    the inmate (message exchange through the comm page); destroy; disable."""
    cell_id = run_cell(rig, cell("hello"), Image(images["hello"]))
    assert rig.phys(HELLO_RAM, 0x1000) == images["hello"][:0x1000]
    rig.wait_text("hello: PASSED")
    text = rig.ports.text()
    assert 'Hello from jhlab inmate "hello"!' in text
    assert "comm region: JHCOMM rev 2, state 0, 1 CPU(s), PM timer 0x608" in text
    assert text.count("PM timer: ") == 10
    assert cpu_state(rig, 2) == "running"
    rig.driver.cell_shutdown(cell_id)
    assert "Shutdown request approved" in rig.ports.text()
    assert cpu_state(rig, 2) == "parked"
    assert rig.hv.cell_by_id(cell_id).state == CellState.SHUT_DOWN
    rig.driver.cell_destroy(cell_id)
    status = rig.arch.status()
    assert status["cells"] == {} and status["cpus"] == {} and status["zombies"] == 0
    rig.driver.disable()
    hv_text = rig.ports.hv_text()
    for line in ('Created cell "hello"', 'Started cell "hello"', 'Closing cell "hello"',
                 " Releasing CPU 3"):  # fmt: skip
        assert line in hv_text


#: real mode at 0: mov dx, 0x2f8; mov al, 'X'; out dx, al; hlt; jmp $-1
PRINT_X = bytes.fromhex("baf802" "b058" "ee" "f4" "ebfd")


def test_start_of_a_running_cell_resets_its_cpus(rig: Rig) -> None:
    """cell start on a running cell: shutdown request, then the CPU starts at 0 again."""
    cell_id = run_cell(rig, passive(cell("hello")), Image(PRINT_X))
    rig.wait_text("X")
    rig.driver.cell_start(cell_id)
    rig.wait_text("XX")
    rig.driver.cell_destroy(cell_id)


def test_reload_and_start_runs_the_inmate_again(rig: Rig, images: dict[str, bytes]) -> None:
    """shutdown, load, start: a fresh image, a second greeting."""
    cell_id = run_cell(rig, passive(cell("hello")), Image(images["hello"]))
    rig.wait_text("cmdline:")
    rig.driver.cell_load(cell_id, [Image(images["hello"])])
    rig.driver.cell_start(cell_id)
    rig.wait(lambda: rig.ports.text().count("Hello from jhlab inmate") == 2, "second greeting")
    rig.driver.cell_destroy(cell_id)


def test_command_line_reaches_the_inmate(rig: Rig, images: dict[str, bytes]) -> None:
    """A second image at 0x1000 (``-s STRING -a 0x1000``)."""
    run_cell(rig, passive(cell("hello")), Image(images["hello"]), Image(b"answer=42\0", 0x1000))
    rig.wait_text('cmdline: "answer=42"')


# --- FATAL paths -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "fatal", "stat"),
    [
        ("mode=mem", "FATAL: Invalid MMIO/RAM write, addr: 0x00000000001f0000 size: 4",
         CpuStat.VMEXITS_MMIO),
        ("mode=mem-read", "FATAL: Invalid MMIO/RAM read, addr: 0x00000000001f0000 size: 4",
         CpuStat.VMEXITS_MMIO),
        ("mode=pio", "FATAL: Invalid PIO read, port: 3f8 size: 1", CpuStat.VMEXITS_PIO),
        ("mode=pio write", "FATAL: Invalid PIO write, port: 3f8 size: 1", CpuStat.VMEXITS_PIO),
    ],
)  # fmt: skip
def test_rogue_is_parked_and_its_cell_fails(
    rig: Rig, images: dict[str, bytes], mode: str, fatal: str, stat: CpuStat
) -> None:
    """The violation: FATAL line, Parking line, CPU failed and parked, cell FAILED; the
    exit is counted; destroy still works."""
    cell_id = run_cell(
        rig, cell("rogue"), Image(images["rogue"]), Image(mode.encode() + b"\0", 0x1000)
    )
    rig.wait(lambda: rig.hv.cpus[2].failed, "the CPU to fail")
    lines = list(rig.hv.console.lines)
    assert fatal in lines
    assert lines[lines.index(fatal) + 1] == 'Parking CPU 2 (Cell: "rogue")'
    assert rig.hv.cell_by_id(cell_id).state == CellState.FAILED
    assert cpu_state(rig, 2) == "parked"
    assert rig.hv.cpus[2].stats[stat] == 1
    assert "violation not stopped" not in rig.ports.text()
    rig.driver.cell_destroy(cell_id)
    assert not rig.hv.cpus[2].failed


#: real mode at 0: lidt [0x10] (limit 0, base 0); int3 -- #GP, #DF, triple fault on
#: hardware (the lab: KVM_EXIT_SHUTDOWN); PVM's real-mode emulation fails on it instead
#: (IVT entry 3, used where the limit is ignored, points at 0xffff:0x1010 = 0x101000,
#: outside the cell)
TRIPLE_FAULT = bytes.fromhex("0f011e1000" "cc" "f4").ljust(0xC, b"\x90") + bytes.fromhex(
    "1010ffff"
) + bytes(6)


def test_unhandled_exit_is_fatal_with_a_register_dump(rig: Rig) -> None:
    """A triple fault (or, on PVM, KVM's emulation failure) ends in FATAL, the register
    dump, panic_park, and is counted in vmexits_total."""
    cell_id = run_cell(rig, passive(cell("hello")), Image(TRIPLE_FAULT))
    rig.wait(lambda: rig.hv.cpus[2].failed, "the CPU to fail")
    lines = list(rig.hv.console.lines)
    fatal = next(line for line in lines if line.startswith("FATAL: "))
    assert fatal == (
        "FATAL: Unexpected #VMEXIT, exitcode 7f, exitinfo1 0x0000000000000000 "
        "exitinfo2 0x0000000000000000"
    ) or fatal.startswith("FATAL: KVM internal error, suberror 1 (emulation failure)"), fatal
    after = lines[lines.index(fatal) + 1 :]
    assert after[0].startswith("RIP: 0x")
    assert 'Parking CPU 2 (Cell: "hello")' in after
    # the fatal exit, after the management exits of cell load and start
    assert rig.hv.cpus[2].stats[CpuStat.VMEXITS_TOTAL] == 3
    assert rig.hv.cell_by_id(cell_id).state == CellState.FAILED
    rig.driver.cell_destroy(cell_id)


# --- resources --------------------------------------------------------------------------------


def _resources(mem: Path) -> dict[str, int]:
    """What a cell could leak: fds, threads, KVM and guest-memory mappings. (Anonymous
    mappings are not counted: malloc arenas and thread stacks settle after a few cycles.)"""
    gc.collect()
    status = Path("/proc/self/status").read_text()
    maps = Path("/proc/self/maps").read_text().splitlines()
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": int(status.split("Threads:")[1].split()[0]),
        "python_threads": threading.active_count(),
        "kvm_maps": sum(1 for line in maps if "kvm" in line),
        "mem_maps": sum(1 for line in maps if str(mem) in line),
    }


def test_twenty_cycles_leak_nothing(rig: Rig, images: dict[str, bytes]) -> None:
    """create/load/start/destroy 20 times (destroyed while running): same fds, threads
    and KVM/guest-memory mappings before and after, and a stable RSS."""
    config = passive(cell("hello")).to_bytes()

    def cycle() -> None:
        cell_id = rig.driver.cell_create(config)
        assert cell_id is not None
        rig.driver.cell_load(cell_id, [Image(images["hello"])])
        before = rig.ports.reads.get(PM_TIMER, 0)
        rig.driver.cell_start(cell_id)
        rig.wait(lambda: rig.ports.reads.get(PM_TIMER, 0) > before + 20, "PM timer reads")
        rig.driver.cell_destroy(cell_id)

    def rss_kib() -> int:
        return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0])

    for _ in range(3):
        cycle()
    before, rss_before = _resources(rig.mem), rss_kib()
    for _ in range(20):
        cycle()
    assert _resources(rig.mem) == before
    assert rss_kib() - rss_before < 2048
    assert rig.arch.status()["zombies"] == 0


# --- pieces --------------------------------------------------------------------------------------


def test_fatal_wording_per_vendor() -> None:
    """Jailhouse's default-case lines (svm.c / vmx.c); the executor takes only those two."""
    assert fatal_text(ShutdownExit(), "amd") == (
        "Unexpected #VMEXIT, exitcode 7f, exitinfo1 0x0000000000000000 exitinfo2 0x0000000000000000"
    )
    assert fatal_text(ShutdownExit(), "intel") == "Unhandled VM-Exit, reason 2"
    assert fatal_text(FailEntryExit(2**64 - 1, 0), "amd") == "VM-Entry failure, error -1"
    assert fatal_text(FailEntryExit(0x80000021, 0), "intel") == "VM-Entry failure, reason 33"
    assert fatal_text(UnknownExit(48), "intel") == "Unhandled VM-Exit, reason 48"
    assert ex.ExecutorArch(vendor="amd", isolate=False).status()["vendor"] == "amd"
    with pytest.raises(ValueError, match="vendor"):
        ex.ExecutorArch(vendor="arm", isolate=False)


def _comm_page() -> memoryview:
    return memoryview(mmap.mmap(-1, mmap.PAGESIZE))


def test_wait_for_reply_deadline_and_answers() -> None:
    """No answer: False after the deadline; a reply or a terminal state: True at once."""
    arch = ex.ExecutorArch(isolate=False)
    page = _comm_page()
    comm_write_u32(page, CommOffset.MSG_TO_CELL, Message.SHUTDOWN_REQUEST)
    start = time.monotonic()
    assert arch.wait_for_reply(7, page, 0.05) is False
    assert 0.05 <= time.monotonic() - start < 1.0
    limited = ex.ExecutorArch(isolate=False, reply_wait_limit=0.05)
    assert limited.wait_for_reply(7, page, None) is False

    def answer() -> None:
        time.sleep(0.05)
        comm_write_u32(page, CommOffset.MSG_TO_CELL, Message.NONE)
        comm_write_u32(page, CommOffset.REPLY_FROM_CELL, Reply.REQUEST_APPROVED)

    replier = threading.Thread(target=answer)
    replier.start()
    assert arch.wait_for_reply(7, page, 5.0) is True
    replier.join()
    comm_write_u32(page, CommOffset.REPLY_FROM_CELL, Reply.NONE)
    comm_write_u32(page, CommOffset.CELL_STATE, CellState.FAILED)
    assert arch.wait_for_reply(7, page, 5.0) is True


def test_root_hardware_is_not_written(rig: Rig, tmp_path: Path) -> None:
    """MMIO, IOAPIC and PCI config writes for the root's hardware are dropped; reads go
    to the hardware; an IOAPIC out of reach is a detached model."""
    before = rig.phys(0xFEBF0000, 16)
    rig.arch.mmio_write(0xFEBF0000, 4, 0x12345678)
    assert rig.phys(0xFEBF0000, 16) == before
    assert rig.arch.mmio_read(0xFEBF0000, 4) == int.from_bytes(before[:4], "little")
    rig.arch.ioapic_write(0xFEC00000, 0x10, 0)
    rig.arch.pci_write_config(0x00F8, 0x04, 2, 0)
    assert rig.arch.pci_read_config(0x00F8, 0, 4) == 0xFFFFFFFF  # no such device here
    detached = ex.ExecutorArch(mem_device=str(tmp_path / "none"), isolate=False)
    assert detached.ioapic_read(0xFEC00000, 0x01) == 0x00170011
    assert detached.ioapic_read(0xFEC00000, 0x10) == 0x00010000
    assert detached.ioapic_read(0xFEC00000, 0x11) == 0


def test_subpage_region_writes_reach_the_hardware(rig: Rig, images: dict[str, bytes]) -> None:
    """A non-root cell's sub-page region is real MMIO: writes there are performed."""
    base = cell("rogue")
    subpage = MemoryRegion(phys_start=0x3E000100, virt_start=0x200100, size=0x100,
                           flags=0x0001 | 0x0002 | 0x40000)  # fmt: skip
    cell_id = rig.driver.cell_create(
        dataclasses.replace(base, memory_regions=(*base.memory_regions, subpage)).to_bytes()
    )
    assert cell_id is not None
    rig.arch.mmio_write(0x3E000104, 4, 0xCAFEF00D)
    assert rig.phys(0x3E000104, 4) == struct.pack("<I", 0xCAFEF00D)
    rig.driver.cell_destroy(cell_id)
    rig.arch.mmio_write(0x3E000104, 4, 0)  # the cell is gone: the root's hardware now
    assert rig.phys(0x3E000104, 4) == struct.pack("<I", 0xCAFEF00D)


class _FakeVcpu:
    def __init__(self) -> None:
        self.run_page = mmap.mmap(-1, mmap.PAGESIZE)

    def get_regs(self) -> object:
        return type("Regs", (), {"rip": 0x1234, "rdi": 0xAAAA_0000_0001, "rsi": 0xBBBB_0000_0002})()


class _Handler:
    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def hypercall(self, cpu: int, code: int, arg1: int = 0, arg2: int = 0, *, rip: int = 0) -> int:
        self.calls.append((cpu, code, arg1, arg2, rip))
        return -int(Errno.ENOSYS)

    def count_exit(self, cpu: int, stat: CpuStat, count: int = 1) -> None:
        self.calls.append((cpu, stat))


def _xen_exit(page: mmap.mmap, *hcall: int) -> XenExit:
    """A KVM_EXIT_XEN in ``page``: type, longmode, cpl, input, result, params[6]."""
    struct.pack_into("<I", page, RUN_EXIT_REASON, ExitReason.XEN)
    struct.pack_into("<I4xIIQQ6Q", page, RUN_EXIT_INFO, *hcall)
    exit_ = decode_exit(page)
    assert isinstance(exit_, XenExit)
    return exit_


def test_xen_hypercall_exit_is_decoded_and_answered() -> None:
    """KVM_EXIT_XEN (kernels with CONFIG_KVM_XEN): code, RDI/RSI (32-bit: masked), result
    into the run page; CPL 3 gets -EPERM without the model being asked."""
    vcpu = _FakeVcpu()
    page = vcpu.run_page
    cpu = CellCpu(3, None, vcpu)  # type: ignore[arg-type]
    handler = _Handler()
    exits = ExitDispatcher(vendor="amd", ports=lambda: None, native_pio=False)
    exits.attach(lambda: handler)  # type: ignore[arg-type,return-value]
    assert exits.handle_exit(cpu, _xen_exit(page, 1, 1, 0, 8, 0, 0x41, 0, 0, 0, 0, 0)) is None
    assert handler.calls == [(3, 8, 0x41, 0, 0x1234)]
    assert struct.unpack_from("<q", page, RUN_EXIT_INFO + 24)[0] == -int(Errno.ENOSYS)
    handler.calls.clear()
    exits.handle_exit(cpu, _xen_exit(page, 1, 0, 0, 0x1_0000_0005, 0, 0, 0, 0, 0, 0, 0))
    assert handler.calls == [(3, 5, 1, 2, 0x1234)]
    handler.calls.clear()
    exits.handle_exit(cpu, _xen_exit(page, 1, 1, 3, 2, 0, 0, 0, 0, 0, 0, 0))
    assert handler.calls == [(3, CpuStat.VMEXITS_HYPERCALL)]
    assert struct.unpack_from("<q", page, RUN_EXIT_INFO + 24)[0] == -int(Errno.EPERM)
    assert cpu.exits["XenExit"] == 3


def test_is_an_arch_and_attaches_either_way(rig: Rig) -> None:
    """It satisfies the Arch protocol; exits go to a hypervisor or a callable's answer."""
    from harness.hvmodel.arch import Arch

    assert isinstance(rig.arch, Arch)
    other = ex.ExecutorArch(isolate=False)
    other.attach(rig.hv)
    assert other._exits.handler() is rig.hv
    other.attach(lambda: None)
    assert other._exits.handler() is None


def test_lifecycle_is_guarded(tmp_path: Path) -> None:
    """Hooks before init, a second init: clear errors; shutdown is idempotent."""
    arch = ex.ExecutorArch(isolate=False)
    with pytest.raises(ex.ExecutorStateError, match=r"cell_create.*new"):
        arch.cell_create(1, cell("hello"))
    arch.shutdown()
    arch.shutdown()
    with pytest.raises(ex.ExecutorStateError, match=r"init.*shut down"):
        arch.init(load_source(CONFIGS / "qemu-x86.toml"))  # type: ignore[arg-type]


def test_host_info_is_measured_on_the_keeper() -> None:
    """The executor's host_info needs no VM of its own; init reuses the keeper."""
    arch = ex.ExecutorArch(isolate=False, ports=FakePorts(), console=False)
    try:
        info = arch.host_info()
        keeper = arch._keeper_vm
        assert keeper is not None and info.tsc_khz > 0 and info.apic_khz == 1_000_000
        assert info.cpu_vendor == _vendor_from_cpuinfo()
        arch.init(load_source(CONFIGS / "qemu-x86.toml"))  # type: ignore[arg-type]
        assert arch._keeper_vm is keeper
    finally:
        arch.shutdown()
    assert arch._keeper_vm is None
    with pytest.raises(ex.ExecutorStateError, match="host_info"):
        arch.host_info()


def test_host_info_helpers(tmp_path: Path) -> None:
    """Reserved windows from /proc/iomem, vendor from the CPU flags, CPU lists."""
    iomem = tmp_path / "iomem"
    iomem.write_text(
        "00000000-00000fff : Reserved\n00001000-0009fbff : System RAM\n"
        "3a000000-3f1fffff : Reserved\n  b0000000-bfffffff : Reserved\n"
    )
    assert host.reserved_ranges(str(iomem)) == ((0, 0x1000), (0x3A000000, 0x05200000))
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu svm lm\n")
    assert host.cpu_vendor(str(cpuinfo)) == "amd"
    cpuinfo.write_text("flags : fpu vmx\n")
    assert host.cpu_vendor(str(cpuinfo)) == "intel"
    online = tmp_path / "online"
    online.write_text("0-1,3\n")
    assert host.online_cpus(str(online)) == {0, 1, 3}
    assert host.online_cpus(str(tmp_path / "missing")) == frozenset()


def _vendor_from_cpuinfo() -> str:
    """What this host's CPU flags say the virtualization vendor is: ``amd`` with svm,
    ``intel`` with vmx, ``""`` with neither (a PVM host)."""
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return "amd" if "svm" in flags else "intel" if "vmx" in flags else ""
