"""``jailhouse config check`` prints and exits exactly as Jailhouse's ``jailhouse-config-check``.

Every case of :mod:`config_check_cases` (real config sets, broken ones, usage errors) runs
through :func:`jailhouse_config_check` and must give the tool's standard output, standard
error and exit status byte for byte; ``jhlab config check`` must answer the same for every
config set, and with ``--next`` as Jailhouse's next branch does. A few cases also run
through the programs the root cell has (``jailhouse config check``, and
``jailhouse-config-check`` where Jailhouse installs it) on the standard library alone.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from config_check_cases import CASES, NEXT_CASES, PROG, SYS, Case, materialize

import harness
from harness.hvmodel.config import jailhouse_config_check, main

REPO = Path(harness.__file__).resolve().parent.parent
GUEST = REPO / "images" / "guest"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory; help text formatted for 80 columns."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    return tmp_path


def run_in_process(case: Case, folder: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str], command: list[str]) -> tuple[str, str, int]:
    """Write the case's files, run ``command`` (``jailhouse`` or ``jhlab`` form) here."""
    materialize(case, folder)
    stdin = io.BytesIO(case.stdin)
    stdin.name = "<stdin>"  # as the interpreter names its standard input
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(stdin))
    if command[0] == "jailhouse":
        status = jailhouse_config_check([*command[1:], *case.args], prog=PROG)
    else:
        status = main([*command[1:], *case.args], prog="jhlab config")
    captured = capsys.readouterr()
    return captured.out, captured.err, status


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_jailhouse_config_check(case: Case, workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """Standard output, standard error and exit status are the tool's."""
    result = run_in_process(case, workdir, monkeypatch, capsys, ["jailhouse"])
    assert result == (case.stdout, case.stderr, case.status)


JHLAB_CASES = [case for case in CASES if not case.jailhouse_only]


@pytest.mark.parametrize("case", JHLAB_CASES, ids=[case.id for case in JHLAB_CASES])
def test_jhlab_config_check_answers_the_same(case: Case, workdir: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``jhlab config check`` without options prints what Jailhouse's tool prints."""
    result = run_in_process(case, workdir, monkeypatch, capsys, ["jhlab", "check"])
    assert result == (case.stdout, case.stderr, case.status)


@pytest.mark.parametrize("case", NEXT_CASES, ids=[case.id for case in NEXT_CASES])
def test_jhlab_config_check_next(case: Case, workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``--next``: the tool of Jailhouse's next branch (two CPU checks, CPU sets read)."""
    result = run_in_process(case, workdir, monkeypatch, capsys, ["jhlab", "check", "--next"])
    assert result == (case.stdout, case.stderr, case.status)


def test_next_checks_are_not_jailhouse_config_check(workdir: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The anchored revision has no CPU checks: the next branch's CPU overlap passes there."""
    (case,) = [case for case in NEXT_CASES if case.id == "next-reference-set"]
    out, err, status = run_in_process(case, workdir, monkeypatch, capsys, ["jailhouse"])
    assert "CPU" not in out and not err and status == 0


GUEST_CASES = ["reference-set", "findings-everywhere", "cell-architecture-mismatch",
               "missing-system", "stdin", "help", "arm64-unknown-gic"]


def guest_run(command: list[str], case: Case, folder: Path) -> subprocess.CompletedProcess[bytes]:
    """Run a guest program as the root cell would: ``python3 -S`` (no site packages), the
    hypervisor model on PYTHONPATH only."""
    materialize(case, folder)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "COLUMNS": "80", "LC_ALL": "C.UTF-8"}
    return subprocess.run([sys.executable, "-S", *command, *case.args], cwd=folder, env=env,
                          input=case.stdin, capture_output=True, timeout=60, check=False)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in GUEST_CASES],
                         ids=lambda case: case.id)
@pytest.mark.parametrize("program", ["jailhouse config check", "jailhouse-config-check"])
def test_guest_programs(program: str, case: Case, tmp_path: Path) -> None:
    """The root cell's ``jailhouse config check`` and its libexec ``jailhouse-config-check``
    (whose usage names it as the tool does: file name with dashes as spaces)."""
    if program == "jailhouse config check":
        command = [str(GUEST / "libexec" / "jailhouse"), "config", "check"]  # what the launcher runs
    else:
        command = [str(GUEST / "libexec" / "jailhouse-config-check")]
    result = guest_run(command, case, tmp_path)
    assert (result.stdout.decode(), result.stderr.decode(), result.returncode) == \
        (case.stdout, case.stderr, case.status)


def test_usage_names_the_script(tmp_path: Path) -> None:
    """Like the tool, the script takes its name from its file: dashes become spaces."""
    link = tmp_path / "my-config-check"
    link.symlink_to(GUEST / "libexec" / "jailhouse-config-check")
    result = guest_run([str(link)], Case(id="x", args=(), files=dict, stdout=""), tmp_path)
    assert result.returncode == 2
    assert result.stderr.decode().startswith("usage: my config check [-h] SYSCONFIG ")


def test_jhlab_strict_reading(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--jhlab`` reads every file strictly: what the tool lets through is named."""
    (case,) = [case for case in CASES if case.id == "trailing-bytes"]
    materialize(case, workdir)
    assert main(["check", *case.args]) == 0
    capsys.readouterr()
    assert main(["check", "--jhlab", *case.args]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("python3 -m harness.hvmodel.config: long.cell")
    assert captured.err.count("\n") == 1


def test_jhlab_checks_follow_jailhouse_checks(workdir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """``--jhlab`` adds jhlab's sections after Jailhouse's; here they find the RAM
    tiny-demo and pci-demo share, which Jailhouse's tool lets through (exit 0)."""
    (case,) = [case for case in CASES if case.id == "all-demos"]
    materialize(case, workdir)
    args = [SYS, "tiny-demo.cell", "pci-demo.cell"]
    assert main(["check", *args]) == 0
    plain = capsys.readouterr().out
    assert main(["check", "--jhlab", *args]) == 1
    out = capsys.readouterr().out
    assert out.startswith(plain)
    extra = out[len(plain):]
    assert extra.startswith("Overlapping memory regions between non-root cells:\n\n"
                            "In cell 'tiny-demo', region 0\n")
    assert extra.endswith("Sub-page region flags: None\n")
