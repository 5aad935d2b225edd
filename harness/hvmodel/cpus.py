"""CPU sets: the bitmap of a config's ``cpu_set`` (``include/jailhouse/cell-config.h``,
``struct cpu_set`` of ``include/jailhouse/cell.h``) and Linux's text forms of a CPU set.

Linux writes CPU sets two ways, and jhlab reads and writes both where Jailhouse's driver
and Linux do: the list form (``%*pbl``, ``0-2,5``; ``/sys/devices/system/cpu/online``,
``cpuset.cpus``, the driver's ``cpus_assigned_list``) and the mask form (``%*pb``,
``0000002f``; ``cpus_assigned``). Standard library only and free of other jhlab imports
but the error type, so the model, the executor, the config tools and the host-side
checks share one implementation.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import ConfigError

__all__ = ["cpu_set_from", "cpus_from_bitmap", "format_cpu_list", "format_cpu_mask", "parse_cpu_list"]


def cpus_from_bitmap(bitmap: bytes) -> frozenset[int]:
    """CPU numbers of a config ``cpu_set``: bit n of the little-endian bytes is CPU n."""
    value = int.from_bytes(bitmap, "little")
    found = []
    while value:
        low = value & -value
        found.append(low.bit_length() - 1)
        value ^= low
    return frozenset(found)


def cpu_set_from(cpus: Iterable[int], size: int = 8) -> bytes:
    """The config ``cpu_set`` of ``size`` bytes holding ``cpus``.

    :raise ConfigError: when a CPU number is negative or does not fit
    """
    bits = 0
    for cpu in cpus:
        if not isinstance(cpu, int) or cpu < 0 or cpu >= size * 8:
            raise ConfigError(
                f"CPU {cpu!r} does not fit a {size}-byte CPU set", field="CellConfig.cpu_set"
            )
        bits |= 1 << cpu
    return bits.to_bytes(size, "little")


def parse_cpu_list(text: str) -> frozenset[int]:
    """The CPUs of Linux's list form (``0-2,5``; surrounding white space and empty items
    are allowed, as sysfs ends its files with a newline and prints nothing for no CPU).

    :raise ValueError: naming the text, when an item is not ``N`` or ``N-M`` with N <= M
    """
    cpus: set[int] = set()
    for item in filter(None, (part.strip() for part in text.strip().split(","))):
        first, dash, last = item.partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise ValueError(f"CPU list {text!r}: {item!r} is not a CPU or a range N-M") from None
        if low < 0 or high < low:
            raise ValueError(f"CPU list {text!r}: {item!r} is not a range of CPU numbers")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Linux ``%*pbl``: ranges such as ``0-2,5`` (empty for no CPU)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    index = 0
    while index < len(ordered):
        start = end = ordered[index]
        while index + 1 < len(ordered) and ordered[index + 1] == end + 1:
            index += 1
            end = ordered[index]
        parts.append(str(start) if start == end else f"{start}-{end}")
        index += 1
    return ",".join(parts)


def format_cpu_mask(cpus: Iterable[int], nbits: int) -> str:
    """Linux ``%*pb``: hex, 32-bit chunks separated by commas, the first chunk padded to
    the digits its bits need (``nbits`` = ``nr_cpu_ids``)."""
    value = 0
    for cpu in cpus:
        value |= 1 << cpu
    nbits = max(nbits, 1)
    chunks: list[str] = []
    first_bits = nbits % 32 or 32
    top = ((nbits + 31) // 32 - 1) * 32
    bits = first_bits
    for shift in range(top, -1, -32):
        chunk = (value >> shift) & ((1 << bits) - 1)
        chunks.append(f"{chunk:0{(bits + 3) // 4}x}")
        bits = 32
    return ",".join(chunks)
