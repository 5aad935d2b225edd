"""``/sys/devices/jailhouse`` and ``jailhouse cell list``; models ``driver/sysfs.c`` and
the ``cell list`` part of ``tools/jailhouse.c``.

:func:`sysfs_tree` renders the tree as ``{relative path: file text}`` with the driver's
exact names and formats; the values come from hypercalls, as in the driver (so reading
the tree counts hypercalls on the reading CPU, as reading the real files does).
:func:`cell_list` renders the ``jailhouse cell list`` table from that tree.

Not rendered: the binary ``core`` file, and ``console`` when the system config does not
set ``JAILHOUSE_SYS_VIRTUAL_DEBUG_CONSOLE`` (reading it fails with ``EPERM`` there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from .abi import (
    CPU_INFO_STAT_BASE,
    CPU_INFO_STATE,
    CpuInfoState,
    CpuStat,
    Hypercall,
    InfoType,
    state_text,
)
from .cpus import format_cpu_list, format_cpu_mask

if TYPE_CHECKING:
    from .driver import Driver

__all__ = ["CELL_LIST_HEADER", "cell_list", "sysfs_tree"]

SYS_VIRTUAL_DEBUG_CONSOLE: Final = 0x0001
_ROW: Final = "%-8s%-24s%-18s%-24s%-24s\n"
#: the header line of ``jailhouse cell list``
CELL_LIST_HEADER: Final = _ROW % ("ID", "Name", "State", "Assigned CPUs", "Failed CPUs")

_POOL_FILES: Final = (
    ("mem_pool_size", InfoType.MEM_POOL_SIZE),
    ("mem_pool_used", InfoType.MEM_POOL_USED),
    ("remap_pool_size", InfoType.REMAP_POOL_SIZE),
    ("remap_pool_used", InfoType.REMAP_POOL_USED),
)


def sysfs_tree(driver: Driver) -> dict[str, str]:
    """The files under ``/sys/devices/jailhouse`` and their contents.

    :param driver: the driver whose state (and hypervisor) is shown
    """
    tree: dict[str, str] = {}
    hv = driver.hv
    tree["enabled"] = "1\n" if hv is not None else "0\n"
    system = driver.system
    if hv is None or system is None:
        for name, _ in _POOL_FILES:
            tree[name] = "0\n"
        tree["console"] = ""
        return tree
    caller = min(driver.root.cpus_assigned & driver.online)

    def call(code: Hypercall, arg1: int = 0, arg2: int = 0) -> int:
        return hv.hypercall(caller, code, arg1, arg2)

    for name, info in _POOL_FILES:
        tree[name] = "%d\n" % call(Hypercall.HYPERVISOR_GET_INFO, info)
    if system.flags & SYS_VIRTUAL_DEBUG_CONSOLE:
        tree["console"] = hv.console.content
    nbits = driver.host.possible_cpus
    for cell_id in sorted(driver.cells):
        cell = driver.cells[cell_id]
        base = f"cells/{cell_id}/"
        cpus = sorted(cell.cpus_assigned)
        tree[base + "name"] = cell.name + "\n"
        state = call(Hypercall.CELL_GET_STATE, cell_id)
        tree[base + "state"] = (state_text(state) if state >= 0 else "invalid") + "\n"
        tree[base + "cpus_assigned"] = format_cpu_mask(cpus, nbits) + "\n"
        tree[base + "cpus_assigned_list"] = format_cpu_list(cpus) + "\n"
        failed = [
            cpu for cpu in cpus if call(Hypercall.CPU_GET_INFO, cpu, CPU_INFO_STATE) == CpuInfoState.FAILED
        ]
        tree[base + "cpus_failed"] = format_cpu_mask(failed, nbits) + "\n"
        tree[base + "cpus_failed_list"] = format_cpu_list(failed) + "\n"
        for stat in CpuStat:
            values = [call(Hypercall.CPU_GET_INFO, cpu, CPU_INFO_STAT_BASE + stat) for cpu in cpus]
            name = stat.sysfs_name
            tree[f"{base}statistics/{name}"] = "%d\n" % sum(v for v in values if v >= 0)
            for cpu, value in zip(cpus, values, strict=True):
                tree[f"{base}statistics/cpu{cpu}/{name}"] = "%d\n" % max(value, 0)
    return tree


def cell_list(driver: Driver, tree: dict[str, str] | None = None) -> str:
    """``jailhouse cell list``: nothing without cells, else header and one row per cell
    in ``alphasort`` order of the id directory names.

    :param tree: an already read :func:`sysfs_tree` (read afresh when None)
    """
    if tree is None:
        tree = sysfs_tree(driver) if driver.enabled else {}
    ids = sorted({path.split("/")[1] for path in tree if path.startswith("cells/")})
    if not ids:
        return ""
    lines = [CELL_LIST_HEADER]
    for cell_id in ids:
        base = f"cells/{cell_id}/"
        lines.append(
            _ROW
            % (
                "%d" % int(cell_id),
                tree[base + "name"].rstrip("\n"),
                tree[base + "state"].rstrip("\n"),
                tree[base + "cpus_assigned_list"].rstrip("\n"),
                tree[base + "cpus_failed_list"].rstrip("\n"),
            )
        )
    return "".join(lines)
