"""The boot parameters of ``jailhouse cell linux`` (:mod:`harness.hvmodel.linux_params`),
checked byte by byte against Linux's boot protocol (``Documentation/x86/boot.rst``,
``zero-page.rst``, ``asm/bootparam.h``) and what Jailhouse's ``jailhouse-cell-linux``
writes there; every offset and value below is written out from those documents, not
taken from the code under test.

The kernel images are synthetic: a boot sector and setup header with chosen fields, a
payload in the compression under test.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import struct
from pathlib import Path

import pytest

import harness
from harness.hvmodel.config import SetCell, load_source, read_cell
from harness.hvmodel.linux_params import (
    KernelImage,
    KernelImageError,
    LinuxSetupError,
    compression_method,
    decompression_factor,
    jailhouse_guest,
    linux_boot,
)

CONFIGS = Path(harness.__file__).parent / "configs"
SETUP_SECTS = 0x1F
PREF_ADDRESS = 0x1000000
INIT_SIZE = 0x1081000
MARKER = b"Jailhouse: Unsupported setup data structure"


def kernel_image(payload: bytes = b"\x1f\x8b\x08\0" + bytes(60), *, setup_sects: int = SETUP_SECTS,
                 header_end: int = 0x26C, version: int = 0x020F) -> bytes:
    """A bzImage: (setup_sects + 1) sectors of real-mode part with the setup header
    (boot.rst's table), then the protected-mode part whose payload starts at its offset
    0x10."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, (len(payload) + 0x10 + 15) // 16)  # syssize
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)  # boot_flag
    setup[0x200:0x202] = bytes([0xEB, header_end - 0x202])  # jmp: its offset ends the header
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<I", setup, 0x230, 0x200000)  # kernel_alignment as built
    setup[0x234] = 0  # relocatable_kernel
    struct.pack_into("<I", setup, 0x238, 2047)  # cmdline_size
    struct.pack_into("<I", setup, 0x248, 0x10)  # payload_offset
    struct.pack_into("<I", setup, 0x24C, len(payload))  # payload_length
    struct.pack_into("<Q", setup, 0x258, PREF_ADDRESS)  # pref_address
    struct.pack_into("<I", setup, 0x260, INIT_SIZE)  # init_size
    setup[0x264:header_end] = b"\xa5" * (header_end - 0x264)  # the rest of the header
    return bytes(setup) + bytes(0x10) + payload


def cell(name: str) -> SetCell:
    """A shipped config as Jailhouse's tool reads it."""
    return read_cell(load_source(CONFIGS / f"{name}.toml").to_bytes())


def test_load_addresses_follow_the_setup_header_and_the_compression() -> None:
    """The whole file goes where its protected-mode part lands at pref_address; the
    initrd after a gap of factor x file size (gzip: 7), page aligned; -k overrides."""
    data = kernel_image()
    kernel = KernelImage.parse(data)
    boot = linux_boot(kernel, cell("linux-x86-demo"), initrd_size=12345)
    assert boot.kernel_address == PREF_ADDRESS - (SETUP_SECTS + 1) * 512
    gap = boot.kernel_address + 7 * len(data)
    assert boot.initrd_address == (gap + 0xFFF) & ~0xFFF
    boot10 = linux_boot(kernel, cell("linux-x86-demo"), initrd_size=12345, decomp_factor=10)
    assert boot10.initrd_address == (boot.kernel_address + 10 * len(data) + 0xFFF) & ~0xFFF
    assert (boot.loader_address, boot.params_address) == (0, 0x1000)


def test_zero_page_of_linux_x86_demo() -> None:
    """The zero page: the image's setup header from 0x1f0 to its declared end, with
    type_of_loader 0xff (0x210), ramdisk_image/size (0x218/0x21c), cmd_line_ptr (0x228)
    after the setup_data, kernel_alignment = pref_address (0x230, the loader reads the
    load address there), setup_data at 0x2000 (0x250); e820_entries (0x1e8) and the table
    at 0x2d0 (addr, size, type: 20 bytes each): the config's RAM regions as RAM (1), its
    comm region as reserved (2), in config order; everything else zero."""
    data = kernel_image()
    boot = linux_boot(KernelImage.parse(data), cell("linux-x86-demo"), initrd_size=0x1E3C4C,
                      cmdline="console=ttyS1")
    zero = boot.params[:0x1000]
    assert len(zero) == 0x1000
    assert zero[0x210] == 0xFF
    assert struct.unpack_from("<II", zero, 0x218) == (boot.initrd_address, 0x1E3C4C)
    assert struct.unpack_from("<I", zero, 0x228)[0] == 0x2000 + 16 + 284
    assert struct.unpack_from("<I", zero, 0x230)[0] == PREF_ADDRESS
    assert struct.unpack_from("<Q", zero, 0x250)[0] == 0x2000
    assert struct.unpack_from("<Q", zero, 0x258)[0] == PREF_ADDRESS  # copied from the image
    assert struct.unpack_from("<I", zero, 0x260)[0] == INIT_SIZE
    assert zero[0x1F1] == SETUP_SECTS and zero[0x202:0x206] == b"HdrS"
    assert zero[0x264:0x26C] == b"\xa5" * 8
    assert zero[0x26C:0x2D0] == bytes(0x2D0 - 0x26C)  # beyond the header: zero
    assert zero[0x1E8] == 3
    table = [struct.unpack_from("<QQI", zero, 0x2D0 + 20 * n) for n in range(3)]
    assert table == [(0, 0x100000, 1), (0x100000, 0x1000, 2), (0x200000, 0x4700000, 1)]
    assert zero[0x2D0 + 60 :] == bytes(0x1000 - 0x2D0 - 60)
    assert zero[:0x1E8] == bytes(0x1E8) and zero[0x1E9:0x1F0] == bytes(7)


def test_setup_data_is_jailhouse_v2_with_ioapic_and_uarts() -> None:
    """setup_data at 0x2000: next 0, type 6 (SETUP_JAILHOUSE), len 284, then struct
    jailhouse_setup_data: version 2, compatible_version 1, the loader's fields zero,
    standard_ioapic 1 (IOAPIC at 0xfec00000), cpu_ids zero, flags bit 0 (0x3f8) and
    bit 1 (0x2f8): linux-x86-demo whitelists both with 8 ports; then the command line
    and a NUL."""
    boot = linux_boot(KernelImage.parse(kernel_image()), cell("linux-x86-demo"),
                      cmdline="console=ttyS1 quiet")
    setup = boot.params[0x1000:]
    assert struct.unpack_from("<QII", setup) == (0, 6, 284)
    version, compat, pm_timer, cpus, mmconfig, tsc, apic, ioapic = struct.unpack_from(
        "<HHHHQIIB", setup, 16)
    assert (version, compat) == (2, 1)
    assert (pm_timer, cpus, mmconfig, tsc, apic) == (0, 0, 0, 0, 0)
    assert ioapic == 1
    assert setup[16 + 25 : 16 + 280] == bytes(255)
    assert struct.unpack_from("<I", setup, 16 + 280)[0] == 0b0011
    assert setup[300:] == b"console=ttyS1 quiet\0"
    assert len(boot.params) == 0x1000 + 300 + len("console=ttyS1 quiet") + 1


def test_no_ioapic_and_no_uarts_without_them() -> None:
    """standard_ioapic and the UART flags follow the config (apic-demo: no IOAPIC, its
    own UART whitelist); without a command line it is an empty string."""
    config = cell("apic-demo")
    boot = linux_boot(KernelImage.parse(kernel_image()), config)
    setup = boot.params[0x1000:]
    expected_flags = sum(1 << n for n, base in enumerate((0x3F8, 0x2F8, 0x3E8, 0x2E8))
                         if (base, 8) in config.pio_regions)
    assert setup[16 + 24] == (1 if 0xFEC00000 in config.irqchip_addresses else 0)
    assert struct.unpack_from("<I", setup, 16 + 280)[0] == expected_flags
    assert setup[300:] == b"\0"
    assert struct.unpack_from("<II", boot.params, 0x218) == (0, 0)  # no initrd


def test_cpu_reset_address_other_than_zero_is_refused() -> None:
    """Jailhouse's tool raises RuntimeError('x86 requires cpu_reset_address=0')."""
    config = cell("linux-x86-demo")
    moved = dataclasses.replace(config, cpu_reset_address=0x1000)
    with pytest.raises(LinuxSetupError) as failed:
        linux_boot(KernelImage.parse(kernel_image()), moved)
    assert failed.value.message == "x86 requires cpu_reset_address=0"
    assert failed.value.traceback


def test_more_than_128_e820_entries_are_refused() -> None:
    """'Too many memory regions' (the zero page holds 128 entries)."""
    config = cell("linux-x86-demo")
    regions = config.memory_regions[-1:] * 129
    many = dataclasses.replace(config, memory_regions=regions)
    with pytest.raises(LinuxSetupError, match=r"^Too many memory regions$"):
        linux_boot(KernelImage.parse(kernel_image()), many)


@pytest.mark.parametrize(("magic", "method", "factor"), [
    (b"\x1f\x8b\x08\x00", "gzip", 7), (b"\x1f\x9e\x00\x00", "gzip", 7),
    (b"BZh9", "bzip2", 4), (b"\x5d\x00\x00\x80", "lzma", 8), (b"\xfd7zX", "xz", 9),
    (b"\x02\x21\x4c\x18", "lz4", 6), (b"\x89LZO", "lzo", 6), (b"\x7fELF", "uncompressed", 9),
    (b"\x28\xb5\x2f\xfd", "unknown", 9),  # zstd: not among the tool's methods
])
def test_compression_and_its_decompression_factor(magic: bytes, method: str, factor: int) -> None:
    assert compression_method(magic) == method
    assert decompression_factor(method) == factor
    assert decompression_factor(method, 3) == 3


def test_images_without_a_boot_header_are_refused() -> None:
    with pytest.raises(KernelImageError, match="too short"):
        KernelImage.parse(b"\x7fELF" + bytes(100))
    with pytest.raises(KernelImageError, match="HdrS"):
        KernelImage.parse(bytes(0x1000))
    old = kernel_image(header_end=0x250, version=0x0208)
    with pytest.raises(KernelImageError, match=r"2\.08.*2\.10"):
        KernelImage.parse(old)


@pytest.mark.parametrize("pack", [
    lambda data: gzip.compress(data, mtime=0),
    bz2.compress,
    lambda data: lzma.compress(data, format=lzma.FORMAT_XZ),
    lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE),
    lambda data: data,
], ids=["gzip", "bzip2", "xz", "lzma", "uncompressed"])
def test_a_jailhouse_guest_is_told_from_its_payload(pack: object) -> None:
    """The marker (a message only arch/x86/kernel/jailhouse.c has) anywhere in the
    decompressed image, also across the decompressor's chunks."""
    body = b"\x7fELF" + bytes(3 << 20) + MARKER + bytes(1000)
    other = b"\x7fELF" + bytes(3 << 20) + b"Hypervisor detected: %s" + bytes(1000)
    packed = pack(body)  # type: ignore[operator]
    packed_other = pack(other)  # type: ignore[operator]
    assert jailhouse_guest(KernelImage.parse(kernel_image(packed))) is True
    assert jailhouse_guest(KernelImage.parse(kernel_image(packed_other))) is False


def test_other_compressions_cannot_tell() -> None:
    assert jailhouse_guest(KernelImage.parse(kernel_image(b"\x28\xb5\x2f\xfd" + MARKER))) is None
    broken = b"\x1f\x8b\x08\x00" + bytes(100)
    assert jailhouse_guest(KernelImage.parse(kernel_image(broken))) is None
