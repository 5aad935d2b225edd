"""Linux in a non-root cell, end to end: ``jailhouse cell linux`` in the lab's root cell
with Jailhouse's ``linux-x86-demo.cell`` (as its C source builds it, and with
``CONFIG_QEMU_E1000E_ASSIGNMENT``: the e1000e at 00:02.0), the guest kernel and
initramfs the root cell carries (``/usr/share/jailhouse/linux``), on the executor.

The lab's e1000e is a tap whose host end lives in the lab's private network namespace:
the Linux cell, given the NIC, answers the namespace's pings. The cell's console is the
lab's serial 0 (the cell owns 0x3f8; the root kernel is kept off it by its console log
level). Each cell is shut down and destroyed, and the root cell gets its CPUs and the
NIC back (the daemon runs with ``--rebind-pci``) and keeps running.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Iterator

import pytest

from harness.lab import Lab
from harness.labfile import TAP_GUEST_END
from harness.protocol import CommandResult
from harness.pytest_plugin.common import tap_lab

pytestmark = [pytest.mark.lab, pytest.mark.kvm, pytest.mark.slow]

KERNEL = "/usr/share/jailhouse/linux/bzImage"
INITRD = "/usr/share/jailhouse/linux/rootfs.cpio"
NIC = "0000:00:02.0"
#: the guest kernel's gzip payload unpacks beyond Jailhouse's factor 7 (its init_size):
#: the initrd must lie further out, or the command refuses it
FACTOR = 10
#: seconds from ``cell linux`` to the ready line (a boot takes 20-30 s on a loaded machine)
READY_TIMEOUT = 300.0
PINGS = 10
ENV = "JAILHOUSE_ARCH=executor JAILHOUSE_DAEMON_ARGS=--rebind-pci"


@pytest.fixture(scope="module")
def linux_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The default lab with its e1000e on a tap whose host end (TAP_HOST_END) lives in the
    lab's private network namespace; the root kernel's console messages off serial 0."""
    with tap_lab(request.config, "linuxcell") as lab:
        lab.run("echo 1 > /proc/sys/kernel/printk", check=True)
        yield lab


def jailhouse(lab: Lab, args: str, timeout: float = 180.0) -> CommandResult:
    return lab.run(f"{ENV} jailhouse {args}", timeout=timeout)


def ok(result: CommandResult) -> str:
    assert result.status == 0, result.output
    return result.stdout


def cell_linux(lab: Lab, config: str, cmdline: str) -> float:
    """``cell linux`` with ``config`` from /etc/jailhouse; the command's own checks pass
    and it returns 0 once the guest shows it is a Jailhouse guest. Seconds it took."""
    started = time.monotonic()
    ok(jailhouse(lab, f"cell linux /etc/jailhouse/{config} {KERNEL} -i {INITRD} -k {FACTOR} "
                      f"-c {shlex.quote(cmdline)}"))
    return time.monotonic() - started


def list_rows(lab: Lab) -> list[list[str]]:
    return [line.split() for line in ok(jailhouse(lab, "cell list")).splitlines()[1:]]


def driver_of(lab: Lab, bdf: str) -> str:
    return ok(lab.run(f"basename $(readlink /sys/bus/pci/devices/{bdf}/driver)")).strip()


def shut_down_and_destroy(lab: Lab) -> None:
    """Shutdown leaves the cell ``shut down`` with its CPUs; destroy gives them back."""
    ok(jailhouse(lab, "cell shutdown linux-x86-demo"))
    assert list_rows(lab) == [["0", "QEMU-VM", "running", "0-1"],
                              ["1", "linux-x86-demo", "shut", "down", "2-3"]]
    ok(jailhouse(lab, "cell destroy linux-x86-demo"))
    assert list_rows(lab) == [["0", "QEMU-VM", "running", "0-3"]]
    assert ok(lab.run("cat /sys/devices/system/cpu/online")).strip() == "0-3"


def test_linux_cells_boot_answer_pings_and_give_everything_back(linux_lab: Lab) -> None:
    """linux-x86-demo: the guest finds Jailhouse and both its CPUs and reaches its ready
    line; shutdown and destroy give the CPUs back. Then the e1000e variant (a second
    ``cell linux``): the NIC is probed in the cell and carries the namespace's pings to
    it; after destroy the root cell's e1000e driver has it again, and the root runs on."""
    lab = linux_lab
    console = lab.console
    network = lab.network
    assert network is not None
    ok(jailhouse(lab, "enable /etc/jailhouse/qemu-x86.cell"))

    console.discard()
    started = time.monotonic()
    cell_linux(lab, "linux-x86-demo.cell", "console=ttyS0")
    console.expect(r"Hypervisor detected: Jailhouse", timeout=READY_TIMEOUT)
    console.expect(r"smp: Brought up 1 node, 2 CPUs", timeout=READY_TIMEOUT)
    console.expect(r"jhlab-linux-cell ready", timeout=READY_TIMEOUT)
    first_ready = time.monotonic() - started
    assert list_rows(lab) == [["0", "QEMU-VM", "running", "0-1"],
                              ["1", "linux-x86-demo", "running", "2-3"]]
    shut_down_and_destroy(lab)
    assert driver_of(lab, NIC) == "e1000e"

    console.discard()
    started = time.monotonic()
    cell_linux(lab, "linux-x86-demo-e1000e.cell", f"console=ttyS0 jhlab.ip={TAP_GUEST_END}/24")
    assert driver_of(lab, NIC) == "vfio-pci"
    console.expect(r"smp: Brought up 1 node, 2 CPUs", timeout=READY_TIMEOUT)
    console.expect(re.escape(f"e1000e {NIC} eth0: Intel(R) PRO/1000 Network Connection"),
                   timeout=READY_TIMEOUT)
    console.expect(r"jhlab-linux-cell ready", timeout=READY_TIMEOUT)
    second_ready = time.monotonic() - started
    console.expect(r"eth0: NIC Link is Up", timeout=60)
    times = network.ping(TAP_GUEST_END, count=PINGS, timeout=10.0)
    assert None not in times, f"requests without a reply: {times}"
    rtts = sorted(1000 * t for t in times if t is not None)
    print(f"cell linux -> ready: {first_ready:.1f} s, {second_ready:.1f} s; ping ms "
          f"min {rtts[0]:.2f} median {rtts[len(rtts) // 2]:.2f} max {rtts[-1]:.2f}")
    shut_down_and_destroy(lab)
    assert driver_of(lab, NIC) == "e1000e"
    ok(jailhouse(lab, "disable"))


def test_a_kernel_without_jailhouse_guest_is_refused_before_anything_is_created(
        linux_lab: Lab) -> None:
    """The lab's root kernel (Debian's, CONFIG_JAILHOUSE_GUEST off): the command says so
    from the image, exits 1, and no cell exists afterwards."""
    images = linux_lab.images
    assert images is not None
    linux_lab.put(images.kernel.vmlinuz.read_bytes(), "/tmp/root-vmlinuz")
    ok(jailhouse(linux_lab, "enable /etc/jailhouse/qemu-x86.cell"))
    result = jailhouse(linux_lab, f"cell linux /etc/jailhouse/linux-x86-demo.cell /tmp/root-vmlinuz "
                                  f"-i {INITRD} -k {FACTOR} -c console=ttyS0")
    assert result.status == 1
    assert result.stderr.startswith("jailhouse cell linux: /tmp/root-vmlinuz is not a Jailhouse "
                                    "guest: its kernel was built without CONFIG_JAILHOUSE_GUEST")
    assert "nothing was created" in result.stderr
    assert list_rows(linux_lab) == [["0", "QEMU-VM", "running", "0-3"]]
    ok(jailhouse(linux_lab, "disable"))
