"""The bookkeeping Arch; stands in for ``hypervisor/arch/x86`` on the host.

:class:`OracleArch` implements :class:`~harness.hvmodel.arch.Arch` without a machine:
memory is a sparse dict of pages, I/O ports, PCI config spaces and IOAPIC registers
are small simulated stores, CPUs are state labels, and every hook call is recorded in
:attr:`OracleArch.events` (when ``record`` is on) so tests can assert on the effects the
executor would have produced. Cells answer hypervisor messages through *responders*:
a callable per cell name (default: approve requests, acknowledge information), which
is how the oracle scripts inmates such as apic-demo.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from ..abi import PAGE_SIZE, CommOffset, CpuStat, Message, Reply, comm_read_u32, comm_write_u32
from . import RootBuffers

if TYPE_CHECKING:
    from ..config import CellConfig, MemoryRegion, PciDevice, SystemConfig

__all__ = ["OracleArch", "Responder", "approve_all", "deny_first_shutdown"]

#: answers a message of the hypervisor: (cell name, message, comm page) -> reply, or None
#: for "no answer" (the hypervisor then times out)
Responder = Callable[[str, Message, memoryview], "Reply | None"]


def approve_all(name: str, message: Message, page: memoryview) -> Reply | None:
    """A cell that approves every request and acknowledges every information."""
    return Reply.REQUEST_APPROVED if message == Message.SHUTDOWN_REQUEST else Reply.RECEIVED


def deny_first_shutdown() -> Responder:
    """apic-demo's behaviour: refuse the first shutdown request, approve the next ones."""
    asked = [0]

    def responder(name: str, message: Message, page: memoryview) -> Reply | None:
        if message == Message.SHUTDOWN_REQUEST:
            asked[0] += 1
            return Reply.REQUEST_DENIED if asked[0] == 1 else Reply.REQUEST_APPROVED
        return Reply.RECEIVED

    return responder


def deny_shutdown(name: str, message: Message, page: memoryview) -> Reply | None:
    """A cell that refuses every shutdown request."""
    return Reply.REQUEST_DENIED if message == Message.SHUTDOWN_REQUEST else Reply.RECEIVED


def silent(name: str, message: Message, page: memoryview) -> Reply | None:
    """A cell that never answers (the hypervisor's reply timeout decides)."""
    return None


#: the scripted answers a daemon's ``--responder CELL=POLICY`` names
RESPONDER_POLICIES: Final = ("approve", "deny-first-shutdown", "deny", "silent")


def responder_for(policy: str) -> Responder:
    """A fresh responder for one of :data:`RESPONDER_POLICIES`.

    :raise ValueError: for another name
    """
    if policy == "approve":
        return approve_all
    if policy == "deny-first-shutdown":
        return deny_first_shutdown()
    if policy == "deny":
        return deny_shutdown
    if policy == "silent":
        return silent
    raise ValueError(f"responder policy {policy!r}: expected {', '.join(RESPONDER_POLICIES)}")


class OracleArch:
    """An Arch that only keeps books.

    :param record: keep :attr:`events` (turn off for benchmarks)
    :param ioapic_pins: redirection entries of each simulated IOAPIC (QEMU: 24)
    :param default_responder: how cells without a scripted responder answer
    """

    def __init__(
        self,
        *,
        record: bool = True,
        ioapic_pins: int = 24,
        default_responder: Responder = approve_all,
    ) -> None:
        self.record = record
        #: ``(hook, args...)`` tuples, in call order
        self.events: list[tuple[object, ...]] = []
        #: scripted responders by cell name
        self.responders: dict[str, Responder] = {}
        self.default_responder = default_responder
        #: text written to the debug UART
        self.uart: collections.deque[str] = collections.deque(maxlen=100000)
        #: simulated physical memory, by page number
        self.memory: dict[int, bytearray] = {}
        #: simulated I/O ports (reads of unknown ports return all ones)
        self.ports: dict[int, int] = {}
        #: simulated PCI config spaces by BDF (missing devices read all ones; the root's
        #: devices get zeroed spaces at :meth:`init` unless already present)
        self.pci_config: dict[int, bytearray] = {}
        #: simulated IOAPIC registers by (base, index)
        self.ioapic_regs: dict[tuple[int, int], int] = {}
        self.ioapic_pins = ioapic_pins
        #: MSIs sent: (cell id, address, data)
        self.msis: list[tuple[int, int, int]] = []
        #: what each CPU does: ``root``, ``parked``, ``running``, ``suspended``
        self.cpu_state: dict[int, str] = {}
        #: cell names by id (from :meth:`cell_create`)
        self.cell_names: dict[int, str] = {}
        #: guest mappings per cell: (virt, size) -> region
        self.mappings: dict[int, dict[tuple[int, int], MemoryRegion]] = {}
        #: PCI devices per cell id
        self.devices: dict[int, set[int]] = {}
        self.comm_pages: dict[int, bytearray] = {}
        self.buffers = RootBuffers()
        self.system: SystemConfig | None = None

    def _event(self, *event: object) -> None:
        self.events.append(event)

    def events_of(self, hook: str) -> list[tuple[object, ...]]:
        """The recorded calls of one hook."""
        return [event for event in self.events if event[0] == hook]

    # --- bring-up and shutdown -----------------------------------------------------------

    def init(self, system: SystemConfig) -> None:
        """Remember the system; the root's CPUs run the root."""
        self.system = system
        # The root's physical devices exist: zeroed config spaces unless given.
        for device in system.root_cell.pci_devices:
            if device.type != 3:
                self.pci_config.setdefault(device.bdf, bytearray(0x1000))
        for cpu in system.root_cell.cpus:
            self.cpu_state[cpu] = "root"
        self.cell_names[system.root_cell.id] = system.root_cell.name
        if self.record:
            self._event("init")

    def shutdown(self) -> None:
        """Record the shutdown."""
        if self.record:
            self._event("shutdown")

    # --- cells -----------------------------------------------------------------------------

    def cell_create(self, cell_id: int, config: CellConfig) -> None:
        """Record the cell."""
        self.cell_names[cell_id] = config.name
        self.mappings.setdefault(cell_id, {})
        if self.record:
            self._event("cell_create", cell_id, config.name)

    def cell_destroy(self, cell_id: int) -> None:
        """Forget the cell."""
        self.mappings.pop(cell_id, None)
        self.devices.pop(cell_id, None)
        if self.record:
            self._event("cell_destroy", cell_id)

    def cell_reset(self, cell_id: int) -> None:
        """Record the reset."""
        if self.record:
            self._event("cell_reset", cell_id)

    def comm_page_alloc(self, cell_id: int) -> memoryview:
        """A zeroed ``bytearray`` page."""
        page = bytearray(PAGE_SIZE)
        self.comm_pages[cell_id] = page
        return memoryview(page)

    def comm_page_free(self, cell_id: int) -> None:
        """Drop the page."""
        self.comm_pages.pop(cell_id, None)

    def map_memory_region(self, cell_id: int, region: MemoryRegion) -> None:
        """Record the mapping."""
        cell_maps = self.mappings.get(cell_id)
        if cell_maps is None:
            cell_maps = self.mappings[cell_id] = {}
        cell_maps[(region.virt_start, region.size)] = region
        if self.record:
            self._event("map", cell_id, region.virt_start, region.size)

    def unmap_memory_region(self, cell_id: int, region: MemoryRegion) -> None:
        """Record the unmapping."""
        cell_maps = self.mappings.get(cell_id)
        if cell_maps is not None:
            cell_maps.pop((region.virt_start, region.size), None)
        if self.record:
            self._event("unmap", cell_id, region.virt_start, region.size)

    def config_commit(self, cell_id: int | None) -> None:
        """Record the commit."""
        if self.record:
            self._event("config_commit", cell_id)

    # --- CPUs ------------------------------------------------------------------------------

    def park_cpu(self, cpu: int) -> None:
        """The CPU waits in the parking page."""
        self.cpu_state[cpu] = "parked"
        if self.record:
            self._event("park_cpu", cpu)

    def reset_cpu(self, cpu: int, cell_id: int, reset_address: int) -> None:
        """The CPU runs the cell from ``reset_address``."""
        self.cpu_state[cpu] = "running"
        if self.record:
            self._event("reset_cpu", cpu, cell_id, reset_address)

    def suspend_cpu(self, cpu: int) -> None:
        """The CPU waits in the hypervisor."""
        if self.record:
            self._event("suspend_cpu", cpu)

    def resume_cpu(self, cpu: int) -> None:
        """The CPU continues."""
        if self.record:
            self._event("resume_cpu", cpu)

    def cpu_exit_counts(self, cpu: int) -> Mapping[CpuStat, int]:
        """None: nothing runs here, every exit the oracle sees goes through the model."""
        return {}

    # --- messages ----------------------------------------------------------------------------

    def wait_for_reply(self, cell_id: int, comm_page: memoryview, timeout: float | None) -> bool:
        """Let the cell's responder answer at once, the way the inmate library does."""
        name = self.cell_names.get(cell_id, "")
        message = Message(comm_read_u32(comm_page, CommOffset.MSG_TO_CELL))
        responder = self.responders.get(name, self.default_responder)
        reply = responder(name, message, comm_page)
        if self.record:
            self._event("message", cell_id, int(message), None if reply is None else int(reply))
        if reply is None:
            return False
        comm_write_u32(comm_page, CommOffset.MSG_TO_CELL, Message.NONE)
        comm_write_u32(comm_page, CommOffset.REPLY_FROM_CELL, reply)
        return True

    # --- hardware ----------------------------------------------------------------------------

    def pio_read(self, port: int, size: int) -> int:
        """A simulated port (all ones when never written)."""
        return self.ports.get(port, (1 << (8 * size)) - 1) & ((1 << (8 * size)) - 1)

    def pio_write(self, port: int, size: int, value: int) -> None:
        """Store the value; UART data ports also feed :attr:`uart`."""
        self.ports[port] = value
        if self.record:
            self._event("pio_write", port, size, value)

    def mmio_read(self, address: int, size: int) -> int:
        """Read simulated physical memory."""
        return int.from_bytes(self.phys_read(address, size), "little")

    def mmio_write(self, address: int, size: int, value: int) -> None:
        """Write simulated physical memory."""
        self.phys_write(address, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def pci_read_config(self, bdf: int, reg: int, size: int) -> int:
        """Read a simulated config space (all ones for absent devices)."""
        space = self.pci_config.get(bdf)
        if space is None:
            return (1 << (8 * size)) - 1
        return int.from_bytes(space[reg : reg + size], "little")

    def pci_write_config(self, bdf: int, reg: int, size: int, value: int) -> None:
        """Write a simulated config space (absent devices ignore it)."""
        space = self.pci_config.get(bdf)
        if space is not None:
            space[reg : reg + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if self.record:
            self._event("pci_write", bdf, reg, size, value)

    def pci_add_device(self, cell_id: int, device: PciDevice) -> None:
        """Record the assignment."""
        self.devices.setdefault(cell_id, set()).add(device.bdf)
        if self.record:
            self._event("pci_add", cell_id, device.bdf)

    def pci_remove_device(self, cell_id: int, device: PciDevice) -> None:
        """Record the removal."""
        self.devices.get(cell_id, set()).discard(device.bdf)
        if self.record:
            self._event("pci_remove", cell_id, device.bdf)

    def send_msi(self, cell_id: int, address: int, data: int) -> None:
        """Record the MSI."""
        self.msis.append((cell_id, address, data))
        if self.record:
            self._event("msi", cell_id, address, data)

    def ioapic_read(self, address: int, index: int) -> int:
        """A QEMU-like IOAPIC: version 0x11 with ``ioapic_pins`` entries, entries masked."""
        if index == 0x01:
            return ((self.ioapic_pins - 1) << 16) | 0x11
        default = 0x00010000 if index >= 0x10 and index % 2 == 0 else 0
        return self.ioapic_regs.get((address, index), default)

    def ioapic_write(self, address: int, index: int, value: int) -> None:
        """Store the register."""
        self.ioapic_regs[(address, index)] = value
        if self.record:
            self._event("ioapic_write", address, index, value)

    # --- memory ------------------------------------------------------------------------------

    def phys_read(self, address: int, size: int) -> bytes:
        """Read simulated physical memory (unwritten bytes are 0)."""
        out = bytearray()
        while size > 0:
            page, offset = divmod(address, PAGE_SIZE)
            chunk = min(size, PAGE_SIZE - offset)
            data = self.memory.get(page)
            out += data[offset : offset + chunk] if data is not None else bytes(chunk)
            address += chunk
            size -= chunk
        return bytes(out)

    def phys_write(self, address: int, data: bytes) -> None:
        """Write simulated physical memory."""
        view = memoryview(data)
        while view:
            page, offset = divmod(address, PAGE_SIZE)
            chunk = min(len(view), PAGE_SIZE - offset)
            store = self.memory.setdefault(page, bytearray(PAGE_SIZE))
            store[offset : offset + chunk] = view[:chunk]
            address += chunk
            view = view[chunk:]

    def root_memory_read(self, gphys: int, size: int) -> bytes:
        """Read a staged buffer."""
        return self.buffers.read(gphys, size)

    def root_buffer_alloc(self, data: bytes) -> int:
        """Stage a buffer."""
        return self.buffers.alloc(data)

    def root_buffer_free(self, gphys: int) -> None:
        """Drop a staged buffer."""
        self.buffers.free(gphys)

    # --- console -----------------------------------------------------------------------------

    def console_write(self, text: str) -> None:
        """Collect the hypervisor's UART output."""
        if self.record:
            self.uart.append(text)
