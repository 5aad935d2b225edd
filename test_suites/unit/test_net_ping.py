"""ICMP echo from a lab's private network namespace (:meth:`PrivateNetwork.ping`): the
replies of the namespace's own addresses are timed, a request that cannot go out or
gets no answer is None. Needs root (namespaces, raw sockets)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from harness.net import PrivateNetwork, _checksum

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture
def network() -> Iterator[PrivateNetwork]:
    net = PrivateNetwork("ping-test")
    fd = net.tap("ping0", "192.168.66.1/24")
    try:
        yield net
    finally:
        os.close(fd)
        net.close()


def test_own_addresses_answer(network: PrivateNetwork) -> None:
    times = network.ping("192.168.66.1", count=3, interval=0.01)
    assert len(times) == 3
    assert all(t is not None and 0 < t < 5 for t in times)
    assert network.ping("127.0.0.1", count=1)[0] is not None


def test_silence_and_no_route_are_none(network: PrivateNetwork) -> None:
    """A neighbour that never answers (nothing behind the tap) and an address with no
    route: both requests are lost, after at most the timeout."""
    assert network.ping("192.168.66.2", count=1, timeout=0.3) == [None]
    assert network.ping("10.254.254.254", count=1, timeout=0.3) == [None]


def test_checksum_is_rfc_1071() -> None:
    """RFC 1071's example words sum to 0xddf2; its checksum is the complement."""
    assert _checksum(bytes.fromhex("0001f203f4f5f6f7")) == ~0xDDF2 & 0xFFFF
    assert _checksum(b"\x01") == ~0x0100 & 0xFFFF  # an odd byte is padded with zero
