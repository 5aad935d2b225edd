"""The lab network for passthrough tests: the e1000e on a tap whose host end lives in
the lab's private network namespace (pyroute2), reached from the root cell."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest

from harness.lab import Lab
from harness.labfile import TAP_GUEST_END, TAP_HOST_END, load_lab, with_lan_on_tap

pytestmark = [pytest.mark.lab, pytest.mark.slow]



@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_e1000e_reaches_the_host_end_in_the_private_namespace(lab_factory: Callable[..., Lab]) -> None:
    """Frames cross between the root cell's e1000e and the namespace, counted on both
    sides; the namespace is invisible to the host's own network stack."""
    lab = lab_factory(with_lan_on_tap(load_lab("default"), name="tapnet"))
    assert lab.network is not None
    iface = lab.run("ls /sys/bus/pci/devices/0000:00:02.0/net/", check=True).stdout.strip()
    lab.run(f"ip addr add {TAP_GUEST_END}/24 dev {iface} && ip link set {iface} up", check=True)
    # e1000e autonegotiation takes a few seconds under TCG: wait for the carrier
    lab.run(f"for i in $(seq 150); do [ $(cat /sys/class/net/{iface}/carrier) = 1 ] && exit 0; "
            "sleep 0.2; done; exit 1", check=True, timeout=60)
    before = lab.network.counters("lan0")
    out = lab.run(f"busybox ping -c 3 -W 5 {TAP_HOST_END}", timeout=60)
    assert out.status == 0, out.output
    after = lab.network.counters("lan0")
    assert after["rx_packets"] - before["rx_packets"] >= 3
    assert after["tx_packets"] - before["tx_packets"] >= 3

    # A raw frame from the host end arrives at the root cell's e1000e.
    rx = int(lab.run(f"cat /sys/class/net/{iface}/statistics/rx_packets", check=True).stdout)
    sock = lab.network.packet_socket("lan0")
    try:
        frame = b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x88\xb5" + b"jhlab" * 12
        for _ in range(5):
            sock.send(frame)
    finally:
        sock.close()
    rx_after = int(lab.run(f"cat /sys/class/net/{iface}/statistics/rx_packets",
                           check=True).stdout)
    assert rx_after - rx >= 5

    # The host's own namespace has no such interface.
    assert "lan0" not in [name for _, name in socket.if_nameindex()]
