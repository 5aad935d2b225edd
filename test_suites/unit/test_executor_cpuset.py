"""Root-cell CPU confinement (:mod:`harness.hvmodel.arch.cpuset`) on a fake cgroup2 tree:
plain files take the writes (opened with ``O_APPEND``, so every write is recorded), a fake
``/proc`` says which processes are kernel threads. The real cgroupfs is exercised in the
lab (test_suites/e2e/test_executor.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness.hvmodel.arch.cpuset import RootCpuset

SELF = 4242
USER = (100, 101, 102)
KTHREADS = (2, 3)


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A cgroup2 root with the cpuset controller, processes, and their /proc entries."""
    cgroup = tmp_path / "cgroup"
    proc = tmp_path / "proc"
    cgroup.mkdir()
    (cgroup / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (cgroup / "cgroup.subtree_control").write_text("")
    (cgroup / "cgroup.procs").write_text("\n".join(str(p) for p in (*KTHREADS, *USER, SELF)) + "\n")
    for pid in (*KTHREADS, *USER, SELF):
        (proc / str(pid)).mkdir(parents=True)
        flags = 0x00208040 if pid in KTHREADS else 0x00400100
        (proc / str(pid) / "stat").write_text(
            f"{pid} (name with ) paren) S 1 {pid} {pid} 0 -1 {flags} 0 0 0 0\n"
        )
        (proc / str(pid) / "cgroup").write_text("0::/\n")
    original_rmdir = Path.rmdir
    original_mkdir = Path.mkdir

    def rmdir(self: Path) -> None:
        # cgroupfs removes a group with its control files; a plain directory cannot.
        if self.parent == cgroup:
            shutil.rmtree(self)
        else:
            original_rmdir(self)

    def mkdir(self: Path, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        original_mkdir(self, mode, parents, exist_ok)
        if self.parent == cgroup:  # the kernel makes the control files
            (self / "cgroup.procs").write_text("")
            (self / "cpuset.cpus").write_text("")

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(Path, "rmdir", rmdir)
    return cgroup, proc


def writes(path: Path) -> list[str]:
    return path.read_text().split()


def test_apply_confines_user_processes_but_not_kernel_threads_or_the_hypervisor(
    tree: tuple[Path, Path],
) -> None:
    """Controller enabled, group made, CPUs written, user processes moved."""
    cgroup, proc = tree
    cpuset = RootCpuset(cgroup, proc=proc, keep={SELF})
    assert cpuset.available and not cpuset.active
    moved = cpuset.apply({0, 1, 3})
    group = cgroup / "jailhouse-root"
    assert writes(cgroup / "cgroup.subtree_control") == ["+cpuset"]
    assert writes(group / "cpuset.cpus") == ["0-1,3"]
    assert moved == list(USER)
    assert writes(group / "cgroup.procs") == [str(p) for p in USER]
    assert cpuset.active and cpuset.cpus == {0, 1, 3}


def test_apply_again_updates_cpus_and_sweeps(tree: tuple[Path, Path]) -> None:
    """A second cell: new CPU set; processes that appeared are swept too."""
    cgroup, proc = tree
    cpuset = RootCpuset(cgroup, proc=proc, keep={SELF})
    cpuset.apply({0, 1, 3})
    cpuset.apply({0, 1, 3})  # same set: no rewrite
    cpuset.apply({0, 1})
    assert writes(cgroup / "jailhouse-root" / "cpuset.cpus") == ["0-1,3", "0-1"]


def test_release_restores_everything(tree: tuple[Path, Path]) -> None:
    """Tasks back to the root cgroup, group gone, controller off again; idempotent."""
    cgroup, proc = tree
    cpuset = RootCpuset(cgroup, proc=proc, keep={SELF})
    cpuset.apply({0})
    root_procs_before = writes(cgroup / "cgroup.procs")
    cpuset.release()
    cpuset.release()
    assert not (cgroup / "jailhouse-root").exists()
    assert writes(cgroup / "cgroup.procs") == root_procs_before + [str(p) for p in USER]
    assert writes(cgroup / "cgroup.subtree_control") == ["+cpuset", "-cpuset"]
    assert not cpuset.active and cpuset.cpus == frozenset()


def test_controller_already_enabled_stays(tree: tuple[Path, Path]) -> None:
    """What was enabled before is not turned off at release."""
    cgroup, proc = tree
    (cgroup / "cgroup.subtree_control").write_text("cpuset\n")
    cpuset = RootCpuset(cgroup, proc=proc, keep={SELF})
    cpuset.apply({0})
    cpuset.release()
    assert writes(cgroup / "cgroup.subtree_control") == ["cpuset"]


def test_adopt_moves_the_hypervisor_to_the_root_cgroup(tree: tuple[Path, Path]) -> None:
    """A hypervisor started from a confined shell leaves the confinement first."""
    cgroup, proc = tree
    cpuset = RootCpuset(cgroup, proc=proc, keep={SELF})
    assert cpuset.adopt(SELF) is False
    (proc / str(SELF) / "cgroup").write_text("0::/jailhouse-root\n")
    assert cpuset.adopt(SELF) is True
    assert writes(cgroup / "cgroup.procs")[-1] == str(SELF)


def test_unavailable_without_cpuset_controller(tmp_path: Path) -> None:
    """No cgroup2 (or no cpuset in it): not available, nothing touched."""
    assert not RootCpuset(tmp_path).available
    (tmp_path / "cgroup.controllers").write_text("cpu io\n")
    assert not RootCpuset(tmp_path).available


def test_empty_root_set_is_refused(tree: tuple[Path, Path]) -> None:
    """The root always keeps a CPU."""
    cgroup, proc = tree
    with pytest.raises(ValueError, match="at least one CPU"):
        RootCpuset(cgroup, proc=proc).apply(set())


def test_kernel_threads_are_checked_once_while_listed(tree: tuple[Path, Path]) -> None:
    """A pid found to be a kernel thread is not read again by later sweeps while the root
    cgroup keeps listing it; once it was gone from the list, its (reused) pid is checked
    anew."""
    cgroup, proc = tree
    cpuset = RootCpuset(cgroup, proc=proc, keep={SELF})
    cpuset.apply({0, 1})
    procs = cgroup / "cgroup.procs"
    procs.write_text("2\n3\n4242\n")  # the user processes moved (cgroupfs lists them no more)
    (proc / "3" / "stat").unlink()  # read again, it would count as gone
    (proc / "2" / "stat").write_text("2 (user) S 1 2 2 0 -1 4194560 0 0 0 0\n")  # pid 2 reused
    assert cpuset.apply({0}) == []  # both still kernel threads for the sweep
    procs.write_text("3\n")  # pid 2 left the root cgroup ...
    cpuset.apply({0, 1})
    procs.write_text("2\n3\n")  # ... and is back: a user process now
    assert cpuset.apply({0}) == [2]
