"""The root cell's side of passthrough: :class:`PciAddress`, the IOMMU group policy and
:class:`PciStub`, which claims devices for ``vfio-pci`` and releases them; stands where
the Linux driver's ``jailhouse-pci-stub`` claim and release (``driver/pci.c``) are.

**IOMMU groups.** Jailhouse assigns single functions and does not know about groups.
VFIO isolates whole groups: a group can be used only when every member is either bound to
``vfio-pci`` or harmless to DMA ownership (no driver, ``pci-stub``, ``pcieport``). The
policy here: a device is claimed only if its group is *fully claimed*, i.e. every other
member is in the same :meth:`PciStub.claim_all` call, already claimed, or in that harmless
state. The stub never takes devices nobody asked for; it fails and names the group and
what blocks it, e.g. ``00:1f.2: not in its own IOMMU group (group 7 also holds 00:1f.3
(i801_smbus)): cannot pass it through``.

:meth:`PciStub.release` refuses while any process holds the group open: unbinding
``vfio-pci`` from an open device blocks in the kernel until it is closed, so the stub
checks instead of hanging.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterable, Mapping
from typing import Final

from ...errors import Errno
from .ioctl import VfioError, failed

__all__ = ["DMA_NEUTRAL_DRIVERS", "Claim", "PciAddress", "PciStub", "group_policy"]

LOG = logging.getLogger(__name__)

_PCI_NAME = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<slot>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])$"
)


@dataclasses.dataclass(frozen=True, order=True, slots=True)
class PciAddress:
    """A PCI function: ``domain:bus:slot.function``.

    ``str()`` is the sysfs name (``0000:01:01.0``); :attr:`short` is Jailhouse's way of
    printing it (``01:01.0``, with the domain only when it is not 0).
    """

    domain: int
    bus: int
    slot: int
    function: int

    def __post_init__(self) -> None:
        if not (
            0 <= self.domain <= 0xFFFF
            and 0 <= self.bus <= 0xFF
            and 0 <= self.slot <= 0x1F
            and 0 <= self.function <= 7
        ):
            raise ValueError(f"bad PCI address {self.domain:x}:{self.bus:x}:{self.slot:x}.{self.function:x}")

    @classmethod
    def parse(cls, text: str | PciAddress) -> PciAddress:
        """From ``0000:01:01.0`` or ``01:01.0`` (or an address, returned as is)."""
        if isinstance(text, PciAddress):
            return text
        match = _PCI_NAME.match(text.strip())
        if match is None:
            raise ValueError(f"not a PCI address: {text!r} (want DDDD:BB:SS.F or BB:SS.F)")
        return cls(
            int(match["domain"] or "0", 16), int(match["bus"], 16), int(match["slot"], 16), int(match["fn"])
        )

    @classmethod
    def from_bdf(cls, bdf: int, domain: int = 0) -> PciAddress:
        """From Jailhouse's 16-bit ``bdf`` (bus << 8 | device << 3 | function)."""
        return cls(domain, (bdf >> 8) & 0xFF, (bdf >> 3) & 0x1F, bdf & 7)

    @property
    def bdf(self) -> int:
        return self.bus << 8 | self.slot << 3 | self.function

    @property
    def short(self) -> str:
        text = f"{self.bus:02x}:{self.slot:02x}.{self.function:x}"
        return f"{self.domain:04x}:{text}" if self.domain else text

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"


#: Drivers that leave a group's DMA ownership free (the kernel's ``driver_managed_dma``).
DMA_NEUTRAL_DRIVERS: Final = frozenset({"vfio-pci", "pci-stub", "pcieport"})


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """A device bound to ``vfio-pci`` by :meth:`PciStub.claim`, and what it had before.

    :param address: the device
    :param group: its IOMMU group (``/dev/vfio/<group>``)
    :param original_driver: the driver bound before the claim (None: unbound)
    :param original_override: ``driver_override`` before the claim (None: unset)
    """

    address: PciAddress
    group: int
    original_driver: str | None
    original_override: str | None

    @property
    def group_path(self) -> str:
        return f"/dev/vfio/{self.group}"


def group_policy(
    address: PciAddress,
    group: int,
    members: Mapping[PciAddress, str | None],
    claiming: Iterable[PciAddress] = (),
) -> None:
    """Check that ``address`` may be passed through: its IOMMU group is fully claimed.

    :param members: every device of the group (``address`` included) and its driver
    :param claiming: devices claimed together with ``address`` (or before it)
    :raise VfioError: ``EBUSY``, naming the group and the devices that block it
    """
    together = set(claiming) | {address}
    blocking = [
        (other, driver)
        for other, driver in sorted(members.items())
        if other not in together and driver is not None and driver not in DMA_NEUTRAL_DRIVERS
    ]
    if not blocking:
        return
    others = sorted(other for other in members if other != address)
    listed = ", ".join(
        f"{other.short} ({members[other]})" if members[other] else other.short for other in others
    )
    names = " ".join(other.short for other, _ in blocking)
    raise VfioError(
        address.short,
        f"not in its own IOMMU group (group {group} also holds {listed}): cannot pass it through; "
        f"claim the whole group together or unbind {names} first",
        code=Errno.EBUSY,
    )


class PciStub:
    """The root cell's side of passthrough: claim devices for VFIO, release them.

    Models the Linux driver's ``jailhouse_pci_claim_release`` (reference §6.2): on cell
    create each PCI device of the cell is taken from its root driver and bound to a stub;
    on destroy it is released (Jailhouse leaves it unbound). The stub here is
    ``vfio-pci``, bound through ``driver_override`` (``drivers_probe`` then picks it), so
    the device becomes usable through ``/dev/vfio/<group>``.

    One instance keeps the claims it made (:attr:`claims`); release what you claimed with
    the same instance. Every step is a sysfs write; errors name the device and the step.

    :param sysfs: the sysfs mount (``/sys``)
    :param dev_vfio: where the group nodes appear (``/dev/vfio``)
    :param proc: procfs (to find processes holding a group open)
    :param driver: the stub driver (``vfio-pci``)
    :param timeout: seconds to wait for a group node to appear
    """

    def __init__(
        self,
        *,
        sysfs: str = "/sys",
        dev_vfio: str = "/dev/vfio",
        proc: str = "/proc",
        driver: str = "vfio-pci",
        timeout: float = 5.0,
    ) -> None:
        self.sysfs = sysfs
        self.dev_vfio = dev_vfio
        self.proc = proc
        self.driver = driver
        self.timeout = timeout
        self.claims: dict[PciAddress, Claim] = {}

    # --- sysfs reading ---------------------------------------------------------------------

    def _device_dir(self, address: PciAddress) -> str:
        return os.path.join(self.sysfs, "bus", "pci", "devices", str(address))

    def _driver_dir(self, driver: str) -> str:
        return os.path.join(self.sysfs, "bus", "pci", "drivers", driver)

    def exists(self, address: str | PciAddress) -> bool:
        """Whether the machine has the device (Linux lists it in sysfs)."""
        return os.path.isdir(self._device_dir(PciAddress.parse(address)))

    def driver_of(self, address: str | PciAddress) -> str | None:
        """The bound driver's name, or None."""
        link = os.path.join(self._device_dir(PciAddress.parse(address)), "driver")
        try:
            return os.path.basename(os.readlink(link))
        except FileNotFoundError:
            return None

    def override_of(self, address: str | PciAddress) -> str | None:
        """``driver_override`` (None when unset; the kernel shows that as ``(null)``)."""
        path = os.path.join(self._device_dir(PciAddress.parse(address)), "driver_override")
        try:
            with open(path) as file:
                value = file.read().strip()
        except FileNotFoundError:
            return None
        return None if value in ("", "(null)") else value

    def irq_of(self, address: str | PciAddress) -> int | None:
        """The root Linux's IRQ of the device's INTx (sysfs ``irq``; the firmware's
        routing applies once the device is enabled, e.g. opened through VFIO); None
        when it has none."""
        path = os.path.join(self._device_dir(PciAddress.parse(address)), "irq")
        try:
            with open(path) as file:
                irq = int(file.read().strip())
        except (OSError, ValueError):
            return None
        return irq or None

    def group_of(self, address: str | PciAddress) -> int:
        """The device's IOMMU group number.

        :raise VfioError: ``ENODEV`` when the device or its group is missing
        """
        address = PciAddress.parse(address)
        self._require_device(address)
        link = os.path.join(self._device_dir(address), "iommu_group")
        try:
            return int(os.path.basename(os.readlink(link)))
        except (FileNotFoundError, ValueError) as exc:
            raise VfioError(
                address.short,
                "has no IOMMU group: the IOMMU is off (boot with intel_iommu=on) or the device is "
                "not behind one: cannot pass it through",
                os_errno=errno.ENODEV,
            ) from exc

    def group_members(self, group: int) -> dict[PciAddress, str | None]:
        """Every device of IOMMU group ``group`` and its driver."""
        folder = os.path.join(self.sysfs, "kernel", "iommu_groups", str(group), "devices")
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError as exc:
            raise VfioError(
                f"group {group}", f"no such IOMMU group ({folder})", os_errno=errno.ENOENT
            ) from exc
        members: dict[PciAddress, str | None] = {}
        for name in names:
            try:
                member = PciAddress.parse(name)
            except ValueError:
                continue  # not PCI (cannot happen on x86 today)
            members[member] = self.driver_of(member)
        return members

    def holders(self, group: int) -> list[tuple[int, str]]:
        """(pid, command) of every process with ``/dev/vfio/<group>`` open."""
        target = os.path.join(self.dev_vfio, str(group))
        found: list[tuple[int, str]] = []
        try:
            pids = [int(entry) for entry in os.listdir(self.proc) if entry.isdigit()]
        except FileNotFoundError:
            return found
        for pid in pids:
            fd_dir = os.path.join(self.proc, str(pid), "fd")
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue  # gone, or not ours to look at
            for fd in fds:
                try:
                    if os.readlink(os.path.join(fd_dir, fd)) == target:
                        found.append((pid, self._comm(pid)))
                        break
                except OSError:
                    continue
        return found

    def _comm(self, pid: int) -> str:
        try:
            with open(os.path.join(self.proc, str(pid), "comm")) as file:
                return file.read().strip()
        except OSError:
            return "?"

    def _require_device(self, address: PciAddress) -> None:
        if not self.exists(address):
            raise VfioError(
                address.short, "no such PCI device in /sys/bus/pci/devices", os_errno=errno.ENODEV
            )

    def _write(self, address: PciAddress, path: str, value: str, step: str) -> None:
        """One sysfs write; ``step`` says what it was for."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            code = exc.errno or 0
            raise VfioError(address.short, failed(step, code, f"open {path}"), os_errno=code) from exc
        try:
            os.write(fd, value.encode())
        except OSError as exc:
            code = exc.errno or 0
            raise VfioError(
                address.short, failed(step, code, f"write {value.strip()!r} to {path}"), os_errno=code
            ) from exc
        finally:
            os.close(fd)

    def _ensure_driver_loaded(self, address: PciAddress) -> None:
        if os.path.isdir(self._driver_dir(self.driver)):
            return
        module = self.driver.replace("-", "_")
        try:
            result = subprocess.run(
                ["modprobe", module], capture_output=True, text=True, timeout=30, check=False
            )
            problem = result.stderr.strip() or f"exit status {result.returncode}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            problem = str(exc)
        if not os.path.isdir(self._driver_dir(self.driver)):
            raise VfioError(
                address.short,
                f"the {self.driver} driver is not available (modprobe {module}: {problem})",
                os_errno=errno.ENODEV,
            )

    def _wait_group_node(self, address: PciAddress, group: int) -> None:
        path = os.path.join(self.dev_vfio, str(group))
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while not os.path.exists(path):
            if time.monotonic() >= deadline:
                raise VfioError(
                    address.short,
                    f"bound to {self.driver} but {path} did not appear within {self.timeout:g} s",
                    os_errno=errno.ENOENT,
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    # --- claim and release -------------------------------------------------------------------

    def check(self, address: str | PciAddress, claiming: Iterable[str | PciAddress] = ()) -> int:
        """Check that ``address`` can be claimed (with ``claiming``); return its group.

        :raise VfioError: the device or its group is missing, or the group is not fully
            claimed (see :func:`group_policy`)
        """
        address = PciAddress.parse(address)
        group = self.group_of(address)
        together = {PciAddress.parse(other) for other in claiming} | set(self.claims)
        group_policy(address, group, self.group_members(group), together)
        return group

    def claim(self, address: str | PciAddress) -> Claim:
        """Bind ``address`` to the stub driver (idempotent for a device claimed here).

        Steps: the device exists; the stub driver is loaded (``modprobe``); the group
        policy holds; ``driver_override`` is set to the stub; the current driver is
        unbound; ``drivers_probe`` binds the stub; ``/dev/vfio/<group>`` appears. A failed
        step undoes the earlier ones (override restored, original driver rebound).

        :raise VfioError: naming the device and the failed step
        """
        return self.claim_all([address])[0]

    def claim_all(self, addresses: Iterable[str | PciAddress]) -> list[Claim]:
        """Claim several devices, checking every group against the whole set first.

        All or nothing: when one claim fails, the ones made by this call are released
        (rebinding their original drivers).
        """
        wanted = [PciAddress.parse(address) for address in addresses]
        for address in wanted:
            self._require_device(address)
        if wanted:
            self._ensure_driver_loaded(wanted[0])
        groups = {address: self.check(address, wanted) for address in wanted if address not in self.claims}
        made: list[Claim] = []
        try:
            for address in wanted:
                if address in self.claims:
                    continue
                made.append(self._claim_one(address, groups[address]))
        except BaseException:
            for claim in reversed(made):
                try:
                    self.release(claim.address, rebind=True)
                except Exception:
                    LOG.exception("%s: undoing the claim failed", claim.address.short)
            raise
        return [self.claims[address] for address in wanted]

    def _claim_one(self, address: PciAddress, group: int) -> Claim:
        device_dir = self._device_dir(address)
        driver = self.driver_of(address)
        claim = Claim(address, group, driver, self.override_of(address))
        if driver != self.driver:
            LOG.info(
                "%s: claiming for VFIO (driver %s, IOMMU group %d)", address.short, driver or "none", group
            )
            self._write(
                address,
                os.path.join(device_dir, "driver_override"),
                self.driver,
                f"set driver_override to {self.driver}",
            )
            try:
                if driver is not None:
                    self._write(
                        address,
                        os.path.join(device_dir, "driver", "unbind"),
                        str(address),
                        f"unbind {driver}",
                    )
                self._write(
                    address,
                    os.path.join(self.sysfs, "bus", "pci", "drivers_probe"),
                    str(address),
                    f"bind {self.driver}",
                )
                bound = self.driver_of(address)
                if bound != self.driver:
                    raise VfioError(
                        address.short,
                        f"bind {self.driver} failed: driver is now {bound or 'none'} (see dmesg)",
                        os_errno=errno.ENODEV,
                    )
            except BaseException:
                self._undo_claim(claim)
                raise
        self._wait_group_node(address, group)
        self.claims[address] = claim
        return claim

    def _give_back(self, claim: Claim, *, rebind: bool) -> None:
        """Undo what :meth:`claim` changed: ``vfio-pci`` unbound (unless it was the
        device's driver before), ``driver_override`` restored and, with ``rebind``, the
        original driver bound again.

        :raise VfioError: the failed sysfs step
        """
        address = claim.address
        original = claim.original_driver
        if self.driver_of(address) == self.driver and original != self.driver:
            self._write(
                address,
                os.path.join(self._driver_dir(self.driver), "unbind"),
                str(address),
                f"unbind {self.driver}",
            )
        self._write(
            address,
            os.path.join(self._device_dir(address), "driver_override"),
            (claim.original_override or "") + "\n",
            "restore driver_override",
        )
        if rebind and original and original != self.driver and self.driver_of(address) is None:
            self._write(
                address, os.path.join(self._driver_dir(original), "bind"), str(address), f"rebind {original}"
            )

    def _undo_claim(self, claim: Claim) -> None:
        try:
            self._give_back(claim, rebind=True)
        except VfioError:
            LOG.exception("%s: undoing a failed claim", claim.address.short)

    def release(self, address: str | PciAddress, *, rebind: bool = False) -> None:
        """Give a claimed device back to the root.

        Steps: nobody holds its group open (else unbinding would block in the kernel);
        ``vfio-pci`` unbound; ``driver_override`` restored; with ``rebind``, the original
        driver bound again (Jailhouse does not rebind; ``rebind=False`` is its behaviour).

        :raise VfioError: ``ENOENT`` when the device was not claimed here, ``EBUSY`` when
            its group is open, or the failed sysfs step
        """
        address = PciAddress.parse(address)
        claim = self.claims.get(address)
        if claim is None:
            raise VfioError(address.short, "release: not claimed by this stub", os_errno=errno.ENOENT)
        holders = self.holders(claim.group)
        if holders:
            who = ", ".join(f"pid {pid} ({comm})" for pid, comm in holders)
            raise VfioError(
                address.short,
                f"release: {claim.group_path} is still open by {who}: close the VFIO device and group first",
                code=Errno.EBUSY,
            )
        self._give_back(claim, rebind=rebind)
        del self.claims[address]
        original = claim.original_driver
        if rebind and original and original != self.driver:
            bound = self.driver_of(address)
            if bound != original:
                raise VfioError(
                    address.short,
                    f"rebind {original} failed: driver is now {bound or 'none'}",
                    os_errno=errno.ENODEV,
                )
        LOG.info("%s: released (driver %s)", address.short, self.driver_of(address) or "none")

    def release_all(self, *, rebind: bool = False) -> None:
        """Release every claim (reverse order); errors are logged, the first re-raised."""
        first: VfioError | None = None
        for address in reversed(list(self.claims)):
            try:
                self.release(address, rebind=rebind)
            except VfioError as exc:
                LOG.error("%s", exc)
                first = first or exc
        if first is not None:
            raise first
