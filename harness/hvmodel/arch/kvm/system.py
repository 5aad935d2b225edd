"""The KVM system fd (``/dev/kvm``): API version, capabilities, the CPUID KVM can give a
guest, the MSRs it saves; :class:`CpuidEntry`, one leaf of a CPUID table.

Lifecycle of the binding's objects: a :class:`Kvm` is opened first, VMs are made on it
(``Vm(kvm)``, :mod:`.vm`), vCPUs by a VM (:mod:`.vcpu`); they are closed in the reverse
order.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import struct

from .ioctl import KvmError, kvm_ioctl
from .structs import (
    KVM_API_VERSION,
    KVM_CHECK_EXTENSION,
    KVM_GET_API_VERSION,
    KVM_GET_MSR_INDEX_LIST,
    KVM_GET_SUPPORTED_CPUID,
    KVM_GET_VCPU_MMAP_SIZE,
    Cap,
    KvmCpuid2,
    KvmCpuidEntry2,
    KvmMsrList,
)

__all__ = ["CpuidEntry", "Kvm", "cpuid_buffer"]

_sz = ctypes.sizeof


@dataclasses.dataclass(frozen=True, slots=True)
class CpuidEntry:
    """One ``kvm_cpuid_entry2``: the result of CPUID leaf ``function``, subleaf ``index``."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    @classmethod
    def from_struct(cls, raw: KvmCpuidEntry2) -> CpuidEntry:
        return cls(
            int(raw.function),
            int(raw.index),
            int(raw.flags),
            int(raw.eax),
            int(raw.ebx),
            int(raw.ecx),
            int(raw.edx),
        )

    def to_struct(self, raw: KvmCpuidEntry2) -> None:
        raw.function, raw.index, raw.flags = self.function, self.index, self.flags
        raw.eax, raw.ebx, raw.ecx, raw.edx = self.eax, self.ebx, self.ecx, self.edx


def cpuid_buffer(count: int) -> tuple[bytearray, KvmCpuid2, ctypes.Array[KvmCpuidEntry2]]:
    """A ``kvm_cpuid2`` with room for ``count`` entries, plus views of header and entries."""
    buf = bytearray(_sz(KvmCpuid2) + count * _sz(KvmCpuidEntry2))
    header = KvmCpuid2.from_buffer(buf)
    header.nent = count
    entries = (KvmCpuidEntry2 * count).from_buffer(buf, _sz(KvmCpuid2))
    return buf, header, entries


class Kvm:
    """The KVM system fd (``/dev/kvm``).

    Lifecycle: opened (and the API version checked) on construction; VMs are made with
    :class:`Vm(kvm) <harness.hvmodel.arch.kvm.vm.Vm>`; :meth:`close` or the ``with`` block
    closes it, after those VMs are closed (they use it for capabilities, CPUID and the
    vCPU mmap size).

    :param path: the KVM device
    :raise KvmError: when the device cannot be opened or speaks another API version
    """

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(f"open {path}", exc.errno or 0) from exc
        version = kvm_ioctl(self.fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            self.close()
            raise KvmError("KVM_GET_API_VERSION", 0, f"API version {version}, expected {KVM_API_VERSION}")
        self._mmap_size: int | None = None

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 when ``cap`` is missing, else its (positive) value."""
        return kvm_ioctl(self.fd, KVM_CHECK_EXTENSION, int(cap), f"capability {cap}")

    def require(self, *caps: Cap) -> None:
        """Check that every capability in ``caps`` is present.

        :raise KvmError: naming the first missing one
        """
        for cap in caps:
            if not self.check_extension(cap):
                raise KvmError("KVM_CHECK_EXTENSION", errno.ENODEV, f"KVM_CAP_{cap.name} missing")

    @property
    def vcpu_mmap_size(self) -> int:
        """``KVM_GET_VCPU_MMAP_SIZE``: bytes to mmap from a vCPU fd (``kvm_run`` + PIO page)."""
        if self._mmap_size is None:
            self._mmap_size = kvm_ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)
        return self._mmap_size

    def supported_cpuid(self) -> list[CpuidEntry]:
        """``KVM_GET_SUPPORTED_CPUID``: every leaf KVM can present to a guest."""
        count = 64
        while True:
            buf, header, entries = cpuid_buffer(count)
            try:
                kvm_ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as exc:
                if exc.os_errno == errno.E2BIG and count < 4096:
                    count *= 2
                    continue
                raise
            return [CpuidEntry.from_struct(entries[i]) for i in range(header.nent)]

    def msr_index_list(self) -> list[int]:
        """``KVM_GET_MSR_INDEX_LIST``: MSRs that KVM_GET/SET_MSRS save and restore."""
        count = 256
        while True:
            buf = bytearray(_sz(KvmMsrList) + 4 * count)
            KvmMsrList.from_buffer(buf).nmsrs = count
            try:
                kvm_ioctl(self.fd, KVM_GET_MSR_INDEX_LIST, buf)
            except KvmError as exc:
                if exc.os_errno == errno.E2BIG and count < 65536:
                    count *= 4
                    continue
                raise
            found = KvmMsrList.from_buffer(buf).nmsrs
            return list(struct.unpack_from(f"<{found}I", buf, _sz(KvmMsrList)))

    def close(self) -> None:
        """Close the system fd; idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Kvm({self.path!r}, fd={self.fd})"
