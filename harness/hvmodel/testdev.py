"""The x86 test device; models ``hypervisor/arch/x86/test-device.c`` (``CONFIG_TEST_DEVICE``).

A unit that exists only in a hypervisor built with ``CONFIG_TEST_DEVICE``
(:attr:`~harness.hvmodel.params.HvParams.test_device`; off by default, as in Jailhouse).
For every non-root cell with the ``TEST_DEVICE`` flag it intercepts the page right after
the cell's COMM_REGION (x86 inmates: 0x101000). Accesses of 1, 2, 4 or 8 bytes that lie
inside offsets 0xff8..0xfff of that page read and write bytes 0xff8..0xfff of the cell's
comm page (which the cell also sees as plain memory at 0x100ff8); any other access prints
``testdev: invalid read|write, register OFFSET, size N`` and is an MMIO error (the CPU
is parked). Inmates use it to test the MMIO instruction decoder (``mmio-access``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from .abi import CELL_TEST_DEVICE, MEM_COMM_REGION, PAGE_SIZE, TEST_DEVICE_REGISTER
from .errors import Errno, HvError
from .mmio import MmioAccess, MmioHandler, MmioResult
from .unit import define_unit

if TYPE_CHECKING:
    from .cell import Cell
    from .printk import Console
    from .unit import UnitHost

__all__ = ["MSG_TESTDEV_INVALID", "TestDevice"]

MSG_TESTDEV_INVALID: Final = "testdev: invalid %s, register %x, size %d\n"


class TestDevice:
    """The test device unit (``DEFINE_UNIT(testdev, "Test device")``).

    Lifecycle: a unit (:mod:`.unit`): nothing at enable or disable; ``cell_init``
    registers the page of a flagged cell, ``cell_exit`` unregisters it.

    :param console: where invalid accesses are reported
    """

    __test__ = False  # not a pytest class
    name = "Test device"

    def __init__(self, console: Console) -> None:
        self.console = console

    @staticmethod
    def _flagged(cell: Cell) -> bool:
        return bool(cell.config.flags & CELL_TEST_DEVICE)

    @staticmethod
    def mmio_base(cell: Cell) -> int | None:
        """The page after the cell's COMM_REGION (``testdev_get_mmio_base``); None
        without one."""
        for mem in cell.config.memory_regions:
            if mem.flags & MEM_COMM_REGION:
                return int(mem.virt_start) + PAGE_SIZE
        return None

    # -- unit hooks -------------------------------------------------------------------

    def init(self) -> None:
        """Nothing to set up (the root cell gets no test device)."""

    def shutdown(self) -> None:
        """Nothing to hand back."""

    def mmio_count_regions(self, cell: Cell) -> int:
        """One page for a cell with the flag."""
        return 1 if self._flagged(cell) else 0

    def cell_init(self, cell: Cell) -> None:
        """Intercept the test page of a flagged cell (``testdev_cell_init``).

        :raise HvError: ``EINVAL`` when the cell has no COMM_REGION
        """
        if not self._flagged(cell):
            return
        base = self.mmio_base(cell)
        if base is None:
            raise HvError(Errno.EINVAL, f'cell "{cell.name}": TEST_DEVICE without a COMM_REGION')
        cell.mmio.register(base, PAGE_SIZE, self._handler(cell))

    def cell_exit(self, cell: Cell) -> None:
        """Stop intercepting the page (``testdev_cell_exit``)."""
        if not self._flagged(cell):
            return
        base = self.mmio_base(cell)
        if base is not None:
            cell.mmio.unregister(base)

    # -- the handler ------------------------------------------------------------------

    def _handler(self, cell: Cell) -> MmioHandler:
        page = cell.comm_page
        console = self.console

        def handler(access: MmioAccess) -> MmioResult:
            offset, size = access.address, access.size
            if offset < TEST_DEVICE_REGISTER or offset > PAGE_SIZE - size:
                console.printk(
                    MSG_TESTDEV_INVALID, "write" if access.is_write else "read", offset, size
                )
                return MmioResult.ERROR
            if size not in (1, 2, 4, 8):
                return MmioResult.HANDLED  # no such x86 access; Jailhouse ignores it too
            if access.is_write:
                mask = (1 << (8 * size)) - 1
                page[offset : offset + size] = (access.value & mask).to_bytes(size, "little")
            else:
                access.value = int.from_bytes(page[offset : offset + size], "little")
            return MmioResult.HANDLED

        return handler


def _link(host: UnitHost) -> TestDevice | None:
    return TestDevice(host.console) if host.params.test_device else None


define_unit("testdev", _link)
