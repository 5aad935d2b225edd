"""The checked driver without a VM: the guest's side (the real ``jailhouse`` command and
driver daemon, oracle Arch) runs on the host in a private run directory, the "root
console" is the daemon's debug console written to a file. Everything the checked driver
compares is compared for real: exit status and messages, ``cell list``, the sysfs tree,
root CPUs, PCI bindings (a fake device folder), console lines; and an injected fault
(``JHLAB_FAULT``) must make it fail with a diff that names the fault's effect.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.checked import (
    CheckedJailhouse,
    ExpectationError,
    Locks,
    ValidationError,
)
from harness.errors import JhlabError
from harness.fake import LocalRootCell, WithoutPrograms
from harness.recipes import CONFIGS, find_recipes

IMAGE = bytes(range(256)) * 16


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[LocalRootCell, list[CheckedJailhouse]]]:
    """This host as the root cell (guest tools pointing at this checkout, a run
    directory, a fake PCI folder); every checked driver made on it is cleaned up."""
    made: list[CheckedJailhouse] = []
    yield LocalRootCell(tmp_path), made
    for jh in made:
        problems = jh.cleanup()
        assert not problems, problems


def checked(local: tuple[LocalRootCell, list[CheckedJailhouse]], **extra: object) -> CheckedJailhouse:
    root, made = local
    jh = CheckedJailhouse(root, "oracle", **(root.checked_options() | extra))
    made.append(jh)
    return jh


def test_demo_sequence_validates(local: tuple[LocalRootCell, list[CheckedJailhouse]]) -> None:
    """Jailhouse's demo sequence with the oracle Arch on both sides: every step agrees,
    apic-demo refuses its first shutdown, statistics are compared value by value."""
    jh = checked(local)
    jh.enable(CONFIGS / "qemu-x86.toml")
    created = jh.cell_create(CONFIGS / "apic-demo.toml")
    assert "apic-demo" in created.view.cell_list
    jh.cell_load("apic-demo", IMAGE, strings=[("hello", 0x1000)])
    jh.cell_start("apic-demo")
    counters = jh.stats("apic-demo")
    assert len(counters) == 12
    refused = jh.cell_shutdown("apic-demo", expect="EPERM")
    assert refused.stderr == "JAILHOUSE_CELL_LOAD: Operation not permitted\n"
    jh.cell_shutdown("apic-demo")
    jh.cell_destroy("apic-demo")
    done = jh.disable()
    assert done.view.daemon is None and done.view.cell_list == ""
    assert "Shutting down hypervisor" in local[0].console.since(0)


def test_one_guest_program_serves_every_step(local: tuple[LocalRootCell, list[CheckedJailhouse]]) -> None:
    """The guest program is started once and answers every step; one that ended between
    steps (a lab reset takes its connection) is started again; cleanup ends it."""
    jh = checked(local)
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(CONFIGS / "apic-demo.toml")
    program = jh.channel.program
    assert jh.channel.starts == 1 and program is not None and program.alive
    program.close()
    jh.cell_destroy("apic-demo")
    assert jh.channel.starts == 2
    assert not jh.cleanup()
    assert jh.channel.program is None and not program.alive


def test_without_programs_every_step_is_a_run(local: tuple[LocalRootCell, list[CheckedJailhouse]]) -> None:
    """Where no program can be started, each request is a run of the guest program of
    its own, and everything is compared all the same (the injected fault is caught)."""
    root, made = local
    jh = CheckedJailhouse(WithoutPrograms(root), "oracle",
                          **(root.checked_options() | {"env": {"JHLAB_FAULT": "destroy-leaks-pages"}}))
    made.append(jh)
    assert jh.channel.one_shot
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(CONFIGS / "apic-demo.toml")
    with pytest.raises(ValidationError, match="files differing: mem_pool_used"):
        jh.cell_destroy("apic-demo")
    assert jh.channel.starts == 0 and jh.channel.program is None


def test_before_enable_the_device_is_missing(local: tuple[LocalRootCell, list[CheckedJailhouse]]) -> None:
    """Without a daemon ever started, commands fail to open /dev/jailhouse (ENOENT),
    and after a disable every ioctl is EINVAL; the oracle predicts both."""
    jh = checked(local)
    missing = jh.cell_create(CONFIGS / "apic-demo.toml", expect="ENOENT")
    assert missing.stderr == "opening /dev/jailhouse: No such file or directory\n"
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.disable()
    offline = jh.cell_start("apic-demo", expect="EINVAL")
    assert offline.stderr == "JAILHOUSE_CELL_START: Invalid argument\n"


def test_errors_agree_and_intent_is_checked(local: tuple[LocalRootCell, list[CheckedJailhouse]]) -> None:
    """An error the oracle predicts passes validation; a test expecting another errno
    gets an ExpectationError naming both."""
    jh = checked(local)
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(CONFIGS / "apic-demo.toml")
    jh.cell_create(CONFIGS / "apic-demo.toml", expect="EEXIST")
    with pytest.raises(ExpectationError, match="expected EBUSY, guest and oracle both gave EEXIST"):
        jh.cell_create(CONFIGS / "apic-demo.toml", expect="EBUSY")
    jh.cell_load("apic-demo", IMAGE, 0x200000, expect="EINVAL")
    jh.cell_destroy("nosuchcell", expect="ENOENT")
    jh.cell_destroy(0, expect="EINVAL")


def test_fault_destroy_leaks_pages_is_caught(local: tuple[LocalRootCell, list[CheckedJailhouse]]) -> None:
    """A daemon started with JHLAB_FAULT=destroy-leaks-pages keeps a destroyed cell's
    pages: the destroy step fails validation, and the diff names mem_pool_used and the
    console's page pool line."""
    jh = checked(local, env={"JHLAB_FAULT": "destroy-leaks-pages"})
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(CONFIGS / "apic-demo.toml")
    with pytest.raises(ValidationError) as caught:
        jh.cell_destroy("apic-demo")
    text = str(caught.value)
    assert "cell destroy apic-demo: the guest differs from the oracle in sysfs tree" in text
    assert "files differing: mem_pool_used" in text
    assert "-mem_pool_used: " in text and "+mem_pool_used: " in text
    assert "Page pool usage after cell destruction" in text


def test_fault_shutdown_ignores_denial_is_caught(local: tuple[LocalRootCell, list[CheckedJailhouse]]) -> None:
    """With JHLAB_FAULT=shutdown-ignores-denial apic-demo's first shutdown succeeds in
    the guest: the diff shows exit status 1 against 0 and the missing EPERM message."""
    jh = checked(local, env={"JHLAB_FAULT": "shutdown-ignores-denial"})
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(CONFIGS / "apic-demo.toml")
    jh.cell_load("apic-demo", IMAGE)
    jh.cell_start("apic-demo")
    with pytest.raises(ValidationError) as caught:
        jh.cell_shutdown("apic-demo")
    text = str(caught.value)
    assert "exit status of jailhouse cell shutdown --name apic-demo" in text
    assert "-JAILHOUSE_CELL_LOAD: Operation not permitted" in text
    assert "-cells/1/state: running\n+cells/1/state: shut down" in text


def test_unknown_fault_stops_the_daemon(local: tuple[LocalRootCell, list[CheckedJailhouse]]) -> None:
    """A misspelt fault name does not run a silently unbroken model: enable fails."""
    jh = checked(local, env={"JHLAB_FAULT": "no-such-fault"})
    with pytest.raises(ValidationError, match="unknown fault"):
        jh.enable(CONFIGS / "qemu-x86.toml")


def test_effects_need_the_guest_to_agree(local: tuple[LocalRootCell, list[CheckedJailhouse]]) -> None:
    """A declared inmate effect the guest never shows (the oracle Arch's cells do nothing
    by themselves) fails after the settle timeout, naming the state."""
    jh = checked(local)
    jh.enable(CONFIGS / "qemu-x86.toml")
    jh.cell_create(CONFIGS / "apic-demo.toml")
    jh.cell_load("apic-demo", IMAGE)
    with pytest.raises(ValidationError) as caught:
        jh.cell_start("apic-demo", effects=[Locks("apic-demo")], settle_timeout=1.0)
    assert "+cells/1/state: running" in str(caught.value)
    assert "-cells/1/state: running/locked" in str(caught.value)


def _guest_programs() -> int:
    """Guest programs running below this process (``sh -c`` of the command, and its
    ``python3 -m harness.guest.checked``)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        count += parent == os.getpid() and b"harness.guest.checked" in b" ".join(cmdline)
    return count


def test_a_running_daemon_is_refused(local: tuple[LocalRootCell, list[CheckedJailhouse]]) -> None:
    """The checked driver needs a disabled hypervisor to start from; the refused one
    leaves no guest program behind."""
    jh = checked(local)
    jh.enable(CONFIGS / "qemu-x86.toml")
    assert _guest_programs() == 1
    with pytest.raises(JhlabError, match="already runs"):
        checked(local)
    assert _guest_programs() == 1


def test_batch_checks_every_step(local: tuple[LocalRootCell, list[CheckedJailhouse]]) -> None:
    """A batch runs many steps in one guest round trip and still compares every step's
    result and view; a fault shows up at the step where it matters."""
    hello = find_recipes().cells / "hello.toml"
    jh = checked(local)
    jh.enable(CONFIGS / "qemu-x86.toml")
    with jh.batch() as batch:
        for _ in range(3):
            batch.cell_create(hello)
            batch.cell_load("hello", IMAGE)
            batch.cell_start("hello")
            batch.cell_destroy("hello")
        batch.cell_destroy("hello", expect="ENOENT")
    assert len(batch.results) == 13
    assert batch.results[-1].stderr == "JAILHOUSE_CELL_DESTROY: No such file or directory\n"
    jh.disable()

    broken = checked(local, env={"JHLAB_FAULT": "destroy-leaks-pages"})
    broken.enable(CONFIGS / "qemu-x86.toml")
    with pytest.raises(ValidationError, match=r"cell destroy hello \(batch step 2 of 4\)") as caught:
        with broken.batch() as batch:
            for _ in range(2):
                batch.cell_create(hello)
                batch.cell_destroy("hello")
    assert "files differing: mem_pool_used" in str(caught.value)
