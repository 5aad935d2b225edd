"""The Jailhouse ABI: the one home of every number, flag, state, signature, size and byte
layout that jhlab shares with Jailhouse (its cells, its driver, its tools, its configs).

Everything else imports these names from here (``from harness.hvmodel.abi import
MEM_WRITE``); nothing defines them again. One module per Jailhouse header, so that a
reader of Jailhouse finds each fact where Jailhouse keeps it:

=========================  ==============================================================
module                     Jailhouse source and what it holds
=========================  ==============================================================
:mod:`.cell_config`        ``include/jailhouse/cell-config.h``: revisions, signatures,
                           name and IOMMU limits, the struct layouts (revision 14 and 12)
                           and offsets, memory/cell/system/PCI-cap/cache flags, PCI
                           device, IOMMU, cache and APIC-mode types, ivshmem protocols
                           and BAR masks, ``config_size``
:mod:`.console`            ``include/jailhouse/console.h``: the console layout, types,
                           flags
:mod:`.hypercall`          ``include/jailhouse/hypercall.h`` and
                           ``asm/jailhouse_hypercall.h``: hypercall codes, cell states,
                           messages and replies, info selectors, CPU statistics, the comm
                           region (layout, signature, revision, flags, x86 base address),
                           the CPUID signature leaves
:mod:`.ioctl`              ``driver/jailhouse.h``: ioctl numbers, cell id conventions
:mod:`.linux_boot`         Linux's x86 boot protocol as ``jailhouse cell linux`` uses it
                           (setup header, zero page, E820, ``SETUP_JAILHOUSE`` data) and
                           where the tool and its loader put things in the cell
:mod:`.pci`                ``include/jailhouse/pci.h``, ``pci_defs.h``, ``ivshmem.c``: PCI
                           config-space registers, capability IDs, MSI/MSI-X bits, the
                           ivshmem device's IDs and limits
:mod:`.vmexit`             ``asm/svm.h``, ``asm/vmx.h``: the SVM exit codes and VMX exit
                           reasons Jailhouse handles
:mod:`.x86`                ``arch/x86/include/asm``: Jailhouse's ``PAGE_SIZE``, CPUID
                           feature bits, XCR0, the x2APIC MSRs, IOAPIC registers and
                           redirection entries, the MSI message format, the PCI
                           configuration ports
=========================  ==============================================================

Standard library only, and importing nothing else of jhlab: every part of the model,
the driver, the tools and the host-side harness can depend on it.
"""

from __future__ import annotations

from . import cell_config, console, hypercall, ioctl, linux_boot, pci, vmexit, x86
from .cell_config import *  # noqa: F403 - the package re-exports its modules' names
from .console import *  # noqa: F403
from .hypercall import *  # noqa: F403
from .ioctl import *  # noqa: F403
from .linux_boot import *  # noqa: F403
from .pci import *  # noqa: F403
from .vmexit import *  # noqa: F403
from .x86 import *  # noqa: F403

__all__: list[str] = []
__all__ += cell_config.__all__
__all__ += console.__all__
__all__ += hypercall.__all__
__all__ += ioctl.__all__
__all__ += linux_boot.__all__
__all__ += pci.__all__
__all__ += vmexit.__all__
__all__ += x86.__all__
