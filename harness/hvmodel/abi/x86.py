"""x86 facts of Jailhouse's ``hypervisor/arch/x86/include/asm`` headers that more than
one part of jhlab relies on: ``paging.h`` (the page size), ``processor.h`` (the CPUID
feature bits the hypervisor hides or shows, XCR0, the x2APIC MSRs), ``apic.h`` (the
xAPIC page), ``ioapic.h`` (the IOAPIC registers and redirection entries), the MSI
message format of ``apic.h``/``iommu.h`` and ``pci.h`` (the port-I/O configuration
mechanism); plus the register window of the test device (``test-device.c``).

The page size here is Jailhouse's: the unit of its mappings, of the comm region and of
the checks on memory regions. The page size of the Linux the executor runs on (the
granularity of ``mmap``) is a different fact, :data:`mmap.PAGESIZE`; on x86 both are
4 KiB, but code that maps host memory asks the host.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CPUID_1_ECX_HYPERVISOR",
    "CPUID_1_ECX_OSXSAVE",
    "CPUID_1_ECX_TSC_DEADLINE",
    "CPUID_1_ECX_VMX",
    "CPUID_1_ECX_X2APIC",
    "CPUID_1_ECX_XSAVE",
    "CPUID_80000001_ECX_SVM",
    "IOAPIC_MAX_PINS",
    "IOAPIC_REDIR_DELIVERY_MASK",
    "IOAPIC_REDIR_DELIVERY_SHIFT",
    "IOAPIC_REDIR_DEST_LOGICAL",
    "IOAPIC_REDIR_DEST_SHIFT",
    "IOAPIC_REDIR_LEVEL",
    "IOAPIC_REDIR_MASK",
    "IOAPIC_REDIR_TBL_START",
    "IOAPIC_REDIR_VECTOR_MASK",
    "IOAPIC_REG_DATA",
    "IOAPIC_REG_EOI",
    "IOAPIC_REG_INDEX",
    "IOAPIC_VER",
    "MSI_ADDRESS_DEST_LOGICAL",
    "MSI_ADDRESS_DEST_SHIFT",
    "MSI_ADDRESS_REDIR_HINT",
    "MSI_ADDRESS_WINDOW",
    "MSI_DATA_DELIVERY_SHIFT",
    "MSI_DATA_LEVEL_ASSERT",
    "MSI_DATA_LEVEL_TRIGGER",
    "MSR_X2APIC_BASE",
    "MSR_X2APIC_END",
    "MSR_X2APIC_ICR",
    "PAGE_SIZE",
    "PCI_REG_ADDR_PORT",
    "PCI_REG_DATA_PORT",
    "TEST_DEVICE_REGISTER",
    "XAPIC_BASE",
    "XCR0_FP",
]

#: ``PAGE_SIZE`` of ``asm/paging.h``: Jailhouse maps, checks and allocates in 4 KiB pages.
PAGE_SIZE: Final = 0x1000

# --- CPUID (asm/processor.h) -------------------------------------------------------------

#: leaf 1, ECX: VMX (hidden from non-root cells)
CPUID_1_ECX_VMX: Final = 1 << 5
#: leaf 1, ECX: x2APIC
CPUID_1_ECX_X2APIC: Final = 1 << 21
#: leaf 1, ECX: XSAVE/XRSTOR, XSETBV/XGETBV and XCR0
CPUID_1_ECX_XSAVE: Final = 1 << 26
#: leaf 1, ECX: TSC deadline timer
CPUID_1_ECX_TSC_DEADLINE: Final = 1 << 24
#: leaf 1, ECX: OSXSAVE (mirrors the guest's CR4.OSXSAVE)
CPUID_1_ECX_OSXSAVE: Final = 1 << 27
#: leaf 1, ECX: "running under a hypervisor" (shown to non-root cells)
CPUID_1_ECX_HYPERVISOR: Final = 1 << 31
#: leaf 0x80000001, ECX: SVM (hidden from non-root cells)
CPUID_80000001_ECX_SVM: Final = 1 << 2
#: XCR0 bit 0, x87 state: must be set in every XCR0 (``X86_XCR0_FP``)
XCR0_FP: Final = 1 << 0

# --- local APIC (asm/apic.h) -------------------------------------------------------------

#: the local APIC's MMIO page in xAPIC mode; MSIs are writes into this 0xfeexxxxx window
XAPIC_BASE: Final = 0xFEE00000
#: an MSI address lies in the 1 MiB window of the xAPIC page: ``address >> 20`` is this
MSI_ADDRESS_WINDOW: Final = XAPIC_BASE >> 20
#: the x2APIC registers' MSRs (``MSR_X2APIC_BASE`` .. ``MSR_X2APIC_END``) and the ICR
MSR_X2APIC_BASE: Final = 0x800
MSR_X2APIC_ICR: Final = 0x830
MSR_X2APIC_END: Final = 0x83F
#: MSI address (``union x86_msi_vector``): destination APIC ID at bits 12..19, logical
#: destination mode, redirection hint
MSI_ADDRESS_DEST_SHIFT: Final = 12
MSI_ADDRESS_DEST_LOGICAL: Final = 1 << 2
MSI_ADDRESS_REDIR_HINT: Final = 1 << 3
#: MSI data: vector at bits 0..7, delivery mode at 8..10, level assert, level trigger
MSI_DATA_DELIVERY_SHIFT: Final = 8
MSI_DATA_LEVEL_ASSERT: Final = 1 << 14
MSI_DATA_LEVEL_TRIGGER: Final = 1 << 15

# --- IOAPIC (asm/ioapic.h) ---------------------------------------------------------------

#: ``IOAPIC_MAX_PINS``: redirection entries the hypervisor supports per IOAPIC
IOAPIC_MAX_PINS: Final = 120
#: MMIO register offsets: index (register select), data, EOI
IOAPIC_REG_INDEX: Final = 0x00
IOAPIC_REG_DATA: Final = 0x10
IOAPIC_REG_EOI: Final = 0x40
#: indirect register: version (bits 16..23: the highest redirection entry)
IOAPIC_VER: Final = 0x01
#: first indirect register of the redirection table (two per pin: low, high)
IOAPIC_REDIR_TBL_START: Final = 0x10
#: redirection entry (``union ioapic_redir_entry``, native format): vector, delivery mode
#: (bits 8..10, encoded as in an MSI), logical destination, level trigger, mask, destination
#: APIC ID (bits 56..63); polarity (bit 13) and the read-only bits 12 and 14 between
IOAPIC_REDIR_VECTOR_MASK: Final = 0xFF
IOAPIC_REDIR_DELIVERY_SHIFT: Final = 8
IOAPIC_REDIR_DELIVERY_MASK: Final = 0x7
IOAPIC_REDIR_DEST_LOGICAL: Final = 1 << 11
IOAPIC_REDIR_LEVEL: Final = 1 << 15
#: redirection entry bit 16: the pin is masked
IOAPIC_REDIR_MASK: Final = 1 << 16
IOAPIC_REDIR_DEST_SHIFT: Final = 56

# --- test device (test-device.c, CONFIG_TEST_DEVICE) ----------------------------------

#: the page after a cell's comm region is the test device; its registers are the bytes
#: from this offset to the end of the page (they alias the end of the comm page)
TEST_DEVICE_REGISTER: Final = 0xFF8

# --- PCI configuration mechanism #1 (asm/pci.h) ------------------------------------------

#: the address register (0xCF8) and the data window (0xCFC..0xCFF)
PCI_REG_ADDR_PORT: Final = 0xCF8
PCI_REG_DATA_PORT: Final = 0xCFC
