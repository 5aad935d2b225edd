"""Image helpers: module dependency order, kernel config checks, reproducible cpio,
cache locking, the guest payload's byte code."""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import images
from harness.errors import ImageError
from harness.images import GUEST_PYTHON_CACHE_TAG, Kernel, build_payload, check_kernel_config, write_cpio


def _kernel(tmp_path: Path) -> Kernel:
    kernel = Kernel("linux-image-6.1.0-99-amd64", "1", tmp_path)
    kernel.modules.mkdir(parents=True)
    (kernel.modules / "modules.dep").write_text(
        "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n"
        "kernel/lib/crc16.ko:\n"
        "kernel/fs/mbcache.ko:\n"
        "kernel/fs/jbd2/jbd2.ko:\n"
        "kernel/drivers/ata/ahci.ko: kernel/drivers/ata/libahci.ko kernel/drivers/ata/libata.ko\n"
        "kernel/drivers/ata/libahci.ko: kernel/drivers/ata/libata.ko\n"
        "kernel/drivers/ata/libata.ko:\n")
    (kernel.modules / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n")
    return kernel


def test_module_closure_loads_dependencies_first(tmp_path: Path) -> None:
    order = _kernel(tmp_path).module_closure(["ahci", "ext4", "virtio"])
    names = [p.rsplit("/", 1)[1] for p in order]
    assert names.index("libata.ko") < names.index("libahci.ko") < names.index("ahci.ko")
    assert names[-1] == "ext4.ko" and {"crc16.ko", "jbd2.ko", "mbcache.ko"} < set(names)
    assert len(names) == len(set(names))
    with pytest.raises(ImageError, match="no module 'nosuch'"):
        _kernel(tmp_path / "k2").module_closure(["nosuch"])


def test_kernel_config_check() -> None:
    config = "CONFIG_KVM=m\nCONFIG_CPUSETS=y\n# CONFIG_KVM_XEN is not set\n"
    fragment = "# comment\nCONFIG_KVM=y|m\nCONFIG_CPUSETS=y\nCONFIG_KVM_XEN=y\nCONFIG_DEVPORT=y\n"
    assert check_kernel_config(fragment, config) == [
        "CONFIG_KVM_XEN: want y, have n", "CONFIG_DEVPORT: want y, have n"]


def test_cpio_is_reproducible(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_text("#!/bin/sh\n")
    (tree / "init").write_text("init")
    write_cpio(tree, tmp_path / "a.cpio.gz")
    time.sleep(1.1)
    (tree / "init").write_text("init")  # new mtime
    write_cpio(tree, tmp_path / "b.cpio.gz")
    assert (tmp_path / "a.cpio.gz").read_bytes() == (tmp_path / "b.cpio.gz").read_bytes()
    raw = gzip.decompress((tmp_path / "a.cpio.gz").read_bytes())
    assert raw.startswith(b"070701") and b"bin/tool" in raw and b"TRAILER!!!" in raw


def test_cache_lock_serializes_builders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JHLAB_CACHE", str(tmp_path))
    events: list[str] = []

    def builder(name: str) -> None:
        with images.cache_lock("artefact"):
            events.append(f"{name} in")
            time.sleep(0.2)
            events.append(f"{name} out")

    threads = [threading.Thread(target=builder, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert events[0].endswith("in") and events[1] == events[0].replace("in", "out")


def test_missing_build_tool_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.errors import MissingToolError

    monkeypatch.setattr("harness.images.shutil.which", lambda *args, **kwargs: None)
    with pytest.raises(MissingToolError, match=r"mmdebstrap not found.*apt-get install mmdebstrap"):
        images.require_tool("mmdebstrap")


def test_kernel_package_is_asked_once_per_apt_lists_state(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """apt is asked for the kernel package once; again only after its lists changed."""
    monkeypatch.setenv("JHLAB_CACHE", str(tmp_path / "cache"))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "Packages").write_text("v1")
    real_state = images._apt_lists_state
    monkeypatch.setattr(images, "_apt_lists_state", lambda: real_state(str(lists)))
    asked: list[list[str]] = []

    def apt(argv: list[str], **kwargs: object) -> str:
        asked.append(argv)
        if argv[1] == "depends":
            return "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n"
        return "linux-image-6.1.0-57-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-3\n"

    monkeypatch.setattr(images, "run_tool", apt)
    builder = images.ImageBuilder(quiet=True)
    expected = ("linux-image-6.1.0-57-amd64", "6.1.192-3")
    assert builder.resolve_kernel_package() == expected
    assert builder.resolve_kernel_package() == expected
    assert len(asked) == 2  # depends + policy, once
    os.utime(lists / "Packages", ns=(1, 10**18))  # apt-get update touched the lists
    assert builder.resolve_kernel_package() == expected
    assert len(asked) == 4


def test_payload_carries_hash_checked_bytecode(tmp_path: Path) -> None:
    """The payload's modules come byte-compiled for the guest's Python (hash-checked, so
    the time stamps of the reproducible archive do not matter) when the host's Python is
    the guest's version; the guest tools include the setup hook that starts the loader."""
    payload = build_payload(tmp_path / "payload.cpio.gz", authorized_key="ssh-ed25519 AAAA test")
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=gzip.decompress(payload.read_bytes()),
                             capture_output=True, check=True).stdout.decode().split()
    assert "jhlab/bin/jailhouse" in listing and "jhlab/bin/jhlab-guest-setup" in listing
    pyc = f"jhlab/lib/harness/hvmodel/__pycache__/tool.{GUEST_PYTHON_CACHE_TAG}.pyc"
    if sys.implementation.cache_tag != GUEST_PYTHON_CACHE_TAG:
        assert pyc not in listing
        return
    assert pyc in listing
    subprocess.run(["cpio", "-id", "--quiet", pyc], input=gzip.decompress(payload.read_bytes()),
                   cwd=tmp_path, check=True)
    header = (tmp_path / pyc).read_bytes()[:8]
    assert header[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(header[4:8], "little") == 0b11  # hash-based, checked (PEP 552)


def test_payload_carries_the_root_cell_modules_and_their_loader(tmp_path: Path) -> None:
    """jhlab's root-cell modules go to ``modules/`` of the payload (``/opt/jhlab/modules``
    in the root cell), next to ``bin/jhlab-guest-setup``, which jhlab-init runs at boot and
    which loads them."""
    built = tmp_path / "root-modules"
    built.mkdir()
    (built / "jhlab_gsi.ko").write_bytes(b"\x7fELF module")
    (built / "build.json").write_text("{}")
    payload = images.build_payload(tmp_path / "payload.cpio.gz", authorized_key="ssh-ed25519 AAAA x",
                                   modules=built)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=gzip.decompress(payload.read_bytes()),
                   cwd=unpacked, check=True)
    root = unpacked / "jhlab"
    assert sorted(p.name for p in (root / "modules").iterdir()) == ["jhlab_gsi.ko"]
    assert (root / "modules" / "jhlab_gsi.ko").read_bytes() == b"\x7fELF module"
    setup = root / "bin" / "jhlab-guest-setup"
    assert os.access(setup, os.X_OK)
    assert "/opt/jhlab/modules/*.ko" in setup.read_text() and "insmod" in setup.read_text()


def test_inputs_key_follows_what_images_are_built_from(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """jhlab images key: stable; changed by a recipe, a kernel config fragment or another
    kernel package; not by the guest tools (they go in the per-boot payload)."""
    from harness.recipes import Recipes, find_recipes

    source = find_recipes()
    tree = tmp_path / "tree"
    for folder in ("images", "kernel_configs"):
        shutil.copytree(source.root / folder, tree / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("build"))
    builder = images.ImageBuilder(quiet=True, recipes=Recipes(tree))
    monkeypatch.setattr(builder, "resolve_kernel_package", lambda: ("linux-image-6.1.0-9-amd64", "6.1.1-1"))
    key = builder.inputs_key()
    assert key == builder.inputs_key() and len(key) == 16
    (tree / "images" / "guest" / "bin" / "jailhouse").write_text("#!/bin/sh\n")
    assert builder.inputs_key() == key
    changes = []
    with open(tree / "images" / "rootfs" / "packages.txt", "a") as packages:
        packages.write("strace\n")
    changes.append(builder.inputs_key())
    (tree / "kernel_configs" / "root-cell.config").write_text("CONFIG_KVM=y\n")
    changes.append(builder.inputs_key())
    monkeypatch.setattr(builder, "resolve_kernel_package", lambda: ("linux-image-6.1.0-9-amd64", "6.1.1-2"))
    changes.append(builder.inputs_key())
    assert len({key, *changes}) == 4
