"""Jailhouse's view of a cell CPU and the runner's pieces, without /dev/kvm.

Start state (reference §5.1), guest CPUID (§3.1), the local APIC reset page, the comm
region (§3.3), the runner's UART, size and port parsing, and the binding's errors.
"""

from __future__ import annotations

import dataclasses
import errno
import struct

import pytest

from harness.hvmodel.arch import kvm, runner
from harness.hvmodel.arch.kvm import structs
from harness.hvmodel.arch.vcpu import (
    jailhouse_cpuid,
    jailhouse_reset_regs,
    jailhouse_reset_sregs,
    lapic_reset_page,
)
from harness.hvmodel.arch.xsave import limit_xsave, xcr0_supported
from harness.hvmodel.errors import Errno, HvError

SUPPORTED = [
    kvm.CpuidEntry(0, eax=0x16, ebx=0x68747541, ecx=0x444D4163, edx=0x69746E65),
    kvm.CpuidEntry(1, eax=0xA00F11, ebx=0x01020800, ecx=0x01202021, edx=0x078BFBFF),
    kvm.CpuidEntry(0xB, 0, 1, ebx=1, ecx=0x100, edx=7),
    kvm.CpuidEntry(0xB, 1, 1, eax=1, ebx=2, ecx=0x201, edx=7),
    kvm.CpuidEntry(0x40000000, eax=0x40000001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
    kvm.CpuidEntry(0x40000001, eax=0x01007EFB),
    kvm.CpuidEntry(0x40000010, eax=1234),
    kvm.CpuidEntry(0x80000001, eax=0xA00F11, ecx=0x00400397, edx=0x23D3FBFF),
    kvm.CpuidEntry(0x8000001E, eax=9, ebx=0x100),
]


def _leaf(table: list[kvm.CpuidEntry], function: int, index: int = 0) -> kvm.CpuidEntry:
    (entry,) = [e for e in table if e.function == function and e.index == index]
    return entry


def test_cpuid_hypervisor_leaves_are_jailhouse_not_kvm() -> None:
    """0x40000000 says "Jailhouse" with max leaf 0x40000001, which is all zero; no KVM leaf."""
    table = jailhouse_cpuid(SUPPORTED, apic_id=2)
    signature = _leaf(table, 0x40000000)
    assert signature.eax == 0x40000001
    assert (signature.ebx, signature.ecx, signature.edx) == (0x6C69614A, 0x73756F68, 0x00000065)
    assert struct.pack("<III", signature.ebx, signature.ecx, signature.edx) == b"Jailhouse\0\0\0"
    assert _leaf(table, 0x40000001) == kvm.CpuidEntry(0x40000001)
    assert [e.function for e in table if e.function >= 0x40000000 and e.function < 0x50000000] == [
        0x40000000,
        0x40000001,
    ]


def test_cpuid_leaf1_vmx_cleared_hypervisor_set_apic_id() -> None:
    """Leaf 1: VMX off, HYPERVISOR and x2APIC on, APIC ID in EBX[31:24], rest untouched."""
    table = jailhouse_cpuid(SUPPORTED, apic_id=3)
    leaf = _leaf(table, 1)
    assert not leaf.ecx & (1 << 5)
    assert leaf.ecx & (1 << 31)
    assert leaf.ecx & (1 << 21)
    assert leaf.ebx >> 24 == 3
    assert leaf.ebx & 0xFFFFFF == 0x020800
    changed = (1 << 5) | (1 << 31) | (1 << 21)
    assert leaf.ecx & ~changed == 0x01202021 & ~changed
    assert leaf.eax == 0xA00F11 and leaf.edx == 0x078BFBFF


def test_cpuid_svm_cleared_and_topology_ids() -> None:
    """0x80000001 loses SVM; every 0xb subleaf and 0x8000001e carry the APIC ID."""
    table = jailhouse_cpuid(SUPPORTED, apic_id=5)
    assert _leaf(table, 0x80000001).ecx == 0x00400397 & ~(1 << 2)
    assert _leaf(table, 0xB, 0).edx == 5
    assert _leaf(table, 0xB, 1).edx == 5
    assert _leaf(table, 0xB, 1).ecx == 0x201
    assert _leaf(table, 0x8000001E).eax == 5
    assert _leaf(table, 0) == SUPPORTED[0]


@pytest.mark.parametrize(("force", "expected"), [(None, True), (True, True), (False, False)])
def test_cpuid_tsc_deadline_override(force: bool | None, expected: bool) -> None:
    """TSC-deadline follows KVM unless forced."""
    table = jailhouse_cpuid(SUPPORTED, apic_id=0, tsc_deadline=force)
    assert bool(_leaf(table, 1).ecx & (1 << 24)) is expected


@pytest.mark.parametrize(
    ("address", "selector", "base", "rip"),
    [(0, 0, 0, 0), (0x10000, 0x1000, 0x10000, 0), (0xFFFF0, 0xF000, 0xF0000, 0xFFF0)],
)
def test_reset_state_real_mode(address: int, selector: int, base: int, rip: int) -> None:
    """§5.1: CS from cpu_reset_address, segment ARs, descriptor tables, CR0, EFER, APIC base."""
    sregs = structs.KvmSregs()
    sregs.cr0 = 0x80000011
    sregs.efer = 0x500
    sregs.cs.base = 0x1234
    sregs.cs.l = 1
    sregs.interrupt_bitmap[1] = 4
    jailhouse_reset_sregs(sregs, address)
    assert (sregs.cs.selector, sregs.cs.base, sregs.cs.limit) == (selector, base, 0xFFFF)
    assert sregs.cs.access_rights() == 0x9B
    for name in ("ds", "es", "fs", "gs", "ss"):
        seg = getattr(sregs, name)
        assert (seg.selector, seg.base, seg.limit, seg.access_rights()) == (0, 0, 0xFFFF, 0x93)
    assert sregs.tr.access_rights() == 0x8B
    assert sregs.ldt.access_rights() == 0x82
    assert (sregs.gdt.base, sregs.gdt.limit, sregs.idt.base, sregs.idt.limit) == (0, 0xFFFF) * 2
    assert sregs.cr0 == 0x60000010  # NW | CD | ET
    assert (sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8, sregs.efer) == (0, 0, 0, 0, 0)
    assert sregs.apic_base == 0xFEE00C00  # enabled, x2APIC, not BSP
    assert list(sregs.interrupt_bitmap) == [0, 0, 0, 0]
    regs = jailhouse_reset_regs(address)
    assert (regs.rip, regs.rflags) == (rip, 2)
    assert all(getattr(regs, name) == 0 for name, *_ in structs.KvmRegs._fields_[:16])


def test_segment_access_rights_round_trip() -> None:
    """The VMX-style AR word maps onto kvm_segment's bit fields and back."""
    seg = structs.KvmSegment()
    for ar in (0x9B, 0x93, 0x8B, 0x82, 0xA09B, 0xC093, 0x80F3):
        seg.set_access_rights(ar)
        assert seg.access_rights() == ar
    seg.set_access_rights(0xA09B)
    assert (seg.type, seg.s, seg.dpl, seg.present, seg.l, seg.db, seg.g) == (11, 1, 0, 1, 1, 0, 1)


def test_lapic_reset_page() -> None:
    """ID/version/LDR and the timer divider kept, LVTs masked, SVR 0xff, DFR all ones,
    everything else zero."""
    current = bytearray(range(256)) * 4
    page = lapic_reset_page(current)
    assert len(page) == 1024

    def reg(offset: int) -> int:
        return int.from_bytes(page[offset : offset + 4], "little")

    # TDCR (0x3e0) too: Jailhouse's apic_clear leaves the divider the last owner set
    for kept in (0x20, 0x30, 0xD0, 0x3E0):
        assert page[kept : kept + 4] == current[kept : kept + 4]
    assert reg(0xE0) == 0xFFFFFFFF
    assert reg(0xF0) == 0xFF
    for lvt in (0x2F0, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370):
        assert reg(lvt) == 1 << 16, hex(lvt)
    others = set(range(0, 0x400, 0x10)) - {0x20, 0x30, 0xD0, 0xE0, 0xF0, 0x3E0}
    others -= {0x2F0, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370}
    assert all(reg(offset) == 0 for offset in others)  # TPR, ISR, IRR, TMICT, ...


def test_comm_region_layout() -> None:
    """§3.3: 76 packed bytes at the documented offsets, console copied at 24."""
    data = runner.comm_region(console_port=0x2F8, num_cpus=3, tsc_khz=2_400_000, apic_khz=1_000_000)
    assert len(data) == 76
    assert data[0:6] == b"JHCOMM"
    assert struct.unpack_from("<H", data, 6)[0] == 2
    assert struct.unpack_from("<IIII", data, 8) == (0, 0, 0, 0)  # RUNNING, no message, flags
    address, size, ctype, flags, divider, gate, clock = struct.unpack_from("<QIHHIIQ", data, 24)
    assert (address, size, ctype, flags, divider, gate, clock) == (0x2F8, 0, 2, 0, 0, 0, 0)
    assert struct.unpack_from("<Q", data, 56)[0] == 0
    assert struct.unpack_from("<HHII", data, 64) == (0x608, 3, 2_400_000, 1_000_000)


def test_uart_8250_emulation() -> None:
    """THR transmits, LSR says ready, DLAB switches offsets 0/1 to the divisor latch."""
    sent: list[int] = []
    uart = runner.Uart8250(sent.append)
    assert uart.read(5) & 0x60 == 0x60
    uart.write(0, ord("x"))
    uart.write(3, 0x80)  # DLAB
    uart.write(0, 1)
    uart.write(1, 0)
    assert uart.read(0) == 1
    uart.write(3, 0x03)  # 8N1, DLAB off
    uart.write(0, ord("y"))
    uart.write(7, 0x5A)
    assert uart.read(7) == 0x5A
    assert uart.read(2) == 1
    assert bytes(sent) == b"xy"


def test_parse_helpers() -> None:
    """Sizes with units, ports as lists, ranges and base+count."""
    assert runner.parse_size("1M") == 0x100000
    assert runner.parse_size("64K") == 0x10000
    assert runner.parse_size("0x2000") == 0x2000
    assert runner.parse_size("2MiB") == 0x200000
    ports = runner.parse_ports("0x608-0x60b, 0x2f8+8,0x80")
    assert ports == [range(0x608, 0x60C), range(0x2F8, 0x300), range(0x80, 0x81)]
    assert runner.parse_ports("") == []
    with pytest.raises(ValueError):
        runner.parse_ports("0x10-0x5")
    with pytest.raises(ValueError):
        runner.parse_ports("0xffff+2")


def test_runner_config_checks() -> None:
    """RAM must fit below the comm region, be page-aligned and hold the image."""
    with pytest.raises(ValueError, match="comm region"):
        runner.RunnerConfig(image=b"", ram_size=0x200000)
    with pytest.raises(ValueError, match="page-aligned"):
        runner.RunnerConfig(image=b"", ram_size=0x1800)
    with pytest.raises(ValueError, match="larger than RAM"):
        runner.RunnerConfig(image=bytes(0x2001), ram_size=0x2000)
    with pytest.raises(ValueError, match="page-aligned"):
        runner.RunnerConfig(image=b"", phys=0x3A000800)
    with pytest.raises(ValueError, match="cpus"):
        runner.RunnerConfig(image=b"", cpus=0)


def test_kvm_error_names_the_operation_and_maps_errno() -> None:
    """KvmError is an HvError: Jailhouse errno when it has one, EIO otherwise."""
    err = kvm.KvmError("KVM_SET_USER_MEMORY_REGION", errno.EEXIST, "slot 1, guest 0x0+0x1000")
    assert isinstance(err, HvError)
    assert err.errno is Errno.EEXIST and err.code == -17
    assert str(err) == ("KVM_SET_USER_MEMORY_REGION failed: EEXIST (File exists): slot 1, guest 0x0+0x1000")
    other = kvm.KvmError("KVM_RUN", errno.EFAULT)
    assert other.errno is Errno.EIO and other.os_errno == errno.EFAULT
    assert str(other) == "KVM_RUN failed: EFAULT (Bad address)"
    assert str(kvm.KvmError("kick", 0, "no handler")) == "kick failed: no handler"


def test_describe_exit_uses_jailhouse_wording() -> None:
    """Unhandled PIO/MMIO exits read like Jailhouse's FATAL lines."""
    page = bytearray(4096)
    mmio = kvm.MmioExit(0x180000, 4, True, b"\xfe\xca\0\0", page)  # type: ignore[arg-type]
    assert kvm.describe_exit(mmio) == "Invalid MMIO/RAM write, addr: 0x0000000000180000 size: 4"
    pio = kvm.IoExit(0x3F9, 1, False, 1, 0x1000, page)  # type: ignore[arg-type]
    assert kvm.describe_exit(pio) == "Invalid PIO read, port: 3f9 size: 1"
    assert kvm.describe_exit(kvm.ShutdownExit()) == "Triple fault (KVM_EXIT_SHUTDOWN)"
    assert "emulation failure" in kvm.describe_exit(kvm.InternalErrorExit(1, (0, 1)))
    assert kvm.describe_exit(kvm.OtherExit(4)) == "Unhandled exit KVM_EXIT_DEBUG"
    assert kvm.OtherExit(999).reason == 999


# A CPU with XSAVE, AVX, AVX2, AVX-512, MPX, PKU, VAES and AMX-TILE (and BMI1, GFNI that
# need no XSAVE state); XCR0 components x87, SSE, YMM, AVX-512 (5-7) and PKRU (9), and
# the supervisor component 8 (PT, in XSS: ECX bit 0).
XSAVE_CPU = [
    kvm.CpuidEntry(0, eax=0xD, ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69),
    kvm.CpuidEntry(1, eax=0x50654, ecx=(1 << 26) | (1 << 28) | (1 << 12) | (1 << 29) | (1 << 0),
                   edx=0x078BFBFF),
    kvm.CpuidEntry(7, 0, eax=1, ebx=(1 << 5) | (1 << 16) | (1 << 14) | (1 << 3) | (1 << 31),
                   ecx=(1 << 9) | (1 << 3) | (1 << 8), edx=1 << 24),
    kvm.CpuidEntry(7, 1, eax=1 << 4),
    kvm.CpuidEntry(0xD, 0, eax=0x2E7, ebx=0x340, ecx=0xA88, edx=0),
    kvm.CpuidEntry(0xD, 1, eax=0xF, ecx=1 << 8),
    kvm.CpuidEntry(0xD, 2, eax=256, ebx=576),
    kvm.CpuidEntry(0xD, 5, eax=64, ebx=1088),
    kvm.CpuidEntry(0xD, 6, eax=512, ebx=1152),
    kvm.CpuidEntry(0xD, 7, eax=1024, ebx=1664),
    kvm.CpuidEntry(0xD, 8, eax=128, ecx=1),
    kvm.CpuidEntry(0xD, 9, eax=8, ebx=2688),
    kvm.CpuidEntry(0x80000001, ecx=(1 << 11) | (1 << 16) | (1 << 5)),
]


def test_no_usable_xsave_hides_xsave_and_everything_that_needs_it() -> None:
    """Without usable XCR0 state: leaf 1 says no XSAVE, OSXSAVE, AVX, FMA, F16C; leaf 7
    no AVX2, AVX-512, MPX, PKU, VAES, AMX, AVX-VNNI; 0xD all zero; AMD's XOP and FMA4
    gone; features that need no XSAVE state (SSE3, BMI1, GFNI, LZCNT) stay."""
    table = limit_xsave(XSAVE_CPU, 0)
    assert _leaf(table, 1).ecx == 1 << 0  # SSE3 only
    leaf7 = _leaf(table, 7)
    assert (leaf7.ebx, leaf7.ecx, leaf7.edx) == (1 << 3, 1 << 8, 0)
    assert _leaf(table, 7, 1).eax == 0
    assert all((e.eax, e.ebx, e.ecx, e.edx) == (0, 0, 0, 0) for e in table if e.function == 0xD)
    assert _leaf(table, 0x80000001).ecx == 1 << 5
    assert xcr0_supported(table) == 0


def test_xsave_without_avx512_state_keeps_avx() -> None:
    """XCR0 x87|SSE|YMM usable: AVX, AVX2, FMA, VAES stay; AVX-512, PKU, MPX, AMX go; 0xD.0
    announces 0x7 with the area up to YMM; the unusable user components' subleaves
    go, the supervisor one (8) and 0xD.1 stay."""
    table = limit_xsave(XSAVE_CPU, 0x7)
    assert _leaf(table, 1).ecx == _leaf(XSAVE_CPU, 1).ecx
    leaf7 = _leaf(table, 7)
    assert leaf7.ebx == (1 << 5) | (1 << 3) and leaf7.ecx == (1 << 9) | (1 << 8) and leaf7.edx == 0
    state = _leaf(table, 0xD)
    assert (state.eax, state.edx, state.ecx, state.ebx) == (0x7, 0, 576 + 256, 0x340)
    assert sorted(e.index for e in table if e.function == 0xD) == [0, 1, 2, 8]
    assert xcr0_supported(table) == 0x7


def test_all_usable_keeps_the_table_and_x87_is_required() -> None:
    """With every announced component usable only the features whose state CPUID does
    not announce go (MPX, AMX-TILE); a usable mask without x87 (which every XCR0
    holds) means no XSAVE; components CPUID does not announce are never added."""
    table = limit_xsave(XSAVE_CPU, 0x2E7)
    leaf7 = _leaf(XSAVE_CPU, 7)
    assert _leaf(table, 7) == dataclasses.replace(leaf7, ebx=leaf7.ebx & ~(1 << 14), edx=0)
    assert [e for e in table if e.function != 7] == [e for e in XSAVE_CPU if e.function != 7]
    assert limit_xsave(XSAVE_CPU, 0x2E6) == limit_xsave(XSAVE_CPU, 0)
    assert limit_xsave(XSAVE_CPU, 0xFFFFFFFF) == table
