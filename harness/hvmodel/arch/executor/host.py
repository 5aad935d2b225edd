"""The lab's Linux as the driver needs it (:class:`~harness.hvmodel.driver.HostInfo`):
online CPUs, the CPU vendor and APIC mode, ``memmap=`` reservations, PCI devices, and
the TSC and local-APIC timer frequencies as KVM gives them to cells. No Jailhouse
counterpart: Jailhouse's driver reads these from the kernel it runs in.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Final

from ...cpus import parse_cpu_list
from ..kvm import Kvm, Vm
from ..vcpu import apic_khz, measure_tsc_khz

if TYPE_CHECKING:
    from ...driver import HostInfo

__all__ = [
    "cpu_vendor",
    "describe_host",
    "host_info",
    "online_cpus",
    "pci_devices",
    "reserved_ranges",
    "x2apic_mode",
]


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """``amd`` (SVM), ``intel`` (VMX) or ``""`` from the CPU flags."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "amd" if "svm" in flags else "intel" if "vmx" in flags else ""
    except OSError:
        pass
    return ""


#: IA32_APIC_BASE and its x2APIC-enable bit (EXTD)
_MSR_APIC_BASE: Final = 0x1B
_APIC_BASE_EXTD: Final = 1 << 10


def x2apic_mode(cpu: int = 0, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the local APICs run in x2APIC mode (Jailhouse's ``using_x2apic``):
    IA32_APIC_BASE.EXTD through the msr driver (``/dev/cpu/N/msr``), else whether the
    CPU flags show ``x2apic`` (Linux turns x2APIC on where the CPU and interrupt
    remapping allow and clears the flag where it keeps xAPIC mode on purpose)."""
    try:
        fd = os.open(f"/dev/cpu/{cpu}/msr", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            data = os.pread(fd, 8, _MSR_APIC_BASE)
        except OSError:
            data = b""
        finally:
            os.close(fd)
        if len(data) == 8:
            return bool(int.from_bytes(data, "little") & _APIC_BASE_EXTD)
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return "x2apic" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def online_cpus(path: str = "/sys/devices/system/cpu/online") -> frozenset[int]:
    """The CPUs Linux has online (empty when unknown)."""
    try:
        with open(path, encoding="ascii") as handle:
            return parse_cpu_list(handle.read())
    except (OSError, ValueError):
        return frozenset()


_IOMEM_LINE: Final = re.compile(r"^([0-9a-fA-F]+)-([0-9a-fA-F]+) : (.*)$")


def reserved_ranges(iomem: str = "/proc/iomem") -> tuple[tuple[int, int], ...]:
    """Top-level ``Reserved`` ranges of ``/proc/iomem`` (``memmap=`` windows) as
    ``(start, size)``."""
    found: list[tuple[int, int]] = []
    try:
        with open(iomem, encoding="ascii", errors="replace") as handle:
            for line in handle:
                match = _IOMEM_LINE.match(line.rstrip("\n"))
                if match and match.group(3).strip().lower() == "reserved":
                    start, end = int(match.group(1), 16), int(match.group(2), 16)
                    found.append((start, end - start + 1))
    except OSError:
        pass
    return tuple(found)


def host_info(kvm_path: str = "/dev/kvm") -> HostInfo:
    """The lab's Linux for :class:`~harness.hvmodel.driver.Driver`: online CPUs, vendor,
    ``memmap=`` reservations, and the TSC and local-APIC timer frequencies *as KVM gives
    them to cells* (``KVM_GET_TSC_KHZ`` of a scratch vCPU; KVM's APIC bus: 1 GHz unless
    reconfigured), which the driver writes into the system config when it has zeros.

    The scratch VM comes and goes; with an executor at hand, prefer
    :meth:`ExecutorArch.host_info <harness.hvmodel.arch.executor.ExecutorArch.host_info>`,
    which measures on its keeper VM.
    """
    with Kvm(kvm_path) as kvm:
        vm = Vm(kvm)
        try:
            tsc = measure_tsc_khz(vm.create_vcpu(0))
        finally:
            vm.close()
        apic = apic_khz(kvm)
    return describe_host(tsc, apic)


_PCI_NAME: Final = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")


def pci_devices(path: str = "/sys/bus/pci/devices") -> frozenset[tuple[int, int]] | None:
    """The PCI functions Linux has, as (domain, BDF); None when sysfs cannot tell."""
    try:
        names = os.listdir(path)
    except OSError:
        return None
    found: set[tuple[int, int]] = set()
    for name in names:
        match = _PCI_NAME.match(name)
        if match:
            domain, bus, dev, fn = (int(part, 16) for part in match.groups())
            found.add((domain, bus << 8 | dev << 3 | fn))
    return frozenset(found)


def describe_host(tsc_khz: int, apic_khz: int) -> HostInfo:
    """:class:`~harness.hvmodel.driver.HostInfo` of this machine with the given timer
    frequencies (kHz)."""
    from ...driver import HostInfo

    online = online_cpus()
    possible = online_cpus("/sys/devices/system/cpu/possible")
    return HostInfo(
        online_cpus=online or frozenset({0}),
        possible_cpus=(max(possible) + 1) if possible else max(online, default=0) + 1,
        cpu_vendor=cpu_vendor(),
        reserved=reserved_ranges() or None,
        tsc_khz=tsc_khz,
        apic_khz=apic_khz,
        pci_devices=pci_devices(),
    )
