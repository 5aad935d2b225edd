"""Every config source in the repository round-trips byte for byte, and decompiles back."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config_vectors import CONFIGS_DIR, VECTORS

from harness.hvmodel.config import (
    CellConfig,
    SystemConfig,
    compile_source,
    decompile,
    load_source,
    parse,
)

SOURCES = sorted(CONFIGS_DIR.glob("*.toml"))


def test_all_shipped_configs_are_sources() -> None:
    """harness/configs holds the default lab and every demo cell of the reference."""
    assert {p.stem for p in SOURCES} >= set(VECTORS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_source_round_trip(path: Path) -> None:
    """compile -> bytes -> parse -> bytes is the identity, and parse gives the same object."""
    config = load_source(path)
    data = config.to_bytes()
    assert len(data) == config.size
    again = parse(data, path.name)
    assert again == config
    assert again.to_bytes() == data


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_decompile_round_trip(path: Path) -> None:
    """decompile(config) compiles back to the same bytes."""
    config = load_source(path)
    text = decompile(config, path.name)
    assert compile_source(text, "decompiled.toml").to_bytes() == config.to_bytes()


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_decompile_vectors(name: str) -> None:
    """The independently built vectors survive decompile + compile unchanged."""
    data = VECTORS[name][0]()
    assert compile_source(decompile(parse(data))).to_bytes() == data


def test_decompile_keeps_odd_bytes() -> None:
    """Raw leftovers (name padding, unions, reserved bits, odd signatures) survive."""
    from dataclasses import replace

    from harness.hvmodel.config import IommuUnit, PciDevice, X86Platform

    system = load_source(CONFIGS_DIR / "qemu-x86.toml")
    assert isinstance(system, SystemConfig)
    units = list(system.iommu_units)
    units[2] = IommuUnit.amd(base=0xFEB80000, size=0x80000, bdf=2, base_cap=0x40, msi_cap=0x54,
                             features=0x1F)
    units[3] = IommuUnit.pvu(base=0x30F80000, size=0x1000, tlb_base=0x36000000, tlb_size=0x40000)
    units[5] = IommuUnit(type=2, base=1, size=2, union=bytes(range(12)))
    root = replace(system.root_cell, name_padding=b"\x01\x02", signature=b"JH\0\x01X",
                   stream_ids=(1, 0xFFFFFFFF), vpci_irq_base=5, msg_reply_timeout=100,
                   pci_devices=(PciDevice(msi_reserved_bits=0x84, msi_maskable=True),))
    odd = replace(system, iommu_units=tuple(units), root_cell=root,
                  x86=X86Platform(padding=3, remainder=b"\xff" * 28, apic_mode=7))
    text = decompile(odd)
    again = compile_source(text)
    assert again.to_bytes() == odd.to_bytes()
    assert again == odd
    cell = CellConfig(name="naïve \"q\"\t", cpu_set=bytes(16), architecture=2)
    assert compile_source(decompile(cell)) == cell
