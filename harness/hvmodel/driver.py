"""The Linux driver's side; models ``driver/main.c`` and ``driver/cell.c``.

What ``jailhouse.ko`` does in the root cell before and after each hypercall: validate
the config it was handed, manage the root's CPUs (offline them for a cell, bring them
back), claim PCI devices for the stub driver, assign cell ids, copy images into cell
memory, keep the cells it knows for sysfs. Each command raises
:class:`~harness.hvmodel.errors.HvError` with the errno the ioctl would return;
:meth:`Driver.ioctl_result` turns that into the ioctl's negative return value.

The Linux kernel itself is described by :class:`HostInfo` (CPUs, virtualization,
reserved memory, timer frequencies); the Driver keeps the mutable part (which CPUs are
online now, which devices are claimed).
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, TypeVar

from .abi import (
    CELL_DESC_SIZE,
    CELL_NAME_MAXLEN,
    CELL_OFF_FLAGS,
    CELL_OFF_ID,
    CELL_OFF_NAME,
    CELL_SIGNATURE,
    CELL_VIRTUAL_CONSOLE_ACTIVE,
    CELL_VIRTUAL_CONSOLE_PERMITTED,
    CONFIG_HEAD,
    CONFIG_REVISION,
    MEM_LOADABLE,
    MEM_WRITE,
    NAME_FIELD_SIZE,
    PAGE_SIZE,
    PCI_TYPE_DEVICE,
    PCI_TYPE_IVSHMEM,
    SYSTEM_SIGNATURE,
    SYSTEM_SIZE,
    Architecture,
    Hypercall,
)
from .control import Hypervisor
from .errors import ConfigError, Errno, HvError
from .params import HvParams
from .printk import bdf_params

if TYPE_CHECKING:
    from .arch import Arch
    from .config import CellConfig, SystemConfig

__all__ = ["CellRef", "Driver", "DriverCell", "HostInfo", "Image"]

LOG = logging.getLogger(__name__)


_T = TypeVar("_T")
_U32: Final = struct.Struct("<I")

#: a cell named by id (``int``) or by name (``str``)
CellRef = int | str


@dataclasses.dataclass(frozen=True, kw_only=True)
class HostInfo:
    """The root cell's Linux, as the driver sees it.

    :param online_cpus: CPUs online when the driver starts
    :param possible_cpus: ``nr_cpu_ids`` (width of the sysfs CPU masks)
    :param cpu_vendor: ``intel`` (VMX), ``amd`` (SVM) or ``""`` (neither)
    :param vmx_allowed: ``IA32_FEATURE_CONTROL`` allows VMX outside SMX
    :param firmware: the hypervisor image can be loaded
    :param reserved: physical ranges ``(start, size)`` kept from Linux (``memmap=``);
        None means any range can be requested
    :param tsc_khz: Linux's ``tsc_khz``
    :param apic_khz: ``lapic_timer_period / (1000 / HZ)``
    :param pci_devices: the PCI functions Linux has, as (domain, BDF); None means every
        configured device is taken to exist
    """

    online_cpus: frozenset[int] = frozenset({0, 1, 2, 3})
    possible_cpus: int = 4
    cpu_vendor: str = "intel"
    vmx_allowed: bool = True
    firmware: bool = True
    reserved: tuple[tuple[int, int], ...] | None = None
    tsc_khz: int = 2000000
    apic_khz: int = 1000000
    pci_devices: frozenset[tuple[int, int]] | None = None


@dataclasses.dataclass(frozen=True)
class Image:
    """One preload image of ``jailhouse cell load``.

    :param data: the bytes
    :param target: guest-physical load address in the cell
    """

    data: bytes
    target: int = 0


@dataclasses.dataclass
class DriverCell:
    """A cell as the driver knows it (``struct cell`` of ``driver/cell.h``).

    :param id: the runtime id (root = 0)
    :param name: the cell name
    :param config: the cell config (with the id written in)
    :param cpus_assigned: CPUs of the cell
    """

    id: int
    name: str
    config: CellConfig
    cpus_assigned: set[int]
    #: CPUs the driver took offline for this cell
    offlined: set[int] = dataclasses.field(default_factory=set)
    #: BDFs bound to ``jailhouse-pci-stub`` for this cell
    claimed: list[int] = dataclasses.field(default_factory=list)


class Driver:
    """``jailhouse.ko``: enable, disable and the cell commands.

    Lifecycle: built with the machine (disabled); :meth:`enable` creates the
    :class:`~harness.hvmodel.control.Hypervisor`; :meth:`disable` destroys the cells and
    ends it. The hypervisor is reachable as :attr:`hv` while enabled.

    :param arch: the machine (executor or oracle), shared with the hypervisor
    :param host: the Linux side
    :param params: passed to the :class:`~harness.hvmodel.control.Hypervisor`
    :param test_device: the hypervisor is built with ``CONFIG_TEST_DEVICE``
        (:attr:`HvParams.test_device <harness.hvmodel.params.HvParams.test_device>`,
        also set in ``params`` when given)
    """

    def __init__(self, arch: Arch, host: HostInfo | None = None, *, params: HvParams | None = None,
                 test_device: bool = False) -> None:
        self.arch = arch
        self.host = host or HostInfo()
        self.params = params
        self.test_device = test_device
        #: the running hypervisor, or None while disabled
        self.hv: Hypervisor | None = None
        #: the system config as the hypervisor got it (timer fields filled in)
        self.system: SystemConfig | None = None
        #: CPUs online in Linux now
        self.online: set[int] = set(self.host.online_cpus)
        #: cells by id, root included
        self.cells: dict[int, DriverCell] = {}
        #: BDFs bound to the stub driver
        self.claimed: set[int] = set()
        #: the driver's kernel log lines
        self.kernel_log: list[str] = []
        #: root ivshmem devices Linux sees (scanned at enable)
        self.linux_ivshmem: list[int] = []

    @property
    def enabled(self) -> bool:
        """Whether the hypervisor runs."""
        return self.hv is not None

    @property
    def root(self) -> DriverCell:
        """The root cell (while enabled).

        :raise HvError: ``EINVAL`` when disabled
        """
        root = self.cells.get(0)
        if root is None:
            raise HvError(Errno.EINVAL, "hypervisor not enabled")
        return root

    def _log(self, line: str) -> None:
        self.kernel_log.append(line)
        LOG.info("%s", line)

    @staticmethod
    def ioctl_result(operation: Callable[[], _T]) -> int:
        """Run a command and return what the ioctl returns: 0 or the negative errno."""
        try:
            operation()
        except HvError as err:
            return err.code
        return 0

    def _hypercall(self, code: Hypercall, arg1: int = 0, arg2: int = 0) -> int:
        hv = self.hv
        if hv is None:
            raise HvError(Errno.EINVAL, "hypervisor not enabled")
        cpu = min(self.root.cpus_assigned & self.online)
        result = hv.hypercall(cpu, code, arg1, arg2)
        if result < 0:
            raise HvError(Errno(-result), f"hypercall {code.name}")
        return result

    # ---------------------------------------------------------------------------------
    # enable / disable
    # ---------------------------------------------------------------------------------

    def enable(self, system_data: bytes) -> None:
        """``JAILHOUSE_ENABLE`` (``jailhouse_cmd_enable``).

        :raise HvError: ``ENODEV``, ``EINVAL``, ``EBUSY``, ``ENOENT`` or what the
            hypervisor's enable returned
        """
        from .config import parse_system

        host = self.host
        if host.cpu_vendor not in ("intel", "amd"):
            raise HvError(Errno.ENODEV, "Missing or unsupported HVM technology")
        if len(system_data) < SYSTEM_SIZE or system_data[:5] != SYSTEM_SIGNATURE:
            raise HvError(Errno.EINVAL, "Not a system configuration")
        _, architecture, revision = CONFIG_HEAD.unpack_from(system_data)
        if revision != CONFIG_REVISION:
            raise HvError(Errno.EINVAL, "Configuration revision mismatch")
        if architecture != Architecture.X86:
            raise HvError(Errno.EINVAL, "Configuration architecture mismatch")
        try:
            system = parse_system(system_data, source="JAILHOUSE_ENABLE")
        except ConfigError as err:
            raise HvError(Errno.EINVAL, f"unusable system configuration: {err}") from err
        root_cpus = system.root_cell.cpus
        if not root_cpus:
            raise HvError(Errno.EINVAL, "empty root CPU set")
        max_cpus = max(root_cpus) + 1
        if self.hv is not None:
            raise HvError(Errno.EBUSY, "already enabled")
        if host.cpu_vendor == "intel" and not host.vmx_allowed:
            raise HvError(Errno.ENODEV, "VT-x disabled by Firmware/BIOS")
        if not host.firmware:
            raise HvError(Errno.ENOENT, "Missing hypervisor image")
        params = self.params or HvParams(vendor=host.cpu_vendor)
        if self.test_device and not params.test_device:
            params = dataclasses.replace(params, test_device=True)
        hv_size = system.hypervisor_memory.size
        percpu = params.percpu_pages * PAGE_SIZE
        if (
            params.core_size >= hv_size
            or params.core_size + max_cpus * percpu >= hv_size
            or params.core_size + max_cpus * percpu + len(system_data) > hv_size
        ):
            raise HvError(Errno.EINVAL, "hypervisor image does not fit")
        if host.reserved is not None:
            start = system.hypervisor_memory.phys_start
            if not any(base <= start and start + hv_size <= base + size for base, size in host.reserved):
                raise HvError(Errno.EINVAL, 'Did you reserve the memory with "memmap=" or "mem="?')
        x86 = system.x86
        if not x86.tsc_khz or not x86.apic_khz:
            x86 = dataclasses.replace(
                x86,
                tsc_khz=x86.tsc_khz or host.tsc_khz,
                apic_khz=x86.apic_khz or host.apic_khz,
            )
            system = dataclasses.replace(system, x86=x86)
        online = sorted(self.online)
        if any(cpu >= max_cpus for cpu in online):
            raise HvError(Errno.EINVAL, "online CPU beyond the root CPU set")
        hv = Hypervisor(system, self.arch, params=params)
        hv.enable(online)
        self.hv = hv
        self.system = system
        self.cells = {0: DriverCell(0, system.root_cell.name, system.root_cell, set(root_cpus))}
        self.linux_ivshmem = [dev.bdf for dev in system.root_cell.pci_devices if dev.type == PCI_TYPE_IVSHMEM]
        self._log("The Jailhouse is opening.")

    def disable(self) -> None:
        """``JAILHOUSE_DISABLE`` (``jailhouse_cmd_disable``).

        :raise HvError: ``EINVAL`` when not enabled; the first failing cell destruction
            (``EPERM`` from a cell that refuses); ``EBUSY`` when CPUs are missing
        """
        hv = self.hv
        if hv is None:
            raise HvError(Errno.EINVAL, "hypervisor not enabled")
        for cell_id in sorted(self.cells):
            if cell_id != 0:
                self.cell_destroy(cell_id)
        self.linux_ivshmem = []
        root = self.root
        if self.online != root.cpus_assigned:
            raise HvError(Errno.EBUSY, "root CPUs not all online")
        results = [hv.hypercall(cpu, Hypercall.DISABLE) for cpu in sorted(self.online)]
        errors = [code for code in results if code < 0]
        if errors:
            raise HvError(Errno(-errors[0]), "hypervisor refused to disable")
        self.hv = None
        self.cells = {}
        self._log("The Jailhouse was closed.")

    # ---------------------------------------------------------------------------------
    # cells
    # ---------------------------------------------------------------------------------

    def find_cell(self, ref: CellRef) -> DriverCell:
        """A cell by id or name (``find_cell``).

        :raise HvError: ``ENOENT``
        """
        if isinstance(ref, int):
            cell = self.cells.get(ref)
            if cell is not None:
                return cell
        else:
            for cell in self.cells.values():
                if cell.name == ref:
                    return cell
        raise HvError(Errno.ENOENT, f"no cell {ref!r}")

    def cell_create(self, config_data: bytes) -> int | None:
        """``JAILHOUSE_CELL_CREATE`` (``jailhouse_cmd_cell_create``).

        :return: the new cell's id; None when the architecture byte did not match
            (the driver then prints an error and returns 0 without creating anything)
        :raise HvError: ``EINVAL``, ``EEXIST``, ``EBUSY``, or the hypercall's error
        """
        from .config import parse_cell

        if len(config_data) < CELL_DESC_SIZE or config_data[:5] != CELL_SIGNATURE:
            raise HvError(Errno.EINVAL, "Not a cell configuration")
        _, architecture, revision = CONFIG_HEAD.unpack_from(config_data)
        if revision != CONFIG_REVISION:
            raise HvError(Errno.EINVAL, "Configuration revision mismatch")
        if architecture != Architecture.X86:
            self._log("Configuration architecture mismatch")
            return None
        data = bytearray(config_data)
        data[CELL_OFF_NAME + CELL_NAME_MAXLEN] = 0
        flags = _U32.unpack_from(data, CELL_OFF_FLAGS)[0]
        if flags & CELL_VIRTUAL_CONSOLE_ACTIVE:
            _U32.pack_into(data, CELL_OFF_FLAGS, flags | CELL_VIRTUAL_CONSOLE_PERMITTED)
        if self.hv is None:
            raise HvError(Errno.EINVAL, "hypervisor not enabled")
        raw_name = bytes(data[CELL_OFF_NAME : CELL_OFF_NAME + NAME_FIELD_SIZE]).split(b"\0", 1)[0]
        name = raw_name.decode("utf-8", "replace")
        if any(cell.name == name for cell in self.cells.values()):
            raise HvError(Errno.EEXIST, f"cell {name!r} exists")
        cell_id = 0
        while cell_id in self.cells:
            cell_id += 1
        _U32.pack_into(data, CELL_OFF_ID, cell_id)
        try:
            config = parse_cell(bytes(data), source="JAILHOUSE_CELL_CREATE")
        except ConfigError as err:
            raise HvError(Errno.EINVAL, f"unusable cell configuration: {err}") from err
        cell = DriverCell(cell_id, name, config, set(config.cpus))
        root = self.root
        if not cell.cpus_assigned <= root.cpus_assigned:
            raise HvError(Errno.EBUSY, "CPUs not assigned to the root cell")
        self.cells[cell_id] = cell
        try:
            for cpu in sorted(cell.cpus_assigned):
                if cpu == 0:
                    raise HvError(Errno.EINVAL, "Cannot assign CPU 0 to other cells")
                if cpu in self.online:
                    self.online.discard(cpu)
                    cell.offlined.add(cpu)
                root.cpus_assigned.discard(cpu)
            known = self.host.pci_devices
            for dev in config.pci_devices:
                if known is not None and (dev.domain, dev.bdf) not in known:
                    continue  # jailhouse_pci_claim_release: no Linux device, nothing to claim
                if dev.type == PCI_TYPE_DEVICE and dev.bdf not in self.claimed:
                    self.claimed.add(dev.bdf)
                    cell.claimed.append(dev.bdf)
                    self._log(
                        "jailhouse: %04x:%02x:%02x.%x claimed for use in non-root cell"
                        % ((dev.domain, *bdf_params(dev.bdf)))
                    )
            address = self.arch.root_buffer_alloc(bytes(data))
            try:
                self._hypercall(Hypercall.CELL_CREATE, address)
            finally:
                self.arch.root_buffer_free(address)
        except HvError:
            # CPUs come back; claimed PCI devices stay claimed (as in Jailhouse).
            for cpu in sorted(cell.cpus_assigned):
                if cpu in cell.offlined:
                    self.online.add(cpu)
                root.cpus_assigned.add(cpu)
            cell.offlined.clear()
            del self.cells[cell_id]
            raise
        self._log(f'Created Jailhouse cell "{name}"')
        return cell_id

    def cell_load(self, ref: CellRef, images: Iterable[Image] = ()) -> None:
        """``JAILHOUSE_CELL_LOAD`` (``jailhouse_cmd_cell_load``); no images = shutdown.

        :raise HvError: ``ENOENT``, the hypercall's error (``EPERM`` when the cell
            refuses), ``EINVAL`` for an image outside a writable loadable region
        """
        cell = self.find_cell(ref)
        self._hypercall(Hypercall.CELL_SET_LOADABLE, cell.id)
        for image in images:
            region = next(
                (
                    mem
                    for mem in cell.config.memory_regions
                    if mem.virt_start <= image.target < mem.virt_start + mem.size
                ),
                None,
            )
            if region is None:
                raise HvError(Errno.EINVAL, f"no region at {image.target:#x}")
            needed = MEM_WRITE | MEM_LOADABLE
            if (
                image.target + len(image.data) > region.virt_start + region.size
                or region.flags & needed != needed
            ):
                raise HvError(Errno.EINVAL, f"image does not fit at {image.target:#x}")
            self.arch.phys_write(region.phys_start + (image.target - region.virt_start), image.data)

    def cell_shutdown(self, ref: CellRef) -> None:
        """``jailhouse cell shutdown``: a load with no images."""
        self.cell_load(ref, ())

    def cell_start(self, ref: CellRef) -> None:
        """``JAILHOUSE_CELL_START``.

        :raise HvError: ``ENOENT`` or the hypercall's error
        """
        cell = self.find_cell(ref)
        self._hypercall(Hypercall.CELL_START, cell.id)

    def cell_destroy(self, ref: CellRef) -> None:
        """``JAILHOUSE_CELL_DESTROY`` (``jailhouse_cmd_cell_destroy``).

        :raise HvError: ``ENOENT`` or the hypercall's error
        """
        cell = self.find_cell(ref)
        self._hypercall(Hypercall.CELL_DESTROY, cell.id)
        root = self.root
        for cpu in sorted(cell.cpus_assigned):
            if cpu in cell.offlined:
                self.online.add(cpu)
            root.cpus_assigned.add(cpu)
        for bdf in cell.claimed:
            self.claimed.discard(bdf)
        del self.cells[cell.id]
        self._log(f'Destroyed Jailhouse cell "{cell.name}"')
