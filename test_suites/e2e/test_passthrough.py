"""PCI passthrough end to end: cells drive the lab's own devices through VFIO on the lab's
IOMMU, every step checked against the oracle (:class:`~harness.checked.CheckedJailhouse`).

* QEMU's edu (01:01.0) in jhlab's ``edu`` cell: the factorial through MMIO, interrupts
  as MSI, a buffer moved by DMA into cell RAM, which the host reads back over QMP.
* The e1000e (00:02.0, Jailhouse's own qemu-x86 BARs) in a lab whose NIC is a tap in a
  private network namespace: the ``e1000e`` inmate exchanges ARP frames with the host
  end, counted on both sides; a rogue cell that writes a config register the hypervisor
  denies is parked with Jailhouse's FATAL line, and after destroy the device works again
  in the root (the daemon runs with ``--rebind-pci``; Jailhouse would leave it unbound).

While a cell owns a device it is bound to ``vfio-pci`` in the root (the checked driver
compares the bindings after every step).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.checked import CheckedJailhouse, Violation
from harness.hvmodel.config import CellConfig, load_source
from harness.lab import Lab
from harness.labfile import TAP_HOST_END
from harness.pytest_plugin.common import tap_lab
from harness.recipes import CONFIGS, find_recipes

pytestmark = [pytest.mark.lab, pytest.mark.kvm, pytest.mark.slow]

CELLS = find_recipes().cells
#: the edu and e1000e cells' RAM (their cell configs' phys_start of virt 0)
CELL_RAM = 0x3EE00000
EDU = "0000:01:01.0"
NIC = "0000:00:02.0"
CELL_END = "192.168.77.2"
ROOT_END = "192.168.77.3"
ARP_ROUNDS = 3


def test_edu_computes_interrupts_and_moves_data(jailhouse: CheckedJailhouse, inmates: Path,
                                                lab: Lab) -> None:
    """edu in a cell: ID and liveness through its BAR (mapped from VFIO), the factorial
    and a raised interrupt each answered by an MSI in the cell, 2 KiB moved by the
    device's DMA engine to cell RAM (its IOMMU domain), where QMP finds the pattern."""
    jh = jailhouse
    jh.enable(CONFIGS / "qemu-x86.toml")
    created = jh.cell_create(CELLS / "edu.toml")
    assert created.view.pci[EDU] == "vfio-pci"
    jh.cell_load("edu", inmates / "edu.bin")
    lab.cell_console.discard()
    jh.cell_start("edu")
    jh.expect_inmate(r"edu: ID register 0x010000ed: ok", timeout=120)
    jh.expect_inmate(r"edu: 10! = 3628800: ok \(MSI, status 0x1\)")
    jh.expect_inmate(r"edu: raised interrupt 0x4000: ok \(MSI\)")
    moved = jh.expect_inmate(r"edu: DMA RAM -> device -> RAM, 2048 bytes to (0x[0-9a-f]+): ok "
                             r"\(MSI, status 0x100\)")
    jh.expect_inmate(r"edu: PASSED")
    data = lab.qmp.read_phys(CELL_RAM + int(moved.group(1), 16), 2048)
    assert data == bytes((i * 7 + 3) & 0xFF for i in range(2048))
    destroyed = jh.cell_destroy("edu")
    assert destroyed.view.pci[EDU] is None  # released, left unbound as Jailhouse does
    jh.disable()


# -- the e1000e on a tap in a private namespace ----------------------------------------------


@pytest.fixture(scope="module")
def nic_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The default lab with its e1000e on a tap whose host end (TAP_HOST_END) lives in the
    lab's private network namespace."""
    with tap_lab(request.config, "nic") as lab:
        yield lab


@pytest.fixture
def nic_jailhouse(nic_lab: Lab) -> Iterator[CheckedJailhouse]:
    """A checked driver on the NIC lab whose daemon gives released devices back to
    their root driver."""
    checked = CheckedJailhouse(nic_lab, "executor", daemon_args=["--rebind-pci"])
    yield checked
    problems = checked.cleanup()
    assert not problems, problems


def nic_cell(name: str) -> CellConfig:
    """jhlab's e1000e cell config under another name."""
    config = load_source(CELLS / "e1000e.toml")
    assert isinstance(config, CellConfig)
    return dataclasses.replace(config, name=name)


def test_e1000e_exchanges_frames_with_the_namespace(nic_jailhouse: CheckedJailhouse,
                                                    inmates: Path, nic_lab: Lab) -> None:
    """The e1000e inmate's ARP requests reach the host end and its replies come back:
    the namespace counts exactly the inmate's frames, the inmate every reply."""
    jh = nic_jailhouse
    network = nic_lab.network
    assert network is not None
    jh.enable(CONFIGS / "qemu-x86.toml")
    created = jh.cell_create(CELLS / "e1000e.toml")
    assert created.view.pci[NIC] == "vfio-pci"
    jh.cell_load("e1000e", inmates / "e1000e.bin",
                 strings=[(f"mode=arp ip={CELL_END} gw={TAP_HOST_END} count={ARP_ROUNDS}", 0x1000)])
    nic_lab.cell_console.discard()
    before = network.counters("lan0")
    jh.cell_start("e1000e")
    jh.expect_inmate(r"e1000e: link is up", timeout=120)
    done = jh.expect_inmate(r"e1000e: (\d+)/(\d+) ARP round trips: PASSED", timeout=120)
    after = network.counters("lan0")
    assert done.groups() == (str(ARP_ROUNDS), str(ARP_ROUNDS))
    assert after["rx_packets"] - before["rx_packets"] == ARP_ROUNDS  # the requests, nothing else
    assert after["tx_packets"] - before["tx_packets"] >= ARP_ROUNDS  # the replies
    jh.cell_destroy("e1000e")
    jh.disable()


def test_a_configured_device_the_machine_lacks(jailhouse: CheckedJailhouse, lab: Lab) -> None:
    """Jailhouse's e1000-demo.cell names a NIC at 00:19.0, which the QEMU machine lacks:
    as on Jailhouse (``pci_cell_init`` adds it without looking, the driver skips it) the
    cell is created with the device announced, nothing is bound to ``vfio-pci``, and the
    cell is destroyed cleanly (every step checked against the oracle)."""
    absent = lab.run("test -e /sys/bus/pci/devices/0000:00:19.0")
    assert absent.status != 0, "the lab has a device at 00:19.0: this test needs it absent"
    jh = jailhouse
    jh.enable(CONFIGS / "qemu-x86.toml")
    created = jh.cell_create(CONFIGS / "e1000-demo.toml")
    assert re.search(r"\n1 +e1000-demo +shut down +", created.view.cell_list), created.view.cell_list
    assert "vfio-pci" not in created.view.pci.values(), created.view.pci
    jh.cell_destroy("e1000-demo")
    jh.disable()


def test_denied_config_write_parks_and_the_root_gets_the_nic_back(
        nic_jailhouse: CheckedJailhouse, inmates: Path, nic_lab: Lab) -> None:
    """A cell writes the vendor ID of its own e1000e: Jailhouse's moderation denies it,
    the FATAL line appears, the CPU is parked and the cell fails. After destroy the NIC
    is the root's again (rebound to e1000e) and carries the root's traffic."""
    jh = nic_jailhouse
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(nic_cell("rogue-nic"))
    jh.cell_load("rogue-nic", inmates / "rogue.bin", strings=[("mode=pci bdf=0x10", 0x1000)])
    failed = jh.cell_start("rogue-nic", effects=[
        Violation("rogue-nic", "pio", 0xCF8, 4, True, 0x80000000 | 0x10 << 8),  # address port
        Violation("rogue-nic", "pio", 0xCFC, 2, True, 0xFFFF),  # vendor ID: denied
    ])
    assert re.search(r"\n1 +rogue-nic +failed +2 +2 ", failed.view.cell_list), failed.view.cell_list
    destroyed = jh.cell_destroy("rogue-nic")
    assert destroyed.view.pci[NIC] == "e1000e"
    jh.disable()

    iface = nic_lab.run(f"ls /sys/bus/pci/devices/{NIC}/net/", check=True).stdout.strip()
    nic_lab.run(f"ip addr add {ROOT_END}/24 dev {iface} && ip link set {iface} up", check=True)
    nic_lab.run(f"for i in $(seq 150); do [ $(cat /sys/class/net/{iface}/carrier) = 1 ] && exit 0; "
                "sleep 0.2; done; exit 1", check=True, timeout=60)
    out = nic_lab.run(f"busybox ping -c 2 -W 5 {TAP_HOST_END}", timeout=60)
    assert out.status == 0, out.output
