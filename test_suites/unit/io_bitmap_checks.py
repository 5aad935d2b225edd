"""Checks of the executor's I/O bitmap loop on a real port, for wherever ``ioperm`` works.

They need ``/dev/kvm`` and ``ioperm`` (root, a kernel with ``CONFIG_X86_IOPL_IOPERM``).
The unit suite runs them on the host when it can (``test_io_bitmap_loop.py``; a PVM host
refuses ``ioperm``); the integration suite always runs them in the lab VM's root cell
(``test_suites/integration/test_io_bitmap_in_lab.py`` sends this file to the guest's
``python3 -``), so the module uses the standard library and ``harness.hvmodel`` only.
Run as a program it prints one line, ``IO-BITMAP-CHECKS {json}``: each check's name and
``"passed"`` or what failed.

The guests touch one real port, 0x80 (the POST code port, which Linux itself writes for
I/O delays). Every run is bounded by a watchdog kick.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import threading
import traceback
from collections.abc import Callable, Iterator

from harness.hvmodel.arch import hostmem, kvm, portio
from harness.hvmodel.arch.vcpu import jailhouse_vcpu_reset, jailhouse_vcpu_setup

POST = 0x80
UART = 0x2F8
ROUNDS = 100
#: what the program prints before its JSON result
RESULT_TAG = "IO-BITMAP-CHECKS "

# Real mode at 0: ROUNDS pairs of OUT/IN on the open port, then what the loop must hand back.
GUEST = bytes(
    [
        0xB9, ROUNDS, 0x00,     # mov cx, ROUNDS
        0xE6, POST,             # l: out 0x80, al
        0xE4, POST,             #    in al, 0x80
        0xE2, 0xFA,             #    loop l
        0xE7, POST,             # out 0x80, ax       (0x81 closed: back to Python)
        0xBA, 0xF8, 0x02,       # mov dx, 0x2f8
        0xB0, 0x58,             # mov al, 'X'
        0xEE,                   # out dx, al         (closed port)
        0xEC,                   # in al, dx          (closed; the check answers 0x42)
        0xEE,                   # out dx, al         (echo)
        0xBA, POST, 0x00,       # mov dx, 0x80
        0xBF, 0x00, 0x80,       # mov di, 0x8000
        0xB9, 0x02, 0x00,       # mov cx, 2
        0xF3, 0x6C,             # rep insb           (string I/O, count 2: back to Python)
        0xF4,                   # hlt
    ]
)  # fmt: skip
#: real mode at 0: ``l: out 0x80, al ; jmp l``
SPIN_ON_POST = bytes([0xE6, POST, 0xEB, 0xFC])


def ioperm_works() -> bool:
    """Whether this process may use ``ioperm`` (it asks for nothing: ``turn_on`` 0)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.ioperm(POST, 1, 0) == 0)


def bitmap(*ports: int) -> bytearray:
    """An I/O bitmap in the loop's form (a byte per port) with ``ports`` open."""
    data = bytearray(0x10000)
    for port in ports:
        data[port] = 1
    return data


@contextlib.contextmanager
def guest_vm(code: bytes) -> Iterator[kvm.Vcpu]:
    """A VM (in-kernel irqchip) whose one vCPU starts ``code`` in real mode at 0."""
    with kvm.Kvm() as dev:
        vm = kvm.Vm(dev)
        try:
            vm.create_irqchip()
            memory = hostmem.anonymous_memory(0x10000)
            memory[: len(code)] = code
            vm.add_memory(0, memory)
            vcpu = vm.create_vcpu(0)
            jailhouse_vcpu_setup(vcpu)
            jailhouse_vcpu_reset(vcpu, 0)
            yield vcpu
        finally:
            vm.close()


@contextlib.contextmanager
def native_ports() -> Iterator[portio.NativePorts]:
    ports = portio.NativePorts()
    try:
        yield ports
    finally:
        ports.close()


@contextlib.contextmanager
def watchdog(vcpu: kvm.Vcpu, seconds: float = 5.0) -> Iterator[None]:
    """Kick ``vcpu`` after ``seconds`` (a run that never exits ends as IntrExit)."""
    timer = threading.Timer(seconds, vcpu.kick)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def expect_io(exit_: kvm.VcpuExit, port: int, size: int, is_write: bool, count: int = 1) -> kvm.IoExit:
    if not isinstance(exit_, kvm.IoExit):
        raise AssertionError(f"expected an I/O exit at port {port:#x}, got {exit_!r}")
    got = (exit_.port, exit_.size, exit_.is_write, exit_.count)
    if got != (port, size, is_write, count):
        raise AssertionError(f"I/O exit (port, size, write, count) {got}, expected "
                             f"{(port, size, is_write, count)}")
    return exit_


def check_equal(what: str, got: object, expected: object) -> None:
    if got != expected:
        raise AssertionError(f"{what}: {got!r}, expected {expected!r}")


def check_auto_backend_is_native() -> None:
    """Where ``ioperm`` works, the executor's automatic port backend is the native one
    (the only one the I/O bitmap loop runs on)."""
    ports = portio.open_ports(range(0x608, 0x60C))
    try:
        check_equal("open_ports() backend", ports.mode, "native")
    finally:
        ports.close()


def check_open_ports_are_served_and_the_rest_come_back() -> None:
    """Every access to the open port is performed in the loop; a wider access that
    reaches a closed port, closed ports and string I/O come back as exits, with the IN
    data the caller stores delivered to the guest. (A string OUT exits with a count of 1,
    one element at a time: KVM does not tell it from a plain OUT, so only the read-ahead
    of a string IN shows a count.)"""
    with guest_vm(GUEST) as vcpu, native_ports() as native:
        loop = native.io_bitmap_loop(vcpu.fd, vcpu.run_page, bitmap(POST))
        with watchdog(vcpu):
            expect_io(vcpu.run_native(loop), POST, 2, True)
            check_equal("accesses served before the wide OUT", loop.served, 2 * ROUNDS)
            check_equal("OUT data", expect_io(vcpu.run_native(loop), UART, 1, True).value(), ord("X"))
            expect_io(vcpu.run_native(loop), UART, 1, False).set_value(0x42)
            check_equal("echoed IN data", expect_io(vcpu.run_native(loop), UART, 1, True).value(), 0x42)
            expect_io(vcpu.run_native(loop), POST, 1, False, count=2)
        check_equal("accesses served in all", loop.served, 2 * ROUNDS)
        check_equal("CX after the REP INSB exit", vcpu.get_regs().rcx & 0xFFFF, 2)  # not executed


def check_a_kick_ends_the_loop_with_an_interrupt_exit() -> None:
    """A guest that only touches the open port stays in the loop until kicked; then
    run_native returns IntrExit and clears immediate_exit, so the next run goes on."""
    with guest_vm(SPIN_ON_POST) as vcpu, native_ports() as native:
        loop = native.io_bitmap_loop(vcpu.fd, vcpu.run_page, bitmap(POST))
        with watchdog(vcpu, 0.2):
            check_equal("first run", type(vcpu.run_native(loop)).__name__, "IntrExit")
        first = loop.served
        if first <= 0:
            raise AssertionError("the loop served no access before the kick")
        with watchdog(vcpu, 0.2):
            check_equal("second run", type(vcpu.run_native(loop)).__name__, "IntrExit")
        if loop.served <= first:
            raise AssertionError(f"the second run served nothing more ({loop.served} after {first})")


#: every check, in the order the program runs them
CHECKS: tuple[Callable[[], None], ...] = (
    check_auto_backend_is_native,
    check_open_ports_are_served_and_the_rest_come_back,
    check_a_kick_ends_the_loop_with_an_interrupt_exit,
)


def run_all() -> dict[str, str]:
    """Run :data:`CHECKS`: name -> ``"passed"`` or the failure with its traceback."""
    kvm.install_kick_handler()
    results: dict[str, str] = {}
    for check in CHECKS:
        try:
            check()
            results[check.__name__] = "passed"
        except Exception:  # reported, the next check runs
            results[check.__name__] = traceback.format_exc()
    return results


if __name__ == "__main__":
    print(RESULT_TAG + json.dumps(run_all()), flush=True)
