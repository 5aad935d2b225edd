"""Reset points of a lab: what a restore needs besides QEMU's migration stream.

:meth:`harness.lab.Lab.snapshot` takes a reset point and :meth:`~harness.lab.Lab.reset`
restores it.  QEMU saves the machine, stopped first
(:meth:`~harness.machine.Machine.save_snapshot` says why); this module covers what
QEMU 7.2 under TCG does not restore by itself:

* **CPUs inside nested guests.**  A lab CPU running a cell (KVM in the root cell: SVM
  guest mode in QEMU) when QEMU stops is saved, but QEMU refuses to load it ("vCPU set in
  guest-mode inconsistent with migrated kernel nested state": ``cpu_post_load`` expects
  KVM's nested state even under TCG).  So before the save the root cell's
  ``jhlab-snapshot prepare`` (``images/guest/bin``) stops every process that may run a
  KVM vCPU (all but the lab's KVM holder, whose vCPU never runs), which takes every lab
  CPU out of guest mode; they are continued after the save and after every restore
  (the restored copies wake up stopped).  Cells just see their time jump, as after a
  long exit.
* **Devices without migration state.**  Device types with no VMState in this QEMU
  (:func:`~harness.machine.types_with_migration_state`: ``edu``) come back as if reset,
  BARs unassigned.  While no root-cell driver holds such a device, its config header is
  all the guest keeps of it, and the restore writes it back from the host before the
  guest runs (config ports, :meth:`~harness.qmp.QmpSession.write_pci_config`), so the
  guest never sees it reset.  While one is bound (passed through to a cell, claimed by
  VFIO), the snapshot is refused: the driver's idea of the device would meet a reset
  device.

The rest is QEMU's and comes back exactly: RAM, the CPUs (EFER.SVME, VM_HSAVE_PA and the
nested-guest fields included), the TSC and the virtual clock (both stand still while the
machine is stopped: the guest sees no time pass across a save or a restore).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from harness.errors import MachineError
from harness.labfile import LabSpec
from harness.machine import Snapshot

#: the root-cell command that stops the KVM users and reports them and the PCI functions
PREPARE = "jhlab-snapshot prepare"
#: config header fields a restore writes back, as (offset, size), the command register last
_HEADER_FIELDS = (*((0x10 + 4 * bar, 4) for bar in range(6)), (0x30, 4), (0x3C, 1), (0x04, 2))
#: suffixes of virtio PCI proxies, whose state travels with their virtio device
_VIRTIO_PROXY = ("-pci", "-pci-transitional", "-pci-non-transitional")


@dataclass(frozen=True)
class KvmUser:
    """A root-cell process that held a KVM vCPU and was stopped for the save."""

    pid: int
    name: str
    cmdline: str


@dataclass(frozen=True)
class PciFunction:
    """A PCI function as the root cell saw it at the save.

    :param bdf: ``BB:DD.F``
    :param config: the first 64 bytes of its config space
    :param driver: the root-cell driver bound to it, if any
    """

    bdf: str
    config: bytes
    driver: str | None


@dataclass(frozen=True)
class GuestView:
    """What ``jhlab-snapshot prepare`` reported: the KVM users it stopped, the PCI functions."""

    stopped: tuple[KvmUser, ...]
    pci: Mapping[str, PciFunction]

    @classmethod
    def parse(cls, text: str) -> GuestView:
        """:raise MachineError: when ``text`` is not the tool's report"""
        try:
            data: dict[str, Any] = json.loads(text)
            stopped = tuple(KvmUser(int(p["pid"]), str(p["name"]), str(p["cmdline"]))
                            for p in data["stopped"])
            pci = {bdf[5:]: PciFunction(bdf[5:], bytes.fromhex(f["config"]), f["driver"])
                   for bdf, f in data["pci"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise MachineError(f"{PREPARE!r} printed no report it could be read from: "
                               f"{text[-300:]!r} ({exc})") from exc
        return cls(stopped, pci)

    def resume_command(self) -> str | None:
        """The root-cell command continuing the KVM users stopped for the save, if any."""
        pids = " ".join(str(user.pid) for user in self.stopped)
        return f"kill -CONT {pids}" if pids else None


@dataclass(frozen=True)
class ResetPoint:
    """A saved lab state and what its restore must put back.

    :param snapshot: QEMU's migration stream and initrd
    :param taken_at: wall-clock time of the save (``HH:MM:SS``)
    :param guest: the stopped KVM users and the PCI functions at the save
    :param bars: BARs QEMU decoded per ``BB:DD.F`` at the save, as ``(bar, address)``
    :param stateless: ``BB:DD.F`` -> device type, for the lab's PCI devices without
        migration state
    """

    snapshot: Snapshot
    taken_at: str
    guest: GuestView
    bars: Mapping[str, tuple[tuple[int, int], ...]]
    stateless: Mapping[str, str]

    def config_writes(self, bdf: str) -> list[tuple[int, int, int]]:
        """The writes putting back ``bdf``'s config header as the root cell had it, as
        ``(offset, size, value)``: BARs, ROM BAR and interrupt line first, the command
        register last (decoding on once the BARs are set)."""
        header = self.guest.pci[bdf].config
        return [(offset, size, int.from_bytes(header[offset:offset + size], "little"))
                for offset, size in _HEADER_FIELDS]


def has_migration_state(device_type: str, with_state: frozenset[str]) -> bool:
    """Whether QEMU migrates a device of ``device_type``, given the types with a VMState
    (a virtio PCI proxy's state travels with its ``virtio-*-device``)."""
    if device_type in with_state:
        return True
    for suffix in _VIRTIO_PROXY:
        if device_type.startswith("virtio-") and device_type.endswith(suffix):
            return f"{device_type.removesuffix(suffix)}-device" in with_state
    return False


def stateless_pci_devices(spec: LabSpec, devices: Sequence[Mapping[str, Any]],
                          with_state: frozenset[str]) -> dict[str, str]:
    """The lab's PCI devices whose type QEMU does not migrate, as ``BB:DD.F`` -> type.

    :param devices: QEMU's PCI functions (:meth:`~harness.qmp.QmpSession.pci_devices`)
    :param with_state: :func:`~harness.machine.types_with_migration_state`
    """
    present = {str(dev["bdf"]) for dev in devices}
    by_id = {str(dev["qdev_id"]): str(dev["bdf"]) for dev in devices if dev.get("qdev_id")}
    buses = {str(dev["qdev_id"]): int(dev["pci_bridge"]["bus"]["number"]) for dev in devices
             if dev.get("qdev_id") and dev.get("pci_bridge")}
    found: dict[str, str] = {}
    for device in spec.devices:
        if has_migration_state(device.driver, with_state):
            continue
        bdf = by_id.get(device.prop("id") or "")
        addr = device.prop("addr")
        if bdf is None and addr:
            bus_name = device.prop("bus")
            bus = 0 if bus_name in (None, "pcie.0") else buses.get(bus_name or "")
            slot, _, function = addr.partition(".")
            bdf = None if bus is None else f"{bus:02x}:{int(slot, 16):02x}.{int(function or '0', 16):x}"
        if bdf in present:
            found[bdf] = device.driver
    return found


def refusal(view: GuestView, stateless: Mapping[str, str]) -> str | None:
    """Why a snapshot of this state cannot be restored faithfully, or ``None``."""
    held = [f"{stateless[bdf]} at {bdf} (bound to {view.pci[bdf].driver})"
            for bdf in sorted(stateless) if bdf in view.pci and view.pci[bdf].driver]
    if not held:
        return None
    return (f"QEMU keeps no state of {', '.join(held)}: a restore would hand its driver (and "
            "the cell it is passed through to) a device reset under it. Destroy the cell "
            "that owns it (jailhouse cell destroy) or unbind it in the root cell, then take "
            "the snapshot; or take it before the device is claimed")
