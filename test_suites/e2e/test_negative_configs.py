"""Every cell-create error of the reference (§3.5, §6.2), and the errors of the other cell
commands, provoked for real with the ``jailhouse`` command in the lab.

Each step goes through :class:`~harness.checked.CheckedJailhouse`: the guest's exit
status and message (``JAILHOUSE_CELL_CREATE: File exists``) must be what the oracle
predicts, and nothing else may change (``cell list``, sysfs, CPUs, PCI bindings, console);
``expect=`` states which error the step is meant to provoke, so a config that fails for
another reason fails the test. Where a cell list results, it is also held against
Jailhouse's own format (``jailhouse_output``): a refused create leaves nothing behind.
The configs are jhlab's demo cells, altered in one field (or one header byte) each. The
cells are created on the executor by default (real KVM VMs, cpusets and memory, whose
refusals must unwind as well); ``--hv-arch oracle`` runs the bookkeeping-only variant.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest
from jailhouse_output import RUNNING, RUNNING_LOCKED, SHUT_DOWN, cell_list
from jailhouse_output import cell as listed

from harness.checked import CheckedJailhouse, Locks
from harness.hvmodel.config import CellConfig, Irqchip, MemoryRegion, load_source
from harness.lab import Lab
from harness.recipes import CONFIGS, find_recipes

pytestmark = [pytest.mark.lab, pytest.mark.slow]

CELLS = find_recipes().cells
#: qemu-x86's root cell
ROOT = "QEMU-VM"
#: offset of ``cpu_set_size`` in ``struct jailhouse_cell_desc``
CPU_SET_SIZE_OFFSET = 48


def cell(name: str) -> CellConfig:
    config = load_source(CELLS / f"{name}.toml")
    assert isinstance(config, CellConfig)
    return config


def on_cpus(config: CellConfig, name: str, *cpus: int) -> CellConfig:
    """``config`` renamed and moved to ``cpus``."""
    mask = sum(1 << cpu for cpu in cpus)
    return dataclasses.replace(config, name=name, cpu_set=mask.to_bytes(8, "little"))


def patched(config: CellConfig, offset: int, data: bytes) -> bytes:
    raw = bytearray(config.to_bytes())
    raw[offset:offset + len(data)] = data
    return bytes(raw)


def test_driver_checks(jailhouse: CheckedJailhouse) -> None:
    """The Linux driver's checks (§6.2 CELL_CREATE): not enabled, short or foreign
    config, wrong revision, the architecture quirk (returns 0, creates nothing), CPU 0,
    CPUs the root does not own (unknown CPU, CPU of another cell), and a name taken."""
    jh = jailhouse
    hello = cell("hello")
    # Jailhouse's module stays loaded after a disable: then the driver refuses (EINVAL);
    # before any enable in this lab there is no /dev/jailhouse to open (ENOENT).
    if "enabled" in jh.baseline.sysfs:
        before = jh.cell_create(hello, expect="EINVAL")
        assert before.stderr == "JAILHOUSE_CELL_CREATE: Invalid argument\n"
    else:
        before = jh.cell_create(hello, expect="ENOENT")
        assert before.stderr == "opening /dev/jailhouse: No such file or directory\n"
    jh.enable(CONFIGS / "qemu-x86.toml")

    short = jh.cell_create(hello.to_bytes()[:100], expect="EINVAL")
    assert short.stderr == "JAILHOUSE_CELL_CREATE: Invalid argument\n"
    jh.cell_create(patched(hello, 0, b"JHSYS"), expect="EINVAL")        # not a cell config
    jh.cell_create(patched(hello, 6, struct.pack("<H", 13)), expect="EINVAL")   # revision
    foreign = jh.cell_create(patched(hello, 5, b"\x01"), expect=0)     # arm: quirk, nothing made
    assert "hello" not in foreign.view.cell_list
    jh.cell_create(on_cpus(hello, "cpu0", 0), expect="EINVAL")         # Cannot assign CPU 0
    jh.cell_create(on_cpus(hello, "cpu5", 5), expect="EBUSY")          # not the root's
    raw = bytearray(on_cpus(hello, "bigset", 2).to_bytes())
    struct.pack_into("<I", raw, CPU_SET_SIZE_OFFSET, 8 + 4096)
    raw[132 + 8:132 + 8] = bytes(4096)

    refused = jh.cell_create(bytes(raw), expect="EINVAL")               # cpu_set_size > 4096
    assert refused.view.cell_list == cell_list(listed(0, ROOT, RUNNING, range(4)))

    jh.cell_create(hello)
    taken = jh.cell_create(hello, expect="EEXIST")
    assert taken.stderr == "JAILHOUSE_CELL_CREATE: File exists\n"
    busy = jh.cell_create(on_cpus(hello, "hello-b", 2), expect="EBUSY")  # CPU 2 is hello's
    assert busy.stderr == "JAILHOUSE_CELL_CREATE: Device or resource busy\n"
    assert busy.view.cell_list == cell_list(listed(0, ROOT, RUNNING, [0, 1, 3]),
                                            listed(1, "hello", SHUT_DOWN, [2]))


def test_hypervisor_checks(jailhouse: CheckedJailhouse) -> None:
    """The hypervisor's checks (§3.5): a config beyond 16 temporary pages (E2BIG), an
    IOAPIC with ``pin_base`` != 0 (EINVAL), ivshmem peer ID 12 or more (EINVAL) and a peer
    ID already on the link (EBUSY)."""
    jh = jailhouse
    jh.enable(CONFIGS / "qemu-x86.toml")
    hello = cell("hello")
    extra = tuple(MemoryRegion(phys_start=0x3a600000 + i * 0x1000, virt_start=0x200000 + i * 0x1000,
                               size=0x1000, flags=0x3) for i in range(2100))
    huge = dataclasses.replace(hello, name="huge", memory_regions=hello.memory_regions + extra)
    too_big = jh.cell_create(huge, expect="E2BIG")
    assert too_big.stderr == "JAILHOUSE_CELL_CREATE: Argument list too long\n"
    pins = dataclasses.replace(hello, name="pins", irqchips=(
        Irqchip(address=0xFEC00000, id=0xFEC00000, pin_base=24, pin_bitmap=(1, 0, 0, 0)),))
    refused = jh.cell_create(pins, expect="EINVAL")
    assert refused.view.cell_list == cell_list(listed(0, ROOT, RUNNING, range(4)))

    peer1, peer2 = cell("ivshmem"), cell("ivshmem-2")
    device = peer2.pci_devices[0]
    def peer2_as(dev_id: int) -> CellConfig:
        return dataclasses.replace(peer2, pci_devices=(dataclasses.replace(device, shmem_dev_id=dev_id),))

    jh.cell_create(peer2_as(12), expect="EINVAL")
    jh.cell_create(peer1)
    taken = jh.cell_create(peer2_as(1), expect="EBUSY")
    assert taken.view.cell_list == cell_list(listed(0, ROOT, RUNNING, [0, 2, 3]),
                                             listed(1, "ivshmem", SHUT_DOWN, [1]))
    both = jh.cell_create(peer2)
    assert both.view.cell_list == cell_list(listed(0, ROOT, RUNNING, [0, 3]),
                                            listed(1, "ivshmem", SHUT_DOWN, [1]),
                                            listed(2, "ivshmem-2", SHUT_DOWN, [2]))


def test_cell_command_errors(jailhouse: CheckedJailhouse, inmates: Path) -> None:
    """load/start/shutdown/destroy on the wrong target: unknown name or id (ENOENT), the
    root cell (EINVAL), an image outside every region, into the non-loadable comm region
    or larger than its region (EINVAL)."""
    jh = jailhouse
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(cell("hello"))
    image = (inmates / "hello.bin").read_bytes()
    nowhere = jh.cell_load("hello", image, 0x200000, expect="EINVAL")
    assert nowhere.stderr == "JAILHOUSE_CELL_LOAD: Invalid argument\n"
    jh.cell_load("hello", image, 0x100000, expect="EINVAL")             # comm region
    jh.cell_load("hello", bytes(0x100000 + 1), 0, expect="EINVAL")      # bigger than the RAM
    unknown = jh.cell_start("nosuchcell", expect="ENOENT")
    assert unknown.stderr == "JAILHOUSE_CELL_START: No such file or directory\n"
    jh.cell_destroy(7, expect="ENOENT")
    jh.cell_shutdown("nosuchcell", expect="ENOENT")
    jh.cell_start(0, expect="EINVAL")
    jh.cell_destroy(0, expect="EINVAL")
    loaded = jh.cell_load("hello", image)   # still loadable after all that
    assert loaded.view.cell_list == cell_list(listed(0, ROOT, RUNNING, [0, 1, 3]),
                                              listed(1, "hello", SHUT_DOWN, [2]))


@pytest.mark.kvm
def test_running_locked_cell_blocks_reconfiguration(jailhouse: CheckedJailhouse, inmates: Path,
                                                    lab: Lab) -> None:
    """While apic-timer runs locked (RUNNING_LOCKED, set by the inmate itself), creating
    a cell and destroying another one fail with EPERM; its first shutdown is refused
    (EPERM), the second one unlocks everything. Its timer lines go to its config's UART
    (serial 1), not to the hypervisor's (serial 0)."""
    jh = jailhouse
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(cell("hello"))
    jh.cell_create(cell("apic-timer"))
    jh.cell_load("apic-timer", inmates / "apic-timer.bin")
    mark = lab.console.mark()
    jh.cell_start("apic-timer", effects=[Locks("apic-timer")])
    jh.expect_inmate(r"Timer fired, jitter: +-?\d+ ns", timeout=120)
    assert "Timer fired" not in lab.console.since(mark)
    locked = jh.cell_create(on_cpus(cell("hello"), "hello-1", 1), expect="EPERM")
    assert locked.stderr == "JAILHOUSE_CELL_CREATE: Operation not permitted\n"
    assert locked.view.cell_list == cell_list(listed(0, ROOT, RUNNING, [0, 1]),
                                              listed(1, "hello", SHUT_DOWN, [2]),
                                              listed(2, "apic-timer", RUNNING_LOCKED, [3]))
    jh.cell_destroy("hello", expect="EPERM")
    jh.cell_shutdown("apic-timer", expect="EPERM")
    jh.expect_inmate(r"Rejecting first shutdown request", timeout=60)
    jh.cell_shutdown("apic-timer")
    jh.cell_destroy("hello")
    jh.cell_create(on_cpus(cell("hello"), "hello-1", 1))
