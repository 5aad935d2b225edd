"""The host-side oracle: the hypervisor model predicting what the guest's driver daemon
must do and show, and what the ``jailhouse`` tool prints for each result."""

from __future__ import annotations

import errno as errno_mod
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Final

from harness.errors import JhlabError
from harness.hvmodel.arch.oracle import OracleArch, responder_for
from harness.hvmodel.driver import Driver, HostInfo
from harness.hvmodel.errors import Errno, HvError
from harness.hvmodel.sysfs import cell_list, sysfs_tree

LOG = logging.getLogger(__name__)

#: the perror() names of the ioctls
IOCTL: Final[Mapping[str, str]] = {
    "enable": "JAILHOUSE_ENABLE",
    "disable": "JAILHOUSE_DISABLE",
    "create": "JAILHOUSE_CELL_CREATE",
    "load": "JAILHOUSE_CELL_LOAD",
    "shutdown": "JAILHOUSE_CELL_LOAD",
    "start": "JAILHOUSE_CELL_START",
    "destroy": "JAILHOUSE_CELL_DESTROY",
}


class ConsoleOracle(OracleArch):
    """An OracleArch that keeps the whole hypervisor console text."""

    def __init__(self) -> None:
        super().__init__(record=False)
        self.console_text: list[str] = []

    def console_write(self, text: str) -> None:
        self.console_text.append(text)


class Oracle:
    """The host-side prediction: what the guest's driver daemon must do and show.

    It follows the daemon's life: a new :class:`~harness.hvmodel.driver.Driver` (on a
    fresh :class:`~harness.hvmodel.arch.oracle.OracleArch`) for every ``enable`` that
    starts a daemon, dropped when the daemon ends (successful disable, failed enable).
    Every operation the daemon serves is followed by a sysfs refresh, as the daemon does
    (reading the tree costs the root CPU hypercalls, which its statistics count).

    :param responders: how cells answer messages (cell name -> daemon responder policy)
    :param test_device: the hypervisor has ``CONFIG_TEST_DEVICE`` (as the guest's daemon)
    """

    def __init__(self, responders: Mapping[str, str] | None = None, *, test_device: bool = False) -> None:
        self.responders = dict(responders or {})
        self.test_device = test_device
        self.driver: Driver | None = None
        self.arch: ConsoleOracle | None = None
        #: the guest's run directory has a sysfs tree ("the module is loaded")
        self.module_loaded = False
        self.host = HostInfo()
        #: console text of every hypervisor this oracle ran
        self._console_done = ""
        self.tree: dict[str, str] = {}

    # -- state --------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.driver is not None and self.driver.enabled

    @property
    def hv(self) -> Any:
        """The running hypervisor model.

        :raise JhlabError: when disabled
        """
        if self.driver is None or self.driver.hv is None:
            raise JhlabError("the oracle's hypervisor is not enabled")
        return self.driver.hv

    def hv_cell(self, name: str) -> Any:
        """The hypervisor's cell ``name``.

        :raise JhlabError: when there is none
        """
        cell = self.hv.cell_by_name(name)
        if cell is None:
            raise JhlabError(f"the oracle has no cell {name!r}")
        return cell

    @property
    def console(self) -> str:
        """Everything the oracle's hypervisors printed."""
        if self.arch is None:
            return self._console_done
        return self._console_done + "".join(self.arch.console_text)

    def _start(self, host: HostInfo) -> Driver:
        arch = ConsoleOracle()
        for name, policy in self.responders.items():
            arch.responders[name] = responder_for(policy)
        self.arch = arch
        self.host = host
        self.driver = Driver(arch, host, test_device=self.test_device)
        self.module_loaded = True
        return self.driver

    def _end(self) -> None:
        if self.arch is not None:
            self._console_done += "".join(self.arch.console_text)
        self.arch = None
        self.driver = None

    def refresh(self) -> dict[str, str]:
        """One reading of the sysfs tree (a daemon refresh, or the disabled tree)."""
        if self.driver is None:
            self.tree = {"enabled": "0\n", "mem_pool_size": "0\n", "mem_pool_used": "0\n",
                         "remap_pool_size": "0\n", "remap_pool_used": "0\n", "console": ""}
            if not self.module_loaded:
                self.tree = {}
        else:
            self.tree = sysfs_tree(self.driver)
        return self.tree

    def cell_list(self) -> str:
        """``jailhouse cell list`` (a refresh, then the table)."""
        tree = self.refresh()
        if self.driver is None:
            return ""
        return cell_list(self.driver, tree)

    # -- commands -----------------------------------------------------------------------

    def run(self, kind: str, operation: Callable[[Driver], object], host: HostInfo | None = None
            ) -> tuple[int, int | None]:
        """Apply one command the way the guest's ``jailhouse`` tool and daemon do.

        :param kind: ``enable``, ``disable``, ``create``, ``load``, ``shutdown``, ``start``,
            ``destroy``
        :param operation: the Driver call
        :param host: the guest's machine, for an ``enable`` that starts a daemon
        :return: ``(ioctl result, None)`` or ``(-ENOENT, 0)``-style pairs: the second item
            is not None when the command never reached an ioctl (module not loaded) and
            then is the errno ``opening /dev/jailhouse`` failed with
        """
        if kind != "enable" and not self.module_loaded:
            return -errno_mod.ENOENT, errno_mod.ENOENT
        started = False
        if kind == "enable" and self.driver is None:
            self._start(host or self.host)
            started = True
        driver = self.driver
        if driver is None:
            return -errno_mod.EINVAL, None  # the module loaded, no daemon: every ioctl EINVAL
        try:
            if kind in ("load", "shutdown", "start", "destroy") and not driver.enabled:
                raise HvError(Errno.EINVAL, "hypervisor not enabled")
            operation(driver)
            result = 0
        except HvError as err:
            result = err.code
        except Exception:  # the daemon answers EIO for a model bug
            LOG.exception("the oracle's model failed on %s", kind)
            result = -errno_mod.EIO
        self.refresh()  # the daemon refreshes sysfs after every operation it serves
        if (kind == "disable" and result == 0) or (started and not driver.enabled):
            self._end()
        return result, None


def tool_output(kind: str, code: int, open_errno: int | None) -> tuple[int, str, str]:
    """What the ``jailhouse`` tool prints for an ioctl result: status, stdout, stderr."""
    if open_errno is not None:
        return 1, "", f"opening /dev/jailhouse: {os.strerror(open_errno)}\n"
    if code == 0:
        return 0, "", ""
    return 1, "", f"{IOCTL[kind]}: {os.strerror(-code)}\n"
