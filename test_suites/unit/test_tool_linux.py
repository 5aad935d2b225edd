"""``jailhouse cell linux`` (:mod:`harness.hvmodel.tool_linux`) run in-process: its
arguments and refusals as Jailhouse's ``tools/jailhouse-cell-linux`` (master) gives them
(argparse usage errors with exit 2; ``Not a cell configuration: FILE``, ``Unknown
architecture`` and the last line of an uncaught exception with exit 1), jhlab's refusals
before anything is created, and ``-w``: the parameter file and the commands it prints.

Nothing here reaches a daemon: the run directory is empty (no driver), so a command that
gets as far as opening the device fails as Jailhouse's script does without the module.
The expected texts are written out from Jailhouse's script, not from the code under test.
"""

from __future__ import annotations

import bz2
import io
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_linux_params import PREF_ADDRESS, SETUP_SECTS, kernel_image

import harness
from harness.hvmodel.config import load_source
from harness.hvmodel.errors import Exit
from harness.hvmodel.tool import Tool

CONFIGS = Path(harness.__file__).parent / "configs"
#: where linux-x86-demo's kernel file goes: its protected-mode part at pref_address
KERNEL_ADDRESS = PREF_ADDRESS - (SETUP_SECTS + 1) * 512
USAGE = (
    'usage: jailhouse cell linux [-h] [-d DTB] [-i INITRD] [-c "CMDLINE"]\n'
    "                            [-w PARAMS_FILE] [-a ARCH] [-k FACTOR]\n"
    "                            CELLCONFIG KERNEL\n"
)


@dataclass(frozen=True)
class Result:
    status: int
    out: str
    err: str


@dataclass(frozen=True)
class Files:
    cell: str
    system: str
    kernel: str
    initrd: str
    loader: str


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Files:
    """linux-x86-demo and qemu-x86 compiled, a gzip bzImage, an initrd, a loader image."""
    cell = tmp_path / "linux-x86-demo.cell"
    cell.write_bytes(load_source(CONFIGS / "linux-x86-demo.toml").to_bytes())
    system = tmp_path / "qemu-x86.cell"
    system.write_bytes(load_source(CONFIGS / "qemu-x86.toml").to_bytes())
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(kernel_image())
    initrd = tmp_path / "rootfs.cpio"
    initrd.write_bytes(b"070701" + bytes(4000))
    loader = tmp_path / "linux-loader.bin"
    loader.write_bytes(b"\x90" * 512)
    monkeypatch.setenv("JAILHOUSE_LINUX_LOADER", str(loader))
    monkeypatch.chdir(tmp_path)
    return Files(str(cell), str(system), str(kernel), str(initrd), str(loader))


def cell_linux(tmp_path: Path, *args: str) -> Result:
    """``jailhouse cell linux ARGS`` with an empty run directory."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    out, err = io.StringIO(), io.StringIO()
    tool = Tool(["jailhouse", "cell", "linux", *args], run, out, err)
    try:
        status = tool.run_command()
    except Exit as done:
        status = done.status
    return Result(status, out.getvalue(), err.getvalue())


def test_missing_arguments_are_a_usage_error(tmp_path: Path) -> None:
    result = cell_linux(tmp_path)
    assert result == Result(2, "", USAGE + "jailhouse cell linux: error: the following "
                            "arguments are required: CELLCONFIG, KERNEL\n")


def test_help_goes_to_stdout_with_status_0(tmp_path: Path) -> None:
    result = cell_linux(tmp_path, "--help")
    assert result.status == 0 and result.err == ""
    assert result.out.startswith(USAGE + "\nBoot Linux in a non-root cell.\n")
    for option in ("-i INITRD, --initrd INITRD", '-c "CMDLINE", --cmdline "CMDLINE"',
                   "-w PARAMS_FILE, --write-params PARAMS_FILE", "-a ARCH, --arch ARCH",
                   "-k FACTOR, --kernel-decomp-factor FACTOR", "-d DTB, --dtb DTB"):
        assert option in result.out


def test_an_unreadable_file_is_a_usage_error(tmp_path: Path, files: Files) -> None:
    result = cell_linux(tmp_path, files.cell, "no-such-bzImage")
    assert result.status == 2
    assert result.err.endswith("jailhouse cell linux: error: argument KERNEL: can't open "
                               "'no-such-bzImage': [Errno 2] No such file or directory: "
                               "'no-such-bzImage'\n")


def test_a_factor_that_is_no_integer_is_a_usage_error(tmp_path: Path, files: Files) -> None:
    result = cell_linux(tmp_path, files.cell, files.kernel, "-k", "five")
    assert result.status == 2
    assert result.err.endswith("error: argument -k/--kernel-decomp-factor: invalid int value: "
                               "'five'\n")


def test_an_unknown_architecture_is_refused(tmp_path: Path, files: Files) -> None:
    assert cell_linux(tmp_path, files.cell, files.kernel, "-a", "mips") == Result(
        1, "", "Unknown architecture\n")


def test_arm_is_not_booted_here(tmp_path: Path, files: Files) -> None:
    result = cell_linux(tmp_path, files.cell, files.kernel, "-a", "arm64")
    assert result.status == 1
    assert result.err == "jailhouse cell linux: arm64: jhlab boots Linux in x86 cells only\n"


def test_a_system_config_is_not_a_cell_configuration(tmp_path: Path, files: Files) -> None:
    assert cell_linux(tmp_path, files.system, files.kernel) == Result(
        1, "", f"Not a cell configuration: {files.system}\n")


def test_a_file_without_a_boot_header_is_refused(tmp_path: Path, files: Files) -> None:
    result = cell_linux(tmp_path, files.cell, files.loader)
    assert result.status == 1
    assert result.err.startswith(f"jailhouse cell linux: {files.loader}: not an x86 Linux kernel")


def test_a_cell_that_does_not_start_at_0_is_refused(tmp_path: Path, files: Files) -> None:
    """cpu_reset_address at offset 84 of the header (reference §1): Jailhouse's
    ``RuntimeError`` ends the script (its last line, exit 1)."""
    data = bytearray(Path(files.cell).read_bytes())
    data[84:92] = (0x1000).to_bytes(8, "little")
    moved = tmp_path / "moved.cell"
    moved.write_bytes(bytes(data))
    assert cell_linux(tmp_path, str(moved), files.kernel) == Result(
        1, "", "RuntimeError: x86 requires cpu_reset_address=0\n")


def test_write_params_writes_the_parameters_and_prints_the_commands(tmp_path: Path,
                                                                    files: Files) -> None:
    """The initrd after 7 x the file size (gzip), page aligned; the loader at 0, the
    parameters at 0x1000; the text of X86.write_params."""
    params = tmp_path / "params.bin"
    result = cell_linux(tmp_path, files.cell, files.kernel, "-i", files.initrd, "-c",
                        "console=ttyS0", "-w", str(params))
    size = Path(files.kernel).stat().st_size
    initrd_address = (KERNEL_ADDRESS + 7 * size + 0xFFF) & ~0xFFF
    assert result == Result(0, (
        "Boot parameters written. Start Linux with the following commands (adjusting "
        "paths as needed):\n\n"
        f"jailhouse cell create {files.cell}\n"
        f"jailhouse cell load linux-x86-demo linux-loader.bin -a 0x0 {files.kernel} "
        f"-a 0x{KERNEL_ADDRESS:x} {files.initrd} -a 0x{initrd_address:x} {params} -a 0x1000\n"
        "jailhouse cell start linux-x86-demo\n"), "")
    data = params.read_bytes()
    assert int.from_bytes(data[0x218:0x21C], "little") == initrd_address  # ramdisk_image
    assert int.from_bytes(data[0x21C:0x220], "little") == 4006  # ramdisk_size
    cmd_line_ptr = int.from_bytes(data[0x228:0x22C], "little")
    assert data[cmd_line_ptr - 0x1000:] == b"console=ttyS0\0"


def test_an_initrd_where_the_kernel_unpacks_itself_is_refused(tmp_path: Path,
                                                              files: Files) -> None:
    """-k 1 puts the initrd right after the file, inside pref_address + init_size."""
    result = cell_linux(tmp_path, files.cell, files.kernel, "-i", files.initrd, "-k", "1")
    assert result.status == 1
    assert result.err.startswith("jailhouse cell linux: the initrd at 0x")
    assert "the decompression factor 1 is too small; use -k " in result.err


def test_a_kernel_built_without_jailhouse_guest_is_refused_before_the_driver(
        tmp_path: Path, files: Files) -> None:
    """The payload shows the kernel lacks the guest's setup-data message: a clear line,
    nothing opened (no device error follows)."""
    plain = tmp_path / "vmlinuz"
    plain.write_bytes(kernel_image(bz2.compress(b"an ordinary kernel" * 100)))
    result = cell_linux(tmp_path, files.cell, str(plain))
    assert result.status == 1
    assert result.err.startswith(f"jailhouse cell linux: {plain} is not a Jailhouse guest: ")
    assert "CONFIG_JAILHOUSE_GUEST" in result.err and "/dev/jailhouse" not in result.err


def test_without_the_driver_the_device_cannot_be_opened(tmp_path: Path, files: Files) -> None:
    """As the script's ``open('/dev/jailhouse')`` without the module: its exception's
    last line, exit 1."""
    assert cell_linux(tmp_path, files.cell, files.kernel) == Result(
        1, "", "FileNotFoundError: [Errno 2] No such file or directory: '/dev/jailhouse'\n")


def test_without_a_loader_the_command_says_where_it_looked(tmp_path: Path, files: Files,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAILHOUSE_LINUX_LOADER", str(tmp_path / "gone.bin"))
    result = cell_linux(tmp_path, files.cell, files.kernel)
    assert result.status == 1
    assert result.err.startswith("jailhouse cell linux: no linux-loader.bin (looked for ")
    assert "set JAILHOUSE_LINUX_LOADER to it" in result.err
