"""The executor's port backends (:mod:`harness.hvmodel.arch.portio`): the native stubs'
machine code, the tear-free counter read, ``/dev/port`` emulated with a plain file, and
the backend choice. Native ``in``/``out`` themselves need ``ioperm``, which the lab grants
(test_suites/e2e/test_executor.py reads the real PM timer with them)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from harness.hvmodel.arch import portio
from harness.hvmodel.arch.kvm import KvmError


def test_stubs_are_small_and_return() -> None:
    """Each stub fits its 16-byte slot and ends in RET; IN stubs zero-extend into EAX."""
    assert set(portio._STUBS) == {"in1", "in2", "in4", "out1", "out2", "out4"}
    for name, code in portio._STUBS.items():
        assert len(code) <= portio._STUB_SLOT, name
        assert code[:2] == b"\x89\xfa", name  # mov edx, edi: the port
        assert code[-1] == 0xC3, name
    assert b"\xec" in portio._STUBS["in1"] and b"\x0f\xb6\xc0" in portio._STUBS["in1"]
    assert b"\x66\xed" in portio._STUBS["in2"] and b"\x0f\xb7\xc0" in portio._STUBS["in2"]
    assert portio._STUBS["in4"] == bytes.fromhex("89faedc3")
    assert b"\x89\xf0\xee" in portio._STUBS["out1"]
    assert b"\x89\xf0\x66\xef" in portio._STUBS["out2"]
    assert b"\x89\xf0\xef" in portio._STUBS["out4"]


class Counter24:
    """A PM-timer-like counter read byte by byte that advances ``step`` ticks per byte
    read, so multi-byte reads through ``/dev/port`` can tear."""

    def __init__(self, start: int, step: int) -> None:
        self.value = start
        self.step = step
        self.byte_reads = 0

    def read_bytes(self, port: int, size: int) -> bytes:
        out = bytearray()
        for index in range(size):
            out.append((self.value >> (8 * index)) & 0xFF)
            self.value = (self.value + self.step) & 0xFFFFFFFF
            self.byte_reads += 1
        return bytes(out)


def test_naive_byte_reads_tear_at_a_carry() -> None:
    """The problem: low byte 0xff read, carry, then the new upper bytes: 0x1ff instead of
    about 0x100."""
    counter = Counter24(0x0000FF, 1)
    torn = int.from_bytes(counter.read_bytes(0x608, 4), "little")
    assert torn == 0x1FF


def test_stable_read_gives_a_consistent_value_across_a_carry() -> None:
    """Two readings whose upper bytes agree: the second is consistent."""
    counter = Counter24(0x00FFFE, 1)
    value = portio.stable_read(counter.read_bytes, 0x608, 4)
    # Consistent: a value the counter had during the operation (a torn read is not).
    assert 0x00FFFE <= value <= counter.value


def test_stable_read_on_many_carries() -> None:
    """From every low-byte phase, the value lies within the read window."""
    for start in range(0x1F0, 0x210):
        counter = Counter24(start << 8 | 0xF8, 3)
        before = counter.value
        value = portio.stable_read(counter.read_bytes, 0x608, 4)
        assert before <= value <= counter.value, (hex(start), hex(value))


def test_stable_read_of_one_byte_reads_once() -> None:
    """A byte cannot tear: one read."""
    counter = Counter24(0x42, 1)
    assert portio.stable_read(counter.read_bytes, 0x608, 1) == 0x42
    assert counter.byte_reads == 1


def test_stable_read_gives_up_after_the_attempts() -> None:
    """A counter whose upper bytes change at every read still returns (bounded)."""
    counter = Counter24(0, 0x100)
    portio.stable_read(counter.read_bytes, 0x608, 4)
    assert counter.byte_reads == 4 * (portio.STABLE_READ_ATTEMPTS + 1)


@pytest.fixture
def fake_devport(tmp_path: Path) -> Path:
    """A 64 KiB file standing in for /dev/port (offset = port)."""
    path = tmp_path / "port"
    data = bytearray(0x10000)
    data[0x2FD] = 0x60
    data[0x608:0x60C] = (0x00ABCDEF).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def test_devport_backend_reads_and_writes_little_endian(fake_devport: Path) -> None:
    """Wide accesses are consecutive bytes, lowest port first."""
    ports = portio.DevPortPorts(counters=range(0x608, 0x60C), path=str(fake_devport))
    try:
        assert ports.mode == "/dev/port"
        assert ports.read(0x2FD, 1) == 0x60
        assert ports.read(0x608, 4) == 0x00ABCDEF
        ports.write(0x2F8, 2, 0x4241)
        ports.write(0x2FA, 1, 0x1FF)  # truncated to the access size
    finally:
        ports.close()
        ports.close()  # idempotent
    data = fake_devport.read_bytes()
    assert data[0x2F8:0x2FB] == b"AB\xff"


def test_devport_backend_checks_access_shape(fake_devport: Path) -> None:
    """Only 1/2/4-byte accesses inside the port space."""
    ports = portio.DevPortPorts(path=str(fake_devport))
    try:
        with pytest.raises(ValueError, match="size 3"):
            ports.read(0x60, 3)
        with pytest.raises(ValueError, match="outside"):
            ports.write(0xFFFF, 2, 0)
    finally:
        ports.close()


def test_open_ports_chooses_a_usable_backend(fake_devport: Path) -> None:
    """auto: native where ioperm works, else /dev/port (which of the two this host gives
    is asked of the kernel first; the lab, where ioperm works, checks the native choice
    too: integration/test_io_bitmap_in_lab.py); devport on request."""
    chosen = portio.open_ports(range(0x608, 0x60C), devport=str(fake_devport))
    try:
        assert chosen.mode == ("native" if _ioperm_works() else "/dev/port")
        if chosen.mode == "/dev/port":
            assert chosen.read(0x2FD, 1) == 0x60  # the file given, not the real /dev/port
    finally:
        chosen.close()
    forced = portio.open_ports(mode="devport", devport=str(fake_devport))
    try:
        assert forced.mode == "/dev/port"
        assert forced.read(0x2FD, 1) == 0x60
    finally:
        forced.close()
    with pytest.raises(ValueError, match="port backend"):
        portio.open_ports(mode="magic")


def _ioperm_works() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.ioperm(0x80, 1, 0) == 0)


def test_native_backend_builds_its_stub_page() -> None:
    """The stub page maps and turns executable; without ioperm, a forced native backend
    is a clear error instead of a crash."""
    native = portio.NativePorts()
    native.close()
    native.close()
    if _ioperm_works():
        portio.open_ports(mode="native").close()
    else:
        with pytest.raises(KvmError, match="ioperm"):
            portio.open_ports(mode="native")
