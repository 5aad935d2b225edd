"""A cell's IOAPIC pins on the executor: the delivery side of
``hypervisor/arch/x86/ioapic.c`` (``ioapic_virt_redir_write``,
``ioapic_translate_redir_entry``, the EOI register) for a root cell that is not
virtualized.

On Jailhouse the cell's redirection entry goes into the physical IOAPIC, and the pin's
interrupt reaches the cell's CPU with the cell's vector. Here the physical IOAPIC stays
the root Linux's, so each pin the cell owns is a **pin** of its own: the entry the cell
wrote (:class:`Pin`), the lines that assert it (:class:`PinSource`: the INTx of a
passed-through device through VFIO, or a root line taken with ``jhlab_gsi``, see
:mod:`~harness.hvmodel.arch.gsi`) and, while the entry is unmasked, a route into the
cell's VM:

* KVM GSI = the pin (below the split irqchip's reserved IOAPIC routes), routed as the
  MSI the entry describes (vector, delivery mode, destination and its mode, the
  redirection hint Jailhouse sets for logical destinations), and an irqfd per source:
  an interrupt goes from VFIO or the module to the cell's vCPU without user space.
* Each source masks itself after an interrupt (the remote IRR of a level-triggered
  pin). The route's MSI is level-triggered, so the cell's EOI of the vector exits to
  user space (``KVM_EXIT_IOAPIC_EOI``; KVM scans exactly these routes) and :meth:`CellPins.
  eoi` unmasks the sources of every pin with that vector: a line the cell's handler did
  not quiet interrupts again, one that it did stays silent (no storm, into the cell or the
  root). An EOI written to the IOAPIC's EOI register does the same.
* Masking the entry takes the route and irqfds away; an interrupt meanwhile stays with
  the masked source. Unmasking drops what the source signalled meanwhile and unmasks
  it, so a line still asserted interrupts at once and one no longer asserted does not
  (a level-triggered pin's behaviour).

Differences from the hardware, by construction: every entry is delivered as a
level-triggered message (an edge-triggered entry's vector also sets its TMR bit in the
cell's local APIC, and its line is re-armed at the cell's EOI rather than at its next
edge); the polarity bit is not interpreted (a source says when its line is asserted);
pins of a second IOAPIC that share a number with the first one's are not delivered.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, Protocol

from ...abi import (
    IOAPIC_REDIR_DELIVERY_MASK,
    IOAPIC_REDIR_DELIVERY_SHIFT,
    IOAPIC_REDIR_DEST_LOGICAL,
    IOAPIC_REDIR_DEST_SHIFT,
    IOAPIC_REDIR_LEVEL,
    IOAPIC_REDIR_MASK,
    IOAPIC_REDIR_VECTOR_MASK,
    MSI_ADDRESS_DEST_LOGICAL,
    MSI_ADDRESS_DEST_SHIFT,
    MSI_ADDRESS_REDIR_HINT,
    MSI_DATA_DELIVERY_SHIFT,
    MSI_DATA_LEVEL_ASSERT,
    MSI_DATA_LEVEL_TRIGGER,
    XAPIC_BASE,
)
from ...errors import HvError
from ..gsi import RootLine
from ..vfio import EventFd

if TYPE_CHECKING:
    from ..kvm import Vm
    from ..passthrough import PassedDevice, Passthrough
    from ..vfio import MsiRouter

__all__ = ["CellPins", "Pin", "PinSource", "RootLineSource", "VfioIntxSource", "redir_entry_msi"]

LOG = logging.getLogger(__name__)

#: the destination APIC ID field of a redirection entry (8 bits)
_DEST_MASK: Final = 0xFF


def redir_entry_msi(entry: int) -> tuple[int, int]:
    """The MSI (address, data) a redirection entry delivers (``ioapic_translate_redir_entry``
    with the redirection hint set for logical destinations), level-triggered (module
    docstring)."""
    destination = (entry >> IOAPIC_REDIR_DEST_SHIFT) & _DEST_MASK
    address = XAPIC_BASE | destination << MSI_ADDRESS_DEST_SHIFT
    if entry & IOAPIC_REDIR_DEST_LOGICAL:
        address |= MSI_ADDRESS_DEST_LOGICAL | MSI_ADDRESS_REDIR_HINT
    delivery = (entry >> IOAPIC_REDIR_DELIVERY_SHIFT) & IOAPIC_REDIR_DELIVERY_MASK
    data = (entry & IOAPIC_REDIR_VECTOR_MASK) | delivery << MSI_DATA_DELIVERY_SHIFT
    return address, data | MSI_DATA_LEVEL_ASSERT | MSI_DATA_LEVEL_TRIGGER


class PinSource(Protocol):
    """A line that asserts a pin: it signals its eventfd once per interrupt and stays
    masked until :meth:`unmask`, which signals again at once while the line is still
    asserted."""

    #: what it is, for logs (``INTx of 01:01.0``, ``root GSI 9``)
    name: str

    def fileno(self) -> int:
        """The eventfd (KVM's irqfd consumes it while the pin is routed)."""

    def drain(self) -> None:
        """Drop what was signalled while nothing consumed the eventfd."""

    def unmask(self) -> None:
        """Let the line interrupt again."""

    def close(self) -> None:
        """Release what the source holds (idempotent)."""


class VfioIntxSource:
    """The INTx of a passed-through device (VFIO's eventfd; the device stays with
    :class:`~harness.hvmodel.arch.passthrough.Passthrough`).

    :param passthrough: unmasks through VFIO
    :param passed: the device (with an INTx eventfd)
    """

    def __init__(self, passthrough: Passthrough, passed: PassedDevice) -> None:
        if passed.intx is None:
            raise ValueError(f"{passed.address.short} has no INTx")
        self.passthrough = passthrough
        self.passed = passed
        self.eventfd = passed.intx
        self.name = f"INTx of {passed.address.short}"

    def fileno(self) -> int:
        return self.eventfd.fileno()

    def drain(self) -> None:
        self.eventfd.read()

    def unmask(self) -> None:
        self.passthrough.intx_unmask(self.passed)

    def close(self) -> None:
        """Nothing: the device's detach turns INTx off."""


class RootLineSource:
    """A GSI taken from the root's Linux (:class:`~harness.hvmodel.arch.gsi.RootLine`),
    with an eventfd of its own.

    :param gsi: the line
    :param device: the ``jhlab_gsi`` device
    :raise GsiError: when the line cannot be taken
    """

    def __init__(self, gsi: int, *, device: str) -> None:
        self.eventfd = EventFd()
        try:
            self.line = RootLine(gsi, self.eventfd.fileno(), device=device)
        except BaseException:
            self.eventfd.close()
            raise
        self.name = f"root GSI {gsi}"

    def fileno(self) -> int:
        return self.eventfd.fileno()

    def drain(self) -> None:
        self.eventfd.read()

    def unmask(self) -> None:
        self.line.unmask()

    def close(self) -> None:
        """Give the line back to the root, then close the eventfd."""
        self.line.close()
        self.eventfd.close()


@dataclasses.dataclass(eq=False)
class Pin:
    """One IOAPIC pin a cell owns."""

    ioapic: int
    pin: int
    #: the redirection entry as the cell wrote it (masked until then)
    entry: int = IOAPIC_REDIR_MASK
    sources: list[PinSource] = dataclasses.field(default_factory=list)
    #: the MSI (address, data) KVM routes it as; None while not routed
    route: tuple[int, int] | None = None

    @property
    def vector(self) -> int:
        return self.entry & IOAPIC_REDIR_VECTOR_MASK


class CellPins:
    """The IOAPIC pins of one cell and their delivery (module docstring).

    Lifecycle: made with the cell's pins (from its config) -> :meth:`add_source` per line
    (at the commit after the cell's creation) -> :meth:`write` (the cell's entries),
    :meth:`eoi`, :meth:`remove_sources` any number of times -> :meth:`close` (at the
    cell's destruction, before its VM closes: every root line goes back). Thread-safe:
    vCPU threads write entries and end interrupts while the root's thread adds sources.

    :param vm: the cell's VM (irqfds)
    :param router: its GSI routing table
    :param pins: (IOAPIC address, pin) pairs the cell owns
    :param name: the cell, for logs
    """

    def __init__(self, vm: Vm, router: MsiRouter, pins: Iterable[tuple[int, int]], name: str) -> None:
        self.vm = vm
        self.router = router
        self.name = name
        self._lock = threading.Lock()
        self.pins: dict[tuple[int, int], Pin] = {}
        taken: dict[int, int] = {}
        for ioapic, number in sorted(pins):
            if number >= router.first_gsi or number in taken:
                why = ("above the split irqchip's IOAPIC routes" if number >= router.first_gsi
                       else f"IOAPIC {taken.get(number, 0):#x} has a pin {number} too")
                LOG.warning("cell %s: IOAPIC %#x pin %d not delivered (%s)", name, ioapic, number, why)
                continue
            taken[number] = ioapic
            self.pins[(ioapic, number)] = Pin(ioapic, number)

    def __repr__(self) -> str:
        return f"CellPins({self.name}, pins={sorted(self.pins)})"

    # --- sources ------------------------------------------------------------------------

    def add_source(self, ioapic: int, pin: int, source: PinSource) -> bool:
        """Let ``source`` assert the pin; False (nothing done) for a pin not delivered."""
        with self._lock:
            entry = self.pins.get((ioapic, pin))
            if entry is None:
                return False
            entry.sources.append(source)
            try:
                if entry.route is not None:
                    self._connect(entry, source)
                else:  # the first line of an unmasked entry routes it
                    self._reconcile(entry)
            except HvError as exc:
                LOG.error("cell %s: IOAPIC %#x pin %d: %s not connected: %s", self.name, ioapic,
                          pin, source.name, exc)
        LOG.info("cell %s: IOAPIC %#x pin %d asserted by %s", self.name, ioapic, pin, source.name)
        return True

    def remove_sources(self, which: Callable[[PinSource], bool]) -> list[PinSource]:
        """Take the sources ``which`` selects off their pins (irqfds deassigned); the
        caller closes them."""
        removed: list[PinSource] = []
        with self._lock:
            for entry in self.pins.values():
                for source in [s for s in entry.sources if which(s)]:
                    if entry.route is not None:
                        self._disconnect(entry, source)
                    entry.sources.remove(source)
                    removed.append(source)
        return removed

    def _connect(self, entry: Pin, source: PinSource) -> None:
        """Routed pin: what the source signalled before is stale; an irqfd, then the line
        re-evaluated."""
        source.drain()
        self.vm.irqfd(source.fileno(), entry.pin)
        source.unmask()

    def _disconnect(self, entry: Pin, source: PinSource) -> None:
        try:
            self.vm.irqfd(source.fileno(), entry.pin, deassign=True)
        except HvError as exc:
            LOG.warning("cell %s: %s: %s", self.name, source.name, exc)

    # --- the cell's side -----------------------------------------------------------------

    def owns(self, ioapic: int, pin: int) -> bool:
        return (ioapic, pin) in self.pins

    def write(self, ioapic: int, pin: int, high: bool, value: int) -> None:
        """The cell wrote half of a redirection entry (``ioapic_virt_redir_write``): the
        route follows, an unmask re-evaluates the lines (module docstring)."""
        with self._lock:
            entry = self.pins.get((ioapic, pin))
            if entry is None:
                return
            value &= 0xFFFFFFFF
            if high:
                entry.entry = (entry.entry & 0xFFFFFFFF) | value << 32
            else:
                entry.entry = (entry.entry & ~0xFFFFFFFF) | value
            try:
                self._reconcile(entry)
            except HvError as exc:
                LOG.error("cell %s: IOAPIC %#x pin %d not routed: %s", self.name, ioapic, pin, exc)

    def _reconcile(self, entry: Pin) -> None:
        masked = entry.entry & IOAPIC_REDIR_MASK or not entry.sources
        wanted = None if masked else redir_entry_msi(entry.entry)
        if wanted == entry.route:
            return
        if wanted is None:
            for source in entry.sources:
                self._disconnect(entry, source)
            self.router.clear_pin(entry.pin)
            entry.route = None
            return
        self.router.set_pin(entry.pin, *wanted)
        newly_routed = entry.route is None
        entry.route = wanted
        LOG.debug("cell %s: IOAPIC %#x pin %d -> MSI %#x/%#x (entry %#x, %s-triggered)", self.name,
                  entry.ioapic, entry.pin, *wanted, entry.entry,
                  "level" if entry.entry & IOAPIC_REDIR_LEVEL else "edge")
        if newly_routed:
            for source in entry.sources:
                self._connect(entry, source)

    def eoi(self, vector: int) -> None:
        """The cell ended ``vector`` (a level-triggered EOI exit, or the IOAPIC's EOI
        register): the sources of every routed pin with that vector may interrupt again."""
        with self._lock:
            for entry in self.pins.values():
                if entry.route is not None and entry.vector == vector:
                    for source in entry.sources:
                        try:
                            source.unmask()
                        except HvError as exc:
                            LOG.warning("cell %s: %s: %s", self.name, source.name, exc)

    def status(self) -> dict[str, object]:
        """JSON-friendly state: per pin the cell's entry, whether it is routed, its lines."""
        with self._lock:
            return {
                f"{entry.ioapic:#x}/{entry.pin}": {
                    "entry": f"{entry.entry:#018x}",
                    "routed": entry.route is not None,
                    "sources": [source.name for source in entry.sources],
                }
                for entry in self.pins.values()
            }

    def close(self) -> None:
        """Routes and irqfds gone, every source released (root lines back to the root);
        errors are logged. Idempotent."""
        with self._lock:
            for entry in self.pins.values():
                if entry.route is not None:
                    for source in entry.sources:
                        self._disconnect(entry, source)
                    try:
                        self.router.clear_pin(entry.pin)
                    except HvError as exc:
                        LOG.warning("cell %s: %s", self.name, exc)
                    entry.route = None
                for source in entry.sources:
                    try:
                        source.close()
                    except HvError as exc:
                        LOG.warning("cell %s: %s: %s", self.name, source.name, exc)
                entry.sources.clear()
