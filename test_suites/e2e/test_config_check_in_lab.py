"""``jailhouse config check`` in the lab's root cell prints and exits as Jailhouse's tool.

The compared cases of ``test_suites/hvmodel/config_check_cases.py`` (written from
Jailhouse's ``tools/jailhouse-config-check``) run in the root cell, with its Debian python3,
through the ``jailhouse`` command, a few also through
``/usr/libexec/jailhouse/jailhouse-config-check``; then the configs the root cell ships in
``/etc/jailhouse``. All cases go to the guest as one archive and run in one shell command
(an interpreter start per run, about 3 s under TCG on a busy machine, no ssh round trip).
"""

from __future__ import annotations

import io
import shlex
import sys
import tarfile
from pathlib import Path

import pytest

# The compared cases live with the model's tests, beside the vectors they are built from;
# that folder is not on this suite's path, and its modules are not type-checked yet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hvmodel"))
from config_check_cases import (  # type: ignore[import-not-found]
    CASES,
    CLEAN,
    Case,
    header,
    materialize,
)

from harness.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]

GUEST_DIR = "/tmp/jhlab-config-check"
PROGRAMS = {
    "jailhouse": "jailhouse config check",
    "libexec": "/usr/libexec/jailhouse/jailhouse-config-check",
}
#: The cases also run through the libexec script (the same code behind another door).
LIBEXEC_CASES = ("reference-set", "findings-everywhere", "cell-architecture-mismatch",
                 "missing-system", "stdin", "help", "cell-name-not-utf8")
RUNS = [(case, program) for case in CASES for program in sorted(PROGRAMS)
        if program == "jailhouse" or case.id in LIBEXEC_CASES]
#: The configs /etc/jailhouse holds, checked together (clean in Jailhouse's tool).
SHIPPED = ("apic-demo", "ivshmem-demo", "linux-x86-demo", "e1000-demo", "hello", "edu")


def _archive(cases: list[Case], folder: Path) -> bytes:
    """The cases' files, arguments and standard input, one folder per case, as a tar."""
    for case in cases:
        where = folder / case.id
        where.mkdir()
        materialize(case, where)
        (where / ".stdin").write_bytes(case.stdin)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=".")
    return buffer.getvalue()


#: runs at a time in the root cell (its CPUs; each run is a Python process of its own)
PARALLEL_RUNS = 4


def _script() -> str:
    """Every run, PARALLEL_RUNS at a time (each in its case's folder, with files of its
    own); keep stdout, stderr and status of each."""
    lines = ["set -u", f"cd {GUEST_DIR}"]
    for index, (case, key) in enumerate(RUNS, 1):
        args = " ".join(shlex.quote(arg) for arg in case.args)
        out = f"{GUEST_DIR}/results/{case.id}.{key}"
        lines.append(f"(cd {shlex.quote(case.id)} && COLUMNS=80 {PROGRAMS[key]} {args} "
                     f"<.stdin >{out}.out 2>{out}.err; echo $? >{out}.rc) &")
        if index % PARALLEL_RUNS == 0:
            lines.append("wait")
    return "\n".join([*lines, "wait"]) + "\n"


@pytest.fixture(scope="module")
def results(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Every case run in the root cell: ``{"<id>.<program>.out|err|rc": bytes}``."""
    folder = tmp_path_factory.mktemp("cases")
    lab.run(f"rm -rf {GUEST_DIR} && mkdir -p {GUEST_DIR}/results", check=True)
    lab.ssh.put(_archive(CASES, folder), f"{GUEST_DIR}/cases.tar")
    lab.run(f"cd {GUEST_DIR} && tar -xf cases.tar", check=True)
    lab.ssh.put(_script().encode(), f"{GUEST_DIR}/run.sh")
    lab.run(f"sh {GUEST_DIR}/run.sh", check=True, timeout=1800)
    lab.run(f"cd {GUEST_DIR}/results && tar -cf ../results.tar .", check=True)
    packed = lab.ssh.get(f"{GUEST_DIR}/results.tar")
    lab.run(f"rm -rf {GUEST_DIR}")
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
        for member in tar.getmembers():
            handle = tar.extractfile(member)
            if handle is not None:
                found[Path(member.name).name] = handle.read()
    return found


@pytest.mark.parametrize(("case", "program"), RUNS,
                         ids=[f"{case.id}-{program}" for case, program in RUNS])
def test_in_the_root_cell(results: dict[str, bytes], case: Case, program: str) -> None:
    """The root cell's program answers each compared case as Jailhouse's tool does."""
    key = f"{case.id}.{program}"
    got = (results[f"{key}.out"].decode(), results[f"{key}.err"].decode(),
           int(results[f"{key}.rc"]))
    assert got == (case.stdout, case.stderr, case.status)


def test_shipped_configs(lab: Lab) -> None:
    """The root cell's own configs, as a user would check them before ``enable``."""
    files = [f"/etc/jailhouse/{name}.cell" for name in ("qemu-x86", *SHIPPED)]
    result = lab.run(f"jailhouse config check {' '.join(files)}", timeout=300)
    expected = header(*(f"{name} ({path})" for name, path in zip(SHIPPED, files[1:], strict=True)),
                      root=f"QEMU-VM ({files[0]})") + CLEAN
    assert (result.stdout, result.stderr, result.status) == (expected, "", 0)
