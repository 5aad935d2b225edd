"""The exits of ``KVM_RUN``, decoded from a vCPU's run page: :class:`VcpuExit` and its
kinds, :func:`decode_exit`, and :func:`describe_exit` for exits nobody handles
(``FATAL:`` reports, worded like Jailhouse where it has a word).

Exits that carry data read and write it in the run page: valid only until the vCPU runs
again.
"""

from __future__ import annotations

import dataclasses
import mmap
from typing import Final

from .structs import (
    KVM_EXIT_IO_OUT,
    KVM_EXIT_XEN_HCALL,
    RUN_EXIT_INFO,
    RUN_EXIT_REASON,
    RUN_IO,
    RUN_MMIO,
    RUN_MMIO_DATA,
    RUN_MSR,
    RUN_MSR_DATA,
    RUN_MSR_ERROR,
    RUN_U32,
    RUN_XEN_HCALL,
    RUN_XEN_HCALL_RESULT,
    ExitReason,
    KvmRunExitInfo,
    SystemEvent,
)

__all__ = [
    "FailEntryExit",
    "HltExit",
    "InternalErrorExit",
    "IntrExit",
    "IoExit",
    "IoapicEoiExit",
    "MmioExit",
    "MsrExit",
    "OtherExit",
    "ShutdownExit",
    "SystemEventExit",
    "UnknownExit",
    "VcpuExit",
    "XenExit",
    "decode_exit",
    "describe_exit",
]


class VcpuExit:
    """Base of the decoded exits :meth:`~.vcpu.Vcpu.run` returns.

    Exits that carry data (:class:`IoExit`, :class:`MmioExit`, :class:`MsrExit`) read and
    write it in the vCPU's run page: valid only until the next :meth:`~.vcpu.Vcpu.run`.
    """

    __slots__ = ()

    @property
    def reason(self) -> int:
        """The ``KVM_EXIT_*`` code (an :class:`ExitReason` when known)."""
        raise NotImplementedError


@dataclasses.dataclass(slots=True)
class IoExit(VcpuExit):
    """``KVM_EXIT_IO``: an IN/OUT (or INS/OUTS, ``count`` > 1) to ``port``.

    For a read (IN), store the result with :meth:`set_value` / :meth:`set_data` before
    the next :meth:`~.vcpu.Vcpu.run`; for a write (OUT), read :attr:`data` / :meth:`value`.
    """

    @property
    def reason(self) -> int:
        return ExitReason.IO

    port: int
    size: int
    is_write: bool
    count: int
    data_offset: int
    run_page: mmap.mmap = dataclasses.field(repr=False)

    @property
    def data(self) -> bytes:
        """The ``size * count`` data bytes in the run page."""
        return self.run_page[self.data_offset : self.data_offset + self.size * self.count]

    def value(self, index: int = 0) -> int:
        """Element ``index`` of the data, little-endian."""
        start = self.data_offset + index * self.size
        return int.from_bytes(self.run_page[start : start + self.size], "little")

    def set_data(self, data: bytes) -> None:
        """Store ``data`` (exactly ``size * count`` bytes) as the IN result."""
        if len(data) != self.size * self.count:
            raise ValueError(f"IN data is {self.size * self.count} bytes, got {len(data)}")
        self.run_page[self.data_offset : self.data_offset + len(data)] = data

    def set_value(self, value: int, index: int = 0) -> None:
        """Store element ``index`` of the IN result (truncated to ``size`` bytes)."""
        start = self.data_offset + index * self.size
        mask = (1 << (8 * self.size)) - 1
        self.run_page[start : start + self.size] = (value & mask).to_bytes(self.size, "little")


@dataclasses.dataclass(slots=True)
class MmioExit(VcpuExit):
    """``KVM_EXIT_MMIO``: a guest access of ``length`` bytes at ``addr`` outside RAM.

    For a write, :attr:`data` holds the ``length`` bytes written (empty for a read); for
    a read, store the result with :meth:`set_value` / :meth:`set_data`.
    """

    @property
    def reason(self) -> int:
        return ExitReason.MMIO

    addr: int
    length: int
    is_write: bool
    data: bytes
    run_page: mmap.mmap = dataclasses.field(repr=False)

    @property
    def value(self) -> int:
        """The written value (little-endian, ``length`` bytes)."""
        return int.from_bytes(self.data[: self.length], "little")

    def set_data(self, data: bytes) -> None:
        """Store ``data`` (``length`` bytes) as the read result."""
        if len(data) != self.length:
            raise ValueError(f"MMIO read is {self.length} bytes, got {len(data)}")
        self.run_page[RUN_MMIO_DATA : RUN_MMIO_DATA + self.length] = data

    def set_value(self, value: int) -> None:
        """Store the read result (truncated to ``length`` bytes)."""
        mask = (1 << (8 * self.length)) - 1
        self.set_data((value & mask).to_bytes(self.length, "little"))


@dataclasses.dataclass(slots=True)
class MsrExit(VcpuExit):
    """``KVM_EXIT_X86_RDMSR``/``WRMSR`` (only with ``KVM_CAP_X86_USER_SPACE_MSR`` enabled)."""

    index: int
    is_write: bool
    data: int
    exit_reason_bits: int
    run_page: mmap.mmap = dataclasses.field(repr=False)

    @property
    def reason(self) -> int:
        return ExitReason.X86_WRMSR if self.is_write else ExitReason.X86_RDMSR

    def set_value(self, value: int) -> None:
        """Result of a read."""
        data = (value & (2**64 - 1)).to_bytes(8, "little")
        self.run_page[RUN_MSR_DATA : RUN_MSR_DATA + 8] = data

    def set_error(self) -> None:
        """Make the guest's RDMSR/WRMSR raise #GP."""
        self.run_page[RUN_MSR_ERROR] = 1


@dataclasses.dataclass(slots=True)
class HltExit(VcpuExit):
    """``KVM_EXIT_HLT`` (only without an in-kernel irqchip; with one, HLT blocks in KVM)."""

    @property
    def reason(self) -> int:
        return ExitReason.HLT


@dataclasses.dataclass(slots=True)
class ShutdownExit(VcpuExit):
    """``KVM_EXIT_SHUTDOWN``: the guest triple-faulted."""

    @property
    def reason(self) -> int:
        return ExitReason.SHUTDOWN


@dataclasses.dataclass(slots=True)
class IntrExit(VcpuExit):
    """``KVM_EXIT_INTR``: KVM_RUN returned ``EINTR`` (a :meth:`~.vcpu.Vcpu.kick` or another signal)."""

    @property
    def reason(self) -> int:
        return ExitReason.INTR


@dataclasses.dataclass(slots=True)
class InternalErrorExit(VcpuExit):
    """``KVM_EXIT_INTERNAL_ERROR`` (suberror 1 = emulation failure, 3 = delivery event)."""

    @property
    def reason(self) -> int:
        return ExitReason.INTERNAL_ERROR

    suberror: int
    data: tuple[int, ...]


@dataclasses.dataclass(slots=True)
class FailEntryExit(VcpuExit):
    """``KVM_EXIT_FAIL_ENTRY``: the hardware refused the guest state."""

    @property
    def reason(self) -> int:
        return ExitReason.FAIL_ENTRY

    hardware_entry_failure_reason: int
    cpu: int


@dataclasses.dataclass(slots=True)
class SystemEventExit(VcpuExit):
    """``KVM_EXIT_SYSTEM_EVENT`` (``type`` is a :class:`SystemEvent` value)."""

    @property
    def reason(self) -> int:
        return ExitReason.SYSTEM_EVENT

    type: int
    data: tuple[int, ...]


@dataclasses.dataclass(slots=True)
class UnknownExit(VcpuExit):
    """``KVM_EXIT_UNKNOWN`` with the hardware exit code."""

    @property
    def reason(self) -> int:
        return ExitReason.UNKNOWN

    hardware_exit_reason: int


@dataclasses.dataclass(slots=True)
class XenExit(VcpuExit):
    """``KVM_EXIT_XEN``, when the VM intercepts hypercalls (``KVM_XEN_HVM_CONFIG``; kernels
    with ``CONFIG_KVM_XEN``). For ``type`` ``KVM_EXIT_XEN_HCALL`` (a VMCALL/VMMCALL) the
    other fields are the hypercall's; set its result with :meth:`set_result`.

    :param type: ``KVM_EXIT_XEN_*``
    :param longmode: the guest was in 64-bit mode (else the arguments are 32-bit)
    :param cpl: the caller's privilege level
    :param input: RAX, the hypercall code
    :param params: RDI, RSI, RDX, R10, R8, R9 in long mode (KVM leaves them 0 otherwise)
    """

    @property
    def reason(self) -> int:
        return ExitReason.XEN

    type: int
    longmode: bool
    cpl: int
    input: int
    params: tuple[int, ...]
    run_page: mmap.mmap = dataclasses.field(repr=False)

    @property
    def is_hcall(self) -> bool:
        return self.type == KVM_EXIT_XEN_HCALL

    def set_result(self, value: int) -> None:
        """The hypercall's result: RAX once KVM completes the instruction."""
        data = (value & (2**64 - 1)).to_bytes(8, "little")
        self.run_page[RUN_XEN_HCALL_RESULT : RUN_XEN_HCALL_RESULT + 8] = data


@dataclasses.dataclass(slots=True)
class IoapicEoiExit(VcpuExit):
    """``KVM_EXIT_IOAPIC_EOI``: with a split irqchip, the guest ended a level-triggered
    interrupt of ``vector`` (one an IOAPIC pin's GSI route delivered); the IOAPIC, in
    user space, clears the pin's remote IRR."""

    @property
    def reason(self) -> int:
        return ExitReason.IOAPIC_EOI

    vector: int


@dataclasses.dataclass(slots=True)
class OtherExit(VcpuExit):
    """Any exit reason not decoded above (``code`` is the raw ``exit_reason``)."""

    code: int

    @property
    def reason(self) -> int:
        try:
            return ExitReason(self.code)
        except ValueError:
            return self.code

    @property
    def name(self) -> str:
        try:
            return f"KVM_EXIT_{ExitReason(self.code).name}"
        except ValueError:
            return f"exit reason {self.code}"



def decode_exit(run_page: mmap.mmap) -> VcpuExit:
    """The exit ``KVM_RUN`` left in ``run_page``."""
    (reason,) = RUN_U32.unpack_from(run_page, RUN_EXIT_REASON)
    if reason == ExitReason.IO:
        direction, size, port, count, data_offset = RUN_IO.unpack_from(run_page, RUN_EXIT_INFO)
        return IoExit(port, size, direction == KVM_EXIT_IO_OUT, count, data_offset, run_page)
    if reason == ExitReason.MMIO:
        addr, data, length, is_write = RUN_MMIO.unpack_from(run_page, RUN_EXIT_INFO)
        return MmioExit(addr, length, bool(is_write), data[:length] if is_write else b"", run_page)
    return _decode_rare(run_page, reason)


def _decode_rare(run_page: mmap.mmap, reason: int) -> VcpuExit:
    info = KvmRunExitInfo.from_buffer_copy(run_page, RUN_EXIT_INFO)
    if reason == ExitReason.HLT:
        return HltExit()
    if reason == ExitReason.SHUTDOWN:
        return ShutdownExit()
    if reason == ExitReason.INTR:
        return IntrExit()
    if reason == ExitReason.INTERNAL_ERROR:
        count = min(int(info.internal.ndata), 16)
        return InternalErrorExit(int(info.internal.suberror), tuple(info.internal.data[:count]))
    if reason == ExitReason.FAIL_ENTRY:
        return FailEntryExit(int(info.fail_entry.hardware_entry_failure_reason), int(info.fail_entry.cpu))
    if reason == ExitReason.SYSTEM_EVENT:
        count = min(int(info.system_event.ndata), 16)
        event = info.system_event
        return SystemEventExit(int(event.type), tuple(event.data[:count]))
    if reason in (ExitReason.X86_RDMSR, ExitReason.X86_WRMSR):
        _, bits, index, data = RUN_MSR.unpack_from(run_page, RUN_EXIT_INFO)
        return MsrExit(index, reason == ExitReason.X86_WRMSR, data, bits, run_page)
    if reason == ExitReason.UNKNOWN:
        return UnknownExit(int(info.hw.hardware_exit_reason))
    if reason == ExitReason.IOAPIC_EOI:
        return IoapicEoiExit(int(info.eoi.vector))
    if reason == ExitReason.XEN:
        kind, longmode, cpl, code, _result, *params = RUN_XEN_HCALL.unpack_from(run_page, RUN_EXIT_INFO)
        return XenExit(kind, bool(longmode), cpl, code, tuple(params), run_page)
    return OtherExit(reason)



_INTERNAL_ERRORS: Final = {
    1: "emulation failure",
    2: "simultaneous exceptions",
    3: "delivery event",
    4: "unexpected exit reason",
}


def describe_exit(exit_: VcpuExit) -> str:
    """One line for an exit nobody handled, worded like Jailhouse where it has a word.

    IO and MMIO give Jailhouse's ``Invalid PIO ...`` / ``Invalid MMIO/RAM ...`` texts
    (without the ``FATAL: `` prefix, which the caller adds).
    """
    if isinstance(exit_, IoExit):
        direction = "write" if exit_.is_write else "read"
        return f"Invalid PIO {direction}, port: {exit_.port:x} size: {exit_.size}"
    if isinstance(exit_, MmioExit):
        direction = "write" if exit_.is_write else "read"
        return f"Invalid MMIO/RAM {direction}, addr: 0x{exit_.addr:016x} size: {exit_.length}"
    if isinstance(exit_, ShutdownExit):
        return "Triple fault (KVM_EXIT_SHUTDOWN)"
    if isinstance(exit_, InternalErrorExit):
        what = _INTERNAL_ERRORS.get(exit_.suberror, "unknown")
        data = " ".join(f"{value:#x}" for value in exit_.data)
        return f"KVM internal error, suberror {exit_.suberror} ({what}), data: {data or '-'}"
    if isinstance(exit_, FailEntryExit):
        return (
            f"VM-Entry failure, hardware reason {exit_.hardware_entry_failure_reason:#x} "
            f"(host CPU {exit_.cpu})"
        )
    if isinstance(exit_, SystemEventExit):
        try:
            name = SystemEvent(exit_.type).name
        except ValueError:
            name = str(exit_.type)
        return f"System event {name}, data: {' '.join(f'{v:#x}' for v in exit_.data) or '-'}"
    if isinstance(exit_, UnknownExit):
        return f"Unknown exit, hardware reason {exit_.hardware_exit_reason:#x}"
    if isinstance(exit_, MsrExit):
        access = "write" if exit_.is_write else "read"
        return f"Unhandled MSR {access}: {exit_.index:x}"
    reason = exit_.reason
    name = f"KVM_EXIT_{reason.name}" if isinstance(reason, ExitReason) else f"exit {reason}"
    return f"Unhandled exit {name}"

