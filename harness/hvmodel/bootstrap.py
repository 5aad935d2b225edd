"""Enabling the hypervisor; models ``hypervisor/setup.c`` (renamed: ``setup.py`` means
something else in Python).

The sequence, with Jailhouse's console lines: banner and code location on the first CPU
to arrive; page pools; arch init; ``Using x2APIC``; the early pool usage; every CPU
initialised; the root cell built from the system config (its CPUs, I/O bitmap and MMIO
table); every unit's ``init`` (which takes the root's devices, IOAPIC pins, ...); the
root's memory mapped; the first commit; the late pool usage; ``Activating hypervisor``.

Checked first: the CPUs that enter must be exactly the root cell's CPUs (Jailhouse
compares the count of online CPUs with the root CPU set; a CPU outside the set fails
the same way), else ``EINVAL``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from .abi import PAGE_SIZE, CellState
from .core import HvState
from .errors import Errno, HvError
from .mmio import is_subpage
from .paging import NUM_REMAP_BITMAP_PAGES, NUM_TEMPORARY_PAGES, pages
from .percpu import PerCpu
from .printk import MSG_INIT_UNIT

if TYPE_CHECKING:
    from .core import HypervisorCore


def enable(hv: HypervisorCore, online_cpus: list[int], master_cpu: int | None) -> None:
    """Run the enable sequence on ``hv`` (lock held by the caller, the
    :class:`~harness.hvmodel.control.Hypervisor`'s :meth:`enable
    <harness.hvmodel.control.Hypervisor.enable>`).

    :raise HvError: ``EINVAL`` for a CPU mismatch; ``ENOMEM``; Arch or unit errors
    """
    system = hv.system
    params = hv.params
    root_config = system.root_cell
    root_cpus = root_config.cpus
    if len(online_cpus) != len(root_cpus) or not set(online_cpus) <= root_cpus:
        raise HvError(
            Errno.EINVAL,
            f"online CPUs {online_cpus} do not match the root cell's CPUs {sorted(root_cpus)}",
        )
    if master_cpu is None or master_cpu not in online_cpus:
        master_cpu = online_cpus[0]
    console = hv.console
    console.printk("Initializing Jailhouse hypervisor %s on CPU %d\n", params.version, master_cpu)
    console.printk("Code location: 0x%016x\n", params.code_location)

    # paging_init: the pool is what follows the core image; per-CPU data and the
    # pool's own bitmap are taken from it first.
    pool_pages = (system.hypervisor_memory.size - params.core_size) // PAGE_SIZE
    hv.mem_pool.size = max(pool_pages, 0)
    hv.mem_pool.used = 0
    bitmap_pages = (hv.mem_pool.size + PAGE_SIZE * 8 - 1) // (PAGE_SIZE * 8)
    hv.mem_pool.alloc(params.percpu_pages * hv.max_cpus + bitmap_pages)
    hv.mem_pool.alloc(NUM_REMAP_BITMAP_PAGES)  # the remap pool's bitmap
    hv.remap_pool.used = 0
    hv.remap_pool.alloc(hv.max_cpus * NUM_TEMPORARY_PAGES)
    hv.mem_pool.alloc(pages(system.size))

    hv.arch.init(system)
    console.write("Using x2APIC\n" if params.x2apic else "Using xAPIC\n")
    hv._dump_stats("after early setup")

    console.write("Initializing processors:\n")
    order = [master_cpu] + [cpu for cpu in online_cpus if cpu != master_cpu]
    raw_root = root_config.to_bytes()
    with contextlib.ExitStack() as undo:
        root = hv._new_cell(root_config.id, root_config, raw_root, undo)
        hv.root = root
        hv.cells = [root]
        for cpu in order:
            console.printk(" CPU %d... (APIC ID %d) OK\n", cpu, cpu)
            hv.cpus[cpu] = PerCpu(cpu, root)
        root.data_pages = 0
        hv._arch_cell_create(root, undo)
        for unit in hv.units:
            console.printk(MSG_INIT_UNIT, unit.name)
            unit.init()
        for mem in root_config.memory_regions:
            if is_subpage(mem):
                hv._subpage_register(root, mem)
            else:
                hv._map_region(root, mem)
        hv._config_commit(root)
        root.state = CellState.RUNNING
        undo.pop_all()
    hv.online_cpus = tuple(order)
    hv._dump_stats("after late setup")
    console.write("Activating hypervisor\n")
    hv.state = HvState.ENABLED
