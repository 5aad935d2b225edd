"""Every error path of the control plane (reference §3.4-3.11), table-driven.

Each case builds an enabled hypervisor on the oracle, arranges the precondition, issues
one hypercall and checks Jailhouse's negative errno, and that a failed create left
nothing behind (pools, CPUs, cells and root mappings as before).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

import pytest
from test_model_configs import (
    apic_demo,
    inmate,
    ivshmem_demo,
    linux_x86_demo,
    pci_demo,
    qemu_x86,
    tiny_demo,
    with_id,
)

from harness.hvmodel.abi import CellState, Hypercall, Reply
from harness.hvmodel.arch.oracle import OracleArch
from harness.hvmodel.config import (
    CacheRegion,
    CellConfig,
    Irqchip,
    MemoryRegion,
    PciDevice,
    SystemConfig,
)
from harness.hvmodel.control import HvParams, Hypervisor, ModelStateError
from harness.hvmodel.errors import Errno, HvError
from harness.hvmodel.params import CatHardware

EPERM, ENOENT, EIO, E2BIG = -Errno.EPERM, -Errno.ENOENT, -Errno.EIO, -Errno.E2BIG
ENOMEM, EBUSY, EEXIST, EINVAL = -Errno.ENOMEM, -Errno.EBUSY, -Errno.EEXIST, -Errno.EINVAL
ERANGE, ENOSYS = -Errno.ERANGE, -Errno.ENOSYS


class Bench:
    """An enabled hypervisor on the oracle with helpers to stage and create cells."""

    def __init__(
        self,
        system: SystemConfig | None = None,
        params: HvParams | None = None,
        *,
        arch_class: type[OracleArch] = OracleArch,
        **arch: object,
    ) -> None:
        self.arch = arch_class(**arch)  # type: ignore[arg-type]
        self.hv = Hypervisor(system or qemu_x86(), self.arch, params=params)
        self.hv.enable([0, 1, 2, 3])

    def stage(self, data: bytes) -> int:
        return self.arch.root_buffer_alloc(data)

    def create(self, config: CellConfig, cell_id: int, cpu: int = 0) -> int:
        return self.hv.hypercall(
            cpu, Hypercall.CELL_CREATE, self.stage(with_id(config, cell_id).to_bytes())
        )

    def call(self, code: Hypercall, arg1: int = 0, arg2: int = 0, cpu: int = 0) -> int:
        return self.hv.hypercall(cpu, code, arg1, arg2)

    def running(self, config: CellConfig, cell_id: int) -> None:
        assert self.create(config, cell_id) == 0
        assert self.call(Hypercall.CELL_SET_LOADABLE, cell_id) == 0
        assert self.call(Hypercall.CELL_START, cell_id) == 0

    def footprint(self) -> tuple[object, ...]:
        hv = self.hv
        return (
            hv.pool_usage(),
            [cell.name for cell in hv.cells],
            sorted(hv.root.cpus),
            hv.root.ept.mappings,
            bytes(hv.root.pio_open),
            [dev.bdf for dev in hv.root.owned_devices()],
            [view.pin_bitmap for view in hv.root.ioapics],
            hv.root.mmio.regions(),
            hv.ivshmem.to_dict(),
        )


def raw_with(config: CellConfig, **header: int) -> bytes:
    """Config bytes with descriptor fields patched (cpu_set_size=..., id=...)."""
    data = bytearray(config.to_bytes())
    offsets = {"id": 40, "cpu_set_size": 48, "num_memory_regions": 52}
    for name, value in header.items():
        struct.pack_into("<I", data, offsets[name], value)
    return bytes(data)


def big_config(regions: int) -> CellConfig:
    """A cell with many (empty) memory regions, to make the config large."""
    return dataclasses.replace(
        tiny_demo(), memory_regions=tiny_demo().memory_regions + (MemoryRegion(),) * regions
    )


# Each case: (id, arrange(bench) -> hypercall result, expected code)
Case = tuple[str, Callable[[Bench], int], int]


def _create_from_cell_cpu(b: Bench) -> int:
    b.running(tiny_demo(), 1)
    return b.create(apic_demo(), 2, cpu=2)


def _create_while_locked(b: Bench) -> int:
    b.running(apic_demo(), 1)
    b.hv.cell_by_id(1).state = CellState.RUNNING_LOCKED  # type: ignore[union-attr]
    return b.create(tiny_demo(), 2)


def _create_unmapped_header(b: Bench) -> int:
    return b.call(Hypercall.CELL_CREATE, 0x12345000)


def _create_unmapped_body(b: Bench) -> int:
    data = with_id(big_config(200), 1).to_bytes()
    return b.call(Hypercall.CELL_CREATE, b.stage(data[:132]))


def _create_name_exists(b: Bench) -> int:
    b.create(tiny_demo(), 1)
    return b.create(tiny_demo(), 2)


def _create_id_exists(b: Bench) -> int:
    b.create(tiny_demo(), 1)
    return b.create(apic_demo(), 1)


def _create_root_name(b: Bench) -> int:
    return b.create(dataclasses.replace(tiny_demo(), name="QEMU-VM"), 1)


def _create_too_big(b: Bench) -> int:
    return b.create(big_config(2100), 1)


def _create_too_big_by_offset(b: Bench) -> int:
    data = with_id(big_config(1930), 1).to_bytes()
    assert len(data) <= 16 * 4096 < 0xF00 + len(data)
    address = b.stage(bytes(0xF00) + data) + 0xF00
    return b.call(Hypercall.CELL_CREATE, address)


def _create_no_memory(b: Bench) -> int:
    return b.create(linux_x86_demo(), 1)


def _create_cpu_set_too_big(b: Bench) -> int:
    data = raw_with(with_id(tiny_demo(), 1), cpu_set_size=5000)
    cpu_set = b"\x04" + bytes(4999)
    return b.call(Hypercall.CELL_CREATE, b.stage(data[:132] + cpu_set + data[140:]))


def _create_with_calling_cpu(b: Bench) -> int:
    return b.create(dataclasses.replace(tiny_demo(), cpu_set=b"\x01" + bytes(7)), 1)


def _create_cpu_taken(b: Bench) -> int:
    b.create(tiny_demo(), 1)
    return b.create(dataclasses.replace(apic_demo(), cpu_set=b"\x04" + bytes(7)), 2)


def _create_cpu_outside_system(b: Bench) -> int:
    return b.create(dataclasses.replace(tiny_demo(), cpu_set=b"\x80" + bytes(7)), 1)


def _irqchip_cell(chips: tuple[Irqchip, ...]) -> CellConfig:
    return dataclasses.replace(tiny_demo(), irqchips=chips)


def _create_pin_base(b: Bench) -> int:
    chip = Irqchip(address=0xFEC00000, id=0xFF00, pin_base=32, pin_bitmap=(1, 0, 0, 0))
    return b.create(_irqchip_cell((chip,)), 1)


def _create_many_irqchips(b: Bench) -> int:
    chip = Irqchip(address=0xFEC00000, id=0xFF00, pin_bitmap=(0x200, 0, 0, 0))
    return b.create(_irqchip_cell((chip,) * 86), 1)


def _create_ioapic_too_many_pins(b: Bench) -> int:
    b.arch.ioapic_pins = 121
    chip = Irqchip(address=0xFEC10000, id=0xFF01, pin_bitmap=(1, 0, 0, 0))
    return b.create(_irqchip_cell((chip,)), 1)


def _cat_bench() -> Bench:
    return Bench(params=HvParams(cat=CatHardware(cbm_length=8, num_cos=2)))


def _create_cat_two_regions(b: Bench) -> int:
    regions = (CacheRegion(start=0, size=2, type=3), CacheRegion(start=2, size=2, type=3))
    return b.create(dataclasses.replace(tiny_demo(), cache_regions=regions), 1)


def _create_cat_not_l3(b: Bench) -> int:
    regions = (CacheRegion(start=0, size=2, type=1),)
    return b.create(dataclasses.replace(tiny_demo(), cache_regions=regions), 1)


def _create_cat_empty(b: Bench) -> int:
    regions = (CacheRegion(start=0, size=0, type=3),)
    return b.create(dataclasses.replace(tiny_demo(), cache_regions=regions), 1)


def _create_cat_beyond_cbm(b: Bench) -> int:
    regions = (CacheRegion(start=6, size=4, type=3),)
    return b.create(dataclasses.replace(tiny_demo(), cache_regions=regions), 1)


def _create_cat_no_cos(b: Bench) -> int:
    assert b.create(apic_demo(), 1) == 0
    return b.create(tiny_demo(), 2)


def _ivshmem_cell(**dev: int) -> CellConfig:
    base = ivshmem_demo()
    device = dataclasses.replace(base.pci_devices[0], **dev)
    return dataclasses.replace(base, pci_devices=(device,))


def _create_ivshmem_regions(b: Bench) -> int:
    return b.create(_ivshmem_cell(shmem_regions_start=4), 1)


def _create_ivshmem_vectors(b: Bench) -> int:
    return b.create(_ivshmem_cell(num_msix_vectors=17), 1)


def _create_ivshmem_id(b: Bench) -> int:
    return b.create(_ivshmem_cell(shmem_dev_id=12), 1)


def _create_ivshmem_id_taken(b: Bench) -> int:
    return b.create(_ivshmem_cell(shmem_dev_id=0), 1)


def _manage_from_cell(code: Hypercall) -> Callable[[Bench], int]:
    def run(b: Bench) -> int:
        b.running(tiny_demo(), 1)
        return b.call(code, 1, cpu=2)

    return run


def _manage_unknown(code: Hypercall) -> Callable[[Bench], int]:
    return lambda b: b.call(code, 7)


def _manage_root(code: Hypercall) -> Callable[[Bench], int]:
    return lambda b: b.call(code, 0)


def _manage_denied(code: Hypercall) -> Callable[[Bench], int]:
    def run(b: Bench) -> int:
        b.running(apic_demo(), 1)
        b.arch.responders["apic-demo"] = lambda name, msg, page: Reply.REQUEST_DENIED
        return b.call(code, 1)

    return run


def _manage_invalid_reply(code: Hypercall) -> Callable[[Bench], int]:
    def run(b: Bench) -> int:
        b.running(apic_demo(), 1)
        b.arch.responders["apic-demo"] = lambda name, msg, page: Reply.UNKNOWN
        return b.call(code, 1)

    return run


def _destroy_other_locked(b: Bench) -> int:
    b.running(apic_demo(), 1)
    b.running(tiny_demo(), 2)
    b.hv.cell_by_id(1).state = CellState.RUNNING_LOCKED  # type: ignore[union-attr]
    return b.call(Hypercall.CELL_DESTROY, 2)


def _get_state_from_cell(b: Bench) -> int:
    b.running(tiny_demo(), 1)
    return b.call(Hypercall.CELL_GET_STATE, 1, cpu=2)


def _get_state_invalid(b: Bench) -> int:
    b.running(tiny_demo(), 1)
    b.hv.cell_by_id(1).state = 9  # type: ignore[union-attr]
    return b.call(Hypercall.CELL_GET_STATE, 1)


def _cpu_info_foreign(b: Bench) -> int:
    b.running(tiny_demo(), 1)
    return b.call(Hypercall.CPU_GET_INFO, 0, 0, cpu=2)


def _putc_not_permitted(b: Bench) -> int:
    b.running(dataclasses.replace(tiny_demo(), flags=0x1), 1)
    return b.call(Hypercall.DEBUG_CONSOLE_PUTC, ord("x"), cpu=2)


def _putc_root(b: Bench) -> int:
    return b.call(Hypercall.DEBUG_CONSOLE_PUTC, ord("x"))


def _disable_from_cell(b: Bench) -> int:
    b.running(tiny_demo(), 1)
    return b.call(Hypercall.DISABLE, cpu=2)


def _disable_with_cells(b: Bench) -> int:
    b.create(tiny_demo(), 1)
    return b.call(Hypercall.DISABLE)


MANAGED = (Hypercall.CELL_START, Hypercall.CELL_SET_LOADABLE, Hypercall.CELL_DESTROY)

CASES: list[Case] = [
    ("unknown hypercall", lambda b: b.call(9), ENOSYS),
    ("create: caller not root", _create_from_cell_cpu, EPERM),
    ("create: a cell is RUNNING_LOCKED", _create_while_locked, EPERM),
    ("create: header not mappable", _create_unmapped_header, ENOMEM),
    ("create: name exists", _create_name_exists, EEXIST),
    ("create: id exists", _create_id_exists, EEXIST),
    ("create: root's name", _create_root_name, EEXIST),
    ("create: config larger than 16 pages", _create_too_big, E2BIG),
    ("create: page offset pushes it over 16 pages", _create_too_big_by_offset, E2BIG),
    ("create: config body not mappable", _create_unmapped_body, ENOMEM),
    ("create: cpu_set_size > 4096", _create_cpu_set_too_big, EINVAL),
    ("create: cell contains the calling CPU", _create_with_calling_cpu, EBUSY),
    ("create: CPU owned by another cell", _create_cpu_taken, EBUSY),
    ("create: CPU outside the system", _create_cpu_outside_system, EBUSY),
    ("create: irqchip pin_base != 0", _create_pin_base, EINVAL),
    ("create: more irqchips than a page holds", _create_many_irqchips, ERANGE),
    ("create: IOAPIC with too many pins", _create_ioapic_too_many_pins, EIO),
    ("create: ivshmem regions beyond the config", _create_ivshmem_regions, EINVAL),
    ("create: ivshmem with 17 vectors", _create_ivshmem_vectors, EINVAL),
    ("create: ivshmem id >= 12", _create_ivshmem_id, EINVAL),
    ("create: ivshmem id taken on the link", _create_ivshmem_id_taken, EBUSY),
    ("destroy: another cell RUNNING_LOCKED", _destroy_other_locked, EPERM),
    ("get_state: caller not root", _get_state_from_cell, EPERM),
    ("get_state: no such cell", lambda b: b.call(Hypercall.CELL_GET_STATE, 5), ENOENT),
    ("get_state: state value unknown", _get_state_invalid, EINVAL),
    ("get_info: unknown type", lambda b: b.call(Hypercall.HYPERVISOR_GET_INFO, 5), EINVAL),
    ("cpu_info: CPU outside the system", lambda b: b.call(Hypercall.CPU_GET_INFO, 4, 0), EINVAL),
    ("cpu_info: foreign CPU from a cell", _cpu_info_foreign, EPERM),
    ("cpu_info: unknown type", lambda b: b.call(Hypercall.CPU_GET_INFO, 1, 1012), EINVAL),
    ("cpu_info: type 1", lambda b: b.call(Hypercall.CPU_GET_INFO, 1, 1), EINVAL),
    ("putc: cell without VIRTUAL_CONSOLE_PERMITTED", _putc_not_permitted, EPERM),
    ("putc: root without the flag", _putc_root, EPERM),
    ("disable: caller not root", _disable_from_cell, EPERM),
    ("disable: cells exist", _disable_with_cells, EBUSY),
]
for _code in MANAGED:
    _name = _code.name.lower()
    CASES += [
        (f"{_name}: caller not root", _manage_from_cell(_code), EPERM),
        (f"{_name}: no such cell", _manage_unknown(_code), ENOENT),
        (f"{_name}: the root cell", _manage_root(_code), EINVAL),
        (f"{_name}: shutdown request denied", _manage_denied(_code), EPERM),
        (f"{_name}: invalid reply", _manage_invalid_reply(_code), EPERM),
    ]

CAT_CASES: list[Case] = [
    ("create: CAT with two regions", _create_cat_two_regions, EINVAL),
    ("create: CAT region not L3", _create_cat_not_l3, EINVAL),
    ("create: CAT region empty", _create_cat_empty, EINVAL),
    ("create: CAT region beyond the CBM", _create_cat_beyond_cbm, EINVAL),
    ("create: CAT without a free COS", _create_cat_no_cos, EBUSY),
]


@pytest.mark.parametrize(("arrange", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_path(arrange: Callable[[Bench], int], expected: int) -> None:
    """The hypercall fails with Jailhouse's code for this path."""
    assert arrange(Bench()) == expected


@pytest.mark.parametrize(
    ("arrange", "expected"), [c[1:] for c in CAT_CASES], ids=[c[0] for c in CAT_CASES]
)
def test_cat_error_path(arrange: Callable[[Bench], int], expected: int) -> None:
    """With CAT present, bad cache regions and exhausted COS fail like cat.c."""
    assert arrange(_cat_bench()) == expected


def test_create_ENOMEM_when_the_pool_runs_dry() -> None:
    """A hypervisor memory too small for the cell's page tables gives ENOMEM."""
    system = dataclasses.replace(
        qemu_x86(), hypervisor_memory=MemoryRegion(phys_start=0x3A000000, size=0x40000 + 60 * 4096)
    )
    bench = Bench(system)
    assert _create_no_memory(bench) == ENOMEM


CREATE_FAILURES = [c for c in CASES if c[0].startswith("create:")] + [
    ("create: pool dry", _create_no_memory, ENOMEM),
]


@pytest.mark.parametrize("case", CREATE_FAILURES, ids=[c[0] for c in CREATE_FAILURES])
def test_failed_create_leaves_nothing_behind(case: Case) -> None:
    """After any failed create the root has exactly what it had (pools included)."""
    _, arrange, _ = case
    small = case[0] == "create: pool dry"
    system = (
        dataclasses.replace(
            qemu_x86(),
            hypervisor_memory=MemoryRegion(phys_start=0x3A000000, size=0x40000 + 60 * 4096),
        )
        if small
        else None
    )
    bench = Bench(system)
    states: list[tuple[object, ...]] = []
    original = bench.create

    def recording_create(config: CellConfig, cell_id: int, cpu: int = 0) -> int:
        states.append(bench.footprint())
        return original(config, cell_id, cpu)

    bench.create = recording_create  # type: ignore[method-assign]
    original_call = bench.call

    def recording_call(code: Hypercall, arg1: int = 0, arg2: int = 0, cpu: int = 0) -> int:
        if code == Hypercall.CELL_CREATE:
            states.append(bench.footprint())
        return original_call(code, arg1, arg2, cpu)

    bench.call = recording_call  # type: ignore[method-assign]
    result = arrange(bench)
    assert result < 0
    assert bench.footprint() == states[-1]


def test_enable_requires_the_root_cpus_online() -> None:
    """enable with online CPUs other than the root CPU set fails with EINVAL."""
    hv = Hypervisor(qemu_x86(), OracleArch())
    with pytest.raises(HvError) as info:
        hv.enable([0, 1, 2])
    assert info.value.errno == Errno.EINVAL
    hv2 = Hypervisor(qemu_x86(), OracleArch())
    with pytest.raises(HvError):
        hv2.enable([0, 1, 2, 5])


def test_hypercall_before_enable_is_a_state_error() -> None:
    """The model refuses hypercalls on a hypervisor that is not running."""
    hv = Hypervisor(qemu_x86(), OracleArch())
    with pytest.raises(ModelStateError):
        hv.hypercall(0, Hypercall.HYPERVISOR_GET_INFO, 4)


def test_unknown_hypercall_prints_cpu_code_and_rip() -> None:
    """ENOSYS comes with Jailhouse's console line."""
    bench = Bench()
    assert bench.hv.hypercall(1, 42, rip=0x1234) == ENOSYS
    assert bench.hv.console.lines[-1] == "CPU 1: Unknown hypercall 42, RIP: 0x0000000000001234"


def test_pci_device_not_in_root_is_simply_added() -> None:
    """A DEVICE the root does not list goes to the cell without a removal from the root."""
    bench = Bench()
    config = dataclasses.replace(
        pci_demo(), pci_devices=(PciDevice(type=1, bdf=0x00C8),), pci_caps=()
    )
    assert bench.create(config, 1) == 0
    assert "Removing PCI device 00:19.0" not in "\n".join(bench.hv.console.lines)
    assert bench.hv.cell_by_id(1).assigned_device(0x00C8) is not None  # type: ignore[union-attr]


def test_inmate_helper_is_a_valid_cell() -> None:
    """The generic inmate builder yields a config the hypervisor accepts."""
    bench = Bench()
    assert bench.create(inmate("x", (1,), 0x3E000000), 1) == 0
