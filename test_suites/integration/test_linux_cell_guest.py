"""The Linux-cell guest (kernel from ``kernel_configs/linux-cell.config`` and the busybox
initramfs, ``harness.kbuild.linux_cell``) boots in plain QEMU (TCG, no cell) to its ready
line and a working shell on ttyS0, with the e1000e probed; and the root cell carries both
files where ``jailhouse cell linux`` users expect them."""

from __future__ import annotations

import hashlib
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from harness.images import ImageBuilder
from harness.kbuild import READY_LINE, LinuxCellImages, linux_cell_images
from harness.kbuild.kconfig import parse_config
from harness.lab import Lab
from harness.machine import qemu_binary

pytestmark = [pytest.mark.slow]

#: seconds from QEMU's start to the ready line under TCG (about 2 s of guest time on an
#: idle machine; the shared 2-core machine is several times slower)
BOOT_TIMEOUT = 180.0
#: seconds for a shell command to answer, and for QEMU to end after ``reboot -f``
SHELL_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def guest() -> LinuxCellImages:
    """The guest images (built on first use; ``jhlab images build`` builds them too)."""
    _package, version = ImageBuilder(quiet=True).resolve_kernel_package()
    return linux_cell_images(version, quiet=True)


@pytest.fixture
def qemu(guest: LinuxCellImages, tmp_path: Path) -> Iterator[pexpect.spawn[str]]:
    """The guest in plain QEMU (q35, TCG, 2 CPUs, an isolated e1000e), console on stdio."""
    argv = [qemu_binary(), "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2",
            "-m", "256M", "-display", "none", "-monitor", "none", "-serial", "stdio",
            "-no-reboot", "-nic", "user,model=e1000e,restrict=on",
            "-kernel", str(guest.kernel), "-initrd", str(guest.rootfs),
            "-append", "console=ttyS0 panic=-1"]
    log = open(tmp_path / "serial.log", "w")  # noqa: SIM115 (closed at teardown)
    child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace",
                          timeout=BOOT_TIMEOUT, logfile=log)
    try:
        yield child
    finally:
        child.close(force=True)  # ends QEMU if the test did not
        log.close()
        print(f"QEMU: {shlex.join(argv)}\nconsole transcript: {tmp_path / 'serial.log'}")


def test_guest_kernel_config_is_a_small_jailhouse_guest(guest: LinuxCellImages) -> None:
    """The built config has what a Jailhouse x86 guest needs and little else: no modules,
    no ACPI, no VT or serio; the bzImage stays small."""
    config = parse_config(guest.config.read_text())
    for option in ("CONFIG_X86_64", "CONFIG_JAILHOUSE_GUEST", "CONFIG_X86_X2APIC", "CONFIG_PCI_MMCONFIG",
                   "CONFIG_PCI_MSI", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_E1000E", "CONFIG_DEVTMPFS",
                   "CONFIG_BLK_DEV_INITRD"):
        assert config.get(option) == "y", option
    for option in ("CONFIG_MODULES", "CONFIG_ACPI", "CONFIG_VT", "CONFIG_SERIO", "CONFIG_BLOCK"):
        assert config.get(option, "n") == "n", option
    assert guest.kernel.stat().st_size < 4 * 2**20


def test_guest_boots_to_a_shell_in_plain_qemu(qemu: pexpect.spawn[str]) -> None:
    """Kernel and initramfs boot under TCG (no hypervisor) to the ready line; the e1000e
    was probed on the way; the shell on the console runs commands; ``reboot -f`` ends QEMU."""
    started = time.monotonic()
    index = qemu.expect([READY_LINE, r"Kernel panic[^\r\n]*", pexpect.EOF])
    assert index == 0, f"no ready line: {qemu.after!r}\n{str(qemu.before)[-3000:]}"
    print(f"QEMU start to '{READY_LINE}': {time.monotonic() - started:.1f} s")
    boot_log = str(qemu.before)
    assert "e1000e 0000:00:02.0 eth0: Intel(R) PRO/1000 Network Connection" in boot_log
    assert "Run /init as init process" in boot_log
    qemu.sendline("echo shell-$((6*7)); cat /proc/cmdline; ls /dev/console /sys/class/net")
    qemu.expect(r"shell-42\r*\n", timeout=SHELL_TIMEOUT)
    qemu.expect(r"/sys/class/net:\s+eth0\s+lo", timeout=SHELL_TIMEOUT)
    qemu.sendline("reboot -f")
    qemu.expect(pexpect.EOF, timeout=SHELL_TIMEOUT)


@pytest.mark.lab
def test_root_cell_carries_the_guest(lab: Lab) -> None:
    """The root cell has the guest kernel and initramfs at the paths Jailhouse users pass
    to ``jailhouse cell linux`` (the same bytes as built)."""
    images = lab.images
    assert images is not None and images.linux_cell is not None
    for path, source in images.linux_cell.root_cell_files().items():
        sums = lab.run(f"sha256sum /{path}", check=True).stdout.split()
        assert sums[0] == hashlib.sha256(source.read_bytes()).hexdigest(), path
