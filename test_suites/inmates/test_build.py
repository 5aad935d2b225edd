"""The inmate build: reproducible bytes, Jailhouse's image layout, sizes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from harness.recipes import build_inmates, find_recipes

INMATES_DIR = find_recipes().inmates
DEMOS = find_recipes().demos()

CELL_RAM = 0x100000
STACK_AND_HEAP_RESERVE = 0x10000


def test_build_is_reproducible(tmp_path: Path, build_dir: Path) -> None:
    """A second build in another directory gives the same .bin, .elf and .map bytes."""
    other = tmp_path / "second"
    build_inmates(other)
    for demo in DEMOS:
        for suffix in (".bin", ".elf", ".map"):
            first = (build_dir / f"{demo}{suffix}").read_bytes()
            second = (other / f"{demo}{suffix}").read_bytes()
            assert first == second, f"{demo}{suffix} differs between two builds"


def test_map_files_name_no_build_directory(build_dir: Path) -> None:
    """Map files and debug info carry relative paths only."""
    for demo in DEMOS:
        assert str(build_dir) not in (build_dir / f"{demo}.map").read_text()
        assert str(build_dir).encode() not in (build_dir / f"{demo}.elf").read_bytes()
        assert str(INMATES_DIR).encode() not in (build_dir / f"{demo}.elf").read_bytes()


def _symbols(elf: Path) -> dict[str, int]:
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    symbols = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            symbols[parts[2]] = int(parts[0], 16)
    return symbols


@pytest.mark.parametrize("demo", DEMOS)
def test_image_layout(build_dir: Path, demo: str) -> None:
    """Reset entry at 0 (16-bit lgdt first), 256-byte NUL command line at 0x1000,
    page tables, stack and heap inside the 1 MiB of cell RAM."""
    image = (build_dir / f"{demo}.bin").read_bytes()
    symbols = _symbols(build_dir / f"{demo}.elf")
    assert symbols["__reset_entry"] == 0
    # cs: o32 lgdt m16: the first instruction the CPU runs in real mode
    assert image[:5] == bytes.fromhex("2e 66 0f 01 16")
    assert symbols["cmdline"] == 0x1000
    assert image[0x1000:0x1101] == bytes(0x101)
    assert symbols["pml4"] % 0x1000 == 0
    assert symbols["stack_top"] == symbols["heap_start"]
    assert symbols["stack_top"] >= symbols["__bss_end"] + 0x1000
    assert symbols["heap_start"] + STACK_AND_HEAP_RESERVE <= CELL_RAM
    assert len(image) <= symbols["__bss_start"]


def test_sizes_are_reported(build_dir: Path) -> None:
    """``make sizes`` lists every demo with its byte count."""
    out = build_inmates(build_dir, "sizes")
    for demo in DEMOS:
        size = (build_dir / f"{demo}.bin").stat().st_size
        assert re.search(rf"^{re.escape(demo)}\.bin\s+{size} bytes$", out, re.MULTILINE), out


def test_library_formatter_and_cmdline_on_host(build_dir: Path) -> None:
    """printk's formatter matches the C library's snprintf; the command-line parser
    follows Jailhouse's syntax (images/inmates/tools/host_lib_test.c)."""
    out = build_inmates(build_dir, "host-test")
    assert re.search(r"^\d+ passed, 0 failed$", out, re.MULTILINE), out
