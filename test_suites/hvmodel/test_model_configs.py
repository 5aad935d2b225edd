"""Jailhouse's QEMU x86 configs (reference §2) built as config objects, for the model tests.

``qemu-x86`` and the demo cells are transcribed from the reference tables; the tests
here check them against the sizes the reference measured on the compiled ``.cell``
files, so a transcription slip shows up as a size mismatch.
"""

from __future__ import annotations

from harness.hvmodel.config import (
    CacheRegion,
    CellConfig,
    Console,
    IommuUnit,
    Irqchip,
    MemoryRegion,
    PciCapability,
    PciDevice,
    PioRegion,
    SystemConfig,
    X86Platform,
    cpu_set_from,
    parse_cell,
    parse_system,
)

R, W, X, DMA = 0x1, 0x2, 0x4, 0x8
COMM, LOAD, RS = 0x20, 0x40, 0x80
RW = R | W
RAM = R | W | X | DMA
IVSHMEM_MSIX_MASK = (0xFFFFF000, 0xFFFFF000, 0, 0, 0, 0)
UART_8250_PIO = Console(address=0x3F8, type=2)
VCON = 0x40000000
PASSIVE = 0x1


def mem(phys: int, size: int, flags: int, virt: int | None = None) -> MemoryRegion:
    """A memory region, identity-mapped unless ``virt`` is given."""
    return MemoryRegion(
        phys_start=phys, virt_start=phys if virt is None else virt, size=size, flags=flags
    )


EMPTY = MemoryRegion()


def qemu_x86(cpus: tuple[int, ...] = (0, 1, 2, 3)) -> SystemConfig:
    """``configs/x86/qemu-x86.c`` (reference §2.1)."""
    regions = (
        mem(0x3F000000, 0x1000, R), mem(0x3F001000, 0xDF000, RW), EMPTY, EMPTY,
        mem(0x3F0E0000, 0x1000, R), mem(0x3F0E1000, 0xF000, RW), EMPTY, EMPTY,
        mem(0x3F0F0000, 0x1000, R), mem(0x3F0F1000, 0x9000, RW), mem(0x3F0FA000, 0x2000, RW),
        mem(0x3F0FC000, 0x2000, R), mem(0x3F0FE000, 0x2000, R),
        mem(0x3F100000, 0x1000, R | RS), EMPTY, mem(0x3F101000, 0x7F000, RW | RS),
        mem(0x3F180000, 0x7F000, R | RS),
        mem(0x00000000, 0x3A000000, RAM), mem(0x3A600000, 0x4A00000, RAM),
        mem(0x3F200000, 0xDDF000, RAM), mem(0x3FFDF000, 0x21000, R),
        mem(0xFD000000, 0x1000000, RW), mem(0xFE200000, 0x4000, RW),
        mem(0xFEA00000, 0x40000, RW), mem(0xFEA40000, 0x20000, RW),
        mem(0xFEA60000, 0x20000, RW), mem(0xFEA91000, 0x3000, RW),
        mem(0xFEA94000, 0x4000, RW), mem(0xFEA98000, 0x1000, RW),
        mem(0xFEA9A000, 0x1000, RW), mem(0xFED00000, 0x1000, RW),
    )
    pios = tuple(
        PioRegion(base=b, length=n)
        for b, n in (
            (0x0, 0x1F), (0x40, 4), (0x60, 2), (0x64, 1), (0x70, 2), (0x1CE, 3), (0x2F8, 8),
            (0x3B0, 0x30), (0x3F0, 8), (0x402, 1), (0xCD0, 8), (0x5658, 4), (0xD000, 0xFF),
        )
    )
    devices = (
        PciDevice(type=1, bdf=0x0008),
        PciDevice(
            type=1, bdf=0x0010,
            bar_mask=(0xFFFE0000, 0xFFFE0000, 0xFFFFFFE0, 0xFFFFC000, 0, 0),
            caps_start=5, num_caps=6, num_msi_vectors=1, msi_64bits=True,
            num_msix_vectors=5, msix_region_size=0x1000, msix_address=0xFEA90000,
        ),
        PciDevice(
            type=2, bdf=0x0018, bar_mask=(0xFFFFFF00, 0, 0, 0, 0, 0), caps_start=11,
            num_caps=5, num_msi_vectors=1, msi_64bits=True, msi_maskable=True,
        ),
        PciDevice(type=1, bdf=0x00D8, caps_start=0, num_caps=2, num_msi_vectors=1,
                  msi_64bits=True),
        PciDevice(type=1, bdf=0x00F8),
        PciDevice(type=1, bdf=0x00FA, caps_start=2, num_caps=2, num_msi_vectors=1,
                  msi_64bits=True),
        PciDevice(type=1, bdf=0x00FB),
        PciDevice(
            type=1, bdf=0x00FF,
            bar_mask=(0xFFFFFFE0, 0xFFFFF000, 0, 0, 0xFFFFC000, 0xFFFFFFFF),
            caps_start=4, num_caps=1, num_msix_vectors=2, msix_region_size=0x1000,
            msix_address=0xFEA9B000,
        ),
        PciDevice(type=3, bdf=0x0160, bar_mask=IVSHMEM_MSIX_MASK, num_msix_vectors=2,
                  shmem_regions_start=0, shmem_dev_id=0, shmem_peers=2, shmem_protocol=0xC002),
        PciDevice(type=3, bdf=0x0168, bar_mask=IVSHMEM_MSIX_MASK, num_msix_vectors=3,
                  shmem_regions_start=4, shmem_dev_id=0, shmem_peers=2, shmem_protocol=0xC003),
        PciDevice(type=3, bdf=0x0170, bar_mask=IVSHMEM_MSIX_MASK, num_msix_vectors=16,
                  shmem_regions_start=8, shmem_dev_id=0, shmem_peers=3, shmem_protocol=0),
        PciDevice(type=3, bdf=0x0178, bar_mask=IVSHMEM_MSIX_MASK, num_msix_vectors=2,
                  shmem_regions_start=13, shmem_dev_id=0, shmem_peers=2, shmem_protocol=1),
    )
    caps = tuple(
        PciCapability(id=i, start=s, len=n, flags=f)
        for i, s, n, f in (
            (0x05, 0x60, 14, 1), (0x00, 0x40, 0x10, 1), (0x12, 0xA8, 2, 0), (0x05, 0x80, 14, 1),
            (0x11, 0x98, 12, 1), (0x01, 0xC8, 8, 1), (0x05, 0xD0, 14, 1), (0x10, 0xE0, 20, 1),
            (0x11, 0xA0, 12, 1), (0x8001, 0x100, 4, 0), (0x8003, 0x140, 4, 0),
            (0x05, 0x8C, 0x18, 1), (0x01, 0x84, 8, 1), (0x10, 0x48, 0x3C, 0), (0x0C, 0x40, 2, 0),
            (0x8001, 0x100, 0x40, 0),
        )
    )
    root = CellConfig(
        signature=bytes(5), architecture=0, revision=0, name="QEMU-VM",
        cpu_set=cpu_set_from(cpus), memory_regions=regions,
        irqchips=(Irqchip(address=0xFEC00000, id=0xFF00, pin_bitmap=(0xFFFFFF, 0, 0, 0)),),
        pio_regions=pios, pci_devices=devices, pci_caps=caps,
    )
    iommus = (IommuUnit(type=2, base=0xFED90000, size=0x1000),) + (IommuUnit(),) * 7
    return SystemConfig(
        flags=1,
        hypervisor_memory=MemoryRegion(phys_start=0x3A000000, size=0x600000),
        debug_console=UART_8250_PIO,
        pci_mmconfig_base=0xB0000000,
        pci_mmconfig_end_bus=0xFF,
        iommu_units=iommus,
        x86=X86Platform(pm_timer_address=0x608, vtd_interrupt_limit=256),
        root_cell=root,
    )


DEMO_PIO = (PioRegion(base=0x2F8, length=8), PioRegion(base=0x3F8, length=8),
            PioRegion(base=0xE010, length=8))


def inmate(name: str, cpus: tuple[int, ...], ram: int, *, flags: int = VCON | PASSIVE,
           cache: tuple[CacheRegion, ...] = (), **extra: object) -> CellConfig:
    """A one-RAM-region demo cell: RAM at 0 (1 MiB), comm region at 0x100000."""
    return CellConfig(
        name=name, flags=flags, cpu_set=cpu_set_from(cpus),
        memory_regions=(mem(ram, 0x100000, R | W | X | LOAD, virt=0),
                        mem(0, 0x1000, RW | COMM, virt=0x100000)),
        cache_regions=cache, pio_regions=DEMO_PIO, console=UART_8250_PIO,
        **extra,  # type: ignore[arg-type]
    )


def apic_demo() -> CellConfig:
    """``apic-demo.c``: CPU 3, not passive, locks itself."""
    return inmate("apic-demo", (3,), 0x3EF00000, flags=VCON,
                  cache=(CacheRegion(start=0, size=2, type=3),))


def tiny_demo() -> CellConfig:
    """``tiny-demo.c``: CPU 2, passive, test device."""
    return inmate("tiny-demo", (2,), 0x3EE00000, flags=VCON | PASSIVE | 0x2,
                  cache=(CacheRegion(start=2, size=1, type=3),))


def ivshmem_demo() -> CellConfig:
    """``ivshmem-demo.c``: CPU 1, peer 1 of the three-peer demo link 01:0e.0."""
    return CellConfig(
        name="ivshmem-demo", flags=VCON | PASSIVE, cpu_set=cpu_set_from((1,)),
        memory_regions=(
            mem(0x3F0F0000, 0x1000, R | RS), mem(0x3F0F1000, 0x9000, RW | RS),
            mem(0x3F0FA000, 0x2000, R | RS), mem(0x3F0FC000, 0x2000, RW | RS),
            mem(0x3F0FE000, 0x2000, R | RS),
            mem(0x3EE00000, 0x100000, R | W | X | LOAD, virt=0),
            mem(0, 0x1000, RW | COMM, virt=0x100000),
        ),
        pio_regions=DEMO_PIO[:2], console=UART_8250_PIO,
        pci_devices=(PciDevice(type=3, bdf=0x0170, bar_mask=IVSHMEM_MSIX_MASK,
                               num_msix_vectors=16, shmem_regions_start=0, shmem_dev_id=1,
                               shmem_peers=3, shmem_protocol=0),),
    )


def linux_x86_demo() -> CellConfig:
    """``linux-x86-demo.c`` (without ``CONFIG_QEMU_E1000E_ASSIGNMENT``): CPUs 2-3."""
    regions = (
        mem(0x3F000000, 0x1000, R | RS), mem(0x3F001000, 0xDF000, RW | RS), EMPTY, EMPTY,
        mem(0x3F0E0000, 0x1000, R | RS), mem(0x3F0E1000, 0xF000, RW | RS), EMPTY, EMPTY,
        mem(0x3F0F0000, 0x1000, R | RS), mem(0x3F0F1000, 0x9000, RW | RS),
        mem(0x3F0FA000, 0x2000, R | RS), mem(0x3F0FC000, 0x2000, R | RS),
        mem(0x3F0FE000, 0x2000, RW | RS),
        mem(0x3F100000, 0x1000, R | RS), EMPTY, mem(0x3F101000, 0x7F000, R | RS),
        mem(0x3F180000, 0x7F000, RW | RS),
        mem(0x3A600000, 0x100000, RAM | LOAD, virt=0),
        mem(0, 0x1000, RW | COMM, virt=0x100000),
        mem(0x3A700000, 0x4700000, RAM | LOAD, virt=0x200000),
    )
    devices = (
        PciDevice(type=3, bdf=0x0160, bar_mask=IVSHMEM_MSIX_MASK, num_msix_vectors=2,
                  shmem_regions_start=0, shmem_dev_id=1, shmem_peers=2, shmem_protocol=0x8002),
        PciDevice(type=3, bdf=0x0168, bar_mask=IVSHMEM_MSIX_MASK, num_msix_vectors=3,
                  shmem_regions_start=4, shmem_dev_id=1, shmem_peers=2, shmem_protocol=0x8003),
        PciDevice(type=3, bdf=0x0170, bar_mask=IVSHMEM_MSIX_MASK, num_msix_vectors=16,
                  shmem_regions_start=8, shmem_dev_id=2, shmem_peers=3, shmem_protocol=0),
        PciDevice(type=3, bdf=0x0178, bar_mask=IVSHMEM_MSIX_MASK, num_msix_vectors=2,
                  shmem_regions_start=13, shmem_dev_id=1, shmem_peers=2, shmem_protocol=1),
    )
    caps = tuple(
        PciCapability(id=i, start=s, len=n, flags=f)
        for i, s, n, f in ((0x01, 0xC8, 8, 1), (0x05, 0xD0, 14, 1), (0x10, 0xE0, 20, 1),
                           (0x11, 0xA0, 12, 1), (0x8001, 0x100, 4, 0), (0x8003, 0x140, 4, 0))
    )
    return CellConfig(
        name="linux-x86-demo", flags=VCON | PASSIVE, cpu_set=cpu_set_from((2, 3)),
        memory_regions=regions, cache_regions=(CacheRegion(start=0, size=2, type=3),),
        irqchips=(Irqchip(address=0xFEC00000, id=0xFF00, pin_bitmap=(0x18, 0, 0, 0)),),
        pio_regions=DEMO_PIO, pci_devices=devices, pci_caps=caps, console=Console(),
    )


def pci_demo() -> CellConfig:
    """``pci-demo.c``: CPU 2, takes the HDA 00:1b.0 (BAR at the root's address here)."""
    return inmate(
        "pci-demo", (2,), 0x3EE00000,
        pci_devices=(PciDevice(type=1, bdf=0x00D8, caps_start=0, num_caps=1,
                               num_msi_vectors=1, msi_64bits=True),),
        pci_caps=(PciCapability(id=0x05, start=0x60, len=14, flags=1),),
    )


def test_sizes_match_the_compiled_configs() -> None:
    """The transcriptions have the byte sizes the reference measured (§1.6)."""
    assert len(qemu_x86().to_bytes()) == 2372
    assert len(apic_demo().to_bytes()) == 228
    assert len(tiny_demo().to_bytes()) == 228
    assert len(ivshmem_demo().to_bytes()) == 428
    assert len(linux_x86_demo().to_bytes()) == 1108


def test_configs_round_trip_through_the_parser() -> None:
    """What the model receives as bytes parses back to the same objects."""
    system = qemu_x86()
    assert parse_system(system.to_bytes()) == system
    for cell in (apic_demo(), ivshmem_demo(), linux_x86_demo(), pci_demo()):
        assert parse_cell(cell.to_bytes()) == cell


# --- helpers shared by the model tests ----------------------------------------------------


def with_id(cell: CellConfig, cell_id: int) -> CellConfig:
    """The config as the driver hands it to the hypervisor (runtime id written in)."""
    import dataclasses

    return dataclasses.replace(cell, id=cell_id)


def relocated(cell: CellConfig, name: str, ram: int) -> CellConfig:
    """A copy of a one-RAM-region demo cell under another name and RAM address."""
    import dataclasses

    regions = tuple(
        dataclasses.replace(region, phys_start=ram) if region.flags & LOAD else region
        for region in cell.memory_regions
    )
    return dataclasses.replace(cell, name=name, memory_regions=regions)


def test_transcriptions_equal_the_shipped_toml_configs() -> None:
    """The model tests use the same bytes as harness/configs/*.toml compile to."""
    from pathlib import Path

    from harness.hvmodel.config.toml import load_source

    configs = Path(__file__).resolve().parents[2] / "harness" / "configs"
    for name, build in (
        ("qemu-x86", qemu_x86), ("apic-demo", apic_demo), ("tiny-demo", tiny_demo),
        ("ivshmem-demo", ivshmem_demo), ("linux-x86-demo", linux_x86_demo),
    ):
        assert load_source(configs / f"{name}.toml").to_bytes() == build().to_bytes(), name
