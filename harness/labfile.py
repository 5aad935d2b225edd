"""Lab descriptions: a machine, its devices and its reserved memory, as a TOML file.

A lab file is data, not code.  The default lab (``harness/labs/default.toml``) is the
machine Jailhouse's ``qemu-x86.cell`` was written for.  Keys::

    name = "default"                 # lab name (letters, digits, - and _)
    description = "..."

    [machine]
    accel = "auto"                   # auto | kvm | tcg
    cpus = 4
    memory = "1G"                    # guest RAM (K/M/G suffixes)
    reserve = "82M@0x3a000000"       # memmap= window for hypervisor and cells, or ""
    iommu = "intel"                  # intel | none
    cmdline = ""                     # appended to the root cell's kernel command line
    boot_timeout = 300               # seconds from start to root-cell ready
    management_nic = "04.0"          # slot of the harness's virtio-net (ssh)

    [[device]]                       # one QEMU -device each, in this order
    driver = "e1000e"
    addr = "02.0"                    # any other key becomes a device property
    netdev = "lan"

    [[netdev]]                       # networks for lab devices
    id = "lan"
    type = "user"                    # user: QEMU user-mode network
    restrict = true                  #   no connection to the outside
    # type = "tap"                   # tap: host end in a private network namespace
    # address = "192.168.77.1/24"    #   the host end's address
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Final

from harness.errors import LabFileError

ACCELS = ("auto", "kvm", "tcg")
IOMMUS = ("intel", "none")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_SLOT = re.compile(r"^[0-9a-fA-F]{1,2}\.[0-7]$")
_SIZE = re.compile(r"^(\d+|0x[0-9a-fA-F]+)\s*([KMG]?)i?B?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
#: Properties the harness sets itself; a lab file may not override them.
_RESERVED_DEVICE_IDS = ("mgmt", "rootdisk")


def parse_size(text: str | int, what: str) -> int:
    """``"82M"`` → 85983232; ints pass through.  :raise ValueError: naming ``what``."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.match(str(text).strip())
    if not match:
        raise ValueError(f"{what}: {text!r} is not a size (examples: 1G, 82M, 0x1000)")
    number, unit = match.groups()
    return int(number, 0) * _UNITS[unit.upper()]


def format_size(size: int) -> str:
    """Shortest exact K/M/G spelling of ``size``."""
    for unit in ("G", "M", "K"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


@dataclass(frozen=True, kw_only=True)
class Reserve:
    """A window of guest RAM hidden from the root cell's kernel (``memmap=SIZE$ADDR``)."""

    size: int
    address: int

    @property
    def kernel_arg(self) -> str:
        return f"memmap={format_size(self.size)}${self.address:#x}"

    def __str__(self) -> str:
        return f"{format_size(self.size)} at {self.address:#x}-{self.address + self.size:#x}"


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One ``-device``: the driver and its properties (``addr`` included)."""

    driver: str
    props: tuple[tuple[str, str], ...] = ()

    def qemu_arg(self) -> str:
        return ",".join([self.driver, *(f"{k}={v}" for k, v in self.props)])

    def prop(self, key: str) -> str | None:
        return dict(self.props).get(key)


@dataclass(frozen=True, kw_only=True)
class NetdevSpec:
    """A network a lab device attaches to: QEMU user-mode, or a tap whose host end sits
    in the lab's private network namespace."""

    id: str
    type: str = "user"
    restrict: bool = True
    address: str = ""

    @property
    def ifname(self) -> str:
        """Name of the tap in the lab's namespace."""
        return f"{self.id}0"[:15]


@dataclass(frozen=True, kw_only=True)
class LabSpec:
    """A validated lab description."""

    name: str
    description: str = ""
    source: str = "<lab>"
    accel: str = "auto"
    cpus: int = 4
    memory: int = 2**30
    reserve: Reserve | None = None
    iommu: str = "intel"
    cmdline: str = ""
    boot_timeout: float = 300.0
    management_nic: str = "04.0"
    devices: tuple[DeviceSpec, ...] = ()
    netdevs: tuple[NetdevSpec, ...] = field(default=())

    @property
    def memory_mib(self) -> int:
        return self.memory // 2**20


def _expect(table: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str,
            where: str, default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise LabFileError(path, f"{where}{key} must be {names}, not {value!r}")
    return value


def _check_keys(table: dict[str, Any], allowed: set[str], path: str, where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise LabFileError(
            path, f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in "
            f"{where or 'the top level'} (known: {', '.join(sorted(allowed))})"
        )


def parse_lab(text: str, source: str = "<lab>") -> LabSpec:
    """Parse and validate a lab description.  :raise LabFileError: naming key and fix."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LabFileError(source, f"not valid TOML: {exc}") from exc
    _check_keys(data, {"name", "description", "machine", "device", "netdev"}, source, "")
    name = _expect(data, "name", str, source, "", None)
    if name is None:
        raise LabFileError(source, 'missing "name" (e.g. name = "mylab")')
    if not _NAME.match(name):
        raise LabFileError(source, f"name {name!r} may only use letters, digits, - and _")
    machine = _expect(data, "machine", dict, source, "", {})
    _check_keys(machine, {"accel", "cpus", "memory", "reserve", "iommu", "cmdline",
                          "boot_timeout", "management_nic"}, source, "[machine]")
    where = "machine."
    accel = _expect(machine, "accel", str, source, where, "auto")
    if accel not in ACCELS:
        raise LabFileError(source, f"machine.accel must be one of {', '.join(ACCELS)}, not {accel!r}")
    cpus = _expect(machine, "cpus", int, source, where, 4)
    if not 1 <= cpus <= 64:
        raise LabFileError(source, f"machine.cpus must be 1..64, not {cpus}")
    iommu = _expect(machine, "iommu", str, source, where, "intel")
    if iommu not in IOMMUS:
        raise LabFileError(source, f"machine.iommu must be one of {', '.join(IOMMUS)}")
    try:
        memory = parse_size(_expect(machine, "memory", (str, int), source, where, "1G"),
                            "machine.memory")
        reserve = _parse_reserve(_expect(machine, "reserve", str, source, where, ""))
    except ValueError as exc:
        raise LabFileError(source, str(exc)) from exc
    if memory < 256 * 2**20:
        raise LabFileError(source, "machine.memory must be at least 256M")
    if reserve and reserve.address + reserve.size > memory:
        raise LabFileError(source, f"machine.reserve ({reserve}) lies beyond machine.memory")
    mgmt = _expect(machine, "management_nic", str, source, where, "04.0")
    if not _SLOT.match(mgmt):
        raise LabFileError(source, f"machine.management_nic must be a slot like 04.0, not {mgmt!r}")
    boot_timeout = _expect(machine, "boot_timeout", (int, float), source, where, 300)

    devices = []
    slots: dict[str, str] = {mgmt.lower(): "the management NIC"}
    for index, entry in enumerate(_expect(data, "device", list, source, "", [])):
        here = f"device[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("driver"), str):
            raise LabFileError(source, f'{here} needs driver = "..." (a QEMU device name)')
        props = []
        for key, value in entry.items():
            if key == "driver":
                continue
            if isinstance(value, bool):
                value = "on" if value else "off"
            if not isinstance(value, (str, int)):
                raise LabFileError(source, f"{here}.{key} must be a string, number or boolean")
            props.append((key, str(value)))
        spec = DeviceSpec(driver=entry["driver"], props=tuple(props))
        addr = spec.prop("addr")
        if addr is not None and spec.prop("bus") is None:
            if not _SLOT.match(addr):
                raise LabFileError(source, f"{here}.addr must look like 1b.0, not {addr!r}")
            owner = slots.get(addr.lower())
            if owner:
                raise LabFileError(source, f"{here} ({spec.driver}) uses slot {addr}, "
                                   f"already taken by {owner}")
            slots[addr.lower()] = spec.driver
        if spec.prop("id") in _RESERVED_DEVICE_IDS:
            raise LabFileError(source, f"{here}.id {spec.prop('id')!r} is reserved for the harness")
        devices.append(spec)

    netdevs = []
    for index, entry in enumerate(_expect(data, "netdev", list, source, "", [])):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise LabFileError(source, f'netdev[{index}] needs id = "..."')
        here = f"netdev[{index}]"
        _check_keys(entry, {"id", "type", "restrict", "address"}, source, here)
        kind = entry.get("type", "user")
        if kind not in ("user", "tap"):
            raise LabFileError(source, f'{here}.type must be "user" or "tap", not {kind!r}')
        address = entry.get("address", "")
        if address and not re.match(r"^\d+\.\d+\.\d+\.\d+/\d+$", str(address)):
            raise LabFileError(source, f"{here}.address must look like 192.168.77.1/24")
        if address and kind != "tap":
            raise LabFileError(source, f"{here}.address only applies to type = \"tap\"")
        netdevs.append(NetdevSpec(id=entry["id"], type=kind, address=str(address),
                                  restrict=bool(entry.get("restrict", True))))
    known = {n.id for n in netdevs}
    for spec in devices:
        netdev = spec.prop("netdev")
        if netdev is not None and netdev not in known:
            raise LabFileError(source, f"device {spec.driver} uses netdev {netdev!r}, "
                               "which no [[netdev]] defines")
    return LabSpec(
        name=name, description=_expect(data, "description", str, source, "", ""),
        source=source, accel=accel, cpus=cpus, memory=memory, reserve=reserve, iommu=iommu,
        cmdline=_expect(machine, "cmdline", str, source, where, ""),
        boot_timeout=float(boot_timeout), management_nic=mgmt, devices=tuple(devices),
        netdevs=tuple(netdevs),
    )


def _parse_reserve(text: str) -> Reserve | None:
    if not text:
        return None
    size, sep, address = text.partition("@")
    if not sep:
        raise ValueError(f"machine.reserve: {text!r} must be SIZE@ADDRESS, e.g. 82M@0x3a000000")
    return Reserve(size=parse_size(size, "machine.reserve size"),
                   address=parse_size(address, "machine.reserve address"))


def builtin_labs() -> list[str]:
    """Names of the labs shipped with jhlab."""
    folder = resources.files("harness") / "labs"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir()
                  if p.name.endswith(".toml"))


#: a lab's ``lan`` on a tap (tests, benchmarks): the address of the host end, in the lab's
#: private network namespace, and the one the machine's side takes
TAP_HOST_END: Final = "192.168.77.1"
TAP_GUEST_END: Final = "192.168.77.2"


def with_lan_on_tap(spec: LabSpec, *, name: str | None = None) -> LabSpec:
    """``spec`` (named ``name``, if given) with its ``lan`` netdev a tap whose host end is
    :data:`TAP_HOST_END`."""
    netdevs = tuple(NetdevSpec(id=n.id, type="tap", address=f"{TAP_HOST_END}/24") if n.id == "lan" else n
                    for n in spec.netdevs)
    return replace(spec, name=name or spec.name, netdevs=netdevs)


def load_lab(name_or_path: str | Path) -> LabSpec:
    """Load a lab by built-in name (``default``) or from a TOML file path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        try:
            text = path.read_text()
        except OSError as exc:
            raise LabFileError(str(path), f"cannot read: {exc.strerror}") from exc
        return parse_lab(text, str(path))
    resource = resources.files("harness") / "labs" / f"{name_or_path}.toml"
    if not resource.is_file():
        raise LabFileError(str(name_or_path), "no such lab file, and not a built-in lab "
                           f"(built-in: {', '.join(builtin_labs())})")
    return parse_lab(resource.read_text(), f"<built-in lab {name_or_path}>")
