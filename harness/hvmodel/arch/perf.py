"""Kernel tracepoints through ``perf_event_open(2)``, for one thread: counters with a
filter, and samples of the raw event in a ring buffer. No Jailhouse counterpart: the
executor uses it to see what KVM does in the kernel for a cell CPU (exits that never
reach user space), see :mod:`~harness.hvmodel.arch.exitstats`.

* :func:`tracefs` finds tracefs; :func:`tracepoint` reads an event's id and
  field layout from it (``events/<system>/<event>/{id,format}``).
* :class:`TracepointCounter`: how often the event fired in a thread, with an ftrace
  filter (``exit_reason == 114``) applied in the kernel; reading it is one ``read(2)``.
* :class:`TracepointSampler`: every matching event's raw record (the fields as the
  ``format`` file lays them out) in a small ring buffer, read without a system call.

Both exist from their opening to :meth:`close`, and count or sample only the thread they
were opened for (``pid`` 0: the calling thread). They need ``CAP_PERFMON`` (root) and a
kernel with ``CONFIG_PERF_EVENTS`` and ``CONFIG_EVENT_TRACING`` (Debian's has both); the
cost is the event's handler in the kernel, only when the event fires in that thread.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import mmap
import os
import struct
from collections.abc import Iterator
from typing import Final

from ..errors import Errno, HvError
from .uapi import io, iow

__all__ = [
    "PerfError",
    "Tracepoint",
    "TracepointCounter",
    "TracepointSampler",
    "decode_records",
    "tracefs",
    "tracepoint",
]

#: x86-64 system call number of perf_event_open(2)
SYS_PERF_EVENT_OPEN: Final = 298
PERF_TYPE_TRACEPOINT: Final = 2
PERF_SAMPLE_RAW: Final = 1 << 10
PERF_FLAG_FD_CLOEXEC: Final = 1 << 3
PERF_RECORD_LOST: Final = 2
PERF_RECORD_SAMPLE: Final = 9
#: ``struct perf_event_attr`` up to ``config1`` (PERF_ATTR_SIZE_VER0): type, size, config,
#: sample_period, sample_type, read_format, flag bits, wakeup_events, bp_type, config1
_ATTR: Final = struct.Struct("<IIQQQQQIIQ")
PERF_EVENT_IOC_ENABLE: Final = io(ord("$"), 0)
PERF_EVENT_IOC_SET_FILTER: Final = iow(ord("$"), 6, 8)
#: ``struct perf_event_mmap_page``: data_head, data_tail, data_offset, data_size
_MMAP_HEAD: Final = 1024
_MMAP_TAIL: Final = 1032
_MMAP_DATA_OFFSET: Final = 1040
_MMAP_DATA_SIZE: Final = 1048
_HEADER: Final = struct.Struct("<IHH")
#: where tracefs is mounted
TRACEFS_PATHS: Final = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

_libc: ctypes.CDLL | None = None


class PerfError(HvError):
    """A tracepoint could not be found, opened or read.

    :param what: the tracepoint or operation
    :param os_errno: the kernel's errno (0 when detected here)
    :param detail: what to do about it
    """

    def __init__(self, what: str, os_errno: int, detail: str = "") -> None:
        self.what = what
        self.os_errno = os_errno
        text = f"{what}: {os.strerror(os_errno)}" if os_errno else what
        super().__init__(Errno.ENODEV if os_errno in (0, errno.ENOENT) else Errno.EIO,
                         f"{text}; {detail}" if detail else text)

    def __str__(self) -> str:
        return self.message


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def tracefs() -> str:
    """The mounted tracefs folder (one with ``events/``), at one of :data:`TRACEFS_PATHS`.

    :raise PerfError: ``ENODEV`` when none is mounted (the lab's init mounts it; this
        module never changes the mount table)
    """
    for path in TRACEFS_PATHS:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    raise PerfError("tracefs", errno.ENOENT, f"not mounted (mount -t tracefs nodev {TRACEFS_PATHS[0]})")


@dataclasses.dataclass(frozen=True)
class Tracepoint:
    """A tracepoint's id and the layout of its raw record (from its ``format`` file).

    :param name: ``system:event``
    :param id: the id perf_event_open takes as ``config``
    :param fields: field name -> (offset, size, signed) in the raw record
    """

    name: str
    id: int
    fields: dict[str, tuple[int, int, bool]]

    def field(self, raw: bytes, name: str) -> int:
        """The value of field ``name`` in a raw record of this event."""
        offset, size, signed = self.fields[name]
        return int.from_bytes(raw[offset : offset + size], "little", signed=signed)


def parse_format(name: str, text: str) -> Tracepoint:
    """A :class:`Tracepoint` from the text of its ``format`` file."""
    event_id = -1
    fields: dict[str, tuple[int, int, bool]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("ID:"):
            event_id = int(line.split(":", 1)[1])
        elif line.startswith("field:"):
            parts = dict(
                part.strip().split(":", 1) for part in line.rstrip(";").split(";") if ":" in part
            )
            declaration = parts["field"].strip()
            field_name = declaration.split()[-1].split("[")[0]
            fields[field_name] = (int(parts["offset"]), int(parts["size"]), parts.get("signed") == "1")
    if event_id < 0:
        raise PerfError(f"tracepoint {name}", 0, "its format has no ID line")
    return Tracepoint(name, event_id, fields)


def tracepoint(name: str, root: str | None = None) -> Tracepoint:
    """The tracepoint ``system:event`` (e.g. ``kvm:kvm_exit``).

    :param root: the tracefs folder (default: :func:`tracefs`)
    :raise PerfError: when tracefs or the event is missing
    """
    system, event = name.split(":", 1)
    path = os.path.join(root or tracefs(), "events", system, event, "format")
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return parse_format(name, handle.read())
    except OSError as exc:
        raise PerfError(f"tracepoint {name}", exc.errno or 0,
                        f"{path} unreadable (module not loaded?)") from exc


def _open(point: Tracepoint, sample: bool, pid: int) -> int:
    """perf_event_open for ``point`` in thread ``pid`` (0: the caller), any CPU, enabled."""
    attr = _ATTR.pack(PERF_TYPE_TRACEPOINT, _ATTR.size, point.id, 1 if sample else 0,
                      PERF_SAMPLE_RAW if sample else 0, 0, 0, 0, 0, 0)
    buffer = ctypes.create_string_buffer(attr, len(attr))
    long = ctypes.c_long
    fd = int(_c().syscall(long(SYS_PERF_EVENT_OPEN), buffer, long(pid), long(-1), long(-1),
                          long(PERF_FLAG_FD_CLOEXEC)))
    if fd < 0:
        code = ctypes.get_errno()
        denied = code in (errno.EACCES, errno.EPERM)
        hint = "needs root (CAP_PERFMON) and CONFIG_PERF_EVENTS" if denied else ""
        raise PerfError(f"perf_event_open {point.name}", code, hint)
    return fd


def _set_filter(fd: int, point: Tracepoint, text: str) -> None:
    # A pointer to the string (fcntl.ioctl would cap the buffer at 1024 bytes).
    string = ctypes.create_string_buffer(text.encode("ascii"))
    if _c().ioctl(fd, ctypes.c_ulong(PERF_EVENT_IOC_SET_FILTER), string) != 0:
        code = ctypes.get_errno()
        raise PerfError(f"filter of {point.name}", code, f"refused: {text!r}")


class TracepointCounter:
    """How often ``point`` fired in one thread (with ``filter`` true), since opening.

    :param point: the tracepoint
    :param filter: an ftrace filter on its fields (``""``: every event)
    :param pid: the thread (0: the calling one)
    :raise PerfError: when it cannot be opened or the filter is refused
    """

    def __init__(self, point: Tracepoint, filter: str = "", pid: int = 0) -> None:
        self.point = point
        self.filter = filter
        self.fd = _open(point, False, pid)
        try:
            if filter:
                _set_filter(self.fd, point, filter)
        except BaseException:
            self.close()
            raise

    def read(self) -> int:
        """The count (0 after :meth:`close`)."""
        if self.fd < 0:
            return 0
        return int.from_bytes(os.read(self.fd, 8), "little")

    def close(self) -> None:
        """Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TracepointSampler:
    """The raw records of ``point`` in one thread (``filter`` true), in a ring buffer of
    ``pages`` pages (a power of two); :meth:`drain` takes what arrived since the last
    call. Records that found the buffer full are counted in :attr:`lost`.

    Not thread-safe: one reader at a time.

    :raise PerfError: when it cannot be opened, mapped or filtered
    """

    def __init__(self, point: Tracepoint, filter: str = "", pid: int = 0, pages: int = 1) -> None:
        if pages < 1 or pages & (pages - 1):
            raise ValueError(f"ring buffer of {pages} pages: must be a power of two")
        self.point = point
        self.filter = filter
        self.lost = 0
        self.fd = _open(point, True, pid)
        self._map: mmap.mmap | None = None
        try:
            if filter:
                _set_filter(self.fd, point, filter)
            self._map = mmap.mmap(self.fd, (1 + pages) * mmap.PAGESIZE, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            self.close()
            raise PerfError(f"ring buffer of {point.name}", exc.errno or 0) from exc
        except BaseException:
            self.close()
            raise

    def drain(self) -> list[bytes]:
        """The raw records written since the last call, oldest first."""
        ring = self._map
        if ring is None:
            return []
        head = int.from_bytes(ring[_MMAP_HEAD : _MMAP_HEAD + 8], "little")
        tail = int.from_bytes(ring[_MMAP_TAIL : _MMAP_TAIL + 8], "little")
        offset = int.from_bytes(ring[_MMAP_DATA_OFFSET : _MMAP_DATA_OFFSET + 8], "little")
        size = int.from_bytes(ring[_MMAP_DATA_SIZE : _MMAP_DATA_SIZE + 8], "little")
        if head == tail or not size:
            return []
        start, end = offset + tail % size, offset + head % size
        if head - tail >= size or end <= start:  # wrapped: two pieces
            data = ring[start : offset + size] + ring[offset:end]
        else:
            data = ring[start:end]
        records, lost = decode_records(data)
        self.lost += lost
        ring[_MMAP_TAIL : _MMAP_TAIL + 8] = head.to_bytes(8, "little")
        return records

    def close(self) -> None:
        """Idempotent."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def decode_records(data: bytes) -> tuple[list[bytes], int]:
    """The raw payloads of the PERF_RECORD_SAMPLE records in ``data`` (sample_type RAW
    only), and the number of events PERF_RECORD_LOST records say were lost."""
    records: list[bytes] = []
    lost = 0
    for kind, body in _records(data):
        if kind == PERF_RECORD_SAMPLE and len(body) >= 4:
            raw_size = int.from_bytes(body[:4], "little")
            records.append(bytes(body[4 : 4 + raw_size]))
        elif kind == PERF_RECORD_LOST and len(body) >= 16:
            lost += int.from_bytes(body[8:16], "little")
    return records, lost


def _records(data: bytes) -> Iterator[tuple[int, bytes]]:
    position = 0
    while position + _HEADER.size <= len(data):
        kind, _misc, size = _HEADER.unpack_from(data, position)
        if size < _HEADER.size or position + size > len(data):
            return
        yield kind, data[position + _HEADER.size : position + size]
        position += size
