"""Kernel builds for the lab from Debian's ``linux-source`` (never installed on the host).

* :func:`root_kernel`: Debian's root-cell kernel with its KVM modules rebuilt with
  ``kernel_configs/hypercalls.config`` (``CONFIG_KVM_XEN``), so cells' hypercalls reach
  the hypervisor model (:mod:`.root_kvm`).
* :func:`linux_cell_images`: the guest kernel and initramfs of Linux cells
  (:mod:`.linux_cell`).
* :func:`root_modules`: jhlab's own modules for the root cell (``images/kmod``), built
  against Debian's headers (:mod:`.modules`).

Both are built on first use by :class:`harness.images.ImageBuilder` (``jhlab images
build``, a lab's boot) and cached by content hash with a lock per artefact, like the
other images::

    images/linux-source_<version>/                  Debian's source, unpacked once
    images/linux-build-config_<release>_<version>/  Debian's .config and Module.symvers
    images/kernel-<package>_<version>+kvm-<key>/    root kernel (vmlinuz, config, modules)
    images/linux-cell-kernel-<key>/                 guest bzImage, config
    images/linux-cell-rootfs-<key>.cpio             guest initramfs
    images/linux-headers_<release>_<version>/       Debian's headers (flavour, common, kbuild)
    images/root-modules-<key>/                      jhlab's root-cell modules (<name>.ko)
    images/kbuild-logs/<artefact>.log               the last build log of each artefact

Each build shows its phase and elapsed time while it runs; a failure names the phase and
shows the telling lines of the log and where the full log is.
"""

from __future__ import annotations

from .kconfig import Fragment
from .linux_cell import READY_LINE, LinuxCellImages, linux_cell_images
from .modules import root_modules
from .process import KernelBuildError
from .root_kvm import root_kernel
from .tree import KernelConfigError

__all__ = [
    "READY_LINE",
    "Fragment",
    "KernelBuildError",
    "KernelConfigError",
    "LinuxCellImages",
    "linux_cell_images",
    "root_kernel",
    "root_modules",
]
