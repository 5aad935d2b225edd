"""The root cell's interrupt lines (GSIs) as the executor sees them: which IOAPIC pin a
GSI is (:class:`GsiMap`, from the ACPI MADT), and a line taken from the root's Linux for
a cell (:class:`RootLine`, through jhlab's ``jhlab_gsi`` kernel module); stands where the
physical side of ``hypervisor/arch/x86/ioapic.c`` is.

**Why a kernel module.** On Jailhouse a cell that owns an IOAPIC pin gets the pin's
interrupts because the hypervisor writes the cell's vector and destination into the
physical redirection entry; the root's Linux then loses the line. The root cell here is
not virtualized: whatever the physical entry says, the interrupt arrives in the root's
Linux, and its handler runs (for the ACPI SCI it clears and disables the fixed events a
cell enabled). Linux forwards a line to user space only for a PCI device (VFIO, UIO), so
for lines without one (the SCI, ISA interrupts) ``images/kmod/jhlab_gsi`` does it: a
claim replaces the root's handlers of the line by one that masks the line and signals an
eventfd; :meth:`RootLine.unmask` after the cell's EOI; closing gives the line back with
its handlers. The module is loaded at the lab's boot (``jhlab-guest-setup``); without it
(:data:`GSI_DEVICE` absent) such pins are not delivered, with a warning.

INTx of a cell's passed-through devices does not come this way: VFIO signals it
(:mod:`~harness.hvmodel.arch.passthrough`), masked at the device until unmasked.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections.abc import Iterator
from typing import Final

from ..errors import Errno, HvError

__all__ = [
    "GSI_DEVICE",
    "MADT_PATH",
    "GsiError",
    "GsiMap",
    "RootLine",
    "madt_ioapics",
]

LOG = logging.getLogger(__name__)

#: the module's device (``JHLAB_GSI_DEVICE`` of ``images/kmod/jhlab_gsi/jhlab_gsi.h``)
GSI_DEVICE: Final = "/dev/jhlab-gsi"
#: the firmware's interrupt controller table
MADT_PATH: Final = "/sys/firmware/acpi/tables/APIC"

# jhlab_gsi.h (test_suites/unit/test_gsi.py compiles it and compares):
#: ``struct jhlab_gsi_claim``: gsi, eventfd (in), irq, taken (out)
CLAIM_STRUCT: Final = struct.Struct("=IiII")
_IOC_WRITE_READ: Final = 3
JHLAB_GSI_MAGIC: Final = ord("J")
JHLAB_GSI_CLAIM: Final = (_IOC_WRITE_READ << 30) | (CLAIM_STRUCT.size << 16) | (JHLAB_GSI_MAGIC << 8) | 0x40
JHLAB_GSI_UNMASK: Final = (JHLAB_GSI_MAGIC << 8) | 0x41

#: MADT: the table header and the fixed fields after it (local APIC address, flags)
MADT_ENTRIES_OFFSET: Final = 44
#: MADT entry type of an I/O APIC: type, length, id, reserved, address, GSI base
MADT_IOAPIC: Final = 1
_MADT_IOAPIC_ENTRY: Final = struct.Struct("<BBBBII")


class GsiError(HvError):
    """A root interrupt line could not be taken or driven.

    :param gsi: the line
    :param message: the step and what went wrong
    :param os_errno: the kernel's errno (0 when found here)
    """

    def __init__(self, gsi: int, message: str, *, os_errno: int = 0) -> None:
        self.gsi = gsi
        self.os_errno = os_errno
        known = {int(e) for e in Errno}
        super().__init__(Errno(os_errno) if os_errno in known else Errno.EIO, f"GSI {gsi}: {message}")


def madt_ioapics(table: bytes) -> Iterator[tuple[int, int]]:
    """(address, GSI base) of every I/O APIC entry of an ACPI MADT (ACPI 6.5, 5.2.12.3).

    :raise ValueError: for a table that is not a MADT or is cut short
    """
    if table[:4] != b"APIC" or len(table) < MADT_ENTRIES_OFFSET:
        raise ValueError("not an ACPI MADT (signature APIC)")
    length = min(int.from_bytes(table[4:8], "little"), len(table))
    offset = MADT_ENTRIES_OFFSET
    while offset + 2 <= length:
        kind, size = table[offset], table[offset + 1]
        if size < 2 or offset + size > length:
            raise ValueError(f"MADT entry at offset {offset} runs past the table")
        if kind == MADT_IOAPIC and size >= _MADT_IOAPIC_ENTRY.size:
            _, _, _, _, address, gsi_base = _MADT_IOAPIC_ENTRY.unpack_from(table, offset)
            yield address, gsi_base
        offset += size


class GsiMap:
    """Which IOAPIC pin each GSI is: the MADT's I/O APICs and their GSI bases.

    :param bases: IOAPIC address -> GSI base
    """

    def __init__(self, bases: dict[int, int]) -> None:
        self.bases = dict(bases)

    @classmethod
    def from_firmware(cls, path: str = MADT_PATH) -> GsiMap:
        """The map of this machine's MADT; when it cannot be read, one IOAPIC at GSI 0 is
        assumed for any address (the PC layout), with a warning."""
        try:
            with open(path, "rb") as handle:
                return cls(dict(madt_ioapics(handle.read())))
        except (OSError, ValueError) as exc:
            LOG.warning("no IOAPIC table (%s): taking GSI = IOAPIC pin", exc)
            return cls({})

    def gsi(self, ioapic: int, pin: int) -> int:
        """The GSI of ``pin`` of the IOAPIC at ``ioapic``."""
        return self.bases.get(ioapic, 0) + pin

    def pin(self, gsi: int) -> tuple[int, int] | None:
        """(IOAPIC address, pin) of ``gsi``: the IOAPIC with the highest GSI base at or
        below it; None without a table."""
        below = [(base, address) for address, base in self.bases.items() if base <= gsi]
        if not below:
            return None
        base, address = max(below)
        return address, gsi - base


class RootLine:
    """A GSI taken from the root's Linux (module docstring): each interrupt signals
    ``eventfd`` and leaves the line masked until :meth:`unmask`.

    Lifecycle: claimed on construction, :meth:`close` gives it back (so does the end of
    the process).

    :param gsi: the line
    :param eventfd: signalled once per interrupt
    :param device: the module's device
    :raise GsiError: ``ENODEV`` without the module, ``EBUSY`` when the line is taken or
        cannot be (a timer, per-CPU or NMI line), ``EINVAL`` for a GSI the firmware lacks
    """

    def __init__(self, gsi: int, eventfd: int, *, device: str = GSI_DEVICE) -> None:
        self.gsi = gsi
        try:
            self.fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            code = exc.errno or errno.EIO
            if code == errno.ENOENT:
                raise GsiError(gsi, f"no {device}: the jhlab_gsi module is not loaded "
                               "(jhlab-guest-setup loads it at boot)", os_errno=errno.ENODEV) from exc
            raise GsiError(gsi, f"open {device}: {os.strerror(code)}", os_errno=code) from exc
        claim = bytearray(CLAIM_STRUCT.pack(gsi, eventfd, 0, 0))
        try:
            fcntl.ioctl(self.fd, JHLAB_GSI_CLAIM, claim)
        except OSError as exc:
            os.close(self.fd)
            self.fd = -1
            code = exc.errno or errno.EIO
            raise GsiError(gsi, f"JHLAB_GSI_CLAIM failed: {errno.errorcode.get(code, code)} "
                           f"({os.strerror(code)})", os_errno=code) from exc
        _, _, self.irq, self.taken = CLAIM_STRUCT.unpack(claim)
        LOG.info("GSI %d (root IRQ %d) taken from the root: %d handler(s) of it detached",
                 gsi, self.irq, self.taken)

    def unmask(self) -> None:
        """Let the line interrupt again (after the cell's EOI); no-op when not masked."""
        if self.fd < 0:
            return
        try:
            fcntl.ioctl(self.fd, JHLAB_GSI_UNMASK)
        except OSError as exc:
            raise GsiError(self.gsi, f"JHLAB_GSI_UNMASK failed: {os.strerror(exc.errno or 0)}",
                           os_errno=exc.errno or 0) from exc

    def close(self) -> None:
        """Give the line back to the root's handlers; idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            LOG.info("GSI %d back to the root", self.gsi)

    def __repr__(self) -> str:
        return f"RootLine(gsi={self.gsi}, irq={getattr(self, 'irq', None)}, open={self.fd >= 0})"

