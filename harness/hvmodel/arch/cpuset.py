"""Taking cell CPUs from the root cell's scheduling; stands where Jailhouse's driver takes
them offline (``jailhouse_cmd_cell_create`` in ``driver/cell.c`` calls ``cpu_down`` for every
CPU of a new cell, ``jailhouse_cmd_cell_destroy`` brings them back with ``cpu_up``).

jhlab cannot offline a cell's CPUs: the cell's vCPU threads run on them. Instead the
root's tasks are confined to the CPUs the root cell still owns, with a cgroup v2 cpuset
(Debian 6.1: cgroup2 at ``/sys/fs/cgroup``, ``CONFIG_CPUSETS``):

1. ``+cpuset`` in the root cgroup's ``cgroup.subtree_control``, and a child group
   ``jailhouse-root``;
2. ``jailhouse-root/cpuset.cpus`` = the CPUs the root cell owns now;
3. every process of the root cgroup moves into it, except the hypervisor's own process
   (its vCPU threads must reach the cell CPUs; they pin themselves there) and kernel
   threads, which cannot be moved (per-CPU ones must stay; unbound ones may still run on
   a cell CPU). Children inherit their parent's group, so a command started later from a
   root shell lands in ``jailhouse-root`` too; each :meth:`RootCpuset.apply` sweeps the
   root cgroup again for processes that appeared there meanwhile;
4. destroy grows the set again (with no cell left: every CPU, so every task's allowed
   CPUs are all CPUs again); at disable :meth:`RootCpuset.release` moves the tasks back,
   removes the group and restores ``subtree_control``: the machine is as before.

Chosen over a cpuset *partition* for the cells (``cpuset.cpus.partition = root``): a
partition takes its CPUs from the root cgroup itself, i.e. from the hypervisor's own
process too, whose vCPU threads could then only reach them from a *threaded* child group
(``cgroup.threads``), which would bind the design to the daemon's cgroup layout. Limits,
as with any cpuset: a task's own affinity mask is replaced by the group's CPUs when it
moves; interrupts are not steered; processes in other cgroups than the root cgroup are
not touched.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from ..cpus import format_cpu_list

__all__ = ["DEFAULT_GROUP", "RootCpuset"]

LOG = logging.getLogger(__name__)

DEFAULT_GROUP: Final = "jailhouse-root"
#: ``PF_KTHREAD`` in the flags field of ``/proc/PID/stat``
PF_KTHREAD: Final = 0x00200000


class RootCpuset:
    """Keeps the root cell's tasks on the root cell's CPUs (see the module docstring).

    Lifecycle: inactive when built; :meth:`apply` creates the group (first call) and sets
    its CPUs; :meth:`release` undoes everything and is idempotent. Not thread-safe: the
    executor calls it with its own lock held.

    :param cgroup_root: where cgroup2 is mounted
    :param name: the child group for the root cell's tasks
    :param proc: where procfs is mounted
    :param keep: processes that stay in the root cgroup (default: this process)
    """

    def __init__(
        self,
        cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup",
        name: str = DEFAULT_GROUP,
        *,
        proc: str | os.PathLike[str] = "/proc",
        keep: Iterable[int] | None = None,
    ) -> None:
        self.root = Path(cgroup_root)
        self.group = self.root / name
        self.proc = Path(proc)
        self._proc_base = os.fspath(proc)
        self.keep = frozenset(keep) if keep is not None else frozenset({os.getpid()})
        #: whether the group exists and confines the root's tasks
        self.active = False
        #: the CPUs written last by :meth:`apply`
        self.cpus: frozenset[int] = frozenset()
        self._added_controller = False
        #: root-cgroup pids known to be kernel threads (checked once, not at every sweep:
        #: under the lab's TCG reading ~100 stat files costs a tenth of a second); a pid
        #: is forgotten once a sweep no longer finds it, so a reused pid is checked anew
        self._kernel_threads: set[int] = set()

    def __repr__(self) -> str:
        return f"RootCpuset({str(self.group)!r}, active={self.active}, cpus={sorted(self.cpus)})"

    @property
    def available(self) -> bool:
        """Whether cgroup v2 with the cpuset controller is mounted at :attr:`root`."""
        try:
            controllers = (self.root / "cgroup.controllers").read_text().split()
        except OSError:
            return False
        return "cpuset" in controllers

    def adopt(self, pid: int | None = None) -> bool:
        """Move process ``pid`` (default: this one) into the root cgroup if it is elsewhere,
        so that no cpuset keeps its threads from the cell CPUs.

        :return: True when it was moved
        :raise OSError: when the move fails
        """
        pid = os.getpid() if pid is None else pid
        try:
            current = (self.proc / str(pid) / "cgroup").read_text()
        except OSError:
            return False
        if any(line.startswith("0::") and line.strip() == "0::/" for line in current.splitlines()):
            return False
        _write(self.root / "cgroup.procs", str(pid))
        LOG.info("process %d moved to the root cgroup", pid)
        return True

    def apply(self, root_cpus: Iterable[int]) -> list[int]:
        """Confine the root's tasks to ``root_cpus`` (creating the group on first use).

        :param root_cpus: the CPUs the root cell owns now (not empty)
        :return: the processes moved into the group by this call
        :raise OSError: when the controller or the group cannot be set up
        :raise ValueError: for an empty CPU set
        """
        cpus = frozenset(root_cpus)
        if not cpus:
            raise ValueError("the root cell needs at least one CPU")
        if not self.active:
            self._setup()
        if cpus != self.cpus:
            _write(self.group / "cpuset.cpus", format_cpu_list(cpus))
            self.cpus = cpus
        return self._sweep()

    def _setup(self) -> None:
        control = self.root / "cgroup.subtree_control"
        enabled = control.read_text().split()
        if "cpuset" not in enabled:
            _write(control, "+cpuset")
            self._added_controller = True
        try:
            self.group.mkdir()
        except FileExistsError:
            LOG.warning("%s exists (left by an earlier run?); reusing it", self.group)
        self.active = True
        LOG.info("root cell cpuset %s created", self.group)

    def _sweep(self) -> list[int]:
        moved: list[int] = []
        listed = self._procs(self.root)
        self._kernel_threads.intersection_update(listed)
        for pid in listed:
            if pid in self.keep or pid in self._kernel_threads:
                continue
            kind = self._kernel_thread(pid)
            if kind is None:
                continue  # gone (or unreadable): nothing to move
            if kind:
                self._kernel_threads.add(pid)
                continue
            try:
                _write(self.group / "cgroup.procs", str(pid))
            except OSError as exc:
                if exc.errno not in (errno.ESRCH, errno.ENOENT):
                    LOG.debug("cannot move process %d into %s: %s", pid, self.group, exc)
                continue
            moved.append(pid)
        if moved:
            LOG.debug("moved %d processes into %s", len(moved), self.group)
        return moved

    def release(self) -> None:
        """Move the tasks back to the root cgroup, remove the group, restore the
        controller setting; idempotent. Failures are logged, never raised (teardown)."""
        if not self.active:
            return
        for attempt in range(3):
            for pid in self._procs(self.group):
                try:
                    _write(self.root / "cgroup.procs", str(pid))
                except OSError as exc:
                    if exc.errno not in (errno.ESRCH, errno.ENOENT):
                        LOG.warning("cannot move process %d back to the root cgroup: %s", pid, exc)
            try:
                self.group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                # A process forked into the group while we moved the others: go again.
                if attempt == 2:
                    LOG.warning("cannot remove %s: %s", self.group, exc)
        if self._added_controller:
            try:
                _write(self.root / "cgroup.subtree_control", "-cpuset")
            except OSError as exc:
                LOG.debug("cpuset controller stays enabled in %s: %s", self.root, exc)
            self._added_controller = False
        self.active = False
        self.cpus = frozenset()
        LOG.info("root cell cpuset %s released", self.group)

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _procs(group: Path) -> list[int]:
        try:
            text = (group / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(line) for line in text.split() if line.isdigit()]

    def _kernel_thread(self, pid: int) -> bool | None:
        """Whether ``pid`` is a kernel thread; None when it is gone or unreadable."""
        try:
            fd = os.open(f"{self._proc_base}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            stat = os.read(fd, 4096)
        except OSError:
            return None
        finally:
            os.close(fd)
        fields = stat.rpartition(b")")[2].split()
        try:
            return bool(int(fields[6]) & PF_KTHREAD)
        except (IndexError, ValueError):
            return False


def _write(path: Path, text: str) -> None:
    """One ``write(2)`` of ``text`` (cgroup files take one value per write; they ignore the
    file offset, so ``O_APPEND`` changes nothing there and lets plain files record every
    write, which the unit tests read back)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode() + b"\n")
    finally:
        os.close(fd)
