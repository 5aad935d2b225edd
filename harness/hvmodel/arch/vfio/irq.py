"""Device interrupts through VFIO and their routes into KVM: :class:`EventFd` (one per
vector), :class:`DeviceIrqs` (a device's IRQ indexes: INTx, MSI, MSI-X, with
``VFIO_DEVICE_SET_IRQS``) and :class:`MsiRouter` (a vector's eventfd into a VM through a
KVM GSI route and irqfd); stands where the interrupt-remapping side of
``hypervisor/arch/x86/vtd.c`` is.

**Not modelled by VFIO, the executor's job**: the MSI and MSI-X capabilities in the VFIO
config region are virtualized by ``vfio-pci``; the real MSI address/data are the host's
(remapped) ones, programmed by ``VFIO_DEVICE_SET_IRQS``. The cell's MSI shadow (reference
§4.4) becomes a KVM route (:meth:`MsiRouter.route`), never a config write. Bus mastering
is the device's ``COMMAND`` register, which the cell (or
:meth:`Device.set_bus_master <.device.Device.set_bus_master>`) sets; without it the
device neither DMAs nor sends MSIs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import select
import struct
import time
from collections.abc import Sequence

from ...errors import HvError
from ..kvm import Cap, IrqchipRoute, MsiRoute, Vm
from .ioctl import VfioError, vfio_ioctl
from .structs import (
    VFIO_DEVICE_GET_IRQ_INFO,
    VFIO_DEVICE_SET_IRQS,
    IrqInfoFlags,
    IrqSetFlags,
    PciIrq,
    VfioIrqInfo,
    VfioIrqSet,
)

__all__ = ["DeviceIrqs", "EventFd", "IrqInfo", "MsiRouter", "RoutedVector", "default_irqchip_routes"]

LOG = logging.getLogger(__name__)

_sz = ctypes.sizeof


class EventFd:
    """A non-blocking ``eventfd(2)``: the signal of one interrupt vector.

    VFIO writes it when the device's vector fires; KVM's irqfd consumes it (then a
    :meth:`wait` here never sees the count). Lifecycle: open on construction, :meth:`close`.
    """

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def fileno(self) -> int:
        return self.fd

    def read(self) -> int:
        """Take the counter (0 when nothing is pending)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def write(self, value: int = 1) -> None:
        """Add ``value`` (signal it from user space, e.g. in tests)."""
        os.eventfd_write(self.fd, value)

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for a signal; take and return the counter (0: timed out)."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            count = self.read()
            if count:
                return count
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return 0
            poller.poll(max(1, int(remaining * 1000)))

    def close(self) -> None:
        """Close; idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventFd({self.fd})"



class _BorrowedEventFd(EventFd):
    """An eventfd the caller owns, wrapped (never closed here)."""

    def __init__(self, fd: int) -> None:  # no os.eventfd here: the caller's fd
        self.fd = fd

    def close(self) -> None:
        """Not ours to close."""


def _irq_name(index: int) -> str:
    try:
        return PciIrq(index).name
    except ValueError:
        return f"IRQ index {index}"


@dataclasses.dataclass(frozen=True, slots=True)
class IrqInfo:
    """``VFIO_DEVICE_GET_IRQ_INFO``: ``count`` vectors of IRQ index ``index``."""

    index: int
    flags: IrqInfoFlags
    count: int



class DeviceIrqs:
    """The IRQ indexes of one VFIO device (:class:`~.structs.PciIrq`: INTx, MSI, MSI-X,
    ERR, REQ), each signalled through eventfds, one per vector.

    Lifecycle: made with its :class:`~.device.Device`; :meth:`enable` / :meth:`disable`
    per index; :meth:`close` (by the device's close) disables what is enabled.

    :param fd: the device fd (not owned)
    :param who: the device, for errors (``01:01.0``)
    :param num_irqs: the device's IRQ indexes (``VFIO_DEVICE_GET_INFO``)
    """

    def __init__(self, fd: int, who: str, num_irqs: int) -> None:
        self.fd = fd
        self.who = who
        self.num_irqs = num_irqs
        #: eventfds of enabled IRQ indexes (those this object created are closed with them)
        self.enabled: dict[int, list[EventFd]] = {}
        self._owned: dict[int, list[EventFd]] = {}

    def info(self, index: int) -> IrqInfo:
        """``VFIO_DEVICE_GET_IRQ_INFO``."""
        raw = VfioIrqInfo(argsz=_sz(VfioIrqInfo), index=index)
        vfio_ioctl(
            self.fd,
            VFIO_DEVICE_GET_IRQ_INFO,
            raw,
            op="VFIO_DEVICE_GET_IRQ_INFO",
            who=self.who,
            detail=f"IRQ index {index}",
        )
        return IrqInfo(index, IrqInfoFlags(raw.flags), int(raw.count))

    def infos(self) -> list[IrqInfo]:
        """Every IRQ index (``num_irqs``); ones the device lacks have count 0.

        vfio-pci refuses ERR and REQ on devices without PCIe/AER (``EINVAL``): they are
        listed with count 0.
        """
        found: list[IrqInfo] = []
        for index in range(self.num_irqs):
            try:
                found.append(self.info(index))
            except VfioError as exc:
                if exc.os_errno != errno.EINVAL:
                    raise
                found.append(IrqInfo(index, IrqInfoFlags(0), 0))
        return found

    def _set_irqs(self, index: int, flags: int, start: int, count: int, data: bytes, detail: str) -> None:
        buf = bytearray(_sz(VfioIrqSet) + len(data))
        header = VfioIrqSet.from_buffer(buf)
        header.argsz = len(buf)
        header.flags = flags
        header.index = index
        header.start = start
        header.count = count
        del header
        buf[_sz(VfioIrqSet) :] = data
        vfio_ioctl(self.fd, VFIO_DEVICE_SET_IRQS, buf, op="VFIO_DEVICE_SET_IRQS", who=self.who, detail=detail)

    def enable(self, index: int, eventfds: int | Sequence[EventFd | int]) -> list[EventFd]:
        """Signal IRQ index ``index`` (:class:`~.structs.PciIrq`) through eventfds, one per vector
        (``DATA_EVENTFD | ACTION_TRIGGER``, vectors 0..n-1). This enables MSI/MSI-X on
        the device (VFIO programs the host's remapped address/data).

        :param eventfds: a vector count (eventfds are made here and closed by
            :meth:`disable`), or the caller's eventfds (kept open)
        :return: the eventfds of the enabled vectors (made here, or wrapped)
        :raise VfioError: ``EINVAL`` when the device has fewer vectors, else the kernel's error
        """
        info = self.info(index)
        name = _irq_name(index)
        owned = isinstance(eventfds, int)
        if isinstance(eventfds, int):
            count = eventfds
            fds: list[EventFd] = []
            try:
                for _ in range(count):
                    fds.append(EventFd())
            except BaseException:
                for fd in fds:
                    fd.close()
                raise
        else:
            fds = [fd if isinstance(fd, EventFd) else _BorrowedEventFd(fd) for fd in eventfds]
            count = len(fds)
        try:
            if count < 1 or count > info.count:
                raise VfioError(
                    self.who,
                    f"enable {name}: {count} vectors asked, the device has {info.count}",
                    os_errno=errno.EINVAL,
                )
            if IrqInfoFlags.EVENTFD not in info.flags:
                raise VfioError(
                    self.who, f"enable {name}: index cannot signal eventfds", os_errno=errno.EINVAL
                )
            if index in self.enabled:
                self.disable(index)
            data = struct.pack(f"={count}i", *(fd.fileno() for fd in fds))
            self._set_irqs(
                index,
                IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER,
                0,
                count,
                data,
                f"enable {name}, {count} vector{'s' if count != 1 else ''}",
            )
        except BaseException:
            if owned:
                for fd in fds:
                    fd.close()
            raise
        self.enabled[index] = fds
        if owned:
            self._owned[index] = fds
        LOG.debug("%s: %s enabled, eventfds %s", self.who, name, [fd.fileno() for fd in fds])
        return fds

    def enable_intx(self, eventfd: EventFd) -> None:
        """:meth:`enable` for INTx, signalling the caller's ``eventfd``. VFIO masks INTx
        after each interrupt (at the device with PCI 2.3 INTx disable, else the line)
        until :meth:`unmask_intx`; a device has INTx or MSI/MSI-X enabled, never both."""
        self.enable(PciIrq.INTX, [eventfd])

    def enable_msi(self, eventfds: int | Sequence[EventFd | int] = 1) -> list[EventFd]:
        """:meth:`enable` for MSI."""
        return self.enable(PciIrq.MSI, eventfds)

    def enable_msix(self, eventfds: int | Sequence[EventFd | int]) -> list[EventFd]:
        """:meth:`enable` for MSI-X (Linux 6.1 cannot add vectors later: enable all
        the vectors the cell may use, or disable and enable again)."""
        return self.enable(PciIrq.MSIX, eventfds)

    def disable(self, index: int) -> None:
        """Disable IRQ index ``index`` (``DATA_NONE | ACTION_TRIGGER``, count 0); close the
        eventfds :meth:`enable` made."""
        try:
            self._set_irqs(
                index,
                IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER,
                0,
                0,
                b"",
                f"disable {_irq_name(index)}",
            )
        finally:
            self.enabled.pop(index, None)
            for fd in self._owned.pop(index, []):
                fd.close()

    def trigger(self, index: int, vector: int = 0) -> None:
        """Fire a vector from software (``DATA_NONE | ACTION_TRIGGER``, count 1): VFIO's
        loopback test; the vector's eventfd is signalled as if the device had fired."""
        self._set_irqs(
            index,
            IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER,
            vector,
            1,
            b"",
            f"trigger {_irq_name(index)} vector {vector}",
        )

    def unmask_intx(self) -> None:
        """Unmask INTx after an interrupt (INTx is automasked by VFIO); VFIO signals the
        eventfd again at once when the device still asserts it."""
        self._set_irqs(
            PciIrq.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 1, b"", "unmask INTx"
        )

    def close(self) -> None:
        """Disable every enabled index (errors are logged); the device fd is closed next."""
        for index in list(self.enabled):
            try:
                self.disable(index)
            except VfioError as exc:
                LOG.warning("%s", exc)
        self.fd = -1

    def __repr__(self) -> str:
        return f"DeviceIrqs({self.who}, enabled={sorted(self.enabled)})"


def default_irqchip_routes() -> list[IrqchipRoute]:
    """KVM's default GSI routes of a full in-kernel irqchip (``default_routing`` of
    ``arch/x86/kvm/irq_comm.c``): GSI 0-15 to the PICs and the IOAPIC, 16-23 to the IOAPIC."""
    routes: list[IrqchipRoute] = []
    for gsi in range(24):
        if gsi < 16:
            routes.append(IrqchipRoute(gsi, 0 if gsi < 8 else 1, gsi % 8))
        routes.append(IrqchipRoute(gsi, 2, gsi))
    return routes


@dataclasses.dataclass(frozen=True, slots=True)
class RoutedVector:
    """A device vector delivered to a VM: its eventfd feeds GSI ``gsi``, routed as an MSI."""

    gsi: int
    eventfd: int
    address: int
    data: int


class MsiRouter:
    """The GSI routing table of one KVM VM: passed-through devices' MSIs and the cell's
    IOAPIC pins.

    KVM replaces the whole table on every ``KVM_SET_GSI_ROUTING``, and
    :class:`~harness.hvmodel.arch.kvm.Vm` does not remember it; this object keeps it.
    Each routed vector gets a GSI (from ``first_gsi``), an MSI route with the cell's
    address and data, and an irqfd: VFIO signals the eventfd, KVM injects the MSI, no
    exit to user space. Below ``first_gsi`` are the IOAPIC pins of the split irqchip:
    :meth:`set_pin` routes GSI = pin as the MSI of the pin's redirection entry (its
    irqfds are the caller's); KVM scans exactly those routes for level-triggered vectors
    whose EOI must exit (``KVM_EXIT_IOAPIC_EOI``).

    Lifecycle: one router per VM; :meth:`route` / :meth:`update` / :meth:`unroute`,
    :meth:`set_pin` / :meth:`clear_pin`; :meth:`close` deassigns every irqfd it assigned
    and clears the routes (before the VM closes).

    :param vm: the cell's VM
    :param first_gsi: lowest GSI to hand out (24: above the IOAPIC pins)
    :param irqchip_defaults: keep KVM's default PIC/IOAPIC routes in the table (needed
        with a full in-kernel irqchip; default: ``vm.has_irqchip``)
    :raise KvmError: when KVM lacks GSI routing or irqfd
    """

    def __init__(self, vm: Vm, *, first_gsi: int = 24, irqchip_defaults: bool | None = None) -> None:
        vm.kvm.require(Cap.IRQ_ROUTING, Cap.IRQFD)
        self.vm = vm
        self.first_gsi = first_gsi
        keep = vm.has_irqchip if irqchip_defaults is None else irqchip_defaults
        self._base: list[MsiRoute | IrqchipRoute] = list(default_irqchip_routes()) if keep else []
        self.vectors: dict[int, RoutedVector] = {}
        #: IOAPIC pin (= GSI) -> (MSI address, data) of its redirection entry
        self.pins: dict[int, tuple[int, int]] = {}

    def _commit(self) -> None:
        routes: list[MsiRoute | IrqchipRoute] = list(self._base)
        routes += [MsiRoute(pin, address, data) for pin, (address, data) in sorted(self.pins.items())]
        routes += [
            MsiRoute(v.gsi, v.address, v.data) for v in sorted(self.vectors.values(), key=lambda v: v.gsi)
        ]
        self.vm.set_gsi_routing(routes)

    def route(self, eventfd: EventFd | int, address: int, data: int) -> RoutedVector:
        """Deliver ``eventfd``'s signals as the MSI (``address``, ``data``) in the VM.

        :return: the vector with its GSI
        """
        fd = eventfd.fileno() if isinstance(eventfd, EventFd) else eventfd
        gsi = self.first_gsi
        while gsi in self.vectors:
            gsi += 1
        vector = RoutedVector(gsi, fd, address, data)
        self.vectors[gsi] = vector
        try:
            self._commit()
            self.vm.irqfd(fd, gsi)
        except BaseException:
            del self.vectors[gsi]
            self._commit()
            raise
        LOG.debug("eventfd %d -> GSI %d -> MSI address %#x data %#x", fd, gsi, address, data)
        return vector

    def update(self, vector: RoutedVector, address: int, data: int) -> RoutedVector:
        """The cell reprogrammed the vector: change its route (the irqfd stays)."""
        new = dataclasses.replace(vector, address=address, data=data)
        self.vectors[vector.gsi] = new
        self._commit()
        return new

    def unroute(self, vector: RoutedVector) -> None:
        """Deassign the irqfd and drop the route."""
        self.vm.irqfd(vector.eventfd, vector.gsi, deassign=True)
        self.vectors.pop(vector.gsi, None)
        self._commit()

    def set_pin(self, pin: int, address: int, data: int) -> None:
        """Route IOAPIC pin ``pin`` (GSI ``pin``) as the MSI (``address``, ``data``).

        :raise ValueError: for a pin at or above ``first_gsi``
        """
        if not 0 <= pin < self.first_gsi:
            raise ValueError(f"IOAPIC pin {pin}: the router keeps pins below GSI {self.first_gsi}")
        if self.pins.get(pin) == (address, data):
            return
        self.pins[pin] = (address, data)
        self._commit()

    def clear_pin(self, pin: int) -> None:
        """Drop the pin's route (its irqfds must be deassigned first)."""
        if self.pins.pop(pin, None) is not None:
            self._commit()

    def close(self) -> None:
        """Unroute everything (errors logged); the VM must still be open."""
        self.pins.clear()
        for vector in list(self.vectors.values()):
            try:
                self.vm.irqfd(vector.eventfd, vector.gsi, deassign=True)
            except HvError as exc:
                LOG.warning("GSI %d: %s", vector.gsi, exc)
        self.vectors.clear()
        if self.vm.fd >= 0:
            try:
                self._commit()
            except HvError as exc:
                LOG.warning("%s", exc)
