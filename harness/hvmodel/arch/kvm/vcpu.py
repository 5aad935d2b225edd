"""A KVM vCPU: :class:`Vcpu` (``KVM_RUN`` returning a decoded exit, register state, MSRs,
CPUID, the in-kernel local APIC, multiprocessing state, debug registers, pending events)
and the kick that interrupts ``KVM_RUN`` from another thread.

Threads: a :class:`Vcpu` is run by one thread at a time. :meth:`Vcpu.kick` is the only
method meant to be called from another thread; it needs :func:`install_kick_handler` to
have been called once from the main thread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from .exits import IntrExit, VcpuExit, decode_exit
from .ioctl import KvmError, kvm_ioctl
from .structs import (
    KVM_APIC_REG_SIZE,
    KVM_GET_CPUID2,
    KVM_GET_DEBUGREGS,
    KVM_GET_LAPIC,
    KVM_GET_MP_STATE,
    KVM_GET_MSRS,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_TSC_KHZ,
    KVM_GET_VCPU_EVENTS,
    KVM_RUN,
    KVM_SET_CPUID2,
    KVM_SET_DEBUGREGS,
    KVM_SET_LAPIC,
    KVM_SET_MP_STATE,
    KVM_SET_MSRS,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_VCPU_EVENTS,
    RUN_IMMEDIATE_EXIT,
    KvmDebugregs,
    KvmLapicState,
    KvmMpState,
    KvmMsrEntry,
    KvmMsrs,
    KvmRegs,
    KvmSregs,
    KvmVcpuEvents,
    MpState,
)
from .system import CpuidEntry, Kvm, cpuid_buffer

__all__ = ["KICK_SIGNAL", "Vcpu", "install_kick_handler", "kick_handler_installed"]

_sz = ctypes.sizeof


#: Signal :meth:`Vcpu.kick` sends to interrupt KVM_RUN (QEMU uses SIGUSR1 the same way).
KICK_SIGNAL: Final = signal.SIGUSR1


def _kick_handler(signum: int, frame: object) -> None:
    """Nothing to do: the signal's only job is to make KVM_RUN return EINTR."""


def install_kick_handler() -> None:
    """Install the no-op :data:`KICK_SIGNAL` handler :meth:`Vcpu.kick` needs.

    Must run in the main thread (Python installs signal handlers only there); idempotent.
    A handler someone else installed is kept (it only has to exist, not to do anything).
    """
    if not kick_handler_installed():
        signal.signal(KICK_SIGNAL, _kick_handler)


def kick_handler_installed() -> bool:
    """Whether :meth:`Vcpu.kick` can interrupt KVM_RUN (a :data:`KICK_SIGNAL` handler)."""
    return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None)


def _msrs_buffer(items: Sequence[tuple[int, int]]) -> tuple[bytearray, ctypes.Array[KvmMsrEntry]]:
    """A ``kvm_msrs`` holding ``items`` (index, data), plus a view of its entries."""
    buf = bytearray(_sz(KvmMsrs) + len(items) * _sz(KvmMsrEntry))
    KvmMsrs.from_buffer(buf).nmsrs = len(items)
    entries = (KvmMsrEntry * len(items)).from_buffer(buf, _sz(KvmMsrs))
    for entry, (index, data) in zip(entries, items, strict=True):
        entry.index, entry.data = index, data
    return buf, entries


class Vcpu:
    """A KVM vCPU of a VM (one per cell CPU); its id is its APIC ID.

    Lifecycle: made by :meth:`Vm.create_vcpu <harness.hvmodel.arch.kvm.vm.Vm.create_vcpu>`;
    set up (CPUID before the first run, then registers, e.g.
    :func:`~harness.hvmodel.arch.vcpu.jailhouse_vcpu_setup` and
    :func:`~harness.hvmodel.arch.vcpu.jailhouse_vcpu_reset`); then
    one thread calls :meth:`run` in a loop, while any thread may :meth:`kick` it out;
    :meth:`close` after that thread stopped (the VM closes its vCPUs).

    Kicking: :meth:`kick` sets ``immediate_exit`` and signals the running thread, so the
    current or the next :meth:`run` returns :class:`IntrExit`. The kicker sets its own
    request flag *before* kicking; the run loop checks its flags after every
    :class:`IntrExit` (and :meth:`run` clears ``immediate_exit`` before returning, so no
    request is lost).

    :param kvm: the system fd (capabilities, supported CPUID, the run page's size)
    :param vcpu_id: the APIC ID
    :param fd: the vCPU fd, owned from now on
    :param has_lapic: KVM gave it an in-kernel local APIC (its VM had an irqchip when the
        vCPU was made)
    """

    def __init__(self, kvm: Kvm, vcpu_id: int, fd: int, *, has_lapic: bool) -> None:
        self.kvm = kvm
        self.id = vcpu_id
        self.fd = fd
        self.has_lapic = has_lapic
        try:
            self.run_page = mmap.mmap(
                fd, kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError as exc:
            raise KvmError("mmap vCPU", exc.errno or 0, f"vCPU {vcpu_id}") from exc
        self._thread: int | None = None
        self._thread_lock = threading.Lock()

    # --- running ---------------------------------------------------------------------------

    def run(self) -> VcpuExit:
        """``KVM_RUN`` until the next exit to userspace; decode it.

        :raise KvmError: when KVM_RUN fails other than by ``EINTR``
        """
        page = self.run_page
        with self._thread_lock:
            self._thread = threading.get_ident()
        try:
            fcntl.ioctl(self.fd, KVM_RUN, 0)
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise KvmError("KVM_RUN", exc.errno or 0, f"vCPU {self.id}") from exc
            page[RUN_IMMEDIATE_EXIT] = 0
            return IntrExit()
        finally:
            with self._thread_lock:
                self._thread = None
        return decode_exit(page)

    def run_native(self, enter: Callable[[], int]) -> VcpuExit:
        """:meth:`run` with ``enter`` in place of the KVM_RUN ioctl: native code that runs
        the vCPU and may serve some exits itself (the executor's I/O bitmap loop,
        :class:`~harness.hvmodel.arch.portio.IoBitmapLoop`). It returns 0 once an exit it leaves to the caller
        is in the run page, or KVM_RUN's negative errno. Kicks work as with :meth:`run`.

        :raise KvmError: when KVM_RUN fails other than by ``EINTR``
        """
        with self._thread_lock:
            self._thread = threading.get_ident()
        try:
            result = enter()
            if result == -errno.EINTR:
                self.run_page[RUN_IMMEDIATE_EXIT] = 0
                return IntrExit()
        finally:
            with self._thread_lock:
                self._thread = None
        if result < 0:
            raise KvmError("KVM_RUN", -result, f"vCPU {self.id}")
        return decode_exit(self.run_page)

    def kick(self) -> None:
        """Make the current or next :meth:`run` return :class:`IntrExit`; any thread.

        :raise KvmError: when :func:`install_kick_handler` was not called
        """
        if not kick_handler_installed():
            raise KvmError("kick", 0, f"no {KICK_SIGNAL.name} handler: call install_kick_handler()")
        with self._thread_lock:
            self.run_page[RUN_IMMEDIATE_EXIT] = 1
            # The running thread cannot leave run() (and exit) while we hold the lock.
            if self._thread is not None and self._thread != threading.get_ident():
                signal.pthread_kill(self._thread, KICK_SIGNAL)

    def complete_pending(self) -> None:
        """Let KVM finish an interrupted PIO/MMIO instruction without entering the guest.

        After an IN or MMIO-read exit, KVM completes the instruction (writes the result,
        advances RIP) at the *next* KVM_RUN. Before overwriting registers (a reset) the
        pending completion must be flushed, or it would land on the new state. This runs
        KVM_RUN with ``immediate_exit`` set. Call it only while no thread runs the vCPU;
        a kick made before the call stays pending, one made during the call is absorbed.
        """
        pending = self.run_page[RUN_IMMEDIATE_EXIT]
        self.run_page[RUN_IMMEDIATE_EXIT] = 1
        try:
            fcntl.ioctl(self.fd, KVM_RUN, 0)
        except OSError as exc:
            if exc.errno != errno.EINTR:
                detail = f"vCPU {self.id} (immediate exit)"
                raise KvmError("KVM_RUN", exc.errno or 0, detail) from exc
        finally:
            self.run_page[RUN_IMMEDIATE_EXIT] = pending

    # --- register state -------------------------------------------------------------------

    def get_regs(self) -> KvmRegs:
        regs = KvmRegs()
        kvm_ioctl(self.fd, KVM_GET_REGS, regs, f"vCPU {self.id}")
        return regs

    def set_regs(self, regs: KvmRegs) -> None:
        kvm_ioctl(self.fd, KVM_SET_REGS, regs, f"vCPU {self.id}")

    def get_sregs(self) -> KvmSregs:
        sregs = KvmSregs()
        kvm_ioctl(self.fd, KVM_GET_SREGS, sregs, f"vCPU {self.id}")
        return sregs

    def set_sregs(self, sregs: KvmSregs) -> None:
        kvm_ioctl(self.fd, KVM_SET_SREGS, sregs, f"vCPU {self.id}")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """``KVM_GET_MSRS``.

        :raise KvmError: naming the first MSR KVM could not read
        """
        wanted = list(indices)
        buf, entries = _msrs_buffer([(index, 0) for index in wanted])
        done = kvm_ioctl(self.fd, KVM_GET_MSRS, buf, f"vCPU {self.id}")
        if done != len(wanted):
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, f"vCPU {self.id}: MSR {wanted[done]:#x}")
        return {int(entry.index): int(entry.data) for entry in entries}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """``KVM_SET_MSRS`` (in the mapping's order).

        :raise KvmError: naming the first MSR KVM refused
        """
        items = list(values.items())
        buf, entries = _msrs_buffer(items)
        del entries
        done = kvm_ioctl(self.fd, KVM_SET_MSRS, buf, f"vCPU {self.id}")
        if done != len(items):
            index, data = items[done]
            raise KvmError(
                "KVM_SET_MSRS", errno.EINVAL, f"vCPU {self.id}: MSR {index:#x} = {data:#x} refused"
            )

    def get_cpuid(self) -> list[CpuidEntry]:
        """``KVM_GET_CPUID2``: the CPUID table set for this vCPU."""
        count = 64
        while True:
            buf, header, entries = cpuid_buffer(count)
            try:
                kvm_ioctl(self.fd, KVM_GET_CPUID2, buf, f"vCPU {self.id}")
            except KvmError as exc:
                if exc.os_errno == errno.E2BIG and count < 4096:
                    count *= 2
                    continue
                raise
            return [CpuidEntry.from_struct(entries[i]) for i in range(header.nent)]

    def set_cpuid(self, table: Sequence[CpuidEntry]) -> None:
        """``KVM_SET_CPUID2``; before the first :meth:`run` (KVM freezes CPUID then)."""
        buf, _, entries = cpuid_buffer(len(table))
        for raw, entry in zip(entries, table, strict=True):
            entry.to_struct(raw)
        del entries
        kvm_ioctl(self.fd, KVM_SET_CPUID2, buf, f"vCPU {self.id}, {len(table)} entries")

    def get_lapic(self) -> bytearray:
        """``KVM_GET_LAPIC``: the 1 KiB local APIC register page."""
        state = KvmLapicState()
        kvm_ioctl(self.fd, KVM_GET_LAPIC, state, f"vCPU {self.id}")
        return bytearray(bytes(state))

    def set_lapic(self, regs: bytes | bytearray) -> None:
        """``KVM_SET_LAPIC`` from a 1 KiB register page."""
        if len(regs) != KVM_APIC_REG_SIZE:
            raise ValueError(f"APIC page is {KVM_APIC_REG_SIZE} bytes, got {len(regs)}")
        state = KvmLapicState.from_buffer_copy(bytes(regs))
        kvm_ioctl(self.fd, KVM_SET_LAPIC, state, f"vCPU {self.id}")

    def get_mp_state(self) -> MpState:
        state = KvmMpState()
        kvm_ioctl(self.fd, KVM_GET_MP_STATE, state, f"vCPU {self.id}")
        return MpState(state.mp_state)

    def set_mp_state(self, value: MpState) -> None:
        kvm_ioctl(self.fd, KVM_SET_MP_STATE, KvmMpState(int(value)), f"vCPU {self.id} {value.name}")

    def get_debugregs(self) -> KvmDebugregs:
        regs = KvmDebugregs()
        kvm_ioctl(self.fd, KVM_GET_DEBUGREGS, regs, f"vCPU {self.id}")
        return regs

    def set_debugregs(self, regs: KvmDebugregs) -> None:
        kvm_ioctl(self.fd, KVM_SET_DEBUGREGS, regs, f"vCPU {self.id}")

    def get_vcpu_events(self) -> KvmVcpuEvents:
        events = KvmVcpuEvents()
        kvm_ioctl(self.fd, KVM_GET_VCPU_EVENTS, events, f"vCPU {self.id}")
        return events

    def set_vcpu_events(self, events: KvmVcpuEvents) -> None:
        kvm_ioctl(self.fd, KVM_SET_VCPU_EVENTS, events, f"vCPU {self.id}")

    def tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ``: the guest TSC frequency."""
        return kvm_ioctl(self.fd, KVM_GET_TSC_KHZ, 0, f"vCPU {self.id}")

    def close(self) -> None:
        """Unmap the run page and close the fd; idempotent. The vCPU must not be running."""
        if not self.run_page.closed:
            self.run_page.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"Vcpu(id={self.id}, fd={self.fd})"
