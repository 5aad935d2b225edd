"""The config command line: show, check, compile, decompile; exit statuses 0/1/2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_config_vectors import CONFIGS_DIR, apic_demo, qemu_x86

from harness.hvmodel.config import main

REPO = CONFIGS_DIR.parent.parent


@pytest.fixture
def cells(tmp_path: Path) -> Path:
    """A folder with qemu-x86.cell, apic-demo.cell and linux-x86-demo.cell compiled by the CLI."""
    for name in ("qemu-x86", "apic-demo", "linux-x86-demo"):
        assert main(["compile", str(CONFIGS_DIR / f"{name}.toml"), "-o",
                     str(tmp_path / f"{name}.cell")]) == 0
    return tmp_path


def test_compile_matches_vectors(cells: Path) -> None:
    """compile writes the same bytes as the independently built vectors."""
    assert (cells / "qemu-x86.cell").read_bytes() == qemu_x86()
    assert (cells / "apic-demo.cell").read_bytes() == apic_demo()


def test_compile_default_output(tmp_path: Path) -> None:
    """Without -o, the .cell goes next to the source."""
    source = tmp_path / "c.toml"
    source.write_text('name = "c"\ncpus = "1"\n')
    assert main(["compile", str(source)]) == 0
    assert (tmp_path / "c.cell").stat().st_size == 140


def test_check_clean_and_findings(cells: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check exits 0 on a clean set; apic + linux share CPU 3, which only --next finds,
    and jhlab's checks (--jhlab) find nothing more in this set."""
    sys_cell, apic = str(cells / "qemu-x86.cell"), str(cells / "apic-demo.cell")
    linux = str(cells / "linux-x86-demo.cell")
    assert main(["check", sys_cell, apic]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Reading configuration set:\n  Architecture:  x86\n")
    assert f"  Non-root cell: apic-demo ({apic})\n" in out
    assert main(["check", sys_cell, apic, linux]) == 0
    assert "CPU" not in capsys.readouterr().out
    assert main(["check", "--next", sys_cell, apic, linux]) == 1
    assert "share CPUs:\n3\n" in capsys.readouterr().out
    assert main(["check", "--jhlab", sys_cell, apic, linux]) == 0
    assert "Invalid CPU assignments: None\n" in capsys.readouterr().out


def test_check_takes_toml_sources(capsys: pytest.CaptureFixture[str]) -> None:
    """check reads TOML sources directly."""
    assert main(["check", str(CONFIGS_DIR / "qemu-x86.toml"),
                 str(CONFIGS_DIR / "tiny-demo.toml")]) == 0
    capsys.readouterr()


def test_check_wrong_kinds(cells: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A cell as system config, or a system config as cell: the tool's refusal, one line;
    with --jhlab, jhlab's."""
    apic, sys_cell = str(cells / "apic-demo.cell"), str(cells / "qemu-x86.cell")
    assert main(["check", apic]) == 1
    assert capsys.readouterr().err == f"Not a root cell configuration: {apic}\n"
    assert main(["check", sys_cell, sys_cell]) == 1
    assert capsys.readouterr().err == f"Not a cell configuration: {sys_cell}\n"
    assert main(["check", "--jhlab", apic]) == 1
    assert capsys.readouterr().err == \
        f"python3 -m harness.hvmodel.config: {apic}: not a system configuration\n"
    assert main(["check", "--jhlab", sys_cell, sys_cell]) == 1
    assert capsys.readouterr().err == \
        f"python3 -m harness.hvmodel.config: {sys_cell}: not a cell configuration\n"
    assert main(["check", str(cells / "missing.cell")]) == 1
    assert "missing.cell: cannot read: No such file or directory" in capsys.readouterr().err


def test_show_text_and_json(cells: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """show prints a listing, --json the same content as JSON."""
    assert main(["show", str(cells / "qemu-x86.cell")]) == 0
    out = capsys.readouterr().out
    assert "System config" in out and "Root cell \"QEMU-VM\"" in out
    assert "01:0e.0  IVSHMEM" in out and "ID 0 of 3, UNDEFINED" in out
    assert main(["show", "--json", str(cells / "apic-demo.cell")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["name"] == "apic-demo" and data["cpus"] == [3] and data["size"] == 228
    assert data["memory_regions"][1]["flag_names"] == ["READ", "WRITE", "COMM_REGION"]


def test_decompile(cells: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """decompile to stdout or a file; the result compiles back to the same bytes."""
    assert main(["decompile", str(cells / "linux-x86-demo.cell")]) == 0
    assert capsys.readouterr().out.startswith("# linux-x86-demo: Jailhouse cell config")
    out = cells / "again.toml"
    assert main(["decompile", str(cells / "qemu-x86.cell"), "-o", str(out)]) == 0
    assert main(["compile", str(out), "-o", str(cells / "again.cell")]) == 0
    assert (cells / "again.cell").read_bytes() == (cells / "qemu-x86.cell").read_bytes()


def test_errors_and_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad input: exit 1 with one line naming file and problem; bad usage: exit 2."""
    bad = tmp_path / "bad.cell"
    bad.write_bytes(apic_demo()[:100])
    assert main(["show", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad} at byte 0x64 (console)" in err and "truncated" in err
    assert main(["frobnicate"]) == 2
    assert main(["compile"]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()
    assert main(["compile", str(tmp_path / "missing.toml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_module_entry_point(tmp_path: Path) -> None:
    """``python3 -m harness.hvmodel.config`` works with the standard library alone: no site
    packages (``-S``: the venv's, where jhlab and its dependencies are installed, are not
    seen), the checkout found through PYTHONPATH only."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}
    probe = subprocess.run([sys.executable, "-S", "-c", "import rich"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=False, timeout=60)
    assert probe.returncode == 1 and "No module named 'rich'" in probe.stderr
    for args in (["compile", str(CONFIGS_DIR / "tiny-demo.toml"), "-o", str(tmp_path / "t.cell")],
                 ["check", "--next", "--jhlab", str(CONFIGS_DIR / "qemu-x86.toml"),
                  str(tmp_path / "t.cell")]):
        result = subprocess.run(
            [sys.executable, "-S", "-m", "harness.hvmodel.config", *args], env=env,
            cwd=tmp_path, capture_output=True, text=True, check=False, timeout=60,
        )
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "t.cell").stat().st_size == 228
    assert "Non-root cell: tiny-demo" in result.stdout
