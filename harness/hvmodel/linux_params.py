"""The boot parameters of a Linux cell on x86; models the x86 half of Jailhouse's
``tools/jailhouse-cell-linux`` (``X86SetupHeader``, ``X86ZeroPage``,
``get_kernel_compression_method``, ``x86_gen_setup_data``, ``X86.setup``).

What ``jailhouse cell linux`` loads into the cell (reference §5.6), byte for byte as
Jailhouse's tool lays it out:

* the loader at 0 (the CPUs start there; the config's ``cpu_reset_address`` must be 0);
* the kernel's bzImage at ``pref_address - (setup_sects + 1) * 512``, so that its
  protected-mode part sits at its preferred address;
* the initrd at the next page after ``load address + factor * image size``, leaving the
  kernel room to decompress itself (the factor follows the payload's compression unless
  given);
* the boot parameters at 0x1000: a zero page (the image's setup header with
  ``type_of_loader`` 0xff, ``kernel_alignment`` = the preferred address, the initrd, the
  command line and setup_data pointers; an E820 table of the config's RAM regions as
  RAM and its comm region as reserved, in config order), at 0x2000 one ``setup_data`` of
  type ``SETUP_JAILHOUSE`` (version 2, compatible with 1: ``standard_ioapic`` when the
  config has the IOAPIC at 0xfec00000, ``flags`` bit n for each PC UART n the PIO
  whitelist names with 8 ports; the rest the loader fills in from the comm region), and
  the NUL-terminated command line right after it.

Plus what jhlab adds: :func:`jailhouse_guest` tells from the image whether the kernel
was built with ``CONFIG_JAILHOUSE_GUEST``, where its compression is one Python reads.

Standard library only (the ``jailhouse`` command runs it in the root cell).
"""

from __future__ import annotations

import bz2
import dataclasses
import struct
import zlib
from typing import TYPE_CHECKING, Final

from .abi import (
    BOOT_E820_ENTRY,
    BOOT_FLAG,
    BOOT_FLAG_MAGIC,
    BOOT_HEADER_BASE,
    BOOT_HEADER_END_BASE,
    BOOT_HEADER_MAGIC,
    BOOT_HEADER_SIGNATURE,
    BOOT_PARAMS_SIZE,
    BOOT_SECTOR_SIZE,
    BOOT_SETUP_HEADER,
    BOOT_VERSION,
    E820_ENTRIES,
    E820_MAX_ENTRIES_ZEROPAGE,
    E820_RAM,
    E820_RESERVED,
    E820_TABLE,
    HDR_CMD_LINE_PTR,
    HDR_INIT_SIZE,
    HDR_KERNEL_ALIGNMENT,
    HDR_PAYLOAD_LENGTH,
    HDR_PREF_ADDRESS,
    HDR_RAMDISK_IMAGE,
    HDR_RAMDISK_SIZE,
    HDR_SETUP_DATA,
    HDR_TYPE_OF_LOADER,
    JAILHOUSE_SETUP_DATA,
    JAILHOUSE_SETUP_MAX_CPUS,
    JAILHOUSE_SETUP_REQUIRED_VERSION,
    JAILHOUSE_SETUP_VERSION,
    LINUX_LOADER_ADDRESS,
    LINUX_PARAMS_ADDRESS,
    LOADER_TYPE_UNDEFINED,
    PAGE_SIZE,
    PLATFORM_UARTS,
    SETUP_DATA_HEADER,
    SETUP_JAILHOUSE,
    STANDARD_IOAPIC_ADDRESS,
)
from .errors import JhlabError

if TYPE_CHECKING:
    from .config import MemoryRegion, SetCell

__all__ = [
    "DECOMPRESSION_FACTORS",
    "GUEST_MARKER",
    "KernelImage",
    "KernelImageError",
    "LinuxBoot",
    "LinuxSetupError",
    "compression_method",
    "decompression_factor",
    "e820_table",
    "jailhouse_guest",
    "jailhouse_setup_data",
    "linux_boot",
]

#: factor x image size left free after the kernel for its decompression, by the payload's
#: compression (``X86ZeroPage``: bzip2 4, lz4 and lzo 6, gzip 7, lzma 8, anything else 9)
DECOMPRESSION_FACTORS: Final = {"bzip2": 4, "lz4": 6, "lzo": 6, "gzip": 7, "lzma": 8}
UNKNOWN_DECOMPRESSION_FACTOR: Final = 9
#: only ``arch/x86/kernel/jailhouse.c`` (``CONFIG_JAILHOUSE_GUEST``) has this string
GUEST_MARKER: Final = b"Jailhouse: Unsupported setup data structure"
#: decompressed bytes read per step while looking for :data:`GUEST_MARKER`
_SCAN_CHUNK: Final = 1 << 20


class KernelImageError(JhlabError):
    """The kernel file is not an x86 Linux image with a boot protocol header."""


class LinuxSetupError(JhlabError):
    """The cell config or the images do not allow an x86 Linux boot; the message is
    Jailhouse's tool's (``x86 requires cpu_reset_address=0``, ``Too many memory regions``).

    :param traceback: Jailhouse's tool ends in a Python traceback (its last line is
        ``RuntimeError: <message>``) rather than printing the message
    """

    def __init__(self, message: str, *, traceback: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.traceback = traceback


@dataclasses.dataclass(frozen=True)
class KernelImage:
    """An x86 Linux kernel image (bzImage) and the setup header fields the tool uses.

    :param data: the whole file
    """

    data: bytes
    setup_sects: int
    syssize: int
    jump: int
    type_of_loader: int
    ramdisk_image: int
    ramdisk_size: int
    cmd_line_ptr: int
    kernel_alignment: int
    payload_offset: int
    setup_data: int
    pref_address: int

    @classmethod
    def parse(cls, data: bytes) -> KernelImage:
        """Read the setup header (boot.rst, "The Real-Mode Kernel Header").

        :raise KernelImageError: without the boot sector's 0xaa55 and the ``HdrS`` header
        """
        end = BOOT_HEADER_BASE + BOOT_SETUP_HEADER.size
        if len(data) < end:
            raise KernelImageError(f"{len(data)} bytes: too short for an x86 boot header")
        if (int.from_bytes(data[BOOT_FLAG : BOOT_FLAG + 2], "little") != BOOT_FLAG_MAGIC
                or data[BOOT_HEADER_MAGIC : BOOT_HEADER_MAGIC + 4] != BOOT_HEADER_SIGNATURE):
            raise KernelImageError("no x86 boot protocol header (boot flag 0xaa55, 'HdrS' at 0x202)")
        image = cls(data, *BOOT_SETUP_HEADER.unpack_from(data, BOOT_HEADER_BASE))
        if BOOT_HEADER_BASE + len(image.header) < HDR_PREF_ADDRESS + 8:
            version = int.from_bytes(data[BOOT_VERSION : BOOT_VERSION + 2], "little")
            raise KernelImageError(f"boot protocol {version >> 8}.{version & 0xFF:02d}: "
                                   "2.10 or later needed (pref_address)")
        return image

    @property
    def setup_size(self) -> int:
        """Bytes of the real-mode part before the protected-mode kernel."""
        return (self.setup_sects + 1) * BOOT_SECTOR_SIZE

    @property
    def load_address(self) -> int:
        """Where the whole image goes: its protected-mode part lands at ``pref_address``."""
        return self.pref_address - self.setup_size

    @property
    def header(self) -> bytes:
        """The setup header as the image has it, 0x1f0 to its declared end (``0x202 +
        the jump's offset byte``)."""
        end = BOOT_HEADER_END_BASE + (self.jump >> 8)
        return self.data[BOOT_HEADER_BASE:end]

    @property
    def init_size(self) -> int:
        """Memory the kernel needs from ``pref_address`` on while it unpacks and starts
        (``init_size``, boot protocol 2.10)."""
        return int.from_bytes(self.data[HDR_INIT_SIZE : HDR_INIT_SIZE + 4], "little")

    @property
    def payload_magic(self) -> bytes:
        """The first four bytes of the compressed payload."""
        start = self.setup_size + self.payload_offset
        return self.data[start : start + 4]

    @property
    def payload(self) -> bytes:
        """The compressed payload (``payload_offset``/``payload_length`` from the
        protected-mode part)."""
        start = self.setup_size + self.payload_offset
        length = int.from_bytes(self.data[HDR_PAYLOAD_LENGTH : HDR_PAYLOAD_LENGTH + 4], "little")
        return self.data[start : start + length]


def compression_method(magic: bytes) -> str:
    """``get_kernel_compression_method``: the payload's compression from its magic."""
    if len(magic) < 4:
        return "unknown"
    if magic[0] == 0x1F and magic[1] in (0x8B, 0x9E):
        return "gzip"
    if magic[:2] == b"\x42\x5a":
        return "bzip2"
    if magic[:2] == b"\x5d\x00":
        return "lzma"
    if magic[:2] == b"\xfd\x37":
        return "xz"
    if magic[:2] == b"\x02\x21":
        return "lz4"
    if magic[:2] == b"\x89\x4c":
        return "lzo"
    if magic[:4] == b"\x7fELF":
        return "uncompressed"
    return "unknown"


def decompression_factor(method: str, requested: int | None = None) -> int:
    """The factor of the gap between kernel and initrd: ``requested`` unless None or 0
    (``-k``), else by the compression method."""
    if requested:
        return requested
    return DECOMPRESSION_FACTORS.get(method, UNKNOWN_DECOMPRESSION_FACTOR)


def e820_table(config: SetCell) -> list[MemoryRegion]:
    """The regions that become E820 entries: RAM and the comm region, in config order.

    :raise LinuxSetupError: ``Too many memory regions`` beyond the zero page's 128
    """
    entries: list[MemoryRegion] = []
    for region in config.memory_regions:
        if region.is_ram or region.is_comm_region:
            if len(entries) >= E820_MAX_ENTRIES_ZEROPAGE:
                raise LinuxSetupError("Too many memory regions")
            entries.append(region)
    return entries


def jailhouse_setup_data(config: SetCell) -> bytes:
    """``x86_gen_setup_data``: the setup_data entry (header, then ``struct
    jailhouse_setup_data`` v2 with ``standard_ioapic`` and ``flags``; the loader fills in
    PM timer, MMCONFIG, TSC and APIC kHz, CPU count and APIC IDs)."""
    standard_ioapic = STANDARD_IOAPIC_ADDRESS in config.irqchip_addresses
    flags = 0
    for base, length in config.pio_regions:
        if base in PLATFORM_UARTS and length == 8:
            flags |= 1 << PLATFORM_UARTS.index(base)
    body = JAILHOUSE_SETUP_DATA.pack(
        JAILHOUSE_SETUP_VERSION, JAILHOUSE_SETUP_REQUIRED_VERSION, 0, 0, 0, 0, 0,
        int(standard_ioapic), bytes(JAILHOUSE_SETUP_MAX_CPUS), flags,
    )
    return SETUP_DATA_HEADER.pack(0, SETUP_JAILHOUSE, len(body)) + body


@dataclasses.dataclass(frozen=True)
class LinuxBoot:
    """Where the images go in the cell and the boot parameters (module docstring)."""

    kernel_address: int
    #: 0 without an initrd
    initrd_address: int
    initrd_size: int
    params: bytes
    loader_address: int = LINUX_LOADER_ADDRESS
    params_address: int = LINUX_PARAMS_ADDRESS


def linux_boot(kernel: KernelImage, config: SetCell, *, initrd_size: int | None = None,
               cmdline: str | None = None, decomp_factor: int | None = None) -> LinuxBoot:
    """``X86.setup``: the boot parameters of ``kernel`` in a cell of ``config`` (the cell
    config as Jailhouse's tool reads it: :func:`~harness.hvmodel.config.read_cell`).

    :param initrd_size: the initrd's size in bytes (None: no initrd)
    :param cmdline: the kernel command line (``-c``)
    :param decomp_factor: ``-k`` (None or 0: by the payload's compression)
    :raise LinuxSetupError: ``cpu_reset_address`` not 0, more than 128 E820 entries
    """
    if config.cpu_reset_address != 0:
        raise LinuxSetupError("x86 requires cpu_reset_address=0", traceback=True)
    load_address = kernel.load_address
    ramdisk_image = 0
    if initrd_size is not None:
        factor = decompression_factor(compression_method(kernel.payload_magic), decomp_factor)
        ramdisk_image = _page_align(load_address + factor * len(kernel.data))
    entries = e820_table(config)
    setup_data = jailhouse_setup_data(config)
    setup_data_address = LINUX_PARAMS_ADDRESS + BOOT_PARAMS_SIZE

    zero_page = bytearray(BOOT_PARAMS_SIZE)
    header = kernel.header
    zero_page[BOOT_HEADER_BASE : BOOT_HEADER_BASE + len(header)] = header
    for offset, fmt, value in (
        (HDR_KERNEL_ALIGNMENT, "<I", kernel.pref_address),
        (HDR_TYPE_OF_LOADER, "<B", LOADER_TYPE_UNDEFINED),
        (HDR_RAMDISK_IMAGE, "<I", ramdisk_image),
        (HDR_RAMDISK_SIZE, "<I", initrd_size or 0),
        (HDR_SETUP_DATA, "<Q", setup_data_address),
        (HDR_CMD_LINE_PTR, "<I", setup_data_address + len(setup_data)),
    ):
        struct.pack_into(fmt, zero_page, offset, value)
    zero_page[E820_ENTRIES] = len(entries)
    for n, region in enumerate(entries):
        BOOT_E820_ENTRY.pack_into(
            zero_page, E820_TABLE + n * BOOT_E820_ENTRY.size, region.virt_start, region.size,
            E820_RAM if region.is_ram else E820_RESERVED,
        )
    params = bytes(zero_page) + setup_data + (cmdline or "").encode() + b"\0"
    return LinuxBoot(load_address, ramdisk_image, initrd_size or 0, params)


def _page_align(value: int) -> int:
    return (value + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


# --- is it a Jailhouse guest? ------------------------------------------------------------


def jailhouse_guest(kernel: KernelImage) -> bool | None:
    """Whether the kernel was built with ``CONFIG_JAILHOUSE_GUEST``: its decompressed
    image holds :data:`GUEST_MARKER` (a message of ``arch/x86/kernel/jailhouse.c``).

    :return: None when the image cannot tell: a compression Python does not read here
        (lz4, lzo, zstd, unknown) or a payload that does not decompress
    """
    method = compression_method(kernel.payload_magic)
    payload = kernel.payload
    if method == "uncompressed":
        return GUEST_MARKER in payload
    decompressor = _decompressor(method)
    if decompressor is None:
        return None
    tail = b""
    try:
        for start in range(0, len(payload), _SCAN_CHUNK // 8):
            chunk = decompressor(payload[start : start + _SCAN_CHUNK // 8])
            window = tail + chunk
            if GUEST_MARKER in window:
                return True
            tail = window[-len(GUEST_MARKER) :]
    except (OSError, ValueError, EOFError, zlib.error) as exc:  # lzma.LZMAError is an OSError
        del exc
        return None
    return False


def _decompressor(method: str) -> _Decompress | None:
    if method == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress
    if method == "bzip2":
        return bz2.BZ2Decompressor().decompress
    if method in ("xz", "lzma"):
        try:
            import lzma
        except ImportError:  # a Python built without liblzma
            return None
        fmt = lzma.FORMAT_XZ if method == "xz" else lzma.FORMAT_ALONE
        return lzma.LZMADecompressor(format=fmt).decompress
    return None


if TYPE_CHECKING:
    from collections.abc import Callable

    _Decompress = Callable[[bytes], bytes]
