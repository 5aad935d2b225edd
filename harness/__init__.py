"""jhlab: a QEMU-backed lab for Jailhouse-compatible cells.

The host side (machine, consoles, QMP, images, CLI, pytest plugin) lives here; the
hypervisor model, which also runs inside the lab's root cell, is :mod:`harness.hvmodel`.
"""

__version__ = "0.1.0"
