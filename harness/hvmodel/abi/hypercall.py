"""Hypercall interface; models ``include/jailhouse/hypercall.h`` and its x86 part
``include/arch/x86/asm/jailhouse_hypercall.h``.

Everything a cell, the root driver and the tools see of the hypervisor as numbers: the
hypercall codes, the cell states, the messages on the communication region and their
replies, the ``GET_INFO`` and ``CPU_GET_INFO`` selectors, the per-CPU statistics
counters (with the names the driver gives them in sysfs) and the CPUID leaves by which a
cell recognises Jailhouse. The communication region is described byte for byte (76
bytes, packed, little-endian) with pack/unpack helpers that work on any writable buffer,
so the same code reads a ``bytearray`` in the oracle and an ``mmap`` of the real comm
page in the executor; :data:`COMM_REGION_BASE` is where x86 inmates find it.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from typing import TYPE_CHECKING, Final

from .x86 import PAGE_SIZE

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "COMM_PAGE_SIZE",
    "COMM_REGION_ABI_REVISION",
    "COMM_REGION_BASE",
    "COMM_REGION_SIGNATURE",
    "COMM_REGION_SIZE",
    "CPU_INFO_STATE",
    "CPU_INFO_STAT_BASE",
    "CPU_STAT_MASK",
    "JAILHOUSE_CPUID_FEATURES",
    "JAILHOUSE_CPUID_SIGNATURE",
    "JAILHOUSE_CPUID_SIGNATURE_REGS",
    "MESSAGE_TYPE",
    "NUM_CPU_STATS",
    "STATE_TEXT_INVALID",
    "CellState",
    "CommFlag",
    "CommOffset",
    "CommRegion",
    "CpuInfoState",
    "CpuStat",
    "Hypercall",
    "InfoType",
    "Message",
    "MessageType",
    "Reply",
    "comm_read_u32",
    "comm_write",
    "comm_write_u32",
    "state_text",
]


class Hypercall(enum.IntEnum):
    """Hypercall codes (EAX on x86)."""

    DISABLE = 0
    CELL_CREATE = 1
    CELL_START = 2
    CELL_SET_LOADABLE = 3
    CELL_DESTROY = 4
    HYPERVISOR_GET_INFO = 5
    CELL_GET_STATE = 6
    CPU_GET_INFO = 7
    DEBUG_CONSOLE_PUTC = 8


class CellState(enum.IntEnum):
    """``comm_region.cell_state`` values."""

    #: running, the cell accepts reconfiguration
    RUNNING = 0
    #: running, set by the cell itself; blocks creation/destruction of other cells
    RUNNING_LOCKED = 1
    #: terminal: created but not started, or shut down
    SHUT_DOWN = 2
    #: terminal: all CPUs of the cell failed, or a message reply timed out
    FAILED = 3
    #: terminal: set by the inmate library on a comm region ABI mismatch
    FAILED_COMM_REV = 4

    @property
    def sysfs_text(self) -> str:
        """The text of ``cells/<id>/state`` (without the newline)."""
        return _STATE_TEXT[self]


_STATE_TEXT: Final = {
    CellState.RUNNING: "running",
    CellState.RUNNING_LOCKED: "running/locked",
    CellState.SHUT_DOWN: "shut down",
    CellState.FAILED: "failed",
    CellState.FAILED_COMM_REV: "Comm ABI mismatch",
}

#: what the driver prints for a state value it does not know
STATE_TEXT_INVALID: Final = "invalid"


def state_text(value: int) -> str:
    """The sysfs text for a raw ``cell_state`` value (``invalid`` when unknown)."""
    try:
        return CellState(value).sysfs_text
    except ValueError:
        return STATE_TEXT_INVALID


class Message(enum.IntEnum):
    """Hypervisor-to-cell messages (``msg_to_cell``)."""

    NONE = 0
    SHUTDOWN_REQUEST = 1
    RECONFIG_COMPLETED = 2


class Reply(enum.IntEnum):
    """Cell-to-hypervisor replies (``reply_from_cell``)."""

    NONE = 0
    UNKNOWN = 1
    REQUEST_DENIED = 2
    REQUEST_APPROVED = 3
    RECEIVED = 4


class MessageType(enum.Enum):
    """Which reply counts as success: approval for a request, receipt for information."""

    REQUEST = "request"
    INFORMATION = "information"


#: the message type of each hypervisor message
MESSAGE_TYPE: Final = {
    Message.SHUTDOWN_REQUEST: MessageType.REQUEST,
    Message.RECONFIG_COMPLETED: MessageType.INFORMATION,
}


class InfoType(enum.IntEnum):
    """``HYPERVISOR_GET_INFO`` selectors."""

    MEM_POOL_SIZE = 0
    MEM_POOL_USED = 1
    REMAP_POOL_SIZE = 2
    REMAP_POOL_USED = 3
    NUM_CELLS = 4


class CpuInfoState(enum.IntEnum):
    """Values of ``CPU_GET_INFO`` type 0 (the CPU state)."""

    RUNNING = 0
    FAILED = 2


#: ``CPU_GET_INFO`` type 0 asks for the state
CPU_INFO_STATE: Final = 0
#: ``CPU_GET_INFO`` type ``1000 + n`` asks for statistics counter ``n``
CPU_INFO_STAT_BASE: Final = 1000


class CpuStat(enum.IntEnum):
    """Per-CPU statistics counters (x86 set, ``JAILHOUSE_NUM_CPU_STATS`` = 12)."""

    VMEXITS_TOTAL = 0
    VMEXITS_MMIO = 1
    VMEXITS_MANAGEMENT = 2
    VMEXITS_HYPERCALL = 3
    VMEXITS_PIO = 4
    VMEXITS_XAPIC = 5
    VMEXITS_CR = 6
    VMEXITS_CPUID = 7
    VMEXITS_XSETBV = 8
    VMEXITS_EXCEPTION = 9
    VMEXITS_MSR_OTHER = 10
    VMEXITS_MSR_X2APIC_ICR = 11

    @property
    def sysfs_name(self) -> str:
        """File name under ``statistics/`` (``vmexits_total`` ...)."""
        return self.name.lower()


NUM_CPU_STATS: Final = len(CpuStat)
#: CPU_GET_INFO returns a counter masked to 31 bits (it is a non-negative ``int``)
CPU_STAT_MASK: Final = 0x7FFFFFFF


class CommFlag(enum.IntFlag):
    """``comm_region.flags``."""

    DBG_PUTC_PERMITTED = 0x0001
    DBG_PUTC_ACTIVE = 0x0002


# --- communication region ------------------------------------------------------------

COMM_REGION_SIGNATURE: Final = b"JHCOMM"
COMM_REGION_ABI_REVISION: Final = 2
#: where x86 inmates expect the comm region (guest-physical; ``COMM_REGION_BASE`` of the
#: inmate library, the address ``jailhouse config check`` insists on)
COMM_REGION_BASE: Final = 0x100000
#: size of the comm page (the region is mapped as one page)
COMM_PAGE_SIZE: Final = PAGE_SIZE
#: size of ``struct jailhouse_comm_region`` on x86
COMM_REGION_SIZE: Final = 76


class CommOffset(enum.IntEnum):
    """Byte offsets of the fields of ``struct jailhouse_comm_region`` (x86)."""

    SIGNATURE = 0
    REVISION = 6
    CELL_STATE = 8
    MSG_TO_CELL = 12
    REPLY_FROM_CELL = 16
    FLAGS = 20
    CONSOLE = 24
    PCI_MMCONFIG_BASE = 56
    PM_TIMER_ADDRESS = 64
    NUM_CPUS = 66
    TSC_KHZ = 68
    APIC_KHZ = 72


_COMM_FORMAT: Final = struct.Struct("<6sHIIII32sQHHII")
_U32: Final = struct.Struct("<I")
assert _COMM_FORMAT.size == COMM_REGION_SIZE  # layout guard, not input checking


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CommRegion:
    """A decoded copy of the communication region (76 bytes).

    :param signature: ``b"JHCOMM"`` once the cell was started
    :param revision: :data:`COMM_REGION_ABI_REVISION`
    :param cell_state: raw state value (see :class:`CellState`)
    :param msg_to_cell: raw message (see :class:`Message`)
    :param reply_from_cell: raw reply (see :class:`Reply`)
    :param flags: :class:`CommFlag` bits
    :param console: the 32 raw bytes of the cell's ``struct jailhouse_console``
    :param pci_mmconfig_base: from the system config
    :param pm_timer_address: x86: PM timer port
    :param num_cpus: x86: CPUs of the cell
    :param tsc_khz: x86: TSC frequency
    :param apic_khz: x86: APIC timer frequency
    """

    signature: bytes = b"\0" * 6
    revision: int = 0
    cell_state: int = 0
    msg_to_cell: int = 0
    reply_from_cell: int = 0
    flags: int = 0
    console: bytes = b"\0" * 32
    pci_mmconfig_base: int = 0
    pm_timer_address: int = 0
    num_cpus: int = 0
    tsc_khz: int = 0
    apic_khz: int = 0

    def to_bytes(self) -> bytes:
        """The 76 packed bytes."""
        return _COMM_FORMAT.pack(
            self.signature,
            self.revision,
            self.cell_state,
            self.msg_to_cell,
            self.reply_from_cell,
            self.flags,
            self.console,
            self.pci_mmconfig_base,
            self.pm_timer_address,
            self.num_cpus,
            self.tsc_khz,
            self.apic_khz,
        )

    @classmethod
    def from_buffer(cls, buffer: bytes | bytearray | memoryview) -> CommRegion:
        """Decode the first 76 bytes of ``buffer``.

        :raise ValueError: when the buffer is shorter than 76 bytes
        """
        if len(buffer) < COMM_REGION_SIZE:
            raise ValueError(f"comm region needs {COMM_REGION_SIZE} bytes, got {len(buffer)}")
        fields = _COMM_FORMAT.unpack_from(buffer, 0)
        return cls(
            signature=fields[0],
            revision=fields[1],
            cell_state=fields[2],
            msg_to_cell=fields[3],
            reply_from_cell=fields[4],
            flags=fields[5],
            console=fields[6],
            pci_mmconfig_base=fields[7],
            pm_timer_address=fields[8],
            num_cpus=fields[9],
            tsc_khz=fields[10],
            apic_khz=fields[11],
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form (bytes as hex)."""
        out: dict[str, object] = dataclasses.asdict(self)
        out["signature"] = self.signature.hex()
        out["console"] = self.console.hex()
        return out


def comm_read_u32(buffer: ReadableBuffer, offset: int) -> int:
    """Read one 32-bit field of a comm region in place (offset: a :class:`CommOffset`)."""
    value: int = _U32.unpack_from(buffer, offset)[0]
    return value


def comm_write_u32(buffer: WriteableBuffer, offset: int, value: int) -> None:
    """Write one 32-bit field of a comm region in place (offset: a :class:`CommOffset`)."""
    _U32.pack_into(buffer, offset, value & 0xFFFFFFFF)


def comm_write(buffer: bytearray | memoryview, region: CommRegion) -> None:
    """Write a whole comm region at the start of ``buffer``."""
    buffer[0:COMM_REGION_SIZE] = region.to_bytes()


# --- CPUID interface (x86) -----------------------------------------------------------

#: ``JAILHOUSE_CPUID_SIGNATURE``: the leaf that names the hypervisor
JAILHOUSE_CPUID_SIGNATURE: Final = 0x40000000
#: ``JAILHOUSE_CPUID_FEATURES``: the feature leaf (all zero)
JAILHOUSE_CPUID_FEATURES: Final = 0x40000001
#: what a cell reads at the signature leaf (EAX, EBX, ECX, EDX): the highest hypervisor
#: leaf, then "Jailhouse\0\0\0"
JAILHOUSE_CPUID_SIGNATURE_REGS: Final = (
    JAILHOUSE_CPUID_FEATURES,
    int.from_bytes(b"Jail", "little"),
    int.from_bytes(b"hous", "little"),
    int.from_bytes(b"e\0\0\0", "little"),
)
