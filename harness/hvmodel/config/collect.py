"""Collect what a root cell sees, for ``config create``; models ``jailhouse config collect``.

Jailhouse's ``tools/jailhouse-config-collect`` packs the files ``jailhouse config create``
reads into a tarball for another machine. jhlab's collector prints the same facts as one
JSON document instead, raw (file contents, table bytes), so that all interpretation lives
in :mod:`.create` and can be replayed offline from a stored document::

    python3 -m harness.hvmodel.config.collect [-o FACTS.json] [--root DIR] [--no-devmem]

It runs in the root cell (Debian's python3, standard library only) and must run as root:
``/proc/iomem`` shows zero addresses to other users, PCI config space beyond 64 bytes and
the ACPI tables are root-only. What it reads:

* ``/proc/cmdline`` (the ``memmap=`` reservation), ``/proc/iomem``, ``/proc/ioports``;
* ``/sys/devices/system/cpu/{online,present,possible}`` and the CPU vendor;
* every ``/sys/bus/pci/devices/*``: its ``config`` (256 bytes, 4096 for PCI Express; the
  trailing zero bytes are left out and ``config_size`` says how long it was), its
  ``resource`` file (BAR, ROM and bridge windows: start, end, flags) and its driver;
* the ACPI tables ``APIC`` (MADT: IOAPICs), ``DMAR`` (VT-d units and device scopes),
  ``FACP`` (PM timer port), ``MCFG`` (MMCONFIG), ``HPET`` and ``IVRS`` when present;
* where the ACPI tables lie in physical memory, found by walking RSDP → RSDT/XSDT → tables
  through ``/dev/mem`` (not in sysfs: the generator needs it to keep the firmware range
  holding them readable, as Jailhouse's ``qemu-x86.c`` does by hand);
* DMI vendor and product, the 8250 UARTs (``/sys/class/tty/ttyS*``), whether
  ``/sys/devices/jailhouse/enabled`` says the hypervisor is enabled.

Anything that cannot be read is left out and named in ``warnings``; the document is
printed anyway (the generator decides what it cannot do without).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import struct
import sys
from collections.abc import Sequence
from typing import Any, Final

#: Identifies the document; :mod:`.create` refuses other formats and newer versions.
FACTS_FORMAT: Final = "jhlab-config-facts"
FACTS_VERSION: Final = 1

#: ACPI tables the generator reads (sysfs names).
ACPI_TABLES: Final = ("APIC", "DMAR", "FACP", "MCFG", "HPET", "IVRS")

_PCI_DIR: Final = "sys/bus/pci/devices"
_CPU_DIR: Final = "sys/devices/system/cpu"
_TTY_DIR: Final = "sys/class/tty"
_TTY_ATTRS: Final = ("port", "io_type", "iomem_base", "iomem_reg_shift")
#: Where a BIOS keeps the RSDP: the first KiB of the EBDA, and 0xe0000..0xfffff.
_BIOS_AREA: Final = (0xE0000, 0x20000)
_RSDP_SIGNATURE: Final = b"RSD PTR "
#: An ACPI table longer than this is taken as garbage (the DSDT of big servers is < 1 MiB).
_MAX_TABLE: Final = 1 << 20


class _Collector:
    """Reads files below ``root``; what fails goes to :attr:`warnings`."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.warnings: list[str] = []

    def path(self, name: str) -> str:
        return os.path.join(self.root, name.lstrip("/"))

    def text(self, name: str, *, optional: bool = False) -> str | None:
        try:
            with open(self.path(name), encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError as exc:
            if not optional:
                self.warnings.append(f"cannot read /{name.lstrip('/')}: {exc.strerror or exc}")
            return None

    def data(self, name: str, *, optional: bool = False) -> bytes | None:
        try:
            with open(self.path(name), "rb") as handle:
                return handle.read()
        except OSError as exc:
            if not optional:
                self.warnings.append(f"cannot read /{name.lstrip('/')}: {exc.strerror or exc}")
            return None

    def listdir(self, name: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(name)))
        except OSError as exc:
            self.warnings.append(f"cannot list /{name}: {exc.strerror or exc}")
            return []


def _line(text: str | None) -> str | None:
    return None if text is None else text.strip()


def _cpu_vendor(cpuinfo: str | None) -> str | None:
    for line in (cpuinfo or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    return None


def _pci_functions(col: _Collector) -> list[dict[str, Any]]:
    functions = []
    for slot in col.listdir(_PCI_DIR):
        base = f"{_PCI_DIR}/{slot}"
        config = col.data(f"{base}/config")
        resource = col.text(f"{base}/resource")
        if config is None or resource is None:
            continue
        driver = None
        with contextlib.suppress(OSError):  # no driver bound
            driver = os.path.basename(os.readlink(col.path(f"{base}/driver")))
        functions.append({
            "slot": slot,
            "config_size": len(config),
            "config": config.rstrip(b"\0").hex(),
            "resource": resource,
            "driver": driver,
        })
    return functions


def _serial_ports(col: _Collector) -> dict[str, dict[str, str]]:
    ports: dict[str, dict[str, str]] = {}
    for name in col.listdir(_TTY_DIR):
        if not name.startswith("ttyS"):
            continue
        attrs = {}
        for attr in _TTY_ATTRS:
            value = _line(col.text(f"{_TTY_DIR}/{name}/{attr}", optional=True))
            if value is not None:
                attrs[attr] = value
        if attrs:
            ports[name] = attrs
    return ports


class _PhysMem:
    """Reads physical memory through ``/dev/mem`` with page-aligned ``mmap``.

    ``read(2)`` of ``/dev/mem`` refuses firmware ranges above 1 MiB on Debian's kernel
    (``CONFIG_IO_STRICT_DEVMEM``) where a mapping is allowed, so only mappings are used.
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, address: int, length: int) -> bytes:
        start = address & ~(mmap.PAGESIZE - 1)
        end = (address + length + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
        with mmap.mmap(self.fd, end - start, mmap.MAP_SHARED, mmap.PROT_READ,
                       offset=start) as window:
            return window[address - start:address - start + length]

    def close(self) -> None:
        os.close(self.fd)


def _checksum_ok(data: bytes) -> bool:
    return sum(data) & 0xFF == 0


def _find_rsdp(col: _Collector, mem: _PhysMem) -> int | None:
    systab = col.text("sys/firmware/efi/systab", optional=True)
    if systab:
        found: dict[str, int] = {}
        for line in systab.splitlines():
            key, _, value = line.partition("=")
            if key in ("ACPI20", "ACPI"):
                found[key] = int(value, 0)
        if found:
            return found.get("ACPI20", found.get("ACPI"))
    ebda = int(struct.unpack("<H", mem.read(0x40E, 2))[0]) << 4
    areas = [(ebda, 0x400)] if 0x80000 <= ebda < 0xA0000 else []
    areas.append(_BIOS_AREA)
    for start, size in areas:
        block = mem.read(start, size)
        for offset in range(0, size - 20, 16):
            if block[offset:offset + 8] == _RSDP_SIGNATURE and _checksum_ok(
                    block[offset:offset + 20]):
                return start + offset
    return None


def _header(mem: _PhysMem, address: int) -> tuple[str, int]:
    head = mem.read(address, 8)
    signature = head[:4].decode("ascii", "replace")
    length = struct.unpack_from("<I", head, 4)[0]
    if not 36 <= length <= _MAX_TABLE and signature != "FACS":
        raise ValueError(f"implausible length {length:#x} of table {signature!r} at "
                         f"{address:#x}")
    return signature, length


def _acpi_locations(col: _Collector) -> dict[str, Any]:
    """The RSDP and every table reachable from it, as {signature, address, length}."""
    result: dict[str, Any] = {"rsdp": None, "tables": []}
    try:
        mem = _PhysMem(col.path("dev/mem"))
    except OSError as exc:
        col.warnings.append(f"cannot open /dev/mem to locate the ACPI tables: "
                            f"{exc.strerror or exc}")
        return result
    tables: list[dict[str, Any]] = result["tables"]
    seen: set[int] = set()

    def add(address: int) -> tuple[str, int] | None:
        if not address or address in seen:
            return None
        seen.add(address)
        signature, length = _header(mem, address)
        tables.append({"signature": signature, "address": address, "length": length})
        return signature, length

    try:
        rsdp = _find_rsdp(col, mem)
        if rsdp is None:
            col.warnings.append("no ACPI RSDP found (EFI systab, EBDA, 0xe0000-0xfffff)")
            return result
        raw = mem.read(rsdp, 36)
        revision = raw[15]
        result["rsdp"] = {"address": rsdp, "revision": revision,
                          "length": struct.unpack_from("<I", raw, 20)[0] if revision >= 2
                          else 20}
        xsdt = struct.unpack_from("<Q", raw, 24)[0] if revision >= 2 else 0
        root, width = (xsdt, 8) if xsdt else (struct.unpack_from("<I", raw, 16)[0], 4)
        found = add(root)
        if found is None:
            return result
        body = mem.read(root + 36, found[1] - 36)
        entries = struct.unpack(f"<{len(body) // width}{'Q' if width == 8 else 'I'}",
                                body[:len(body) // width * width])
        for entry in entries:
            found = add(entry)
            if found is None or found[0] != "FACP":
                continue
            facp = mem.read(entry, min(found[1], 148))
            pointers = [struct.unpack_from("<I", facp, 36)[0],
                        struct.unpack_from("<I", facp, 40)[0]]
            if len(facp) >= 148:
                pointers += [struct.unpack_from("<Q", facp, 132)[0],
                             struct.unpack_from("<Q", facp, 140)[0]]
            for pointer in pointers:
                add(pointer)
    except (OSError, ValueError, struct.error) as exc:
        col.warnings.append(f"locating the ACPI tables through /dev/mem failed: {exc}")
    finally:
        mem.close()
    return result


def collect(root: str = "/", *, devmem: bool = True) -> dict[str, Any]:
    """Collect the raw facts ``config create`` works from.

    :param root: read the files below this directory instead of ``/`` (a copied tree)
    :param devmem: locate the ACPI tables through ``/dev/mem`` (root only; off for trees)
    :return: the JSON-able facts document
    """
    col = _Collector(root)
    if root == "/" and hasattr(os, "geteuid") and os.geteuid() != 0:
        col.warnings.append("not running as root: /proc/iomem addresses, PCI config space "
                            "and ACPI tables are incomplete")
    cpus = {name: _line(col.text(f"{_CPU_DIR}/{name}", optional=name != "online"))
            for name in ("online", "present", "possible")}
    acpi = {}
    for name in ACPI_TABLES:
        data = col.data(f"sys/firmware/acpi/tables/{name}",
                        optional=name in ("HPET", "IVRS", "DMAR"))
        if data is not None:
            acpi[name] = data.hex()
    enabled = _line(col.text("sys/devices/jailhouse/enabled", optional=True))
    facts: dict[str, Any] = {
        "format": FACTS_FORMAT,
        "version": FACTS_VERSION,
        "kernel": _line(col.text("proc/sys/kernel/osrelease", optional=True)),
        "cmdline": _line(col.text("proc/cmdline")),
        "cpu_vendor": _cpu_vendor(col.text("proc/cpuinfo")),
        "cpus": cpus,
        "iomem": col.text("proc/iomem"),
        "ioports": col.text("proc/ioports"),
        "pci": _pci_functions(col),
        "acpi_tables": acpi,
        "acpi_locations": _acpi_locations(col) if devmem else {"rsdp": None, "tables": []},
        "dmi": {name: _line(col.text(f"sys/class/dmi/id/{name}", optional=True))
                for name in ("sys_vendor", "product_name")},
        "serial": _serial_ports(col),
        "jailhouse_enabled": enabled,
    }
    facts["warnings"] = col.warnings
    return facts


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m harness.hvmodel.config.collect``: print (or write) the facts document.

    :return: 0, or 1 when the output cannot be written
    """
    parser = argparse.ArgumentParser(
        prog="python3 -m harness.hvmodel.config.collect",
        description="Collect the facts 'config create' needs, as JSON (run as root).")
    parser.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    parser.add_argument("--root", default="/", metavar="DIR",
                        help="read a copied tree below DIR (implies --no-devmem)")
    parser.add_argument("--no-devmem", action="store_true",
                        help="do not locate the ACPI tables through /dev/mem")
    args = parser.parse_args(None if argv is None else list(argv))
    facts = collect(args.root, devmem=not args.no_devmem and args.root == "/")
    text = json.dumps(facts, indent=1) + "\n"
    if args.output and args.output != "-":
        try:
            with open(args.output, "w", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as exc:
            sys.stderr.write(f"collect: cannot write {args.output}: {exc.strerror or exc}\n")
            return 1
    else:
        sys.stdout.write(text)
    for warning in facts["warnings"]:
        sys.stderr.write(f"WARNING: {warning}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
