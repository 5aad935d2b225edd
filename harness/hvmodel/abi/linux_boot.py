"""Linux's x86 boot protocol as ``jailhouse cell linux`` uses it: the kernel image's
setup header (``Documentation/x86/boot.rst``), the zero page and its E820 table
(``Documentation/x86/zero-page.rst``, ``asm/bootparam.h``), the ``setup_data`` entry
of type ``SETUP_JAILHOUSE`` with ``struct jailhouse_setup_data``
(``arch/x86/include/uapi/asm/bootparam.h``, read by ``arch/x86/kernel/jailhouse.c``),
and where Jailhouse's tool (``tools/jailhouse-cell-linux``) and its loader
(``inmates/tools/x86/linux-loader.c``) put things in the cell.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "BOOT_E820_ENTRY",
    "BOOT_FLAG",
    "BOOT_FLAG_MAGIC",
    "BOOT_HEADER_BASE",
    "BOOT_HEADER_END_BASE",
    "BOOT_HEADER_MAGIC",
    "BOOT_HEADER_SIGNATURE",
    "BOOT_PARAMS_SIZE",
    "BOOT_SECTOR_SIZE",
    "BOOT_SETUP_HEADER",
    "BOOT_VERSION",
    "E820_ENTRIES",
    "E820_MAX_ENTRIES_ZEROPAGE",
    "E820_RAM",
    "E820_RESERVED",
    "E820_TABLE",
    "HDR_CMD_LINE_PTR",
    "HDR_INIT_SIZE",
    "HDR_KERNEL_ALIGNMENT",
    "HDR_PAYLOAD_LENGTH",
    "HDR_PAYLOAD_OFFSET",
    "HDR_PREF_ADDRESS",
    "HDR_RAMDISK_IMAGE",
    "HDR_RAMDISK_SIZE",
    "HDR_SETUP_DATA",
    "HDR_SETUP_SECTS",
    "HDR_SYSSIZE",
    "HDR_TYPE_OF_LOADER",
    "JAILHOUSE_SETUP_DATA",
    "JAILHOUSE_SETUP_MAX_CPUS",
    "JAILHOUSE_SETUP_REQUIRED_VERSION",
    "JAILHOUSE_SETUP_VERSION",
    "KERNEL_ENTRY_64",
    "LINUX_LOADER_ADDRESS",
    "LINUX_PARAMS_ADDRESS",
    "LINUX_PARAMS_AREA_SIZE",
    "LOADER_TYPE_UNDEFINED",
    "PLATFORM_UARTS",
    "SETUP_DATA_HEADER",
    "SETUP_JAILHOUSE",
    "STANDARD_IOAPIC_ADDRESS",
]

# --- the kernel image's setup header (boot.rst, "The Real-Mode Kernel Header") ----------

#: a sector of the boot protocol: the real-mode part is ``(setup_sects + 1)`` of them
BOOT_SECTOR_SIZE: Final = 512
#: where ``struct setup_header`` sits in the image and in the zero page (its first field,
#: ``setup_sects``, is at 0x1f1; the zero page's copy starts one byte earlier, at 0x1f0)
BOOT_HEADER_BASE: Final = 0x1F0
#: offsets in the image and in the zero page (boot.rst's table); sizes in the comments
HDR_SETUP_SECTS: Final = 0x1F1  # u8: real-mode sectors after the boot sector (0 means 4)
HDR_SYSSIZE: Final = 0x1F4  # u32: protected-mode part in 16-byte paragraphs
BOOT_FLAG: Final = 0x1FE  # u16: 0xaa55
BOOT_HEADER_MAGIC: Final = 0x202  # u32: "HdrS"
BOOT_VERSION: Final = 0x206  # u16: protocol version (0x020f = 2.15)
HDR_TYPE_OF_LOADER: Final = 0x210  # u8
HDR_RAMDISK_IMAGE: Final = 0x218  # u32
HDR_RAMDISK_SIZE: Final = 0x21C  # u32
HDR_CMD_LINE_PTR: Final = 0x228  # u32
HDR_KERNEL_ALIGNMENT: Final = 0x230  # u32 (Jailhouse's tool stores the load address here)
HDR_PAYLOAD_OFFSET: Final = 0x248  # u32: compressed payload, from the protected-mode part
HDR_PAYLOAD_LENGTH: Final = 0x24C  # u32
HDR_SETUP_DATA: Final = 0x250  # u64: first struct setup_data
HDR_PREF_ADDRESS: Final = 0x258  # u64: preferred load address of the protected-mode part
HDR_INIT_SIZE: Final = 0x260  # u32: memory the kernel needs from its load address on
#: the header ends at ``0x202 + byte at 0x201`` (boot.rst: "the end of setup header")
BOOT_HEADER_END_BASE: Final = 0x202
BOOT_FLAG_MAGIC: Final = 0xAA55
BOOT_HEADER_SIGNATURE: Final = b"HdrS"
#: ``type_of_loader`` 0xff: "undefined" (what Jailhouse's tool sets)
LOADER_TYPE_UNDEFINED: Final = 0xFF
#: the fields Jailhouse's tool reads, from 0x1f0 (``X86SetupHeader._HEADER_FORMAT``):
#: setup_sects, syssize, jump, type_of_loader, ramdisk_image, ramdisk_size, cmd_line_ptr,
#: kernel_alignment, payload_offset, setup_data, pref_address
BOOT_SETUP_HEADER: Final = struct.Struct("<xB2xI8xH14xB7xII8xI4xI20xI4xQQ")
#: the 64-bit entry point, from the start of the protected-mode part (boot.rst, "64-bit
#: boot protocol")
KERNEL_ENTRY_64: Final = 0x200

# --- the zero page (zero-page.rst, struct boot_params) -----------------------------------

BOOT_PARAMS_SIZE: Final = 0x1000
#: u8 ``e820_entries`` and the ``e820_table`` of struct boot_e820_entry (packed)
E820_ENTRIES: Final = 0x1E8
E820_TABLE: Final = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE: Final = 128
#: struct boot_e820_entry: addr, size, type (20 bytes, packed)
BOOT_E820_ENTRY: Final = struct.Struct("<QQI")
E820_RAM: Final = 1
E820_RESERVED: Final = 2

# --- setup_data and SETUP_JAILHOUSE ------------------------------------------------------

#: struct setup_data's header: next (u64), type (u32), len (u32)
SETUP_DATA_HEADER: Final = struct.Struct("<QII")
SETUP_JAILHOUSE: Final = 6
#: what Jailhouse's tool writes and what Linux since 5.10 reads (hdr.version 2 adds flags)
JAILHOUSE_SETUP_VERSION: Final = 2
#: hdr.compatible_version: the oldest version a reader must understand (Linux requires 1)
JAILHOUSE_SETUP_REQUIRED_VERSION: Final = 1
JAILHOUSE_SETUP_MAX_CPUS: Final = 255
#: struct jailhouse_setup_data (packed, 284 bytes): hdr.version, hdr.compatible_version;
#: v1: pm_timer_address, num_cpus, pci_mmconfig_base, tsc_khz, apic_khz, standard_ioapic,
#: cpu_ids[255]; v2: flags (bit n: platform UART n belongs to the cell)
JAILHOUSE_SETUP_DATA: Final = struct.Struct(f"<HHHHQIIB{JAILHOUSE_SETUP_MAX_CPUS}sI")
#: the IOAPIC Linux registers when ``standard_ioapic`` is set (``jailhouse.c``)
STANDARD_IOAPIC_ADDRESS: Final = 0xFEC00000
#: the PC UARTs in the order of the ``flags`` bits (``jailhouse_serial_fixup``); the tool
#: sets bit n when the cell's PIO whitelist has exactly (base, 8)
PLATFORM_UARTS: Final = (0x3F8, 0x2F8, 0x3E8, 0x2E8)

# --- where ``jailhouse cell linux`` puts things in an x86 cell ----------------------------

#: the loader image (``X86.loader_address``; the CPUs start there: cpu_reset_address 0)
LINUX_LOADER_ADDRESS: Final = 0x0
#: the boot parameters (``X86.params_address``): zero page, then setup_data at +0x1000,
#: then the command line
LINUX_PARAMS_ADDRESS: Final = 0x1000
#: the loader's buffer for them (``PAGE_SIZE * 3`` in its .cmdline section)
LINUX_PARAMS_AREA_SIZE: Final = 0x3000
