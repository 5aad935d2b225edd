"""Guests on this machine's /dev/kvm through the binding and the runner.

Skipped where /dev/kvm is missing or not accessible. Every guest is tiny and
hand-assembled (bytes with their assembly beside them), except the long-mode SMP guest,
which is assembled with gcc at test time (skipped without it). Every run is bounded:
guests that would block (HLT with the in-kernel irqchip) are never re-entered, and a
watchdog kicks the vCPU if a guest misbehaves, so a bug fails a test instead of hanging.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import io
import os
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.hvmodel.abi import CPUID_1_ECX_XSAVE, CellState, CpuStat
from harness.hvmodel.arch import hostmem, kvm, portio, runner, xsave
from harness.hvmodel.arch.executor.cells import CellCpu
from harness.hvmodel.arch.executor.exits import ExitDispatcher
from harness.hvmodel.arch.kvm import structs
from harness.hvmodel.arch.vcpu import Msr, jailhouse_vcpu_reset, jailhouse_vcpu_setup

pytestmark = [
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="/dev/kvm not available"),
    pytest.mark.usefixtures("kick_handler"),  # every test here may run guests (conftest.py)
]

UART = 0x2F8
RAM = 0x10000


@contextlib.contextmanager
def watchdog(vcpu: kvm.Vcpu, seconds: float = 5.0) -> Iterator[None]:
    """Kick ``vcpu`` after ``seconds``: a stuck guest then yields IntrExit, not a hang."""
    timer = threading.Timer(seconds, vcpu.kick)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def guest(vm: kvm.Vm, code: bytes, *, at: int = 0, ram: int = RAM, apic_id: int = 0) -> kvm.Vcpu:
    """RAM at 0 with ``code`` at ``at``, one vCPU in Jailhouse's start state at ``at``."""
    memory = hostmem.anonymous_memory(ram)
    memory[at : at + len(code)] = code
    vm.add_memory(0, memory)
    vcpu = vm.create_vcpu(apic_id)
    jailhouse_vcpu_setup(vcpu)
    jailhouse_vcpu_reset(vcpu, at)
    return vcpu


def expect_out(vcpu: kvm.Vcpu, port: int, size: int, value: int) -> None:
    exit_ = vcpu.run()
    assert isinstance(exit_, kvm.IoExit), exit_
    assert (exit_.port, exit_.size, exit_.is_write, exit_.count) == (port, size, True, 1)
    assert exit_.value() == value


# Real mode, CS=0 IP=0 (Jailhouse's start state for cpu_reset_address 0).
PIO_MMIO_GUEST = bytes(
    [
        0xBA, 0xF8, 0x02,               # mov dx, 0x2f8
        0xB0, 0x48,                     # mov al, 'H'
        0xEE,                           # out dx, al
        0xB0, 0x69,                     # mov al, 'i'
        0xEE,                           # out dx, al
        0xEC,                           # in al, dx          (the test answers 0x5a)
        0xEE,                           # out dx, al         (echo)
        0xB8, 0x34, 0x12,               # mov ax, 0x1234
        0xEF,                           # out dx, ax
        0xB8, 0x00, 0x20,               # mov ax, 0x2000
        0x8E, 0xD8,                     # mov ds, ax         (ds base 0x20000: no RAM)
        0xC7, 0x06, 0x10, 0x00, 0xEF, 0xBE,  # mov word [0x10], 0xbeef -> MMIO 0x20010
        0xA1, 0x20, 0x00,               # mov ax, [0x20]     -> MMIO read 0x20020 (0x4321)
        0xEF,                           # out dx, ax         (echo)
        0xF4,                           # hlt
    ]
)  # fmt: skip


def test_real_mode_pio_and_mmio_exits(vm: kvm.Vm) -> None:
    """OUT/IN to the UART and MMIO write/read outside RAM, with data both ways."""
    vcpu = guest(vm, PIO_MMIO_GUEST)
    with watchdog(vcpu):
        expect_out(vcpu, UART, 1, ord("H"))
        expect_out(vcpu, UART, 1, ord("i"))
        exit_ = vcpu.run()
        assert isinstance(exit_, kvm.IoExit)
        assert (exit_.port, exit_.size, exit_.is_write) == (UART, 1, False)
        assert exit_.reason == kvm.ExitReason.IO
        exit_.set_value(0x5A)
        expect_out(vcpu, UART, 1, 0x5A)
        expect_out(vcpu, UART, 2, 0x1234)
        exit_ = vcpu.run()
        assert isinstance(exit_, kvm.MmioExit), exit_
        assert (exit_.addr, exit_.length, exit_.is_write) == (0x20010, 2, True)
        assert exit_.data == b"\xef\xbe" and exit_.value == 0xBEEF
        exit_ = vcpu.run()
        assert isinstance(exit_, kvm.MmioExit), exit_
        assert (exit_.addr, exit_.length, exit_.is_write, exit_.data) == (0x20020, 2, False, b"")
        exit_.set_value(0x4321)
        expect_out(vcpu, UART, 2, 0x4321)
    regs = vcpu.get_regs()
    assert regs.rax & 0xFFFF == 0x4321
    assert regs.rip == len(PIO_MMIO_GUEST) - 1  # stopped before the HLT


def test_start_state_as_kvm_reports_it(vm: kvm.Vm) -> None:
    """After jailhouse_vcpu_reset, KVM holds §5.1's state, x2APIC on, and the CPU is runnable."""
    reset = 0x10000
    vcpu = guest(vm, b"\xba\xf8\x02\xb0\x52\xee\xf4", at=reset, ram=0x20000, apic_id=1)
    sregs = vcpu.get_sregs()
    assert (sregs.cs.selector, sregs.cs.base, sregs.cs.limit) == (0x1000, 0x10000, 0xFFFF)
    assert sregs.cs.access_rights() == 0x9B
    assert (sregs.ds.selector, sregs.ds.base, sregs.ds.access_rights()) == (0, 0, 0x93)
    assert sregs.tr.access_rights() == 0x8B and sregs.ldt.access_rights() == 0x82
    assert (sregs.gdt.limit, sregs.idt.limit) == (0xFFFF, 0xFFFF)
    assert sregs.cr0 == 0x60000010 and sregs.cr4 == 0 and sregs.efer == 0
    assert sregs.apic_base == 0xFEE00C00
    regs = vcpu.get_regs()
    assert (regs.rip, regs.rflags, regs.rax, regs.rdx, regs.rsp) == (0, 2, 0, 0, 0)
    msrs = vcpu.get_msrs([Msr.IA32_APIC_BASE, Msr.IA32_PAT, Msr.IA32_MTRR_DEF_TYPE])
    assert msrs == {0x1B: 0xFEE00C00, 0x277: 0x0007040600070406, 0x2FF: 0}
    assert vcpu.get_debugregs().dr7 == 0x400
    assert vcpu.get_mp_state() is kvm.MpState.RUNNABLE
    lapic = vcpu.get_lapic()
    assert int.from_bytes(lapic[0x320:0x324], "little") & (1 << 16)  # LVT timer masked
    with watchdog(vcpu):
        expect_out(vcpu, UART, 1, ord("R"))  # the first instruction ran at 0x10000


# Real mode: OUT the x2APIC timer divider (TDCR, MSR 0x83e), then set it to divide-by-1.
TDCR_GUEST = bytes(
    [
        0x66, 0xB9, 0x3E, 0x08, 0x00, 0x00,  # mov ecx, 0x83e
        0x0F, 0x32,                     # rdmsr
        0xBA, 0xF8, 0x02,               # mov dx, 0x2f8
        0x66, 0xEF,                     # out dx, eax        (TDCR as the cell finds it)
        0x66, 0xB8, 0x0B, 0x00, 0x00, 0x00,  # mov eax, 0xb  (divide by 1)
        0x66, 0x31, 0xD2,               # xor edx, edx
        0x0F, 0x30,                     # wrmsr
        0xBA, 0xF8, 0x02,               # mov dx, 0x2f8
        0x66, 0xEF,                     # out dx, eax        (written)
        0xF4,                           # hlt
    ]
)  # fmt: skip


def test_apic_timer_divider_is_the_root_linux_one(vm: kvm.Vm) -> None:
    """A cell CPU finds TDCR = divide-by-16, the divider the root's Linux programmed and
    Jailhouse leaves alone (Jailhouse's inmate library relies on it: ``apic_khz / 16``);
    a restart keeps what the last inmate wrote (Jailhouse's ``apic_clear`` keeps it)."""
    vcpu = guest(vm, TDCR_GUEST)
    with watchdog(vcpu):
        expect_out(vcpu, UART, 4, 0x3)
        expect_out(vcpu, UART, 4, 0xB)
    jailhouse_vcpu_reset(vcpu, 0)
    with watchdog(vcpu):
        expect_out(vcpu, UART, 4, 0xB)


def _cpuid_block(leaf: int) -> bytes:
    """CPUID ``leaf`` (subleaf 0), then OUT EAX, EBX, ECX, EDX to the UART as dwords."""
    return (
        b"\x66\xb8" + leaf.to_bytes(4, "little")  # mov eax, leaf
        + b"\x66\x31\xc9"  # xor ecx, ecx
        + b"\x0f\xa2"  # cpuid
        + b"\x66\x89\xd6"  # mov esi, edx
        + b"\xba\xf8\x02"  # mov dx, 0x2f8
        + b"\x66\xef"  # out dx, eax
        + b"\x66\x89\xd8\x66\xef"  # mov eax, ebx; out dx, eax
        + b"\x66\x89\xc8\x66\xef"  # mov eax, ecx; out dx, eax
        + b"\x66\x89\xf0\x66\xef"  # mov eax, esi; out dx, eax
    )  # fmt: skip


def test_guest_sees_jailhouse_cpuid(vm: kvm.Vm) -> None:
    """The guest's CPUID: Jailhouse signature, no KVM leaves, VMX/SVM hidden, its APIC ID."""
    leaves = (0x40000000, 0x40000001, 1, 0x80000001)
    code = b"".join(_cpuid_block(leaf) for leaf in leaves) + b"\xf4"
    vcpu = guest(vm, code, apic_id=3)
    values: dict[int, tuple[int, ...]] = {}
    with watchdog(vcpu):
        for leaf in leaves:
            regs = []
            for _ in range(4):
                exit_ = vcpu.run()
                assert isinstance(exit_, kvm.IoExit) and exit_.size == 4, exit_
                regs.append(exit_.value())
            values[leaf] = tuple(regs)
    assert values[0x40000000] == (0x40000001, *struct.unpack("<III", b"Jailhouse\0\0\0"))
    assert values[0x40000001] == (0, 0, 0, 0)
    _, ebx, ecx, _ = values[1]
    assert ebx >> 24 == 3
    assert ecx & (1 << 31) and not ecx & (1 << 5)
    assert not values[0x80000001][2] & (1 << 2)


def test_kick_interrupts_spinning_and_halted_guests(vm: kvm.Vm) -> None:
    """kick() before run, during a busy loop and during HLT: each run returns IntrExit."""
    code = bytes(
        [
            0xBA, 0xF8, 0x02,  # mov dx, 0x2f8
            0xEE,              # out dx, al
            0xB9, 0x00, 0x00,  # mov cx, 0
            0xE2, 0xFE,        # loop $          (65536 rounds, then on)
            0xEB, 0xFE,        # jmp $
        ]
    )  # fmt: skip
    vcpu = guest(vm, code)
    vcpu.kick()  # nobody runs it: the next run returns at once
    vcpu.complete_pending()  # ... even across this
    assert isinstance(vcpu.run(), kvm.IntrExit)
    with watchdog(vcpu):
        expect_out(vcpu, UART, 1, 0)  # immediate_exit was cleared again
    results: list[kvm.VcpuExit] = []
    worker = threading.Thread(target=lambda: results.append(vcpu.run()))
    worker.start()
    time.sleep(0.2)
    assert worker.is_alive()  # spinning in the guest
    started = time.monotonic()
    vcpu.kick()
    worker.join(5)
    assert not worker.is_alive()
    assert isinstance(results[0], kvm.IntrExit)
    assert time.monotonic() - started < 2


def test_kick_wakes_a_halted_vcpu(vm: kvm.Vm) -> None:
    """With the in-kernel irqchip HLT blocks inside KVM_RUN; a kick ends it (parking)."""
    vcpu = guest(vm, b"\xfa\xf4\xeb\xfd")  # cli; hlt; jmp hlt
    results: list[kvm.VcpuExit] = []
    worker = threading.Thread(target=lambda: results.append(vcpu.run()))
    worker.start()
    time.sleep(0.2)
    assert worker.is_alive()
    vcpu.kick()
    worker.join(5)
    assert not worker.is_alive() and isinstance(results[0], kvm.IntrExit)


def test_memory_slots_readonly_remove_and_errors(vm: kvm.Vm) -> None:
    """Slots from any buffer; read-only slots exit on writes; bad requests name the ioctl."""
    code = bytes(
        [
            0xB8, 0x00, 0x20,  # mov ax, 0x2000
            0x8E, 0xD8,        # mov ds, ax
            0xA0, 0x00, 0x00,  # mov al, [0]      (0x20000, read-only slot: 0x77)
            0xBA, 0xF8, 0x02,  # mov dx, 0x2f8
            0xEE,              # out dx, al
            0xA2, 0x00, 0x00,  # mov [0], al      -> MMIO write (read-only)
            0xF4,              # hlt
        ]
    )  # fmt: skip
    vcpu = guest(vm, code)
    rom = hostmem.anonymous_memory(0x1000)
    rom[0] = 0x77
    slot = vm.add_memory(0x20000, rom, readonly=True)
    assert slot.readonly and vm.slot_at(0x20FFF) is slot
    with pytest.raises(BufferError):
        rom.close()  # the slot pins the buffer
    with watchdog(vcpu):
        expect_out(vcpu, UART, 1, 0x77)
        exit_ = vcpu.run()
    assert isinstance(exit_, kvm.MmioExit)
    assert (exit_.addr, exit_.is_write, exit_.value) == (0x20000, True, 0x77)
    assert rom[0] == 0x77

    with pytest.raises(kvm.KvmError) as overlap:
        vm.add_memory(0x20000, hostmem.anonymous_memory(0x1000))
    assert overlap.value.op == "KVM_SET_USER_MEMORY_REGION"
    assert overlap.value.os_errno == errno.EEXIST
    vm.remove_memory(slot)
    assert vm.slot_at(0x20000) is None
    rom.close()  # released with the slot

    with pytest.raises(kvm.KvmError, match="guest address not page-aligned"):
        vm.add_memory(0x30800, hostmem.anonymous_memory(0x1000))
    with pytest.raises(kvm.KvmError, match="host address not page-aligned"):
        vm.add_memory(0x30000, hostmem.anonymous_memory(0x2000), offset=0x800, size=0x1000)
    with pytest.raises(kvm.KvmError, match="KVM_CREATE_VCPU failed: EINVAL"):
        vm.create_vcpu(1 << 20)


def test_set_tss_addr_above_int_max(vm: kvm.Vm) -> None:
    """Integer arguments beyond a C int (0xfffbd000) reach the kernel intact."""
    vm.set_tss_addr(0xFFFBD000)


def _run_image(image: bytes, **options: object) -> tuple[runner.InmateRunner, bytes, str]:
    output = bytearray()
    report = io.StringIO()
    config = runner.RunnerConfig(image=image, **options)  # type: ignore[arg-type]
    with runner.InmateRunner(config, output=output.extend, report=report) as run:
        run.start()
        run.wait(10)
    return run, bytes(output), report.getvalue()


def test_runner_comm_region_and_cmdline() -> None:
    """The guest reads JHCOMM at 0x100000 and its command line at 0x1000."""
    code = bytes(
        [
            0xB8, 0xFF, 0xFF,  # mov ax, 0xffff
            0x8E, 0xD8,        # mov ds, ax        (0xffff:0x10 = 0x100000)
            0xBA, 0xF8, 0x02,  # mov dx, 0x2f8
            0xBE, 0x10, 0x00,  # mov si, 0x10
            0xB9, 0x06, 0x00,  # mov cx, 6
            0xAC,              # 1: lodsb
            0xEE,              #    out dx, al
            0xE2, 0xFC,        #    loop 1b        (the signature)
            0x31, 0xC0,        # xor ax, ax
            0x8E, 0xD8,        # mov ds, ax
            0xBE, 0x00, 0x10,  # mov si, 0x1000
            0xAC,              # 2: lodsb
            0x84, 0xC0,        #    test al, al
            0x74, 0x03,        #    jz 3f
            0xEE,              #    out dx, al
            0xEB, 0xF8,        #    jmp 2b         (the command line)
            0xB0, 0x0A,        # 3: mov al, '\n'
            0xEE,              #    out dx, al
            0xF4,              # hlt
        ]
    )  # fmt: skip
    run, output, report = _run_image(
        code, ram_size=0x2000, cmdline="con-base=0x2f8", exit_on="\n", forward_pio=[]
    )
    assert output == b"JHCOMMcon-base=0x2f8\n", report
    assert run.stop_reason is runner.StopReason.EXIT_ON
    assert run.exit_counts()["IoExit"] == len(output)


def test_runner_pm_timer_emulation() -> None:
    """Without /dev/port forwarding the PM timer counts at 3.58 MHz in 24 bits."""
    code = bytes(
        [
            0xBA, 0x08, 0x06,        # mov dx, 0x608
            0x66, 0xED,              # in eax, dx
            0x66, 0xA3, 0x00, 0x20,  # mov [0x2000], eax
            0xB9, 0xFF, 0xFF,        # mov cx, 0xffff
            0xE2, 0xFE,              # loop $
            0x66, 0xED,              # in eax, dx
            0x66, 0xA3, 0x04, 0x20,  # mov [0x2004], eax
            0xBA, 0xF8, 0x02,        # mov dx, 0x2f8
            0xB0, 0x0A,              # mov al, '\n'
            0xEE,                    # out dx, al
            0xF4,                    # hlt
        ]
    )  # fmt: skip
    before = time.monotonic()
    run, output, report = _run_image(code, ram_size=0x3000, exit_on="\n", forward_pio=[])
    elapsed = time.monotonic() - before
    first, second = struct.unpack("<II", run.ram[0x2000:0x2008])
    assert output == b"\n", report
    assert first <= 0xFFFFFF and second <= 0xFFFFFF
    assert first < second <= elapsed * runner.PM_TIMER_HZ + 1


def test_runner_fatal_mmio_parks_cpu_and_fails_cell() -> None:
    """An access outside the cell's memory: Jailhouse's FATAL line, CPU parked, cell FAILED."""
    code = bytes(
        [
            0xBA, 0xF8, 0x02,                    # mov dx, 0x2f8
            0xB0, 0x6B,                          # mov al, 'k'
            0xEE,                                # out dx, al
            0xB8, 0x00, 0x30,                    # mov ax, 0x3000
            0x8E, 0xD8,                          # mov ds, ax
            0xC7, 0x06, 0x08, 0x00, 0x11, 0x22,  # mov word [8], 0x2211  -> 0x30008
            0xF4,                                # hlt
        ]
    )  # fmt: skip
    run, output, report = _run_image(code, ram_size=0x2000, cpus=2, forward_pio=[])
    assert output == b"kk"
    assert report.count("FATAL: Invalid MMIO/RAM write, addr: 0x0000000000030008 size: 2") == 2
    assert 'Parking CPU 0 (Cell: "runner")' in report
    assert 'Parking CPU 1 (Cell: "runner")' in report
    assert "RIP: 0x" in report
    assert run.stop_reason is runner.StopReason.ALL_FAILED
    assert run.cell_state == CellState.FAILED


def test_runner_fatal_pio_outside_whitelist() -> None:
    """A port that is neither UART, PM timer nor port 0x80 parks the CPU."""
    code = bytes([0xB0, 0x01, 0xE6, 0x80, 0xE6, 0x70, 0xF4])  # mov al,1; out 0x80,al; out 0x70,al
    run, _, report = _run_image(code, ram_size=0x1000, forward_pio=[])
    assert "FATAL: Invalid PIO write, port: 70 size: 1" in report
    assert run.exit_counts()["IoExit"] == 2  # 0x80 ignored, 0x70 fatal


LONG_MODE_SMP = r"""
	.code16
	.globl _start
_start:	mov $0x2f8, %dx
	mov $'R', %al
	out %al, %dx
	lgdtl gdt_desc
	mov %cr0, %eax
	or $1, %eax
	mov %eax, %cr0
	ljmpl $0x08, $start32
	.code32
start32:
	mov $0x18, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov $0x2f8, %dx
	mov $'P', %al
	out %al, %dx
	mov %cr4, %eax
	or $0x20, %eax
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $0x2ff, %ecx		/* MTRR_DEF_TYPE.E, as Jailhouse's inmate header */
	rdmsr
	or $0x800, %eax
	wrmsr
	mov $0xc0000080, %ecx		/* EFER.LME */
	rdmsr
	or $0x100, %eax
	wrmsr
	mov $0x80010001, %eax
	mov %eax, %cr0
	ljmpl $0x10, $start64
	.code64
start64:
	mov $0x802, %ecx		/* x2APIC ID */
	rdmsr
	test %eax, %eax
	jz bsp
	cmpl $1, ap_go			/* AP: restarted by INIT/SIPI? */
	jne 1f
	mov $0x2f8, %dx
	mov $'A', %al
	out %al, %dx
	movl $1, ap_done
1:	cli
	hlt
	jmp 1b
bsp:	mov $stack_top, %rsp
	mov $timer, %rax		/* IDT vector 32 */
	mov %ax, idt+32*16
	movw $0x10, idt+32*16+2
	movw $0x8e00, idt+32*16+4
	shr $16, %rax
	mov %ax, idt+32*16+6
	lidt idt_desc
	mov $0x80f, %ecx		/* SVR: enable */
	mov $0x1ff, %eax
	xor %edx, %edx
	wrmsr
	mov $0x83e, %ecx		/* TDCR: divide by 1 */
	mov $0xb, %eax
	wrmsr
	mov $0x832, %ecx		/* LVTT: one-shot, vector 32 */
	mov $32, %eax
	wrmsr
	mov $0x838, %ecx		/* TMICT: 1 ms at KVM's 1 GHz */
	mov $1000000, %eax
	wrmsr
	sti
2:	hlt
	cmpl $1, ticks
	jb 2b
	mov $0x832, %ecx		/* LVTT: TSC-deadline mode */
	mov $(32 | (2 << 17)), %eax
	xor %edx, %edx
	wrmsr
	rdtsc
	add $1000000, %eax
	adc $0, %edx
	mov $0x6e0, %ecx
	wrmsr
3:	hlt
	cmpl $2, ticks
	jb 3b
	cli
	movl $1, ap_go
	mov $0x830, %ecx		/* ICR: INIT, then SIPI vector 0, to APIC ID 1 */
	mov $0x4500, %eax
	mov $1, %edx
	wrmsr
	mov $0x4600, %eax
	wrmsr
4:	pause
	cmpl $1, ap_done
	jne 4b
	mov $0x2f8, %dx
	mov $'D', %al
	out %al, %dx
	mov $'\n', %al
	out %al, %dx
5:	hlt
	jmp 5b
timer:	push %rax
	push %rcx
	push %rdx
	mov $0x2f8, %dx
	mov $'T', %al
	out %al, %dx
	incl ticks
	mov $0x80b, %ecx		/* EOI */
	xor %eax, %eax
	xor %edx, %edx
	wrmsr
	pop %rdx
	pop %rcx
	pop %rax
	iretq
	.balign 4
ap_go:	.long 0
ap_done: .long 0
ticks:	.long 0
	.balign 16
idt:	.fill 128, 8, 0
idt_desc:
	.short 64*16-1
	.quad idt
	.balign 16
	.fill 512, 8, 0
stack_top:
	.balign 8
gdt:	.quad 0
	.quad 0x00cf9b000000ffff	/* 0x08: 32-bit code */
	.quad 0x00af9b000000ffff	/* 0x10: 64-bit code */
	.quad 0x00cf93000000ffff	/* 0x18: data */
gdt_desc:
	.short gdt_desc - gdt - 1
	.long gdt
	.balign 4096
pml4:	.quad pdpt + 0x3
	.fill 511, 8, 0
pdpt:	.quad pd + 0x3
	.fill 511, 8, 0
pd:	.quad 0x83			/* 2 MiB identity map */
	.fill 511, 8, 0
"""


@pytest.fixture(scope="module")
def long_mode_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    gcc, ld = shutil.which("gcc"), shutil.which("ld")
    if gcc is None or ld is None:
        pytest.skip("gcc/ld needed to assemble the long-mode guest")
    work: Path = tmp_path_factory.mktemp("longmode")
    (work / "g.S").write_text(LONG_MODE_SMP)
    subprocess.run([gcc, "-c", "-m64", "g.S", "-o", "g.o"], cwd=work, check=True)
    subprocess.run(
        [ld, "-m", "elf_x86_64", "-Ttext=0", "-e", "_start", "--oformat=binary", "-og.bin", "g.o"],
        cwd=work,
        check=True,
    )
    return (work / "g.bin").read_bytes()


def test_long_mode_smp_timers_and_init_sipi(long_mode_image: bytes) -> None:
    """Two CPUs start together in real mode, reach long mode, take x2APIC one-shot and
    TSC-deadline timer interrupts; INIT/SIPI restarts the AP at 0 in real mode."""
    run, output, report = _run_image(long_mode_image, cpus=2, exit_on="D\n", forward_pio=[])
    assert run.stop_reason is runner.StopReason.EXIT_ON, (output, report)
    assert sorted(output[:4]) == sorted(b"RPRP")  # both CPUs booted, interleaved
    assert output[4:] == b"TTRPAD\n"  # 2 timers, AP restart through real/protected mode
    assert not report


def test_phys_mapping_offsets_and_slot(vm: kvm.Vm, tmp_path: Path) -> None:
    """A PhysMapping at a 4K-misaligned address reads/writes at the right bytes; an aligned
    one becomes a memory slot the guest runs from (a file stands in for /dev/mem)."""
    backing = tmp_path / "mem"
    backing.write_bytes(bytes(0x4000))
    with hostmem.PhysMapping(0x1800, 0x1000, path=str(backing)) as window:
        assert window.offset == 0x800
        window.write(0, b"abc")
        window.write_value(0x10, 4, 0x11223344)
        assert window.read_value(0x10, 2) == 0x3344
        assert window.read(0, 3) == b"abc"
        with pytest.raises(ValueError, match="outside window"):
            window.read(0xFFF, 2)
        with pytest.raises(kvm.KvmError, match="host address not page-aligned"):
            vm.add_memory(0, window.mmap, offset=window.offset, size=0x1000)
    data = backing.read_bytes()
    assert data[0x1800:0x1803] == b"abc"
    assert data[0x1810:0x1814] == bytes.fromhex("44332211")

    code = bytes([0xBA, 0xF8, 0x02, 0xA0, 0x00, 0x01, 0xEE, 0xF4])  # mov al, [0x100]; out
    ram = hostmem.PhysMapping(0x2000, 0x1000, path=str(backing))
    ram.write(0, code)
    ram.write(0x100, b"\x99")
    vm.add_memory(0, ram.mmap, offset=ram.offset, size=0x1000)
    vcpu = vm.create_vcpu(0)
    jailhouse_vcpu_setup(vcpu)
    jailhouse_vcpu_reset(vcpu)
    with watchdog(vcpu):
        expect_out(vcpu, UART, 1, 0x99)
    vm.close()
    ram.close()


def test_dev_port_byte_ports(tmp_path: Path) -> None:
    """DevPort reads and writes consecutive byte ports (a file stands in for /dev/port)."""
    ports = tmp_path / "port"
    ports.write_bytes(bytes(0x1000))
    with portio.DevPort(str(ports)) as dev:
        dev.write(0x608, b"\x01\x02\x03\x04")
        assert dev.read(0x609, 2) == b"\x02\x03"
    with pytest.raises(kvm.KvmError, match="open"):
        portio.DevPort(str(tmp_path / "missing"))


def test_user_space_msr_exits(vm: kvm.Vm) -> None:
    """With KVM_CAP_X86_USER_SPACE_MSR, unknown MSRs exit; read results reach EDX:EAX."""
    if not vm.kvm.check_extension(kvm.Cap.X86_USER_SPACE_MSR):
        pytest.skip("KVM_CAP_X86_USER_SPACE_MSR missing")
    vm.enable_cap(kvm.Cap.X86_USER_SPACE_MSR, structs.KVM_MSR_EXIT_REASON_UNKNOWN)
    code = bytes(
        [
            0x66, 0xB9, 0x34, 0x12, 0x00, 0x00,  # mov ecx, 0x1234 (no such MSR)
            0x0F, 0x32,                          # rdmsr
            0x66, 0x89, 0xD6,                    # mov esi, edx
            0xBA, 0xF8, 0x02,                    # mov dx, 0x2f8
            0x66, 0xEF,                          # out dx, eax
            0x66, 0x89, 0xF0,                    # mov eax, esi
            0x66, 0xEF,                          # out dx, eax
            0x66, 0xB8, 0x88, 0x77, 0x66, 0x55,  # mov eax, 0x55667788
            0x66, 0xBA, 0x99, 0x00, 0x00, 0x00,  # mov edx, 0x99
            0x0F, 0x30,                          # wrmsr
            0xF4,                                # hlt
        ]
    )  # fmt: skip
    vcpu = guest(vm, code)
    with watchdog(vcpu):
        exit_ = vcpu.run()
        assert isinstance(exit_, kvm.MsrExit), exit_
        assert (exit_.index, exit_.is_write, exit_.reason) == (0x1234, False, kvm.ExitReason.X86_RDMSR)
        exit_.set_value(0xAABBCCDD11223344)
        expect_out(vcpu, UART, 4, 0x11223344)
        expect_out(vcpu, UART, 4, 0xAABBCCDD)
        exit_ = vcpu.run()
    assert isinstance(exit_, kvm.MsrExit), exit_
    assert (exit_.index, exit_.is_write, exit_.data) == (0x1234, True, 0x9955667788)
    assert kvm.describe_exit(exit_) == "Unhandled MSR write: 1234"


def test_runner_ram_from_a_physical_window(tmp_path: Path) -> None:
    """--phys: cell RAM comes from the memory device at that address; the image lands there."""
    backing = tmp_path / "mem"
    backing.write_bytes(b"\xcc" * 0x8000)
    code = bytes([0xBA, 0xF8, 0x02, 0xB0, 0x0A, 0xEE, 0xF4])  # mov dx,0x2f8; mov al,'\n'; out
    _, output, report = _run_image(
        code, ram_size=0x2000, phys=0x4000, mem_device=str(backing), exit_on="\n", forward_pio=[]
    )
    assert output == b"\n", report
    data = backing.read_bytes()
    assert data[0x4000 : 0x4000 + len(code)] == code
    assert data[0x4000 + len(code) : 0x6000] == bytes(0x2000 - len(code))  # cleared RAM
    assert data[0x6000:0x6001] == b"\xcc"  # nothing beyond the window


def test_msi_injection_signal_and_irqfd(vm: kvm.Vm) -> None:
    """KVM_SIGNAL_MSI and an MSI route fed by an eventfd reach the guest's x2APIC."""
    code = bytes(
        [
            0x66, 0xB9, 0x0F, 0x08, 0x00, 0x00,  # mov ecx, 0x80f   (x2APIC SVR)
            0x66, 0xB8, 0xFF, 0x01, 0x00, 0x00,  # mov eax, 0x1ff   (APIC enabled)
            0x66, 0x31, 0xD2,                    # xor edx, edx
            0x0F, 0x30,                          # wrmsr
            0xBA, 0xF8, 0x02,                    # mov dx, 0x2f8
            0xEE,                                # out dx, al       (ready)
            0xFB,                                # sti
            0xF4,                                # 1: hlt
            0xEB, 0xFD,                          #    jmp 1b
        ]
    )  # fmt: skip
    handler = bytes(
        [
            0xB0, 0x49,                          # mov al, 'I'
            0xEE,                                # out dx, al
            0x66, 0xB9, 0x0B, 0x08, 0x00, 0x00,  # mov ecx, 0x80b   (x2APIC EOI)
            0x66, 0x31, 0xC0,                    # xor eax, eax
            0x66, 0x31, 0xD2,                    # xor edx, edx
            0x0F, 0x30,                          # wrmsr
            0xBA, 0xF8, 0x02,                    # mov dx, 0x2f8
            0xCF,                                # iret
        ]
    )  # fmt: skip
    vcpu = guest(vm, code)
    memory = vm.slot_at(0)
    assert memory is not None
    ram = (ctypes.c_char * memory.size).from_address(memory.userspace_addr)
    ram[0x200 : 0x200 + len(handler)] = handler  # type: ignore[call-overload]  # c_char arrays take bytes
    ram[0x40 * 4 : 0x40 * 4 + 4] = b"\x00\x02\x00\x00"  # type: ignore[call-overload]  # IVT 0x40 -> 0000:0200
    with watchdog(vcpu):
        expect_out(vcpu, UART, 1, 0xFF)
        assert vm.signal_msi(0xFEE00000, 0x40) == 1
        expect_out(vcpu, UART, 1, ord("I"))
        vm.set_gsi_routing([kvm.MsiRoute(gsi=5, address=0xFEE00000, data=0x40)])
        event = os.eventfd(0)
        try:
            vm.irqfd(event, 5)
            os.eventfd_write(event, 1)
            expect_out(vcpu, UART, 1, ord("I"))
            vm.irqfd(event, 5, deassign=True)
        finally:
            os.close(event)


def test_reset_after_an_unfinished_in(vm: kvm.Vm) -> None:
    """A cell restart after an IN exit starts over at the reset address: the pending IN
    completion is flushed first instead of landing on the fresh state."""
    code = bytes([0xBA, 0xF8, 0x02, 0xB0, 0x41, 0xEE, 0xEC, 0xF4])  # out 'A'; in al, dx; hlt
    vcpu = guest(vm, code)
    with watchdog(vcpu):
        expect_out(vcpu, UART, 1, 0x41)
        exit_ = vcpu.run()
        assert isinstance(exit_, kvm.IoExit) and not exit_.is_write
        exit_.set_value(0x99)
        jailhouse_vcpu_reset(vcpu)  # the parked CPU is started again
        regs = vcpu.get_regs()
        assert (regs.rip, regs.rax) == (0, 0)
        expect_out(vcpu, UART, 1, 0x41)


def test_xsave_is_offered_only_when_xcr0_survives_an_exit(kick_handler: None) -> None:
    """usable_xcr0 runs XSETBV, an exit, XGETBV in a scratch guest: on a KVM whose CPUID
    announces XSAVE the guest keeps XCR0 (all announced components usable); a table
    announcing XSAVE that this KVM cannot honour fails the test (XSAVE then hidden)."""
    with kvm.Kvm() as dev:
        supported = dev.supported_cpuid()
        announced = xsave.xcr0_supported(supported)
        assert xsave.usable_xcr0(dev, supported) == announced
        if not announced:
            claimed = [
                dataclasses.replace(e, ecx=e.ecx | CPUID_1_ECX_XSAVE) if e.function == 1 else e
                for e in supported if e.function != 0xD
            ] + [kvm.CpuidEntry(0xD, 0, eax=0x7, ebx=0x240, ecx=0x340)]
            assert xsave.xcr0_supported(claimed) == 0x7
            assert xsave.usable_xcr0(dev, claimed, timeout=5.0) == 0


# Real mode: WRMSR TMICT (0x838) with EDX=1, EAX=0x1000, then RDMSR TMICT, OUT EAX.
X2APIC_UPPER_HALF_GUEST = bytes(
    [
        0x66, 0xB9, 0x38, 0x08, 0x00, 0x00,  # mov ecx, 0x838
        0x66, 0xB8, 0x00, 0x10, 0x00, 0x00,  # mov eax, 0x1000
        0x66, 0xBA, 0x01, 0x00, 0x00, 0x00,  # mov edx, 1
        0x0F, 0x30,                     # wrmsr
        0x0F, 0x32,                     # rdmsr
        0xBA, 0xF8, 0x02,               # mov dx, 0x2f8
        0x66, 0xEF,                     # out dx, eax
        0xF4,                           # hlt
    ]
)  # fmt: skip


def test_x2apic_writes_with_an_upper_half_as_jailhouse_emulates_them(vm: kvm.Vm) -> None:
    """KVM refuses an x2APIC register write with bits 63:32 set (user-space MSR exit);
    with the host's APIC in xAPIC mode Jailhouse emulates x2APIC and takes EAX only: the
    executor writes the low half, counts an MSR exit, and the guest goes on (TMICT then
    reads 0x1000). With an x2APIC host the write stays FATAL."""
    vm.enable_cap(kvm.Cap.X86_USER_SPACE_MSR,
                  structs.KVM_MSR_EXIT_REASON_UNKNOWN | structs.KVM_MSR_EXIT_REASON_INVAL)
    vcpu = guest(vm, X2APIC_UPPER_HALF_GUEST)
    calls: list[tuple[object, ...]] = []

    class Handler:
        def count_exit(self, cpu: int, stat: CpuStat) -> None:
            calls.append((cpu, stat))

        def panic_park(self, cpu: int, fatal: str | None = None) -> None:
            calls.append((cpu, "panic", fatal))

    exits = ExitDispatcher(vendor="amd", ports=lambda: None, native_pio=False)
    exits.attach(lambda: Handler())  # type: ignore[arg-type,return-value]
    cpu = CellCpu(0, None, vcpu)  # type: ignore[arg-type]
    with watchdog(vcpu):
        exit_ = vcpu.run()
        assert isinstance(exit_, kvm.MsrExit), exit_
        assert (exit_.index, exit_.is_write, exit_.data) == (0x838, True, 0x1_0000_1000)
        exits.x2apic_emulated = False
        assert exits._x2apic_write_emulated(cpu, exit_) is False  # x2APIC host: refused
        exits.x2apic_emulated = True
        assert exits.handle_exit(cpu, exit_) is None
        assert calls == [(0, CpuStat.VMEXITS_MSR_OTHER)]
        out = vcpu.run()
        assert isinstance(out, kvm.IoExit) and out.value() == 0x1000, out
