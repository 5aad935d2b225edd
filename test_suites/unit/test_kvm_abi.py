"""The KVM binding's ABI: struct layouts, ioctl numbers and constants of ``kvm/structs.py``.

The reference values come from the kernel's own headers: a C program including
``<linux/kvm.h>`` prints ``sizeof``/``offsetof`` and the macros, compiled at test time
(gcc and ``linux-libc-dev`` needed; only that test skips without them). A few ioctl
numbers are also checked against literal values from the KVM documentation.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest
from cheaders import header_values

from harness.hvmodel.arch import uapi
from harness.hvmodel.arch.kvm import structs

# (ctypes class, C type, renames of Python field names to C member paths)
STRUCTS: list[tuple[type[ctypes.Structure], str, dict[str, str]]] = [
    (structs.KvmUserspaceMemoryRegion, "struct kvm_userspace_memory_region", {}),
    (structs.KvmRegs, "struct kvm_regs", {}),
    (structs.KvmSegment, "struct kvm_segment", {}),
    (structs.KvmDtable, "struct kvm_dtable", {}),
    (structs.KvmSregs, "struct kvm_sregs", {}),
    (structs.KvmMsrEntry, "struct kvm_msr_entry", {}),
    (structs.KvmMsrs, "struct kvm_msrs", {}),
    (structs.KvmMsrList, "struct kvm_msr_list", {}),
    (structs.KvmCpuidEntry2, "struct kvm_cpuid_entry2", {}),
    (structs.KvmCpuid2, "struct kvm_cpuid2", {}),
    (structs.KvmLapicState, "struct kvm_lapic_state", {}),
    (structs.KvmMpState, "struct kvm_mp_state", {}),
    (structs.KvmDebugregs, "struct kvm_debugregs", {}),
    (structs.KvmVcpuEvents, "struct kvm_vcpu_events", {"triple_fault_pending": "triple_fault.pending"}),
    (structs.KvmEnableCap, "struct kvm_enable_cap", {}),
    (structs.KvmIrqRoutingEntry, "struct kvm_irq_routing_entry", {}),
    (structs.KvmIrqRouting, "struct kvm_irq_routing", {}),
    (structs.KvmIrqfd, "struct kvm_irqfd", {}),
    (structs.KvmMsi, "struct kvm_msi", {}),
    (structs.KvmIrqLevel, "struct kvm_irq_level", {}),
    (structs.KvmXenHvmConfig, "struct kvm_xen_hvm_config", {}),
    # the exit-info union of kvm_run is anonymous in C: its members are kvm_run's own
    (structs.KvmRun, "struct kvm_run", {"u": ""}),
]

# sizes stated in the kernel documentation / measured with gcc for x86-64
KNOWN_SIZES = {
    structs.KvmRun: 2352,
    structs.KvmRegs: 144,
    structs.KvmSregs: 312,
    structs.KvmSegment: 24,
    structs.KvmDtable: 16,
    structs.KvmCpuidEntry2: 40,
    structs.KvmUserspaceMemoryRegion: 32,
    structs.KvmLapicState: 1024,
    structs.KvmVcpuEvents: 64,
    structs.KvmDebugregs: 128,
    structs.KvmIrqRoutingEntry: 48,
    structs.KvmIrqfd: 32,
    structs.KvmMsi: 32,
    structs.KvmEnableCap: 104,
    structs.KvmXenHvmConfig: 56,
}

# request numbers as listed in Documentation/virt/kvm and every VMM's sources
KNOWN_IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_CPUID2": 0x4008AE90,
}


def _fields(
    struct_type: type[ctypes.Structure | ctypes.Union], c_prefix: str, renames: dict[str, str]
) -> Iterator[tuple[str, str, int, int]]:
    """(python path, C member path, offset, size) of every field, nested ones included."""
    for name, field_type, *_ in struct_type._fields_:
        descriptor = getattr(struct_type, name)
        c_name = renames.get(name, name)
        c_path = ".".join(part for part in (c_prefix, c_name) if part)
        yield name, c_path, descriptor.offset, descriptor.size
        if isinstance(field_type, type) and issubclass(field_type, (ctypes.Structure, ctypes.Union)):
            for sub, sub_c, offset, size in _fields(field_type, c_path, {}):
                yield f"{name}.{sub}", sub_c, descriptor.offset + offset, size


def _expected_layout() -> dict[str, int]:
    expected: dict[str, int] = {}
    for struct_type, c_type, renames in STRUCTS:
        expected[f"sizeof({c_type})"] = ctypes.sizeof(struct_type)
        for _, c_path, offset, size in _fields(struct_type, "", renames):
            if not c_path:
                continue
            expected[f"offsetof({c_type}, {c_path})"] = offset
            expected[f"sizeof((({c_type} *)0)->{c_path})"] = size
    return expected


def _expected_constants() -> dict[str, int]:
    constants: dict[str, int] = dict((name, value) for value, name in structs.IOCTL_NAMES.items())
    constants.update({f"KVM_CAP_{cap.name}": int(cap) for cap in structs.Cap})
    constants.update({f"KVM_EXIT_{reason.name}": int(reason) for reason in structs.ExitReason})
    constants.update({f"KVM_MP_STATE_{state.name}": int(state) for state in structs.MpState})
    constants.update({f"KVM_SYSTEM_EVENT_{event.name}": int(event) for event in structs.SystemEvent})
    for name in (
        "KVM_API_VERSION",
        "KVM_MEM_LOG_DIRTY_PAGES",
        "KVM_MEM_READONLY",
        "KVM_IRQ_ROUTING_IRQCHIP",
        "KVM_IRQ_ROUTING_MSI",
        "KVM_IRQFD_FLAG_DEASSIGN",
        "KVM_IRQFD_FLAG_RESAMPLE",
        "KVM_MSI_VALID_DEVID",
        "KVM_VCPUEVENT_VALID_NMI_PENDING",
        "KVM_VCPUEVENT_VALID_SIPI_VECTOR",
        "KVM_EXIT_IO_IN",
        "KVM_EXIT_IO_OUT",
        "KVM_NR_INTERRUPTS",
        "KVM_APIC_REG_SIZE",
        "KVM_CPUID_FLAG_SIGNIFCANT_INDEX",
        "SYNC_REGS_SIZE_BYTES",
        "KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL",
        "KVM_EXIT_XEN_HCALL",
    ):
        constants[name] = getattr(structs, name)
    return constants


def _c_program(layout: dict[str, int], constants: dict[str, int]) -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    for expr in layout:
        lines.append(f'    printf("%s=%llu\\n", "{expr}", (unsigned long long)({expr}));')
    for name in constants:
        lines.append(f"#ifdef {name}")
        lines.append(f'    printf("%s=%llu\\n", "{name}", (unsigned long long)({name}));')
        lines.append("#endif")
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """What the kernel headers say, from a C program compiled now."""
    return header_values("linux/kvm.h", _c_program(_expected_layout(), _expected_constants()),
                         tmp_path_factory.mktemp("kvm_abi"))


def test_struct_layouts_match_kernel_headers(kernel_values: dict[str, int]) -> None:
    """Every struct size, field offset and field size equals what gcc computes."""
    expected = _expected_layout()
    mismatches = {
        expr: (value, kernel_values.get(expr))
        for expr, value in expected.items()
        if kernel_values.get(expr) != value
    }
    assert not mismatches, f"ctypes vs <linux/kvm.h> (ours, kernel's): {mismatches}"
    assert len(expected) > 300  # the whole tree was walked, unions included


def test_constants_match_kernel_headers(kernel_values: dict[str, int]) -> None:
    """ioctl numbers, capabilities, exit reasons and flags equal the header's macros."""
    expected = _expected_constants()
    compared = {name for name in expected if name in kernel_values}
    mismatches = {
        name: (expected[name], kernel_values[name])
        for name in compared
        if expected[name] != kernel_values[name]
    }
    assert not mismatches, f"ours vs <linux/kvm.h>: {mismatches}"
    # every ioctl must exist in the header; only capabilities newer than it may be absent
    missing = {name for name in expected if name not in kernel_values}
    assert all(name.startswith("KVM_CAP_") for name in missing), missing
    assert {name for name in structs.IOCTL_NAMES.values()} <= compared


@pytest.mark.parametrize(("struct_type", "size"), list(KNOWN_SIZES.items()))
def test_struct_sizes_known_values(struct_type: type[ctypes.Structure], size: int) -> None:
    """Sizes the kernel ABI fixes, independent of any compiler on this machine."""
    assert ctypes.sizeof(struct_type) == size


@pytest.mark.parametrize(("name", "number"), list(KNOWN_IOCTLS.items()))
def test_ioctl_numbers_known_values(name: str, number: int) -> None:
    """Request numbers as documented, independent of the headers on this machine."""
    assert getattr(structs, name) == number
    assert structs.IOCTL_NAMES[number] == name


def test_ioc_encoding_fields() -> None:
    """_IOC puts direction in bits 31:30, size in 29:16, type in 15:8, number in 7:0."""
    number = uapi.ioc(uapi.IOC_READ | uapi.IOC_WRITE, 0xAE, 0x05, 8)
    assert number >> 30 == 3
    assert (number >> 16) & 0x3FFF == 8
    assert (number >> 8) & 0xFF == 0xAE
    assert number & 0xFF == 0x05
    with pytest.raises(ValueError, match="does not fit"):
        uapi.ioc(uapi.IOC_WRITE, 0xAE, 1, 1 << 14)


def test_run_page_offsets_used_by_the_fast_path() -> None:
    """The struct formats run() unpacks agree with the ctypes layout of kvm_run."""
    assert structs.RUN_EXIT_REASON == 8
    assert structs.RUN_EXIT_INFO == 32
    assert structs.RUN_IO.size == ctypes.sizeof(structs.KvmRunIo)
    assert structs.RUN_MMIO.size == structs.KvmRunMmio.is_write.offset + 1
    assert structs.RUN_MSR.size == ctypes.sizeof(structs.KvmRunMsr)
    assert structs.KvmRunMmio.data.offset + 32 == structs.RUN_MMIO_DATA
    assert structs.RUN_IMMEDIATE_EXIT == 1
    assert structs.RUN_XEN_HCALL.size == ctypes.sizeof(structs.KvmRunXen)
    assert structs.RUN_XEN_HCALL_RESULT == structs.RUN_EXIT_INFO + 24
