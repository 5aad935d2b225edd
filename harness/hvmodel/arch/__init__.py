"""Architecture interface; models the ``arch_*`` hooks of ``include/jailhouse/control.h``.

The control plane (:mod:`harness.hvmodel.control` and its units) decides *what* happens;
an :class:`Arch` makes it happen on something real, or only writes it down:

* :mod:`harness.hvmodel.arch.oracle` -- bookkeeping only, for the host-side oracle;
* the executor in the lab's root cell (KVM vCPUs, ``/dev/mem``, ``/dev/port``, VFIO).

Rules every implementation keeps:

* The model calls these hooks with its own lock held (see :class:`~harness.hvmodel.control.
  Hypervisor`), except :meth:`Arch.wait_for_reply`, which is called with the lock
  released so that the cell's CPUs can keep exiting into the model while the root waits.
* Hooks that can fail the way Jailhouse's can (allocation, mapping) raise
  :class:`~harness.hvmodel.errors.HvError` with the errno; the model unwinds.
* Hooks never call back into the :class:`~harness.hvmodel.control.Hypervisor`.
* Cell ids are the runtime ids (root = 0); CPU numbers are logical CPU ids, equal to the
  APIC ids on the lab machine.
* Nothing here is about the root cell's own execution: in jhlab the root runs natively,
  so suspending or mapping for cell 0 is bookkeeping the executor may ignore.
"""

from __future__ import annotations

import mmap
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

from ..abi import PAGE_SIZE, CpuStat
from ..errors import Errno, HvError

if TYPE_CHECKING:
    from ..config import CellConfig, MemoryRegion, PciDevice, SystemConfig

__all__ = ["HOST_PAGE_SIZE", "Arch", "RootBuffers"]

#: The page size of the Linux the executor runs on: the granularity of its ``mmap``,
#: ``/dev/mem`` and VFIO mappings. Not Jailhouse's ``PAGE_SIZE`` (:mod:`..abi`), although
#: both are 4 KiB on x86.
HOST_PAGE_SIZE: Final = mmap.PAGESIZE


@runtime_checkable
class Arch(Protocol):
    """What the control plane needs from the machine (``arch_*`` in Jailhouse).

    Lifecycle: :meth:`init` once at enable, then any number of cell operations, then
    :meth:`shutdown` once at disable. One instance serves one
    :class:`~harness.hvmodel.control.Hypervisor`.
    """

    # --- bring-up and shutdown -------------------------------------------------------

    def init(self, system: SystemConfig) -> None:
        """Prepare the machine for the hypervisor (``arch_init_early/late``).

        :raise HvError: ``ENODEV`` when virtualization is missing, ``ENOMEM`` ...
        """

    def shutdown(self) -> None:
        """Give the machine back to the root (``arch_shutdown``); cannot fail."""

    # --- cells -------------------------------------------------------------------------

    def cell_create(self, cell_id: int, config: CellConfig) -> None:
        """Create the per-cell structures (``arch_cell_create``: vCPU state, EPT root).

        :raise HvError: ``ENOMEM`` when resources are exhausted
        :see: :meth:`cell_destroy`
        """

    def cell_destroy(self, cell_id: int) -> None:
        """Free what :meth:`cell_create` made (``arch_cell_destroy``); cannot fail."""

    def cell_reset(self, cell_id: int) -> None:
        """Prepare a cell for (re)start (``arch_cell_reset``), after the comm region is set."""

    def comm_page_alloc(self, cell_id: int) -> memoryview:
        """Return the cell's 4 KiB comm page, writable and zeroed.

        The executor hands out memory its vCPUs see at the COMM_REGION's guest address
        (an mmap); the oracle a ``bytearray``. The model reads and writes the comm region
        through this view only, as Jailhouse does through ``cell->comm_page``.

        :see: :meth:`comm_page_free`
        """
        ...

    def comm_page_free(self, cell_id: int) -> None:
        """Release the comm page of a destroyed (or never created) cell."""

    def map_memory_region(self, cell_id: int, region: MemoryRegion) -> None:
        """Map ``region`` into the cell's guest-physical space (``arch_map_memory_region``).

        ``region.virt_start`` is the guest address, ``region.phys_start`` the host one;
        for a COMM_REGION region ``phys_start`` is meaningless and the cell's comm page
        is meant. DMA regions also go into the IOMMU.

        :raise HvError: ``ENOMEM``, or ``E2BIG`` beyond the IOMMU's address width
        :see: :meth:`unmap_memory_region`
        """

    def unmap_memory_region(self, cell_id: int, region: MemoryRegion) -> None:
        """Remove ``region`` from the cell's guest-physical space.

        :raise HvError: ``ENOMEM`` when a huge page had to be split and could not be
        """

    def config_commit(self, cell_id: int | None) -> None:
        """Make the last changes effective (``arch_config_commit``: flush TLBs, IOMMU).

        :param cell_id: the cell just added or removed, or None
        """

    # --- CPUs --------------------------------------------------------------------------

    def park_cpu(self, cpu: int) -> None:
        """Stop the CPU's guest code; it waits for a reset (``arch_park_cpu``)."""

    def reset_cpu(self, cpu: int, cell_id: int, reset_address: int) -> None:
        """Start the CPU at the cell's reset address in real mode (``arch_reset_cpu``).

        :param reset_address: ``cpu_reset_address`` of the cell config (x86: 0)
        """

    def suspend_cpu(self, cpu: int) -> None:
        """Hold the CPU in the hypervisor until :meth:`resume_cpu` (``arch_suspend_cpu``)."""

    def resume_cpu(self, cpu: int) -> None:
        """Let a suspended CPU continue (``arch_resume_cpu``)."""

    def cpu_exit_counts(self, cpu: int) -> Mapping[CpuStat, int]:
        """Exits of a cell CPU that the machine handled without calling the model, counted
        as Jailhouse counts them (``VMEXITS_TOTAL`` included), since the CPU joined its
        cell. The model adds them to its own counts (``CPU_GET_INFO``).

        An executor's KVM handles CPUID, most MSRs, CR writes ... in the kernel; the
        oracle executes nothing and has none.
        """
        ...

    # --- messages ----------------------------------------------------------------------

    def wait_for_reply(self, cell_id: int, comm_page: memoryview, timeout: float | None) -> bool:
        """Wait until the cell answered the message now in its comm region.

        Answered means ``reply_from_cell`` is non-zero, or ``cell_state`` is SHUT_DOWN
        or FAILED. The model has already written the message; it evaluates the comm
        region itself after this returns. Called without the model's lock.

        :param timeout: seconds (from ``msg_reply_timeout``), None = no limit
        :return: False when the timeout passed without an answer
        """
        ...

    # --- hardware the cells reach through the hypervisor --------------------------------

    def pio_read(self, port: int, size: int) -> int:
        """Read a whitelisted I/O port (pass-through)."""
        ...

    def pio_write(self, port: int, size: int, value: int) -> None:
        """Write a whitelisted I/O port (pass-through)."""

    def mmio_read(self, address: int, size: int) -> int:
        """Read ``size`` bytes of host-physical MMIO (sub-page regions, MSI-X control)."""
        ...

    def mmio_write(self, address: int, size: int, value: int) -> None:
        """Write ``size`` bytes of host-physical MMIO."""

    def pci_read_config(self, bdf: int, reg: int, size: int) -> int:
        """Read the real config space of a physical device."""
        ...

    def pci_write_config(self, bdf: int, reg: int, size: int, value: int) -> None:
        """Write the real config space of a physical device."""

    def pci_add_device(self, cell_id: int, device: PciDevice) -> None:
        """Give a physical device to a cell (``arch_pci_add_device``: IOMMU context).

        :raise HvError: ``ENOMEM`` ...
        :see: :meth:`pci_remove_device`
        """

    def pci_remove_device(self, cell_id: int, device: PciDevice) -> None:
        """Take a physical device from a cell (``arch_pci_remove_device``)."""

    def send_msi(self, cell_id: int, address: int, data: int) -> None:
        """Deliver an MSI (``0xfeexxxxx`` address, data) to a CPU of the cell."""

    def ioapic_read(self, address: int, index: int) -> int:
        """Read register ``index`` of the physical IOAPIC at ``address``."""
        ...

    def ioapic_write(self, address: int, index: int, value: int) -> None:
        """Write register ``index`` of the physical IOAPIC at ``address``."""

    # --- memory --------------------------------------------------------------------------

    def phys_read(self, address: int, size: int) -> bytes:
        """Read host-physical memory (ivshmem state table)."""
        ...

    def phys_write(self, address: int, data: bytes) -> None:
        """Write host-physical memory (cell image loading, ivshmem state table)."""

    def root_memory_read(self, gphys: int, size: int) -> bytes:
        """Read the root cell's memory, e.g. a cell config passed to CELL_CREATE.

        :raise HvError: ``ENOMEM`` when the range cannot be mapped
        """
        ...

    def root_buffer_alloc(self, data: bytes) -> int:
        """Place ``data`` in the root's memory (the driver's ``kmalloc``) and return its
        address, readable afterwards with :meth:`root_memory_read`.

        :see: :meth:`root_buffer_free`
        """
        ...

    def root_buffer_free(self, gphys: int) -> None:
        """Free a buffer from :meth:`root_buffer_alloc`."""

    # --- console ------------------------------------------------------------------------

    def console_write(self, text: str) -> None:
        """Emit hypervisor console text on the debug UART."""


class RootBuffers:
    """Page-aligned staging buffers in a fake root address range.

    A ready-made implementation of :meth:`Arch.root_buffer_alloc`, :meth:`Arch.root_buffer_free`
    and :meth:`Arch.root_memory_read` for an :class:`Arch` whose root memory is not
    real: buffers are kept in a dict, addresses are handed out page-aligned (as Linux's
    ``kmalloc`` does for page-sized objects), lowest free address first, so runs are
    deterministic.

    :param base: first address handed out
    :param limit: end of the range
    """

    def __init__(self, base: int = 0x7F000000, limit: int = 0x80000000) -> None:
        self._base = base
        self._limit = limit
        self._buffers: dict[int, bytes] = {}

    def alloc(self, data: bytes) -> int:
        """Store ``data``; return its address.

        :raise HvError: ``ENOMEM`` when the range is full
        """
        size = max(PAGE_SIZE, (len(data) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        address = self._base
        for start in sorted(self._buffers):
            if address + size <= start:
                break
            length = max(PAGE_SIZE, (len(self._buffers[start]) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
            address = max(address, start + length)
        if address + size > self._limit:
            raise HvError(Errno.ENOMEM, "root staging range full")
        self._buffers[address] = bytes(data)
        return address

    def free(self, address: int) -> None:
        """Forget the buffer at ``address`` (unknown addresses are ignored)."""
        self._buffers.pop(address, None)

    def read(self, address: int, size: int) -> bytes:
        """Read ``size`` bytes at ``address``, inside one buffer.

        :raise HvError: ``ENOMEM`` when the range is not inside a stored buffer
        """
        for start, data in self._buffers.items():
            end = start + max(PAGE_SIZE, (len(data) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
            if start <= address and address + size <= end:
                offset = address - start
                chunk = data[offset : offset + size]
                return chunk + bytes(size - len(chunk))
        raise HvError(Errno.ENOMEM, f"root memory {address:#x}+{size:#x} not mapped")
