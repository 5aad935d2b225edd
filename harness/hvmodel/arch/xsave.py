"""The extended CPU state (XSAVE, XCR0) a cell CPU can really use on this KVM, and a
CPUID view that agrees with it. No Jailhouse counterpart: Jailhouse passes the
hardware's CPUID through (``vcpu_handle_cpuid``) and the hardware keeps XCR0; a nested
KVM may not (QEMU 7.2's TCG ignores the SVM XSETBV intercept, so KVM never learns the
guest's XCR0 and loads its stale value at the next entry: AVX then faults).

* :func:`usable_xcr0` runs a few instructions in a scratch VM: XSETBV, an exit to user
  space, XGETBV. XCR0 survives the exit, or XSAVE is not usable here.
* :func:`limit_xsave` makes CPUID leaves 1, 7, 0xD (and AMD's 0x80000001) agree with the
  usable XCR0 components: no XSAVE, OSXSAVE or AVX family without the state they need,
  0xD announcing only usable components.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Final

from ..abi import CPUID_1_ECX_OSXSAVE, CPUID_1_ECX_XSAVE, XCR0_FP
from . import hostmem
from .kvm import CpuidEntry, IoExit, Kvm, KvmError, Vm
from .vcpu import jailhouse_cpuid, jailhouse_reset_regs, jailhouse_reset_sregs

__all__ = ["XCR0_SSE", "XCR0_YMM", "limit_xsave", "usable_xcr0", "xcr0_supported"]

LOG = logging.getLogger(__name__)

#: XCR0 state components (SDM vol. 1, 13.1)
XCR0_SSE: Final = 1 << 1
XCR0_YMM: Final = 1 << 2
XCR0_MPX: Final = (1 << 3) | (1 << 4)
XCR0_AVX512: Final = (1 << 5) | (1 << 6) | (1 << 7)
XCR0_PKRU: Final = 1 << 9
XCR0_AMX: Final = (1 << 17) | (1 << 18)

#: CPUID feature bits by the XCR0 components they need: (leaf, subleaf, register, bit)
_NEEDS: Final[dict[int, tuple[tuple[int, int, str, int], ...]]] = {
    XCR0_YMM: (
        (1, 0, "ecx", 12), (1, 0, "ecx", 28), (1, 0, "ecx", 29),  # FMA, AVX, F16C
        (7, 0, "ebx", 5), (7, 0, "ecx", 9), (7, 0, "ecx", 10),  # AVX2, VAES, VPCLMULQDQ
        (7, 1, "eax", 4),  # AVX-VNNI
        (0x80000001, 0, "ecx", 11), (0x80000001, 0, "ecx", 16),  # XOP, FMA4
    ),
    XCR0_YMM | XCR0_AVX512: (
        *((7, 0, "ebx", bit) for bit in (16, 17, 21, 26, 27, 28, 30, 31)),  # AVX512F ... VL
        *((7, 0, "ecx", bit) for bit in (1, 6, 11, 12, 14)),  # VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ
        *((7, 0, "edx", bit) for bit in (2, 3, 8, 23)),  # 4VNNIW, 4FMAPS, VP2INTERSECT, FP16
        (7, 1, "eax", 5),  # AVX512_BF16
    ),
    XCR0_MPX: ((7, 0, "ebx", 14),),
    XCR0_PKRU: ((7, 0, "ecx", 3),),
    XCR0_AMX: ((7, 0, "edx", 22), (7, 0, "edx", 24), (7, 0, "edx", 25)),  # AMX-BF16, TILE, INT8
}  # fmt: skip
#: the legacy area and the XSAVE header: the smallest XSAVE area
_XSAVE_BASE_SIZE: Final = 512 + 64
#: seconds the scratch guest of :func:`usable_xcr0` may take (nested, under TCG)
PROBE_TIMEOUT: Final = 10.0
#: its port (any the scratch VM leaves to user space)
_PROBE_PORT: Final = 0x2F8


def _leaf(table: Sequence[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    return next((e for e in table if e.function == function and e.index == index), None)


def xcr0_supported(table: Sequence[CpuidEntry]) -> int:
    """The XCR0 components CPUID announces (leaf 0xD.0 EDX:EAX), 0 without XSAVE."""
    basic = _leaf(table, 1)
    state = _leaf(table, 0xD)
    if basic is None or not basic.ecx & CPUID_1_ECX_XSAVE or state is None:
        return 0
    return state.edx << 32 | state.eax


def limit_xsave(table: Sequence[CpuidEntry], usable: int) -> list[CpuidEntry]:
    """``table`` with XSAVE features limited to the XCR0 components in ``usable`` (0: no
    XSAVE at all): leaf 1 loses XSAVE and OSXSAVE without XSAVE; every feature loses
    its bit when a component it needs is not usable (AVX and its family: YMM; AVX-512:
    opmask and ZMM; MPX; PKU; AMX); leaf 0xD keeps only usable components (all zero
    without XSAVE), its maximum area size (ECX) recomputed."""
    if not usable & XCR0_FP:
        usable = 0
    usable &= xcr0_supported(table)
    clear: dict[tuple[int, int, str], int] = {}
    for needed, features in _NEEDS.items():
        if usable & needed != needed:
            for function, index, register, bit in features:
                key = (function, index, register)
                clear[key] = clear.get(key, 0) | 1 << bit
    if not usable:
        clear[(1, 0, "ecx")] = clear.get((1, 0, "ecx"), 0) | CPUID_1_ECX_XSAVE | CPUID_1_ECX_OSXSAVE
    limited: list[CpuidEntry] = []
    for entry in table:
        if entry.function == 0xD:
            state = _limit_state_leaf(entry, table, usable)
            if state is None:
                continue
            entry = state
        else:
            for register in ("eax", "ebx", "ecx", "edx"):
                mask = clear.get((entry.function, entry.index, register))
                if mask:
                    value = getattr(entry, register) & ~mask
                    entry = dataclasses.replace(entry, **{register: value})
        limited.append(entry)
    return limited


def _limit_state_leaf(entry: CpuidEntry, table: Sequence[CpuidEntry], usable: int) -> CpuidEntry | None:
    """Leaf 0xD, subleaf ``entry.index``, for the ``usable`` XCR0 components."""
    if not usable:
        return dataclasses.replace(entry, eax=0, ebx=0, ecx=0, edx=0)
    if entry.index == 0:
        size = _XSAVE_BASE_SIZE
        for component in table:
            if component.function == 0xD and component.index >= 2 and usable >> component.index & 1:
                size = max(size, component.ebx + component.eax)  # offset + size
        return dataclasses.replace(entry, eax=usable & 0xFFFFFFFF, edx=usable >> 32, ecx=size)
    if entry.index >= 2 and not usable >> entry.index & 1 and not entry.ecx & 1:
        return None  # a user component (ECX bit 0 clear: not XSS) that is not usable
    return entry


# Real mode at 0: CR4.OSXSAVE on, XSETBV(XCR0 = EAX), OUT EAX (an exit to user space),
# XGETBV, OUT EAX (XCR0 as the CPU has it after the exit), HLT.
def _probe_code(xcr0: int) -> bytes:
    return b"".join((
        bytes.fromhex("0f20e0 660d00000400 0f22e0"),  # mov eax, cr4; or eax, OSXSAVE; mov cr4, eax
        b"\x66\xb8" + xcr0.to_bytes(4, "little"),  # mov eax, xcr0
        bytes.fromhex("6631d2 6631c9 0f01d1"),  # xor edx, edx; xor ecx, ecx; xsetbv
        b"\xba" + _PROBE_PORT.to_bytes(2, "little") + b"\x66\xef",  # mov dx, port; out dx, eax
        bytes.fromhex("6631c9 0f01d0"),  # xor ecx, ecx; xgetbv
        b"\xba" + _PROBE_PORT.to_bytes(2, "little") + b"\x66\xef",  # mov dx, port; out dx, eax
        b"\xf4",  # hlt
    ))  # fmt: skip


def usable_xcr0(kvm: Kvm, supported: Sequence[CpuidEntry], timeout: float = PROBE_TIMEOUT) -> int:
    """The XCR0 components a guest can use here: those KVM announces (``supported``) if a
    scratch guest's XCR0 survives an exit to user space, else 0 (logged, with why).

    :raise KvmError: when the scratch VM cannot be made (not for a failed probe)
    """
    announced = xcr0_supported(supported)
    if not announced:
        return 0
    wanted = announced & (XCR0_FP | XCR0_SSE | XCR0_YMM)
    try:
        written, after = _run_probe(kvm, supported, wanted, timeout)
    except KvmError as exc:
        LOG.warning("XSAVE hidden from cells: the XCR0 test guest failed: %s", exc)
        return 0
    if (written, after) != (wanted, wanted):
        LOG.warning("XSAVE hidden from cells: XCR0 %#x written, %#x after an exit (this KVM "
                    "does not see the guest's XSETBV, e.g. nested under QEMU's TCG)", wanted, after)
        return 0
    return announced


def _run_probe(kvm: Kvm, supported: Sequence[CpuidEntry], xcr0: int, timeout: float) -> tuple[int, int]:
    """(XCR0 written, XCR0 read back after an exit) in a scratch VM.

    :raise KvmError: when the guest does not get there (a fault, a timeout)
    """
    code = _probe_code(xcr0)
    memory = hostmem.anonymous_memory(0x10000)
    memory[: len(code)] = code
    vm = Vm(kvm)
    try:
        vm.add_memory(0, memory)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(jailhouse_cpuid(supported, 0))
        sregs = vcpu.get_sregs()
        jailhouse_reset_sregs(sregs, 0)
        sregs.apic_base = 0  # no in-kernel APIC in the scratch VM
        vcpu.set_sregs(sregs)
        vcpu.set_regs(jailhouse_reset_regs(0))
        values: list[int] = []
        with _watchdog(vcpu.kick, timeout):
            while len(values) < 2:
                exit_ = vcpu.run()
                if not isinstance(exit_, IoExit) or exit_.port != _PROBE_PORT or not exit_.is_write:
                    raise KvmError("XCR0 test", 0, f"unexpected exit {exit_!r}")
                values.append(exit_.value())
        return values[0], values[1]
    finally:
        vm.close()
        memory.close()


@contextlib.contextmanager
def _watchdog(kick: Callable[[], None], seconds: float) -> Iterator[None]:
    timer = threading.Timer(seconds, kick)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
