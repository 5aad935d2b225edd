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

import pytest
from io_bitmap_checks import (
    bitmap,
    check_a_kick_ends_the_loop_with_an_interrupt_exit,
    check_auto_backend_is_native,
    check_open_ports_are_served_and_the_rest_come_back,
    ioperm_works,
)

from harness.hvmodel.arch import portio
from harness.hvmodel.arch.kvm import structs

needs_ioperm = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK) or not ioperm_works(),
    reason="needs /dev/kvm and ioperm, which this host refuses; the lab runs these checks "
    "(integration/test_io_bitmap_in_lab.py)",
)


def test_open_ranges_are_the_runs_of_open_ports() -> None:
    """Runs of non-zero bytes, in order, as (first port, length); none when all closed."""
    data = bitmap(0x2F8, 0x2F9, 0x2FA, 0x608, 0xFFFF)
    data[0x609] = 7  # any non-zero byte is open
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
