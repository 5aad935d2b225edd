"""What a Linux UAPI header says, read by compiling and running a C program against it:
the ABI tests (``test_kvm_abi``, ``test_vfio_abi``) compare the ctypes bindings with it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def header_values(header: str, program: str, workdir: Path) -> dict[str, int]:
    """Compile ``program`` (C that prints ``NAME=VALUE`` lines) in ``workdir`` and run it.

    Skips the test when there is no C compiler or no ``header`` (linux-libc-dev); fails
    when the program does not compile (the header lacks something a binding names).
    """
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip(f"no C compiler to read <{header}>")
    probe = subprocess.run([gcc, "-E", "-x", "c", "-"], input=f"#include <{header}>\n",
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"<{header}> not available (linux-libc-dev): {probe.stderr.strip()}")
    source = workdir / "abi.c"
    binary = workdir / "abi"
    source.write_text(program)
    build = subprocess.run([gcc, "-O0", "-o", str(binary), str(source)],
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, f"<{header}> lacks something the binding names:\n{build.stderr[-3000:]}"
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.split("=", 1) for line in output.splitlines())}
