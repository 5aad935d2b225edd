"""Private lab networks: a network namespace of the harness's own, holding the host end
of a lab NIC (a tap device QEMU uses through an inherited file descriptor).

The namespace is anonymous (``unshare``), not a named one under ``/var/run/netns``: it
lives as long as the harness or QEMU holds it, so nothing is left behind even when the
harness is killed.  Everything that must happen inside it (netlink through pyroute2,
opening the tap, packet sockets) runs on one worker thread that entered the namespace;
sockets and file descriptors made there keep working from any thread.

Needs CAP_NET_ADMIN and CAP_SYS_ADMIN (root), and ``/dev/net/tun``.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from pyroute2 import IPRoute

from harness.errors import MachineError

LOG = logging.getLogger(__name__)
T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
# <linux/if_tun.h>: TUNSETIFF = _IOW('T', 202, int); flags of struct ifreq
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_ETH_P_ALL = 0x0003
_ICMP_ECHO_REPLY = 0
_ICMP_ECHO_REQUEST = 8


class NetworkError(MachineError):
    """A private lab network could not be set up."""


class PrivateNetwork:
    """An anonymous network namespace with tap devices for lab NICs.

    Lifecycle: construct (the namespace is created) → :meth:`tap` per NIC → use
    :meth:`packet_socket` for the host end → :meth:`close`.

    :param name: used in thread names and errors
    """

    def __init__(self, name: str = "lab") -> None:
        self.name = name
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._serve, name=f"netns-{name}", daemon=True)
        self._thread.start()
        try:
            self._ready.result(timeout=10)
        except OSError as exc:
            raise NetworkError(f"cannot create a network namespace for lab {name}: "
                               f"{exc.strerror} (needs root)") from exc

    def _serve(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(_CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            self._ready.set_exception(OSError(err, os.strerror(err)))
            return
        self._ready.set_result(None)
        while (job := self._jobs.get()) is not None:
            func, future = job
            try:
                future.set_result(func())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

    def run(self, func: Callable[[], T], timeout: float = 30.0) -> T:
        """Run ``func`` inside the namespace and return its result."""
        future: Future[T] = Future()
        self._jobs.put((func, future))
        return future.result(timeout=timeout)

    def tap(self, ifname: str, address: str | None = None) -> int:
        """Create tap ``ifname`` in the namespace, bring it up (with ``address``, e.g.
        ``"192.168.77.1/24"``), and return a file descriptor attached to it for QEMU's
        ``-netdev tap,fd=N``.  The tap outlives that descriptor: :meth:`attach` gives
        a new one for the next QEMU (after a snapshot restore)."""

        def create() -> None:
            with IPRoute() as ipr:
                ipr.link("add", ifname=ifname, kind="tuntap", mode="tap")
                index = ipr.link_lookup(ifname=ifname)[0]
                ipr.link("set", index=index, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                if address:
                    addr, prefix = address.split("/")
                    ipr.addr("add", index=index, address=addr, prefixlen=int(prefix))

        try:
            self.run(create)
        except OSError as exc:
            raise NetworkError(f"lab {self.name}: cannot create tap {ifname}: {exc}") from exc
        return self.attach(ifname)

    def attach(self, ifname: str) -> int:
        """A new inheritable file descriptor attached to tap ``ifname``."""

        def open_tap() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR)
            try:
                request = struct.pack("16sH22x", ifname.encode(), _IFF_TAP | _IFF_NO_PI)
                fcntl.ioctl(fd, _TUNSETIFF, request)
            except OSError:
                os.close(fd)
                raise
            return fd

        try:
            fd = self.run(open_tap)
        except OSError as exc:
            raise NetworkError(f"lab {self.name}: cannot attach to tap {ifname}: {exc}") from exc
        os.set_inheritable(fd, True)
        return fd

    def packet_socket(self, ifname: str) -> socket.socket:
        """A raw packet socket bound to ``ifname`` in the namespace (the host end)."""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
            sock.bind((ifname, 0))
            return sock

        return self.run(make)

    def ping(self, address: str, *, count: int = 3, interval: float = 0.2,
             timeout: float = 5.0) -> list[float | None]:
        """ICMP echo requests from the namespace to ``address`` (what ``ping`` does,
        with a raw socket made inside the namespace).

        :param count: requests, one at a time
        :param interval: seconds between a reply (or its timeout) and the next request
        :param timeout: seconds each request waits for its reply
        :return: per request, the round-trip time in seconds, or None when no reply came
        """
        sock = self.run(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
        ident = os.getpid() & 0xFFFF
        times: list[float | None] = []
        try:
            for sequence in range(count):
                if sequence:
                    time.sleep(interval)
                payload = b"jhlab-ping" + bytes(46)
                header = struct.pack("!BBHHH", _ICMP_ECHO_REQUEST, 0, 0, ident, sequence)
                packet = struct.pack("!BBHHH", _ICMP_ECHO_REQUEST, 0, _checksum(header + payload),
                                     ident, sequence) + payload
                sent = time.monotonic()
                try:
                    sock.sendto(packet, (address, 0))
                except OSError as exc:  # no route, no neighbour: this request is lost
                    LOG.debug("ping %s: %s", address, exc)
                    times.append(None)
                    continue
                times.append(_await_reply(sock, ident, sequence, sent, timeout))
        finally:
            sock.close()
        return times

    def counters(self, ifname: str) -> dict[str, int]:
        """The interface's rx/tx packet and byte counters."""

        def read() -> dict[str, int]:
            with IPRoute() as ipr:
                link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
                stats = link.get_attr("IFLA_STATS64")
                return {key: int(stats[key]) for key in
                        ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes")}

        return self.run(read)

    def close(self) -> None:
        """Leave the namespace; it vanishes once no QEMU holds a tap of it."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=5)


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _await_reply(sock: socket.socket, ident: int, sequence: int, sent: float,
                 timeout: float) -> float | None:
    """Seconds until the echo reply ``(ident, sequence)`` came, None after ``timeout``."""
    deadline = sent + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            data = sock.recv(2048)
        except TimeoutError:
            return None
        arrived = time.monotonic()
        start = (data[0] & 0x0F) * 4  # after the IP header
        kind, _code, _sum, got_ident, got_sequence = struct.unpack_from("!BBHHH", data, start)
        if kind == _ICMP_ECHO_REPLY and (got_ident, got_sequence) == (ident, sequence):
            return arrived - sent
    return None
