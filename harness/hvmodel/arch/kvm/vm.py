"""A KVM VM (one per Jailhouse cell): :class:`Vm` with its memory slots, in-kernel
irqchip (full or split), GSI routing, irqfds, MSI injection and vCPUs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import HOST_PAGE_SIZE
from .ioctl import KvmError, kvm_ioctl
from .structs import (
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_ENABLE_CAP,
    KVM_IRQ_LINE,
    KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
    KVM_IRQFD,
    KVM_IRQFD_FLAG_DEASSIGN,
    KVM_IRQFD_FLAG_RESAMPLE,
    KVM_MEM_READONLY,
    KVM_MSI_VALID_DEVID,
    KVM_SET_GSI_ROUTING,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_SET_TSS_ADDR,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SIGNAL_MSI,
    KVM_XEN_HVM_CONFIG,
    Cap,
    KvmEnableCap,
    KvmIrqfd,
    KvmIrqLevel,
    KvmIrqRouting,
    KvmIrqRoutingEntry,
    KvmMsi,
    KvmUserspaceMemoryRegion,
    KvmXenHvmConfig,
)
from .system import Kvm
from .vcpu import Vcpu

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["IrqchipRoute", "MemorySlot", "MsiRoute", "Vm"]

LOG = logging.getLogger(__name__)

_u64 = ctypes.c_uint64
_sz = ctypes.sizeof


@dataclasses.dataclass(slots=True)
class MemorySlot:
    """A KVM memory slot: ``size`` bytes of host memory at guest-physical ``guest_phys``.

    ``anchor`` pins the host buffer (a ctypes view holding a buffer export) for as long
    as the slot exists, so the mmap behind it cannot be closed under the guest; removing
    the slot drops it.
    """

    slot: int
    guest_phys: int
    size: int
    userspace_addr: int
    flags: int
    anchor: ctypes.Array[ctypes.c_char] | None = dataclasses.field(repr=False)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)


@dataclasses.dataclass(frozen=True, slots=True)
class MsiRoute:
    """A ``KVM_IRQ_ROUTING_MSI`` entry of the GSI routing table."""

    gsi: int
    address: int
    data: int
    devid: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class IrqchipRoute:
    """A ``KVM_IRQ_ROUTING_IRQCHIP`` entry (chip 0/1 = PIC, 2 = IOAPIC)."""

    gsi: int
    irqchip: int
    pin: int


class Vm:
    """A KVM VM (one per Jailhouse cell).

    Lifecycle: made on a :class:`~.system.Kvm` (``KVM_CREATE_VM``, default machine type);
    :meth:`create_irqchip` or :meth:`create_split_irqchip` (when wanted) before the first
    :meth:`create_vcpu`; memory slots added and removed at any time with
    :meth:`add_memory` / :meth:`remove_memory`; :meth:`close` closes the vCPUs, drops the
    slots (releasing the buffers) and closes the VM fd.

    :param kvm: the system fd; it must stay open as long as the VM
    :raise KvmError: when KVM refuses a VM
    """

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.fd = kvm_ioctl(kvm.fd, KVM_CREATE_VM, 0)
        self.slots: dict[int, MemorySlot] = {}
        self.vcpus: dict[int, Vcpu] = {}
        self.has_irqchip = False
        self._lock = threading.Lock()
        self._max_slots = kvm.check_extension(Cap.NR_MEMSLOTS) or 32

    # --- interrupt controllers -------------------------------------------------------

    def create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: in-kernel PIC, IOAPIC and a local APIC per vCPU.

        Must come before the first vCPU; Jailhouse inmates need the local APIC.
        """
        if self.vcpus:
            raise KvmError("KVM_CREATE_IRQCHIP", errno.EINVAL, "vCPUs already exist")
        kvm_ioctl(self.fd, KVM_CREATE_IRQCHIP)
        self.has_irqchip = True

    def create_split_irqchip(self, routes: int) -> None:
        """``KVM_CAP_SPLIT_IRQCHIP``: in-kernel local APICs only; IOAPIC and PIC accesses
        exit to user space. Before the first vCPU.

        :param routes: GSI routes reserved for the user-space IOAPIC's pins
        """
        if self.vcpus:
            raise KvmError("KVM_ENABLE_CAP", errno.EINVAL, "KVM_CAP_SPLIT_IRQCHIP: vCPUs already exist")
        self.enable_cap(Cap.SPLIT_IRQCHIP, routes)
        self.has_irqchip = True

    def set_tss_addr(self, address: int) -> None:
        """``KVM_SET_TSS_ADDR``: three pages KVM needs for real mode on Intel without
        unrestricted guest; must not overlap guest memory."""
        kvm_ioctl(self.fd, KVM_SET_TSS_ADDR, address, f"{address:#x}")

    def set_identity_map_addr(self, address: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR``: one page for Intel's real-mode EPT identity map."""
        value = _u64(address)
        kvm_ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, bytearray(value), f"{address:#x}")

    def enable_cap(self, cap: Cap, *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM (e.g. ``X86_USER_SPACE_MSR``)."""
        raw = KvmEnableCap(cap=int(cap), flags=flags)
        for i, value in enumerate(args):
            raw.args[i] = value
        kvm_ioctl(self.fd, KVM_ENABLE_CAP, raw, f"KVM_CAP_{cap.name}{list(args)}")

    def set_xen_hvm_config(self, flags: int, *, msr: int = 0) -> None:
        """``KVM_XEN_HVM_CONFIG`` (kernels with ``CONFIG_KVM_XEN``), e.g. with
        ``KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL``: VMCALL/VMMCALL exit as ``KVM_EXIT_XEN``.

        :param msr: the MSR whose write makes KVM put a Xen hypercall page into the guest
            (0: none)
        """
        raw = KvmXenHvmConfig(flags=flags, msr=msr)
        kvm_ioctl(self.fd, KVM_XEN_HVM_CONFIG, raw, f"flags {flags:#x}, MSR {msr:#x}")

    def irq_line(self, irq: int, level: bool) -> None:
        """``KVM_IRQ_LINE``: drive a GSI of the in-kernel PIC/IOAPIC."""
        kvm_ioctl(self.fd, KVM_IRQ_LINE, KvmIrqLevel(irq=irq, level=int(level)), f"irq {irq}")

    def set_gsi_routing(self, routes: Sequence[MsiRoute | IrqchipRoute]) -> None:
        """``KVM_SET_GSI_ROUTING``: replace the whole GSI routing table."""
        buf = bytearray(_sz(KvmIrqRouting) + len(routes) * _sz(KvmIrqRoutingEntry))
        KvmIrqRouting.from_buffer(buf).nr = len(routes)
        raw = (KvmIrqRoutingEntry * len(routes)).from_buffer(buf, _sz(KvmIrqRouting))
        for entry, route in zip(raw, routes, strict=True):
            entry.gsi = route.gsi
            if isinstance(route, MsiRoute):
                entry.type = KVM_IRQ_ROUTING_MSI
                entry.u.msi.address_lo = route.address & 0xFFFFFFFF
                entry.u.msi.address_hi = route.address >> 32
                entry.u.msi.data = route.data
                if route.devid is not None:
                    entry.flags = KVM_MSI_VALID_DEVID
                    entry.u.msi.devid = route.devid
            else:
                entry.type = KVM_IRQ_ROUTING_IRQCHIP
                entry.u.irqchip.irqchip = route.irqchip
                entry.u.irqchip.pin = route.pin
        del raw
        kvm_ioctl(self.fd, KVM_SET_GSI_ROUTING, buf, f"{len(routes)} routes")

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False, resamplefd: int = -1) -> None:
        """``KVM_IRQFD``: a write to ``eventfd`` raises GSI ``gsi`` (VFIO interrupts)."""
        raw = KvmIrqfd(fd=eventfd, gsi=gsi)
        if deassign:
            raw.flags |= KVM_IRQFD_FLAG_DEASSIGN
        if resamplefd >= 0:
            raw.flags |= KVM_IRQFD_FLAG_RESAMPLE
            raw.resamplefd = resamplefd
        kvm_ioctl(self.fd, KVM_IRQFD, raw, f"eventfd {eventfd} gsi {gsi}")

    def signal_msi(self, address: int, data: int) -> int:
        """``KVM_SIGNAL_MSI``: inject one MSI.

        :return: >0 delivered, 0 blocked by the guest (masked/no target)
        """
        raw = KvmMsi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return kvm_ioctl(self.fd, KVM_SIGNAL_MSI, raw, f"address {address:#x} data {data:#x}")

    # --- memory --------------------------------------------------------------------------

    def add_memory(
        self,
        guest_phys: int,
        buffer: WriteableBuffer,
        *,
        offset: int = 0,
        size: int | None = None,
        readonly: bool = False,
    ) -> MemorySlot:
        """Map ``size`` bytes of ``buffer`` from ``offset`` at ``guest_phys``.

        ``buffer`` is anything writable and mmap-backed: anonymous memory, a ``/dev/mem``
        window's ``mmap`` (:mod:`~harness.hvmodel.arch.hostmem`; ``offset=mapping.offset``),
        a VFIO BAR mmap. The buffer cannot be closed until :meth:`remove_memory`.

        :param size: bytes (default: the rest of the buffer); a multiple of the page size
        :param readonly: guest writes exit as MMIO (needs ``KVM_CAP_READONLY_MEM``)
        :raise KvmError: ``EINVAL`` for unaligned arguments, ``ENOSPC`` with no free slot,
            else the kernel's error (``EEXIST`` for an overlap)
        """
        view = memoryview(buffer)
        total = view.nbytes
        view.release()
        if size is None:
            size = total - offset
        where = f"guest {guest_phys:#x}+{size:#x}"
        if offset < 0 or size <= 0 or offset + size > total:
            raise KvmError("KVM_SET_USER_MEMORY_REGION", errno.EINVAL, f"{where}: outside buffer")
        anchor = (ctypes.c_char * size).from_buffer(buffer, offset)
        address = ctypes.addressof(anchor)
        checks = (("guest address", guest_phys), ("size", size), ("host address", address))
        misaligned = [name for name, value in checks if value % HOST_PAGE_SIZE]
        if misaligned:
            raise KvmError(
                "KVM_SET_USER_MEMORY_REGION",
                errno.EINVAL,
                f"{where}: {', '.join(misaligned)} not page-aligned",
            )
        flags = KVM_MEM_READONLY if readonly else 0
        with self._lock:
            slot = next((n for n in range(self._max_slots) if n not in self.slots), None)
            if slot is None:
                raise KvmError("KVM_SET_USER_MEMORY_REGION", errno.ENOSPC, f"{where}: no free slot")
            region = KvmUserspaceMemoryRegion(
                slot=slot,
                flags=flags,
                guest_phys_addr=guest_phys,
                memory_size=size,
                userspace_addr=address,
            )
            kvm_ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region, f"slot {slot}, {where}")
            entry = MemorySlot(slot, guest_phys, size, address, flags, anchor)
            self.slots[slot] = entry
        LOG.debug("memory slot %d: guest %#x+%#x at host %#x", slot, guest_phys, size, address)
        return entry

    def remove_memory(self, slot: MemorySlot | int) -> None:
        """Delete a memory slot (size 0) and release its buffer."""
        number = slot if isinstance(slot, int) else slot.slot
        with self._lock:
            entry = self.slots.get(number)
            if entry is None:
                raise KvmError("KVM_SET_USER_MEMORY_REGION", errno.ENOENT, f"no slot {number}")
            region = KvmUserspaceMemoryRegion(
                slot=number, flags=entry.flags, guest_phys_addr=entry.guest_phys
            )
            kvm_ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region, f"delete slot {number}")
            del self.slots[number]
            entry.anchor = None
        LOG.debug("memory slot %d removed", number)

    def slot_at(self, guest_phys: int) -> MemorySlot | None:
        """The slot that maps ``guest_phys``, if any."""
        for entry in self.slots.values():
            if entry.guest_phys <= guest_phys < entry.guest_phys + entry.size:
                return entry
        return None

    # --- vCPUs ---------------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """``KVM_CREATE_VCPU``; ``vcpu_id`` becomes the vCPU's (x2)APIC ID."""
        if vcpu_id in self.vcpus:
            raise KvmError("KVM_CREATE_VCPU", errno.EEXIST, f"vCPU {vcpu_id} exists")
        fd = kvm_ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id, f"vCPU {vcpu_id}")
        try:
            vcpu = Vcpu(self.kvm, vcpu_id, fd, has_lapic=self.has_irqchip)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus[vcpu_id] = vcpu
        return vcpu

    def close(self) -> None:
        """Close all vCPUs and the VM fd, then release the slots' buffers; idempotent.

        The vCPUs must not be running (kick and join their threads first).
        """
        for vcpu in list(self.vcpus.values()):
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        # The guest memory is unreachable once the VM fd is gone.
        for entry in self.slots.values():
            entry.anchor = None
        self.slots.clear()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Vm(fd={self.fd}, vcpus={sorted(self.vcpus)}, slots={len(self.slots)})"
