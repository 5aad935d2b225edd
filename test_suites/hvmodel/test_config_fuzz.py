"""Property-based fuzzing of the config parsers: nothing but ConfigError may come out.

Inputs: random bytes, and mutations of the valid vectors (truncation, bit flips, count
edits, byte overwrites, insertions), in both the revision-14 and the revision-12 layouts;
random TOML text for the compiler. Any blob the parser accepts must write back to exactly
the same bytes. The parser's safety net (an unexpected exception turned into ConfigError)
must never fire: every defect needs its own precise error.

Runtime is bounded by the ``config-fuzz`` settings profile (examples per test from
``JHLAB_FUZZ_EXAMPLES``, default 300; about 10 s in all on a shared 2-core machine).
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_config_rev12 import v012_apic_demo, v012_system
from test_config_vectors import VECTORS

from harness.hvmodel.config import compile_source, parse, parse_cell, parse_system
from harness.hvmodel.config.parser import UNEXPECTED
from harness.hvmodel.errors import ConfigError

settings.register_profile(
    "config-fuzz",
    max_examples=int(os.environ.get("JHLAB_FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("config-fuzz")

SEEDS = [build() for build, _size in VECTORS.values()] + [v012_apic_demo(), v012_system()]
# Offsets of u32 count fields: cell descriptor at 0, root cell descriptor of a system at 356
# (revision 14) or 322 (revision 12).
COUNT_OFFSETS = [48 + 4 * i for i in range(8)]


def probe(data: bytes) -> None:
    """Parse with every entry point; accept only success (with exact round trip) or ConfigError."""
    for parser in (parse, parse_cell, parse_system):
        try:
            config = parser(data, "fuzz")
        except ConfigError as exc:
            assert not exc.message.startswith(UNEXPECTED), exc.message
            assert exc.source == "fuzz"
            continue
        if data[:6] not in (b"JHCELL", b"JHSYST"):
            assert config.to_bytes() == data


def _descriptor_base(data: bytes) -> int:
    if data[:5] == b"JHSYS" and data[5:6] != b"T":
        return 356
    if data[:6] == b"JHSYST":
        return 322
    return 0


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid config with one to four mutations applied."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "count", "byte", "insert", "extend"]))
        if kind == "truncate":
            del data[draw(st.integers(0, max(len(data) - 1, 0))):]
        elif kind == "flip" and data:
            index = draw(st.integers(0, len(data) - 1))
            data[index] ^= 1 << draw(st.integers(0, 7))
        elif kind == "count":
            offset = _descriptor_base(bytes(data)) + draw(st.sampled_from(COUNT_OFFSETS))
            if offset + 4 <= len(data):
                value = draw(st.one_of(st.integers(0, 40), st.sampled_from(
                    [0xFFFFFFFF, 0x80000000, 4096, 4097, 1 << 20])))
                struct.pack_into("<I", data, offset, value)
        elif kind == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


@FUZZ
@given(st.binary(max_size=2600))
def test_random_bytes(data: bytes) -> None:
    """Random bytes never crash the parsers."""
    probe(data)


@FUZZ
@given(st.sampled_from([b"JHCLL", b"JHSYS", b"JHCELL", b"JHSYST"]), st.binary(max_size=2600))
def test_random_bytes_with_signature(signature: bytes, rest: bytes) -> None:
    """Random bodies behind every known signature never crash the parsers."""
    probe(signature + rest)


@FUZZ
@given(mutated())
def test_mutated_configs(data: bytes) -> None:
    """Truncated, bit-flipped, count-edited or extended configs give ConfigError or round-trip."""
    probe(data)


@FUZZ
@given(st.text(max_size=300))
def test_random_toml(text: str) -> None:
    """Random text never crashes the TOML compiler."""
    try:
        compile_source(text, "fuzz.toml")
    except ConfigError as exc:
        assert exc.source == "fuzz.toml"


_TOML_KEYS = ["name", "cpus", "flags", "cpu_set_size", "id", "revision", "signature",
              "architecture", "vpci_irq_base"]
_TOML_VALUES = ['"a"', '"1-3"', "[1, 2]", "-1", "0x1_0000_0000_0000_0000", '"1M"', "[]",
                '["READ"]', "true", "1.5", '"hex:00"', '"x86"', "99999999999999999999999", "{}"]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(_TOML_KEYS), st.sampled_from(_TOML_VALUES)),
                max_size=6, unique_by=lambda kv: kv[0]),
       st.lists(st.sampled_from(["memory_regions", "pci_devices", "irqchips", "pci_caps",
                                 "cache_regions", "console"]), max_size=3),
       st.lists(st.tuples(st.sampled_from(["phys_start", "size", "flags", "bdf", "type",
                                           "bar_mask", "pins", "id", "start", "address"]),
                          st.sampled_from(_TOML_VALUES)), max_size=4,
                unique_by=lambda kv: kv[0]))
def test_structured_toml(top: list[tuple[str, str]], tables: list[str],
                         keys: list[tuple[str, str]]) -> None:
    """Well-formed TOML with wrong types and ranges in every place gives only ConfigError."""
    lines = [f"{key} = {value}" for key, value in top]
    for table in tables:
        lines.append(f"[{table}]" if table == "console" else f"[[{table}]]")
        lines += [f"{key} = {value}" for key, value in keys]
    try:
        config = compile_source("\n".join(lines), "fuzz.toml")
    except ConfigError as exc:
        assert exc.source == "fuzz.toml"
    else:
        if not {"signature", "revision", "architecture"} & {key for key, _ in top}:
            assert parse(config.to_bytes()) == config  # header left at its valid defaults
