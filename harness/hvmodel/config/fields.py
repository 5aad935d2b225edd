"""Range checks shared by the config objects (:mod:`.model`, :mod:`.system`): every field
is checked against its C type, and a failure names ``Class.field``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final, Protocol

from ..errors import ConfigError

__all__ = ["U8", "U16", "U32", "U64", "Packable", "bits_to_set", "check_bytes", "check_tuple",
           "check_uints", "fail", "validate"]

#: widths of the C unsigned types, in bits
U8: Final = 8
U16: Final = 16
U32: Final = 32
U64: Final = 64


def fail(obj: object, name: str, message: str) -> ConfigError:
    return ConfigError(message, field=f"{type(obj).__name__}.{name}")


def check_uints(obj: object, spec: tuple[tuple[str, int], ...]) -> None:
    """Check that each named attribute is an int that fits its C unsigned type."""
    for name, bits in spec:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 0 or value >> bits:
            raise fail(obj, name, f"expected an integer in 0..{(1 << bits) - 1:#x}, got {value!r}")


def validate(
    obj: Packable, spec: tuple[tuple[str, int], ...], words: tuple[str, ...] = ()
) -> None:
    """Range-check every field by packing the struct (fast, in C); explain failures.

    :func:`struct.pack` refuses exactly what does not fit the C types (negative, too large,
    not an integer), so packing is the check; only on failure are the fields inspected one
    by one to name the offending one.
    """
    try:
        obj.to_bytes()
    except (struct.error, TypeError, OverflowError, ValueError):
        check_uints(obj, spec)
        for name in words:
            for word in getattr(obj, name):
                if not isinstance(word, int) or word < 0 or word >> 32:
                    raise fail(obj, name, f"expected u32 words, got {word!r}") from None
        raise ConfigError(
            f"invalid field values in {obj!r}", field=type(obj).__name__
        ) from None


class Packable(Protocol):
    """A config object: it packs itself into its C struct."""

    def to_bytes(self) -> bytes: ...


def check_bytes(obj: object, name: str, size: int) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bytes) or len(value) != size:
        raise fail(obj, name, f"expected {size} bytes, got {value!r}")


def check_tuple(obj: object, name: str, kind: type, length: int | None = None) -> None:
    value = getattr(obj, name)
    if not isinstance(value, tuple):
        raise fail(obj, name, f"expected a tuple of {kind.__name__}, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise fail(obj, name, f"expected exactly {length} entries, got {len(value)}")
    if all(type(item) is kind for item in value):
        return
    for item in value:
        if not isinstance(item, kind):
            raise fail(obj, name, f"expected {kind.__name__} entries, got {item!r}")


def bits_to_set(words: Iterable[int], width: int, base: int = 0) -> frozenset[int]:
    found = []
    for index, word in enumerate(words):
        while word:
            low = word & -word
            found.append(base + index * width + low.bit_length() - 1)
            word ^= low
    return frozenset(found)
