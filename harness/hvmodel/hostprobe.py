"""The Linux the driver runs on, as the driver sees it (CPUs, HVM technology,
reserved memory, timer frequencies), and its JSON form for the daemon's ``state``
reply; the host side rebuilds the guest's driver from it.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Final

from .cpus import parse_cpu_list
from .driver import HostInfo

__all__ = ["host_from_wire", "host_to_wire", "parse_memmap", "probe_host"]


_SIZE_SUFFIX: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memmap(cmdline: str) -> tuple[tuple[int, int], ...]:
    """The ranges ``memmap=SIZE$START`` reserves on a kernel command line."""
    ranges = []
    for match in re.finditer(r"(?:^|\s)memmap=(\S+)", cmdline):
        for item in match.group(1).split(","):
            found = re.fullmatch(r"(0x[0-9a-fA-F]+|\d+)([kKmMgGtT]?)\$(0x[0-9a-fA-F]+|\d+)([kKmMgGtT]?)",
                                 item)
            if found is None:
                continue
            size = int(found.group(1), 0) * _SIZE_SUFFIX[found.group(2).lower()]
            start = int(found.group(3), 0) * _SIZE_SUFFIX[found.group(4).lower()]
            ranges.append((start, size))
    return tuple(ranges)


def _read_text(path: str, default: str = "") -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read()
    except OSError:
        return default


def probe_host() -> HostInfo:
    """The Linux this process runs on, as the driver sees it: online and possible CPUs,
    SVM or VMX (AMD preferred, as the driver picks its firmware), VMX enabled in
    ``IA32_FEATURE_CONTROL`` (when the ``msr`` device can tell), ``memmap=`` reservations,
    the TSC frequency from ``/proc/cpuinfo``. The APIC timer frequency is not exposed
    by Linux; the :class:`~harness.hvmodel.driver.HostInfo` default is kept.
    """
    defaults = HostInfo()
    online = parse_cpu_list(_read_text("/sys/devices/system/cpu/online")) or set(defaults.online_cpus)
    possible = parse_cpu_list(_read_text("/sys/devices/system/cpu/possible"))
    cpuinfo = _read_text("/proc/cpuinfo")
    flags: set[str] = set()
    mhz = 0.0
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "cpu MHz" and not mhz:
            with contextlib.suppress(ValueError):
                mhz = float(value)
    vendor = "amd" if "svm" in flags else "intel" if "vmx" in flags else ""
    vmx_allowed = True
    if vendor == "intel":
        try:
            fd = os.open("/dev/cpu/0/msr", os.O_RDONLY)
            try:
                feature = int.from_bytes(os.pread(fd, 8, 0x3A), "little")
                vmx_allowed = bool(feature & (1 << 2))
            finally:
                os.close(fd)
        except OSError:
            pass
    reserved = parse_memmap(_read_text("/proc/cmdline")) or None
    return HostInfo(
        online_cpus=frozenset(online),
        possible_cpus=max(possible) + 1 if possible else max(online) + 1,
        cpu_vendor=vendor,
        vmx_allowed=vmx_allowed,
        reserved=reserved,
        tsc_khz=round(mhz * 1000) if mhz else defaults.tsc_khz,
        apic_khz=defaults.apic_khz,
    )


def host_to_wire(host: HostInfo) -> dict[str, Any]:
    """A :class:`~harness.hvmodel.driver.HostInfo` as JSON (for the ``state`` reply)."""
    return {
        "online_cpus": sorted(host.online_cpus),
        "possible_cpus": host.possible_cpus,
        "cpu_vendor": host.cpu_vendor,
        "vmx_allowed": host.vmx_allowed,
        "firmware": host.firmware,
        "reserved": None if host.reserved is None else [list(r) for r in host.reserved],
        "tsc_khz": host.tsc_khz,
        "apic_khz": host.apic_khz,
        "pci_devices": None if host.pci_devices is None else sorted(map(list, host.pci_devices)),
    }


def host_from_wire(value: dict[str, Any]) -> HostInfo:
    """The inverse of :func:`host_to_wire` (the host side rebuilds the guest's driver)."""
    reserved = value.get("reserved")
    pci = value.get("pci_devices")
    return HostInfo(
        online_cpus=frozenset(value["online_cpus"]),
        possible_cpus=value["possible_cpus"],
        cpu_vendor=value["cpu_vendor"],
        vmx_allowed=value["vmx_allowed"],
        firmware=value["firmware"],
        reserved=None if reserved is None else tuple((int(a), int(b)) for a, b in reserved),
        tsc_khz=value["tsc_khz"],
        apic_khz=value["apic_khz"],
        pci_devices=None if pci is None else frozenset((int(d), int(b)) for d, b in pci),
    )
