"""What the model cannot read from the configs: the build options of the hypervisor
image (Jailhouse's ``include/jailhouse/config.h``, ``CONFIG_*``) and facts of the machine
it runs on (CPU vendor, APIC mode, CAT).

Every part of the model may read these (units decide with them whether they are built,
see :func:`harness.hvmodel.unit.define_unit`); none of it changes after the
:class:`~harness.hvmodel.control.Hypervisor` is made.
"""

from __future__ import annotations

import dataclasses

from . import JAILHOUSE_VERSION

__all__ = ["CatHardware", "HvParams"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CatHardware:
    """What CPUID reports about Intel's Cache Allocation Technology.

    :param cbm_length: bits in a capacity bitmask
    :param num_cos: classes of service
    """

    cbm_length: int = 20
    num_cos: int = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class HvParams:
    """Build-time and machine facts the model cannot read from the configs.

    :param vendor: ``intel`` (VMX, VT-d, CAT unit) or ``amd`` (SVM, AMD IOMMU)
    :param version: ``JAILHOUSE_VERSION`` as printed at enable
    :param code_location: printed as ``Code location``
    :param core_size: bytes of the hypervisor image before the page pool (model figure)
    :param percpu_pages: pages of one ``struct per_cpu`` (model figure)
    :param cell_struct_size: bytes of ``struct cell`` including its comm page (model figure)
    :param gbpages: 1 GiB pages available for guest mappings
    :param x2apic: the APIC runs in x2APIC mode (``Using x2APIC``)
    :param cat: CAT hardware, or None when absent (QEMU)
    :param reply_poll_seconds: duration of one ``msg_reply_timeout`` count (Jailhouse
        counts polling-loop iterations; the model waits this long per count)
    :param console_history: complete console lines kept in
        :attr:`~harness.hvmodel.printk.Console.lines`
    :param test_device: built with ``CONFIG_TEST_DEVICE``: the test device unit
        (:mod:`.testdev`) serves cells with the ``TEST_DEVICE`` flag
    """

    vendor: str = "intel"
    version: str = JAILHOUSE_VERSION
    code_location: int = 0xFFFFFFFFF0000050
    core_size: int = 0x40000
    percpu_pages: int = 6
    cell_struct_size: int = 0x1100
    gbpages: bool = True
    x2apic: bool = True
    cat: CatHardware | None = None
    reply_poll_seconds: float = 1e-6
    console_history: int = 4096
    test_device: bool = False

    def __post_init__(self) -> None:
        if self.vendor not in ("intel", "amd"):
            raise ValueError(f"HvParams.vendor: expected 'intel' or 'amd', got {self.vendor!r}")

    @property
    def io_bitmap_pages(self) -> int:
        """I/O permission bitmap pages per cell (VMX 2, SVM 3)."""
        return 3 if self.vendor == "amd" else 2
