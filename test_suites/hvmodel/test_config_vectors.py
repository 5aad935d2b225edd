"""Binary test vectors for Jailhouse's x86 QEMU configs, built without jhlab's writer.

Every vector is assembled here with :func:`struct.pack` straight from the tables of
``shared/reference/jailhouse-x86.md`` §1-2 (layouts) and §2 (values), so the parser and the
shipped TOML sources are checked against bytes that our own code did not produce. The
tests in this file check the vectors' sizes against the sizes the reference measured on
the compiled ``configs/x86/*.c``, and that the parser reads every field back.

Other ``test_config_*`` files import the vectors from here.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import harness
from harness.hvmodel.config import (
    CacheType,
    CellConfig,
    ConsoleType,
    IommuType,
    MemFlags,
    PciDeviceType,
    SystemConfig,
    parse,
    parse_cell,
    parse_system,
)

CONFIGS_DIR = Path(harness.__file__).parent / "configs"

# Flag values written out from the reference, not imported from the code under test.
R, W, X, DMA, COMM, LOAD, RS = 0x1, 0x2, 0x4, 0x8, 0x20, 0x40, 0x80
PASSIVE, TESTDEV, VCON = 0x1, 0x2, 0x40000000
CON_8250 = 2
MSIX_MASK = (0xFFFFF000, 0xFFFFF000, 0, 0, 0, 0)
CAP_PM, CAP_MSI, CAP_EXP, CAP_MSIX, CAP_SATA = 0x01, 0x05, 0x10, 0x11, 0x12
EXT_ERR, EXT_DSN = 0x8001, 0x8003
CAPS_WRITE = 1


def console(kind: int = 0, address: int = 0) -> bytes:
    """``struct jailhouse_console`` (32 bytes, §1.3)."""
    return struct.pack("<QIHHIIQ", address, 0, kind, 0, 0, 0, 0)


def cell_desc(
    *, signature: bytes, arch: int, revision: int, name: bytes, flags: int, cpu_set_size: int,
    counts: tuple[int, int, int, int, int, int, int], con: bytes,
) -> bytes:
    """``struct jailhouse_cell_desc`` (132 bytes, §1.2), field by field."""
    out = signature + struct.pack("<B", arch) + struct.pack("<H", revision)
    out += name.ljust(32, b"\0")
    out += struct.pack("<I", 0)  # id
    out += struct.pack("<I", flags)
    out += struct.pack("<I", cpu_set_size)
    out += struct.pack("<7I", *counts)
    out += struct.pack("<I", 0)  # vpci_irq_base
    out += struct.pack("<Q", 0)  # cpu_reset_address
    out += struct.pack("<Q", 0)  # msg_reply_timeout
    out += con
    assert len(out) == 132
    return out


def mem(phys: int, virt: int, size: int, flags: int) -> bytes:
    """``struct jailhouse_memory`` (32 bytes, §1.7)."""
    return struct.pack("<QQQQ", phys, virt, size, flags)


def same(phys: int, size: int, flags: int) -> bytes:
    """A region mapped 1:1."""
    return mem(phys, phys, size, flags)


EMPTY = mem(0, 0, 0, 0)


def cache(start: int, size: int, kind: int = 3, flags: int = 0) -> bytes:
    """``struct jailhouse_cache`` (12 bytes, §1.8)."""
    return struct.pack("<IIBBH", start, size, kind, 0, flags)


def irqchip(address: int, ident: int, bitmap0: int) -> bytes:
    """``struct jailhouse_irqchip`` (32 bytes, §1.9)."""
    return struct.pack("<QII4I", address, ident, 0, bitmap0, 0, 0, 0)


def pio(base: int, length: int) -> bytes:
    """``struct jailhouse_pio`` (4 bytes, §1.10)."""
    return struct.pack("<HH", base, length)


def pci(
    kind: int, bdf: int, *, bar_mask: tuple[int, ...] = (0,) * 6, caps: tuple[int, int] = (0, 0),
    msi: int = 0, msi64: bool = False, maskable: bool = False, msix: int = 0,
    msix_size: int = 0, msix_addr: int = 0, shmem: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> bytes:
    """``struct jailhouse_pci_device`` (56 bytes, §1.11)."""
    out = struct.pack("<BBHH", kind, 0, 0, bdf)
    out += struct.pack("<6I", *bar_mask)
    out += struct.pack("<HH", *caps)
    out += struct.pack("<BB", msi, int(msi64) | int(maskable) << 1)
    out += struct.pack("<HHQ", msix, msix_size, msix_addr)
    regions_start, dev_id, peers, protocol = shmem
    out += struct.pack("<IBBH", regions_start, dev_id, peers, protocol)
    assert len(out) == 56
    return out


def cap(ident: int, start: int, length: int, flags: int) -> bytes:
    """``struct jailhouse_pci_capability`` (8 bytes, §1.12)."""
    return struct.pack("<HHHH", ident, start, length, flags)


def cell_file(
    name: bytes, flags: int, cpus: int, regions: list[bytes], *, caches: list[bytes] = (),  # type: ignore[assignment]
    irqchips: list[bytes] = (), pios: list[bytes] = (), devices: list[bytes] = (),  # type: ignore[assignment]
    caps: list[bytes] = (), con: bytes = console(CON_8250, 0x3F8),  # type: ignore[assignment]
) -> bytes:
    """A whole ``.cell``: descriptor, 8-byte CPU set, arrays in §1.6 order."""
    desc = cell_desc(
        signature=b"JHCLL", arch=0, revision=14, name=name, flags=flags, cpu_set_size=8,
        counts=(len(regions), len(caches), len(irqchips), len(pios), len(devices), len(caps), 0),
        con=con,
    )
    parts = [desc, struct.pack("<Q", cpus), *regions, *caches, *irqchips, *pios, *devices, *caps]
    return b"".join(parts)


def demo_ram(phys: int, extra: int = 0) -> bytes:
    """Cell RAM at virt 0, 1 MiB, RWX|LOADABLE (§2.2)."""
    return mem(phys, 0, 0x100000, R | W | X | LOAD | extra)


COMM_REGION = mem(0, 0x100000, 0x1000, R | W | COMM)
DEMO_PIO = [pio(0x2F8, 8), pio(0x3F8, 8), pio(0xE010, 8)]

# --- §2.1 qemu-x86 ----------------------------------------------------------------------------

QEMU_REGIONS = [
    same(0x3F000000, 0x1000, R),
    same(0x3F001000, 0xDF000, R | W),
    EMPTY, EMPTY,
    same(0x3F0E0000, 0x1000, R),
    same(0x3F0E1000, 0xF000, R | W),
    EMPTY, EMPTY,
    same(0x3F0F0000, 0x1000, R),
    same(0x3F0F1000, 0x9000, R | W),
    same(0x3F0FA000, 0x2000, R | W),
    same(0x3F0FC000, 0x2000, R),
    same(0x3F0FE000, 0x2000, R),
    same(0x3F100000, 0x1000, R | RS),
    EMPTY,
    same(0x3F101000, 0x7F000, R | W | RS),
    same(0x3F180000, 0x7F000, R | RS),
    same(0x00000000, 0x3A000000, R | W | X | DMA),
    same(0x3A600000, 0x4A00000, R | W | X | DMA),
    same(0x3F200000, 0xDDF000, R | W | X | DMA),
    same(0x3FFDF000, 0x21000, R),
    same(0xFD000000, 0x1000000, R | W),
    same(0xFE200000, 0x4000, R | W),
    same(0xFEA00000, 0x40000, R | W),
    same(0xFEA40000, 0x20000, R | W),
    same(0xFEA60000, 0x20000, R | W),
    same(0xFEA91000, 0x3000, R | W),
    same(0xFEA94000, 0x4000, R | W),
    same(0xFEA98000, 0x1000, R | W),
    same(0xFEA9A000, 0x1000, R | W),
    same(0xFED00000, 0x1000, R | W),
]
QEMU_PIO = [
    pio(0x0, 0x1F), pio(0x40, 4), pio(0x60, 2), pio(0x64, 1), pio(0x70, 2), pio(0x1CE, 3),
    pio(0x2F8, 8), pio(0x3B0, 0x30), pio(0x3F0, 8), pio(0x402, 1), pio(0xCD0, 8),
    pio(0x5658, 4), pio(0xD000, 0xFF),
]
QEMU_PCI = [
    pci(1, 0x0008),
    pci(1, 0x0010, bar_mask=(0xFFFE0000, 0xFFFE0000, 0xFFFFFFE0, 0xFFFFC000, 0, 0),
        caps=(5, 6), msi=1, msi64=True, msix=5, msix_size=0x1000, msix_addr=0xFEA90000),
    pci(2, 0x0018, bar_mask=(0xFFFFFF00, 0, 0, 0, 0, 0), caps=(11, 5), msi=1, msi64=True,
        maskable=True),
    pci(1, 0x00D8, caps=(0, 2), msi=1, msi64=True),
    pci(1, 0x00F8),
    pci(1, 0x00FA, caps=(2, 2), msi=1, msi64=True),
    pci(1, 0x00FB),
    pci(1, 0x00FF, bar_mask=(0xFFFFFFE0, 0xFFFFF000, 0, 0, 0xFFFFC000, 0xFFFFFFFF), caps=(4, 1),
        msix=2, msix_size=0x1000, msix_addr=0xFEA9B000),
    pci(3, 0x0160, bar_mask=MSIX_MASK, msix=2, shmem=(0, 0, 2, 0xC002)),
    pci(3, 0x0168, bar_mask=MSIX_MASK, msix=3, shmem=(4, 0, 2, 0xC003)),
    pci(3, 0x0170, bar_mask=MSIX_MASK, msix=16, shmem=(8, 0, 3, 0x0000)),
    pci(3, 0x0178, bar_mask=MSIX_MASK, msix=2, shmem=(13, 0, 2, 0x0001)),
]
E1000E_CAPS = [
    cap(CAP_PM, 0xC8, 8, CAPS_WRITE), cap(CAP_MSI, 0xD0, 14, CAPS_WRITE),
    cap(CAP_EXP, 0xE0, 20, CAPS_WRITE), cap(CAP_MSIX, 0xA0, 12, CAPS_WRITE),
    cap(EXT_ERR, 0x100, 4, 0), cap(EXT_DSN, 0x140, 4, 0),
]
QEMU_CAPS = [
    cap(CAP_MSI, 0x60, 14, CAPS_WRITE), cap(0, 0x40, 0x10, CAPS_WRITE),
    cap(CAP_SATA, 0xA8, 2, 0), cap(CAP_MSI, 0x80, 14, CAPS_WRITE),
    cap(CAP_MSIX, 0x98, 12, CAPS_WRITE),
    *E1000E_CAPS,
    cap(CAP_MSI, 0x8C, 0x18, CAPS_WRITE), cap(CAP_PM, 0x84, 8, CAPS_WRITE),
    cap(CAP_EXP, 0x48, 0x3C, 0), cap(0x0C, 0x40, 2, 0), cap(EXT_ERR, 0x100, 0x40, 0),
]


def qemu_x86() -> bytes:
    """``qemu-x86.cell`` (§2.1, §1.4)."""
    head = b"JHSYS" + struct.pack("<BHI", 0, 14, 1)
    head += mem(0x3A000000, 0, 0x600000, 0)
    head += console(CON_8250, 0x3F8)
    head += struct.pack("<QBBH", 0xB0000000, 0xFF, 0, 0)
    head += struct.pack("<IQI12s", 2, 0xFED90000, 0x1000, bytes(12))
    head += bytes(28) * 7
    head += struct.pack("<HBBIII", 0x608, 0, 0, 256, 0, 0) + bytes(28)
    assert len(head) == 356
    root = cell_desc(
        signature=bytes(5), arch=0, revision=0, name=b"QEMU-VM", flags=0, cpu_set_size=8,
        counts=(len(QEMU_REGIONS), 0, 1, len(QEMU_PIO), len(QEMU_PCI), len(QEMU_CAPS), 0),
        con=console(),
    )
    parts = [head, root, struct.pack("<Q", 0x0F), *QEMU_REGIONS,
             irqchip(0xFEC00000, 0xFF00, 0xFFFFFF), *QEMU_PIO, *QEMU_PCI, *QEMU_CAPS]
    return b"".join(parts)


# --- §2.2 inmate cells ------------------------------------------------------------------------


def apic_demo() -> bytes:
    """``apic-demo.cell``."""
    return cell_file(b"apic-demo", VCON, 0x8, [demo_ram(0x3EF00000), COMM_REGION],
                     caches=[cache(0, 2)], pios=DEMO_PIO)


def tiny_demo() -> bytes:
    """``tiny-demo.cell``."""
    return cell_file(b"tiny-demo", PASSIVE | TESTDEV | VCON, 0x4,
                     [demo_ram(0x3EE00000), COMM_REGION], caches=[cache(2, 1)], pios=DEMO_PIO)


def smp_demo() -> bytes:
    """``smp-demo.cell``."""
    return cell_file(b"smp-demo", PASSIVE | VCON, 0xE, [demo_ram(0x3EE00000), COMM_REGION],
                     pios=DEMO_PIO)


def ioapic_demo() -> bytes:
    """``ioapic-demo.cell``."""
    return cell_file(
        b"ioapic-demo", PASSIVE | VCON, 0x4, [demo_ram(0x3EE00000), COMM_REGION],
        irqchips=[irqchip(0xFEC00000, 0xFF01, 0x200)],
        pios=[pio(0x2F8, 8), pio(0x3F8, 8), pio(0x600, 4), pio(0x800, 4), pio(0xE010, 8)],
    )


def pci_demo() -> bytes:
    """``pci-demo.cell``."""
    return cell_file(
        b"pci-demo", PASSIVE | VCON, 0x4,
        [demo_ram(0x3EE00000), COMM_REGION, same(0xFEBD4000, 0x4000, R | W)],
        pios=DEMO_PIO, devices=[pci(1, 0x00D8, caps=(0, 1), msi=1, msi64=True)],
        caps=[cap(CAP_MSI, 0x60, 14, CAPS_WRITE)],
    )


def e1000_demo() -> bytes:
    """``e1000-demo.cell``."""
    return cell_file(
        b"e1000-demo", PASSIVE | VCON, 0x4,
        [demo_ram(0x3EE00000, DMA), COMM_REGION, same(0xFEBC0000, 0x20000, R | W)],
        pios=[pio(0x2F8, 8), pio(0x3F8, 8), pio(0xC000, 0x3F), pio(0xE000, 8)],
        devices=[pci(1, 0x00C8, caps=(0, 1), msi=1, msi64=True)],
        caps=[cap(CAP_MSI, 0xD0, 14, CAPS_WRITE)],
    )


def ivshmem_demo() -> bytes:
    """``ivshmem-demo.cell``: the demo link's peer 1."""
    return cell_file(
        b"ivshmem-demo", PASSIVE | VCON, 0x2,
        [same(0x3F0F0000, 0x1000, R | RS), same(0x3F0F1000, 0x9000, R | W | RS),
         same(0x3F0FA000, 0x2000, R | RS), same(0x3F0FC000, 0x2000, R | W | RS),
         same(0x3F0FE000, 0x2000, R | RS), demo_ram(0x3EE00000), COMM_REGION],
        pios=[pio(0x2F8, 8), pio(0x3F8, 8)],
        devices=[pci(3, 0x0170, bar_mask=MSIX_MASK, msix=16, shmem=(0, 1, 3, 0))],
    )


LINUX_REGIONS = [
    same(0x3F000000, 0x1000, R | RS), same(0x3F001000, 0xDF000, R | W | RS), EMPTY, EMPTY,
    same(0x3F0E0000, 0x1000, R | RS), same(0x3F0E1000, 0xF000, R | W | RS), EMPTY, EMPTY,
    same(0x3F0F0000, 0x1000, R | RS), same(0x3F0F1000, 0x9000, R | W | RS),
    same(0x3F0FA000, 0x2000, R | RS), same(0x3F0FC000, 0x2000, R | RS),
    same(0x3F0FE000, 0x2000, R | W | RS),
    same(0x3F100000, 0x1000, R | RS), EMPTY, same(0x3F101000, 0x7F000, R | RS),
    same(0x3F180000, 0x7F000, R | W | RS),
    mem(0x3A600000, 0, 0x100000, R | W | X | DMA | LOAD),
    COMM_REGION,
    mem(0x3A700000, 0x200000, 0x4700000, R | W | X | DMA | LOAD),
]


def linux_x86_demo() -> bytes:
    """``linux-x86-demo.cell`` without ``CONFIG_QEMU_E1000E_ASSIGNMENT``.

    The e1000e capability entries are in the file even without the option (the config
    declares ``pci_caps[6]`` unconditionally); that is what makes it 1108 bytes.
    """
    return cell_file(
        b"linux-x86-demo", PASSIVE | VCON, 0xC, LINUX_REGIONS, caches=[cache(0, 2)],
        irqchips=[irqchip(0xFEC00000, 0xFF00, 0x18)], pios=DEMO_PIO,
        devices=[
            pci(3, 0x0160, bar_mask=MSIX_MASK, msix=2, shmem=(0, 1, 2, 0x8002)),
            pci(3, 0x0168, bar_mask=MSIX_MASK, msix=3, shmem=(4, 1, 2, 0x8003)),
            pci(3, 0x0170, bar_mask=MSIX_MASK, msix=16, shmem=(8, 2, 3, 0x0000)),
            pci(3, 0x0178, bar_mask=MSIX_MASK, msix=2, shmem=(13, 1, 2, 0x0001)),
        ],
        caps=E1000E_CAPS, con=console(),
    )


def linux_x86_demo_e1000e() -> bytes:
    """``linux-x86-demo.cell`` built with ``CONFIG_QEMU_E1000E_ASSIGNMENT``: the C config's
    ``mem_regions[24]`` end with 00:02.0's window and the e1000e's BARs but the MSI-X
    page, ``pci_devices[5]`` with the e1000e (caps 0-5, MSI 64-bit, 5 MSI-X vectors at
    0xfea90000); 4 x 32 + 56 bytes more than without the option."""
    return cell_file(
        b"linux-x86-demo", PASSIVE | VCON, 0xC,
        [*LINUX_REGIONS, same(0xFEA00000, 0x40000, R | W), same(0xFEA40000, 0x20000, R | W),
         same(0xFEA60000, 0x20000, R | W), same(0xFEA91000, 0x3000, R | W)],
        caches=[cache(0, 2)], irqchips=[irqchip(0xFEC00000, 0xFF00, 0x18)], pios=DEMO_PIO,
        devices=[
            pci(3, 0x0160, bar_mask=MSIX_MASK, msix=2, shmem=(0, 1, 2, 0x8002)),
            pci(3, 0x0168, bar_mask=MSIX_MASK, msix=3, shmem=(4, 1, 2, 0x8003)),
            pci(3, 0x0170, bar_mask=MSIX_MASK, msix=16, shmem=(8, 2, 3, 0x0000)),
            pci(3, 0x0178, bar_mask=MSIX_MASK, msix=2, shmem=(13, 1, 2, 0x0001)),
            pci(1, 0x0010, bar_mask=(0xFFFE0000, 0xFFFE0000, 0xFFFFFFE0, 0xFFFFC000, 0, 0),
                caps=(0, 6), msi=1, msi64=True, msix=5, msix_size=0x1000, msix_addr=0xFEA90000),
        ],
        caps=E1000E_CAPS, con=console(),
    )


#: name -> (vector builder, size measured by the reference §1.6)
VECTORS = {
    "qemu-x86": (qemu_x86, 2372),
    "apic-demo": (apic_demo, 228),
    "ivshmem-demo": (ivshmem_demo, 428),
    "linux-x86-demo": (linux_x86_demo, 1108),
    "linux-x86-demo-e1000e": (linux_x86_demo_e1000e, 1108 + 4 * 32 + 56),
    "pci-demo": (pci_demo, 312),
    "e1000-demo": (e1000_demo, 316),
    "tiny-demo": (tiny_demo, 228),
    "smp-demo": (smp_demo, 216),
    "ioapic-demo": (ioapic_demo, 256),
}


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_size_matches_reference(name: str) -> None:
    """Each hand-built vector has the size the reference measured for the real .cell."""
    build, size = VECTORS[name]
    assert len(build()) == size


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_parser_round_trips_vector(name: str) -> None:
    """Parsing a vector and writing it back gives the same bytes; size agrees."""
    data = VECTORS[name][0]()
    config = parse(data, name)
    assert config.to_bytes() == data
    assert config.size == len(data)


def test_qemu_x86_fields() -> None:
    """The parsed qemu-x86 system config has the reference's header and root cell values."""
    system = parse_system(qemu_x86(), "qemu-x86.cell")
    assert isinstance(system, SystemConfig)
    assert system.flags == 1
    assert (system.hypervisor_memory.phys_start, system.hypervisor_memory.size) == (
        0x3A000000, 0x600000)
    assert system.debug_console.type == ConsoleType.UART_8250
    assert system.debug_console.address == 0x3F8 and system.debug_console.divider == 0
    assert system.pci_mmconfig_base == 0xB0000000 and system.pci_mmconfig_end_bus == 0xFF
    assert system.mmconfig_size == 0x10000000
    units = system.active_iommu_units
    assert [(u.type, u.base, u.size) for u in units] == [(IommuType.INTEL, 0xFED90000, 0x1000)]
    assert system.x86.pm_timer_address == 0x608 and system.x86.vtd_interrupt_limit == 256
    assert system.x86.apic_mode == 0 and system.x86.tsc_khz == 0 and system.x86.apic_khz == 0
    root = system.root_cell
    assert root.name == "QEMU-VM" and root.cpus == {0, 1, 2, 3}
    assert root.signature == bytes(5) and root.revision == 0
    assert (len(root.memory_regions), len(root.cache_regions), len(root.irqchips),
            len(root.pio_regions), len(root.pci_devices), len(root.pci_caps)) == (
        31, 0, 1, 13, 12, 16)
    ram = root.memory_regions[18]
    assert (ram.phys_start, ram.size, ram.flags) == (
        0x3A600000, 0x4A00000, MemFlags.READ | MemFlags.WRITE | MemFlags.EXECUTE | MemFlags.DMA)
    assert ram.is_ram
    assert root.irqchips[0].pins == frozenset(range(24))
    assert root.pio_regions[-1].base == 0xD000 and root.pio_regions[-1].length == 0xFF
    e1000e = root.pci_devices[1]
    assert e1000e.bdf_str == "00:02.0" and e1000e.msi_64bits and not e1000e.msi_maskable
    assert e1000e.msix_address == 0xFEA90000 and e1000e.num_msix_vectors == 5
    assert [c.start for c in root.caps_of(e1000e)] == [0xC8, 0xD0, 0xE0, 0xA0, 0x100, 0x140]
    bridge = root.pci_devices[2]
    assert bridge.type == PciDeviceType.BRIDGE and bridge.msi_64bits and bridge.msi_maskable
    demo = root.pci_devices[10]
    assert (demo.bdf_str, demo.bus, demo.dev, demo.fn) == ("01:0e.0", 1, 0x0E, 0)
    assert (demo.shmem_regions_start, demo.shmem_dev_id, demo.shmem_peers) == (8, 0, 3)
    assert root.pci_devices[8].shmem_protocol == 0xC002


def test_demo_cell_fields() -> None:
    """Spot checks of the inmate cells against §2.2."""
    apic = parse_cell(apic_demo(), "apic-demo.cell")
    assert isinstance(apic, CellConfig)
    assert apic.name == "apic-demo" and apic.flags == 0x40000000 and apic.cpus == {3}
    assert apic.memory_regions[1].virt_start == 0x100000 and apic.memory_regions[1].is_comm_region
    assert apic.cache_regions[0].type == CacheType.L3 and apic.cache_regions[0].size == 2
    assert apic.console.type == ConsoleType.UART_8250 and apic.console.address == 0x3F8
    tiny = parse_cell(tiny_demo())
    assert tiny.flags == 0x40000003 and tiny.cpus == {2}
    ioapic = parse_cell(ioapic_demo())
    assert ioapic.irqchips[0].pins == {9} and ioapic.irqchips[0].id == 0xFF01
    linux = parse_cell(linux_x86_demo())
    assert linux.cpus == {2, 3} and linux.console.type == ConsoleType.NONE
    assert linux.memory_regions[19].virt_start == 0x200000
    assert linux.irqchips[0].pins == {3, 4}
    ivshmem = parse_cell(ivshmem_demo())
    assert ivshmem.pci_devices[0].shmem_dev_id == 1
    assert [r.phys_start for r in ivshmem.shmem_regions_of(ivshmem.pci_devices[0])] == [
        0x3F0F0000, 0x3F0F1000, 0x3F0FA000, 0x3F0FC000, 0x3F0FE000]


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_shipped_toml_compiles_to_vector(name: str) -> None:
    """harness/configs/NAME.toml compiles to exactly the independently built vector."""
    from harness.hvmodel.config import load_source

    config = load_source(CONFIGS_DIR / f"{name}.toml")
    assert config.to_bytes() == VECTORS[name][0]()
