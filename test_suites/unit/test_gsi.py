"""The root's interrupt lines as the executor sees them (:mod:`harness.hvmodel.arch.gsi`):
the ``jhlab_gsi`` interface against its C header, the MADT reading, which IOAPIC pin a
GSI is, and the errors of taking a line without the module.

The module itself runs only in a lab's root cell (``test_suites/e2e/test_probes.py``:
``test_sci``, ``test_jailhouse_ioapic_demo``); its build is in ``test_kbuild.py``.
"""

from __future__ import annotations

import errno
import logging
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from harness.hvmodel.arch import gsi
from harness.recipes import find_recipes

HEADER = find_recipes().kmod / "jhlab_gsi" / "jhlab_gsi.h"

# _IOWR('J', 0x40, 16 bytes) and _IO('J', 0x41), worked out by hand from <asm-generic/ioctl.h>
KNOWN_IOCTLS = {"JHLAB_GSI_CLAIM": 0xC0104A40, "JHLAB_GSI_UNMASK": 0x4A41}


def test_ioctls_match_literal_values() -> None:
    """The request numbers, independent of any header."""
    assert KNOWN_IOCTLS["JHLAB_GSI_CLAIM"] == gsi.JHLAB_GSI_CLAIM
    assert KNOWN_IOCTLS["JHLAB_GSI_UNMASK"] == gsi.JHLAB_GSI_UNMASK
    assert gsi.CLAIM_STRUCT.size == 16


def test_abi_matches_the_modules_header(tmp_path: Path) -> None:
    """Request numbers, the claim's layout and the device name as ``jhlab_gsi.h`` (what
    the module is built with) has them, compiled here."""
    if shutil.which("gcc") is None or not Path("/usr/include/linux/ioctl.h").exists():
        pytest.skip("needs gcc and linux-libc-dev")
    program = tmp_path / "abi.c"
    program.write_text(f"""
#include <stddef.h>
#include <stdio.h>
#include "{HEADER}"
int main(void) {{
    printf("JHLAB_GSI_CLAIM=%lu\\n", (unsigned long)JHLAB_GSI_CLAIM);
    printf("JHLAB_GSI_UNMASK=%lu\\n", (unsigned long)JHLAB_GSI_UNMASK);
    printf("size=%zu\\n", sizeof(struct jhlab_gsi_claim));
    printf("gsi=%zu\\neventfd=%zu\\nirq=%zu\\ntaken=%zu\\n",
           offsetof(struct jhlab_gsi_claim, gsi), offsetof(struct jhlab_gsi_claim, eventfd),
           offsetof(struct jhlab_gsi_claim, irq), offsetof(struct jhlab_gsi_claim, taken));
    printf("device=/dev/%s\\n", JHLAB_GSI_DEVICE);
    return 0;
}}
""")
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(tmp_path / "abi"), str(program)], check=True)
    output = subprocess.run([str(tmp_path / "abi")], check=True, capture_output=True, text=True).stdout
    values = dict(line.split("=", 1) for line in output.splitlines())
    assert int(values["JHLAB_GSI_CLAIM"]) == gsi.JHLAB_GSI_CLAIM
    assert int(values["JHLAB_GSI_UNMASK"]) == gsi.JHLAB_GSI_UNMASK
    assert int(values["size"]) == gsi.CLAIM_STRUCT.size
    # "=IiII": four 4-byte fields in order
    assert [int(values[f]) for f in ("gsi", "eventfd", "irq", "taken")] == [0, 4, 8, 12]
    assert values["device"] == gsi.GSI_DEVICE


def madt(*entries: bytes, length: int | None = None) -> bytes:
    """An ACPI MADT: header (signature, length, revision ...), local APIC address, flags,
    then ``entries``."""
    body = struct.pack("<II", 0xFEE00000, 1) + b"".join(entries)
    size = 36 + len(body) if length is None else length
    header = b"APIC" + struct.pack("<IBB6s8sI4sI", size, 5, 0, b"BOCHS ", b"BXPC    ", 1, b"BXPC", 1)
    return header + body


def local_apic(apic_id: int) -> bytes:
    return struct.pack("<BBBBI", 0, 8, apic_id, apic_id, 1)


def ioapic(ioapic_id: int, address: int, gsi_base: int) -> bytes:
    return struct.pack("<BBBBII", 1, 12, ioapic_id, 0, address, gsi_base)


def override(source: int, gsi_number: int) -> bytes:
    return struct.pack("<BBBBIH", 2, 10, 0, source, gsi_number, 0xD)


def test_madt_ioapics_are_read_among_other_entries() -> None:
    """I/O APIC entries (type 1) give address and GSI base; local APICs and interrupt
    source overrides are skipped (QEMU's q35 MADT has all three kinds)."""
    table = madt(local_apic(0), ioapic(0, 0xFEC00000, 0), override(9, 9), local_apic(1),
                 ioapic(1, 0xFEC01000, 24))
    assert list(gsi.madt_ioapics(table)) == [(0xFEC00000, 0), (0xFEC01000, 24)]


def test_madt_errors_name_the_problem() -> None:
    """Not a MADT, or an entry running past the table: a ValueError saying so."""
    with pytest.raises(ValueError, match="signature APIC"):
        list(gsi.madt_ioapics(b"FACP" + bytes(60)))
    table = madt(ioapic(0, 0xFEC00000, 0))
    cut = table[:-4]
    with pytest.raises(ValueError, match="runs past the table"):
        list(gsi.madt_ioapics(cut[:4] + struct.pack("<I", len(cut)) + cut[8:]))


def test_gsi_map_pins_and_lines() -> None:
    """A GSI is a pin of the IOAPIC with the highest GSI base at or below it."""
    table = gsi.GsiMap({0xFEC00000: 0, 0xFEC01000: 24})
    assert table.gsi(0xFEC00000, 9) == 9
    assert table.gsi(0xFEC01000, 3) == 27
    assert table.pin(20) == (0xFEC00000, 20)
    assert table.pin(27) == (0xFEC01000, 3)
    assert gsi.GsiMap({}).pin(9) is None


def test_gsi_map_from_firmware(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The map of a MADT file; an unreadable one gives the PC layout with a warning."""
    path = tmp_path / "APIC"
    path.write_bytes(madt(local_apic(0), ioapic(0, 0xFEC00000, 0)))
    assert gsi.GsiMap.from_firmware(str(path)).bases == {0xFEC00000: 0}
    with caplog.at_level(logging.WARNING):
        fallback = gsi.GsiMap.from_firmware(str(tmp_path / "missing"))
    assert fallback.bases == {}
    assert fallback.gsi(0xFEC00000, 9) == 9
    assert "GSI = IOAPIC pin" in caplog.text


def test_root_line_without_the_module_says_what_to_load(tmp_path: Path) -> None:
    """No device node: ENODEV naming the module and where it is loaded."""
    with pytest.raises(gsi.GsiError, match="jhlab_gsi module is not loaded") as info:
        gsi.RootLine(9, 0, device=str(tmp_path / "jhlab-gsi"))
    assert info.value.os_errno == errno.ENODEV
    assert f"GSI 9: no {tmp_path / 'jhlab-gsi'}:" in str(info.value)


def test_root_line_on_a_file_that_is_not_the_module(tmp_path: Path) -> None:
    """A node that does not answer the claim (here a plain file): the claim's error, and
    no file descriptor left open."""
    node = tmp_path / "jhlab-gsi"
    node.write_bytes(b"")
    before = len(list(Path("/proc/self/fd").iterdir()))
    with pytest.raises(gsi.GsiError, match="JHLAB_GSI_CLAIM failed: ENOTTY") as info:
        gsi.RootLine(9, 0, device=str(node))
    assert info.value.os_errno == errno.ENOTTY
    assert len(list(Path("/proc/self/fd").iterdir())) == before
