"""PCI facts; models ``hypervisor/include/jailhouse/pci.h``, ``include/jailhouse/pci_defs.h``
and the identity of Jailhouse's virtual ivshmem device (``hypervisor/ivshmem.c``,
``Documentation/ivshmem-v2-specification.md``).

Config-space register offsets and bits are those of the PCI specification under
Jailhouse's names; the model moderates them, the executor and ``config create`` read
them from real devices. MSI and MSI-X control bits are given as the 16-bit control
register holds them (the upper half of the capability's first dword).
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "IVSHMEM_DEVICE_ID",
    "IVSHMEM_MAX_PEERS",
    "IVSHMEM_MSIX_VECTORS",
    "IVSHMEM_VENDOR_ID",
    "PCI_BAR_64BIT",
    "PCI_BAR_IO",
    "PCI_BAR_MEM_TYPE_MASK",
    "PCI_CAP_MSI",
    "PCI_CAP_MSIX",
    "PCI_CFG_BAR",
    "PCI_CFG_BAR_END",
    "PCI_CFG_CAPS",
    "PCI_CFG_COMMAND",
    "PCI_CFG_ROMBAR",
    "PCI_CFG_SECONDARY_BUS",
    "PCI_CFG_SPACE_SIZE",
    "PCI_CFG_STATUS",
    "PCI_CMD_INTX_OFF",
    "PCI_CMD_MASTER",
    "PCI_CMD_MEM",
    "PCI_CONFIG_HEADER_SIZE",
    "PCI_MSIX_CTRL_ENABLE",
    "PCI_MSIX_CTRL_FMASK",
    "PCI_MSIX_CTRL_TABLE_SIZE",
    "PCI_MSIX_DWORD_ENABLE",
    "PCI_MSIX_DWORD_FMASK",
    "PCI_MSIX_VECTOR_CTRL",
    "PCI_MSIX_VECTOR_MASKED",
    "PCI_MSIX_VECTOR_SIZE",
    "PCI_MSI_CTRL_64BIT",
    "PCI_MSI_CTRL_ENABLE",
    "PCI_MSI_CTRL_MASKBIT",
    "PCI_MSI_CTRL_MMC_MASK",
    "PCI_MSI_CTRL_MMC_SHIFT",
    "PCI_MSI_CTRL_MME_MASK",
    "PCI_MSI_CTRL_MME_SHIFT",
    "PCI_MSI_DWORD_ENABLE",
    "PCI_STS_CAPS",
    "PciCapId",
]

# --- configuration space header ----------------------------------------------------------

PCI_CFG_COMMAND: Final = 0x04
PCI_CMD_MEM: Final = 1 << 1
PCI_CMD_MASTER: Final = 1 << 2
PCI_CMD_INTX_OFF: Final = 1 << 10
PCI_CFG_STATUS: Final = 0x06
#: status: the device has a capability list
PCI_STS_CAPS: Final = 1 << 4
PCI_CFG_BAR: Final = 0x10
#: BAR bit 0: an I/O BAR; memory BAR type (bits 1..2) 2: a 64-bit BAR (its upper half
#: follows)
PCI_BAR_IO: Final = 0x1
PCI_BAR_MEM_TYPE_MASK: Final = 0x6
PCI_BAR_64BIT: Final = 0x4
#: last byte of the six BARs of an endpoint
PCI_CFG_BAR_END: Final = 0x27
#: bridges: secondary and subordinate bus numbers (two bytes from here)
PCI_CFG_SECONDARY_BUS: Final = 0x19
PCI_CFG_ROMBAR: Final = 0x30
#: the pointer to the first capability
PCI_CFG_CAPS: Final = 0x34
PCI_CONFIG_HEADER_SIZE: Final = 0x40
#: conventional config space; PCI Express extended capabilities start here
PCI_CFG_SPACE_SIZE: Final = 0x100


class PciCapId(enum.IntEnum):
    """PCI capability IDs seen in configs (``pci_defs.h``); extended ones carry
    ``JAILHOUSE_PCI_EXT_CAP`` (0x8000) as a config's capability entries do."""

    NULL = 0x00
    PM = 0x01
    MSI = 0x05
    VNDR = 0x09
    DBG = 0x0A
    SSVID = 0x0D
    EXP = 0x10
    MSIX = 0x11
    SATA = 0x12
    AF = 0x13
    EXT_ERR = 0x8001
    EXT_VC = 0x8002
    EXT_DSN = 0x8003
    EXT_PWR = 0x8004
    EXT_ACS = 0x800D
    EXT_ARI = 0x800E
    EXT_ATS = 0x800F
    EXT_SRIOV = 0x8010
    EXT_LTR = 0x8018
    EXT_L1SS = 0x801E


#: ``PCI_CAP_MSI``, ``PCI_CAP_MSIX`` of ``pci.h`` as plain integers (compared on hot paths)
PCI_CAP_MSI: Final = int(PciCapId.MSI)
PCI_CAP_MSIX: Final = int(PciCapId.MSIX)

# --- MSI and MSI-X -----------------------------------------------------------------------

#: MSI control: enable, multiple message capable (bits 1..3) and enable (bits 4..6),
#: 64-bit address, per-vector masking
PCI_MSI_CTRL_ENABLE: Final = 0x0001
PCI_MSI_CTRL_MMC_SHIFT: Final = 1
PCI_MSI_CTRL_MMC_MASK: Final = 0x000E
PCI_MSI_CTRL_MME_SHIFT: Final = 4
PCI_MSI_CTRL_MME_MASK: Final = 0x0070
PCI_MSI_CTRL_64BIT: Final = 0x0080
PCI_MSI_CTRL_MASKBIT: Final = 0x0100
#: MSI-X control: table size - 1 (bits 0..10), function mask, enable
PCI_MSIX_CTRL_TABLE_SIZE: Final = 0x07FF
PCI_MSIX_CTRL_FMASK: Final = 0x4000
PCI_MSIX_CTRL_ENABLE: Final = 0x8000
#: the enable and mask bits as the capability's first dword holds them (the control
#: register is its upper half), for code that shadows whole dwords
PCI_MSI_DWORD_ENABLE: Final = PCI_MSI_CTRL_ENABLE << 16
PCI_MSIX_DWORD_ENABLE: Final = PCI_MSIX_CTRL_ENABLE << 16
PCI_MSIX_DWORD_FMASK: Final = PCI_MSIX_CTRL_FMASK << 16
#: an MSI-X table entry: address low, address high, data, vector control
PCI_MSIX_VECTOR_SIZE: Final = 16
#: the dword of the vector control, and its mask bit
PCI_MSIX_VECTOR_CTRL: Final = 3
PCI_MSIX_VECTOR_MASKED: Final = 0x1

# --- ivshmem -----------------------------------------------------------------------------

#: ``PCI_VENDOR_ID_SIEMENS`` and ``IVSHMEM_DEVICE_ID``
IVSHMEM_VENDOR_ID: Final = 0x110A
IVSHMEM_DEVICE_ID: Final = 0x4106
#: ``IVSHMEM_MAX_PEERS``: endpoints per link (``shmem_dev_id`` must stay below it)
IVSHMEM_MAX_PEERS: Final = 12
#: ``IVSHMEM_MSIX_VECTORS``: the most MSI-X vectors an ivshmem device may have
IVSHMEM_MSIX_VECTORS: Final = 16
