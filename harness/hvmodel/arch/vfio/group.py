"""A VFIO group (``/dev/vfio/N``): the unit of isolation VFIO hands out, holding its
devices' fds.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable

from ...errors import Errno
from .device import Device
from .ioctl import VfioError, failed, vfio_ioctl
from .structs import (
    VFIO_GROUP_GET_DEVICE_FD,
    VFIO_GROUP_GET_STATUS,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_GROUP_UNSET_CONTAINER,
    GroupFlags,
    VfioGroupStatus,
)
from .stub import PciAddress

__all__ = ["Group"]

_sz = ctypes.sizeof


class Group:
    """A VFIO group (``/dev/vfio/N``).

    Lifecycle: open → :meth:`set_container` (by :meth:`Container.group
    <.container.Container.group>`) → :meth:`device` → :meth:`close` (closes its devices
    first; the kernel then drops it from the container).

    :raise VfioError: ``ENOENT`` when the node is missing (no device of the group is
        bound to vfio-pci), ``EBUSY`` when another process has it open
    """

    def __init__(self, number: int, *, path: str | None = None) -> None:
        self.number = number
        self.path = path or f"/dev/vfio/{number}"
        self.who = f"group {number}"
        #: the container's fd once :meth:`set_container` added the group
        self.container_fd: int | None = None
        #: called once when the group leaves its container by :meth:`close` (the
        #: container forgets it)
        self.on_close: Callable[[], object] | None = None
        self.devices: dict[str, Device] = {}
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            code = exc.errno or 0
            hint = {
                errno.ENOENT: "no device of the group is bound to vfio-pci (claim it first)",
                errno.EBUSY: "another process or container has the group open",
            }.get(code, "")
            raise VfioError(self.who, failed(f"open {self.path}", code, hint), os_errno=code) from exc

    def status(self) -> GroupFlags:
        """``VFIO_GROUP_GET_STATUS``."""
        raw = VfioGroupStatus(argsz=_sz(VfioGroupStatus))
        vfio_ioctl(self.fd, VFIO_GROUP_GET_STATUS, raw, op="VFIO_GROUP_GET_STATUS", who=self.who)
        return GroupFlags(raw.flags)

    @property
    def viable(self) -> bool:
        """Every device of the group is bound to VFIO or harmless (nothing else DMAs in it)."""
        return GroupFlags.VIABLE in self.status()

    def set_container(self, container_fd: int) -> None:
        """``VFIO_GROUP_SET_CONTAINER`` (after checking that the group is viable)."""
        if not self.viable:
            raise VfioError(
                self.who,
                "not viable: a device of the group is still bound to a host driver (claim the whole group)",
                code=Errno.EBUSY,
            )
        arg = bytearray(struct.pack("=i", container_fd))
        vfio_ioctl(self.fd, VFIO_GROUP_SET_CONTAINER, arg, op="VFIO_GROUP_SET_CONTAINER", who=self.who)
        self.container_fd = container_fd

    def unset_container(self) -> None:
        """``VFIO_GROUP_UNSET_CONTAINER`` (the devices must be closed)."""
        if self.container_fd is None:
            return
        vfio_ioctl(self.fd, VFIO_GROUP_UNSET_CONTAINER, 0, op="VFIO_GROUP_UNSET_CONTAINER", who=self.who)
        self.container_fd = None

    def device(self, address: str | PciAddress) -> Device:
        """``VFIO_GROUP_GET_DEVICE_FD`` (idempotent per device)."""
        address = PciAddress.parse(address)
        name = str(address)
        existing = self.devices.get(name)
        if existing is not None:
            return existing
        if self.container_fd is None:
            raise VfioError(
                address.short,
                f"{self.who} has no container: add it to a Container first",
                os_errno=errno.EINVAL,
            )
        arg = bytearray(name.encode() + b"\0")
        fd = vfio_ioctl(
            self.fd,
            VFIO_GROUP_GET_DEVICE_FD,
            arg,
            op="VFIO_GROUP_GET_DEVICE_FD",
            who=address.short,
            detail=f"in {self.who}",
        )
        try:
            device = Device(address, fd, on_close=lambda: self.devices.pop(name, None))
        except BaseException:
            os.close(fd)
            raise
        self.devices[name] = device
        return device

    def close(self) -> None:
        """Close the devices, then the group; idempotent."""
        for device in list(self.devices.values()):
            device.close()
        self.devices.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.container_fd is not None:
            self.container_fd = None
            if self.on_close is not None:
                self.on_close()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Group({self.number}, fd={self.fd}, devices={sorted(self.devices)})"
