"""Kernel build machinery (harness.kbuild): fragments and config checks, cache keys, the
KVM-rebuild safety checks, the guest initramfs, and the error paths of a build. Builds
run real processes; where a kernel build would take minutes, ``make`` is replaced at
the process boundary by a small script that does what the test needs."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from harness.errors import ImageError, MissingToolError
from harness.images import HOST_BUSYBOX, Kernel
from harness.kbuild import KernelBuildError, KernelConfigError, debian, linux_cell, modules, root_kvm
from harness.kbuild.kconfig import Fragment, config_changes, kconfig_dependencies, parse_config, unmet
from harness.kbuild.process import BuildLog
from harness.progress import Step


def _fragment(tmp_path: Path, text: str, name: str = "f.config") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# -- fragments and configs -------------------------------------------------------------------


def test_fragment_reads_options_in_order(tmp_path: Path) -> None:
    path = _fragment(tmp_path, """\
        # a comment
        CONFIG_KVM_XEN=y

        # CONFIG_SERIO is not set
        CONFIG_CMDLINE="a|b c"
        CONFIG_NR_CPUS=8
        """)
    fragment = Fragment.load(path)
    assert fragment.options == {"CONFIG_KVM_XEN": "y", "CONFIG_SERIO": "n",
                                "CONFIG_CMDLINE": '"a|b c"', "CONFIG_NR_CPUS": "8"}
    assert parse_config(fragment.text()) == fragment.options


@pytest.mark.parametrize(("text", "error"), [
    ("CONFIG_KVM=y|m\n", r"f.config:1: CONFIG_KVM=y\|m lists alternatives"),
    ("CONFIG_A=y\nKVM=y\n", r"f.config:2: not a kernel option: 'KVM=y'"),
    ("CONFIG_A=y\n# CONFIG_A is not set\n", r"f.config:2: CONFIG_A is set twice"),
    ("CONFIG_A=n\n", r"f.config:1: write '# CONFIG_A is not set'"),
    ("# only a comment\n", r"f.config sets no option"),
])
def test_bad_fragments_are_named_with_their_line(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ImageError, match=error):
        Fragment.load(_fragment(tmp_path, text))


def test_missing_fragment_is_named(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"nosuch.config: No such file"):
        Fragment.load(tmp_path / "nosuch.config")


def test_unmet_options_and_changes() -> None:
    fragment = Fragment(Path("k/x.config"), {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "m"})
    config = parse_config("CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n")
    assert unmet([fragment], config) == [
        "CONFIG_B=n (x.config): olddefconfig gave y", "CONFIG_C=m (x.config): olddefconfig gave n"]
    assert config_changes({"CONFIG_A": "y", "CONFIG_D": "m"}, {"CONFIG_A": "y", "CONFIG_E": "y"}) == {
        "CONFIG_D": ("m", "n"), "CONFIG_E": ("n", "y")}


def test_kconfig_dependencies_are_found_outside_help_text(tmp_path: Path) -> None:
    (tmp_path / "fs").mkdir()
    (tmp_path / "fs" / "Kconfig").write_text(textwrap.dedent("""\
        config TMPFS
        \tbool "Tmpfs"
        \tdepends on SHMEM
        \thelp
        \t  depends on nothing: this is help text
        config OTHER
        \tdepends on X
        """))
    assert kconfig_dependencies(tmp_path, ["CONFIG_TMPFS"]) == {
        "CONFIG_TMPFS": ["depends on SHMEM (fs/Kconfig)"]}


# -- what makes a KVM-only rebuild safe -------------------------------------------------------


def test_only_the_fragment_may_change_debians_config() -> None:
    fragment = Fragment(Path("hypercalls.config"), {"CONFIG_KVM_XEN": "y"})
    base = {"CONFIG_KVM": "m", "CONFIG_GCC_VERSION": "120200",
            "CONFIG_CC_VERSION_TEXT": '"gcc-12 (Debian 12.2.0-14) 12.2.0"'}
    ok = {**base, "CONFIG_KVM_XEN": "y",
          "CONFIG_CC_VERSION_TEXT": '"gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"'}
    root_kvm.check_only_fragment_changed(base, ok, [fragment])
    with pytest.raises(ImageError, match=r"CONFIG_PAHOLE_VERSION: Debian 124, here 0") as info:
        root_kvm.check_only_fragment_changed({**base, "CONFIG_PAHOLE_VERSION": "124"},
                                             {**ok, "CONFIG_PAHOLE_VERSION": "0"}, [fragment])
    assert "KVM_XEN" not in str(info.value)
    other_compiler = {**ok, "CONFIG_GCC_VERSION": "130200"}
    with pytest.raises(ImageError, match=r"CONFIG_CC_VERSION_TEXT.*\n.*CONFIG_GCC_VERSION"):
        root_kvm.check_only_fragment_changed(base, other_compiler, [fragment])


def test_export_crcs_must_match_debians(tmp_path: Path) -> None:
    theirs = tmp_path / "debian.symvers"
    theirs.write_text("0x0000aaaa\tkvm_vcpu_kick\tarch/x86/kvm/kvm\tEXPORT_SYMBOL_GPL\t\n"
                      "0x0000bbbb\tkvm_get_kvm\tarch/x86/kvm/kvm\tEXPORT_SYMBOL_GPL\t\n"
                      "0x0000cccc\tprintk\tvmlinux\tEXPORT_SYMBOL\t\n")
    ours = tmp_path / "built.symvers"
    ours.write_text("0x0000aaaa\tkvm_vcpu_kick\t/x/arch/x86/kvm/kvm\tEXPORT_SYMBOL_GPL\t\n"
                    "0x0000bbbb\tkvm_get_kvm\t/x/arch/x86/kvm/kvm\tEXPORT_SYMBOL_GPL\t\n"
                    "0x0000dddd\tkvm_xen_new\t/x/arch/x86/kvm/kvm\tEXPORT_SYMBOL_GPL\t\n")
    root_kvm.check_export_crcs(theirs, ours)  # a new export is fine; vmlinux's are not ours
    ours.write_text("0x0000eeee\tkvm_vcpu_kick\t/x/arch/x86/kvm/kvm\tEXPORT_SYMBOL_GPL\t\n")
    with pytest.raises(ImageError) as info:
        root_kvm.check_export_crcs(theirs, ours)
    assert "kvm_vcpu_kick (arch/x86/kvm/kvm): CRC 0x0000eeee, Debian's 0x0000aaaa" in str(info.value)
    assert "kvm_get_kvm (arch/x86/kvm/kvm): no longer exported" in str(info.value)


def test_cache_keys_follow_every_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JHLAB_CACHE", str(tmp_path / "cache"))
    debian_kernel = Kernel("linux-image-6.1.0-57-amd64", "6.1.192-3", tmp_path / "k")
    xen = Fragment(Path("hypercalls.config"), {"CONFIG_KVM_XEN": "y"})
    first = root_kvm.rebuilt_kernel(debian_kernel, [xen])
    assert first == root_kvm.rebuilt_kernel(debian_kernel, [Fragment(Path("hypercalls.config"),
                                                                      {"CONFIG_KVM_XEN": "y"})])
    assert first.ident.startswith("linux-image-6.1.0-57-amd64_6.1.192-3+kvm-")
    assert first.root.name == f"kernel-{first.ident}" and first.release == debian_kernel.release
    others = {
        root_kvm.rebuilt_kernel(Kernel(debian_kernel.package, "6.1.192-4", debian_kernel.root), [xen]),
        root_kvm.rebuilt_kernel(debian_kernel, [Fragment(xen.path, {"CONFIG_KVM_XEN": "m"})]),
        root_kvm.rebuilt_kernel(debian_kernel, [Fragment(Path("other.config"), xen.options)]),
    }
    monkeypatch.setattr(root_kvm, "RECIPE", "root-kvm changed")
    others.add(root_kvm.rebuilt_kernel(debian_kernel, [xen]))
    assert len({k.root for k in others} | {first.root}) == 5
    guest = Fragment(Path("linux-cell.config"), {"CONFIG_JAILHOUSE_GUEST": "y"})
    folder = linux_cell.kernel_folder("6.1.192-3", guest)
    assert folder == linux_cell.kernel_folder("6.1.192-3", guest)
    assert folder != linux_cell.kernel_folder("6.1.192-4", guest)
    assert folder != linux_cell.kernel_folder(
        "6.1.192-3", Fragment(guest.path, {**guest.options, "CONFIG_E1000E": "y"}))


def test_source_package_of_a_version() -> None:
    assert debian.source_package("6.1.192-3") == "linux-source-6.1"
    with pytest.raises(ImageError, match="'unstable'"):
        debian.source_package("unstable")


def test_compiler_comes_from_debians_config() -> None:
    assert debian.compiler_of({"CONFIG_CC_VERSION_TEXT": '"sh (fake) 1.0"'}) == "sh"
    with pytest.raises(ImageError, match="which compiler"):
        debian.compiler_of({})
    with pytest.raises(MissingToolError, match=r"gcc-99.*apt-get install gcc-99"):
        debian.compiler_of({"CONFIG_CC_VERSION_TEXT": '"gcc-99 (Debian 99) 99"'})


def test_missing_build_tools_name_their_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in debian.BUILD_TOOLS:
        if tool != "bison":
            _script(bin_dir / tool, "exit 0")
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(MissingToolError, match=r"bison not found \(needed to build kernels\).*"
                                               r"apt-get install bison"):
        debian.require_build_tools()


# -- the guest initramfs ----------------------------------------------------------------------


def test_guest_initramfs_holds_console_node_busybox_and_init(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JHLAB_CACHE", str(tmp_path / "cache"))
    if not HOST_BUSYBOX.is_file():
        pytest.skip("busybox-static is not installed")
    image = linux_cell.guest_rootfs(quiet=True)
    assert image == linux_cell.guest_rootfs(quiet=True)  # cached, same key
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=image.read_bytes(),
                             capture_output=True, check=True).stdout.decode()
    entries = {line.split()[-1]: line.split()[0] for line in listing.splitlines()}
    assert entries["dev/console"].startswith("crw-------")
    assert entries["init"] == "-rwxr-xr-x" and entries["bin/busybox"] == "-rwxr-xr-x"
    assert entries["proc"].startswith("d") and entries["sys"].startswith("d")
    init = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", "init"], input=image.read_bytes(),
                          capture_output=True, check=True).stdout.decode()
    assert linux_cell.READY_LINE in init


# -- build commands: logs, errors, deadlines ---------------------------------------------------


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def test_failed_command_shows_the_telling_lines_and_keeps_the_log(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "a.log"
    noise = "for i in $(seq 0 39); do echo \"  CC  file$i.o\"; done"
    with BuildLog(log_file, Step("Building a"), quiet=True) as log, \
            pytest.raises(KernelBuildError) as info:
        log.run(["sh", "-c", f"echo 'x.c:1:2: error: boom'; {noise}; exit 2"],
                phase="compiling a", timeout=30)
    message = str(info.value)
    assert "compiling a failed (exit status 2)" in message
    assert "x.c:1:2: error: boom" in message and "file39.o" in message and "file5.o" not in message
    assert f"full log: {log_file}" in message
    assert "file5.o" in log_file.read_text()


def test_command_past_its_deadline_is_killed(tmp_path: Path) -> None:
    marker = tmp_path / "child-survived"
    started = time.monotonic()
    with BuildLog(tmp_path / "b.log", Step("Building b"), quiet=True) as log, \
            pytest.raises(KernelBuildError, match="sleeping did not finish within 1s"):
        log.run(["sh", "-c", f"(sleep 3; touch {marker}) & sleep 30"], phase="sleeping", timeout=1)
    assert time.monotonic() - started < 10
    time.sleep(3.5)
    assert not marker.exists(), "the command's children were not ended with it"


def test_phases_are_timed(tmp_path: Path) -> None:
    with BuildLog(tmp_path / "c.log", Step("Building c"), quiet=True) as log:
        log.run(["sh", "-c", "echo hi"], phase="saying hi", timeout=30)
        with log.phase("thinking"):
            pass
    assert list(log.phase_times) == ["saying hi", "thinking"]
    assert list(log.cpu_times) == ["saying hi"] and log.cpu_times["saying hi"] >= 0
    assert "### saying hi: sh -c echo hi" in (tmp_path / "c.log").read_text()


# -- a guest kernel build with make replaced ----------------------------------------------------

#: stands in for the kernel's make: writes .config from KCONFIG_ALLCONFIG (dropping the
#: options named in $DROP), "builds" bzImage unless $FAIL says otherwise, and records
#: every call in $CALLS
FAKE_MAKE = r"""
for arg in "$@"; do
    case "$arg" in
        O=*) obj=${arg#O=} ;;
        KCONFIG_ALLCONFIG=*) forced=${arg#KCONFIG_ALLCONFIG=} ;;
    esac
done
last=$(eval echo \${$#})
echo "$last" >> "$CALLS"
case "$last" in
    allnoconfig) grep -v "^${DROP:-NONE}=" "$forced" > "$obj/.config" ;;
    bzImage)
        echo "  CC      drivers/net/e1000e/netdev.o"
        if [ -n "$FAIL" ]; then echo "netdev.c:7:1: error: $FAIL"; exit 2; fi
        mkdir -p "$obj/arch/x86/boot" && echo kernel > "$obj/arch/x86/boot/bzImage" ;;
esac
"""


@pytest.fixture
def fake_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache with an unpacked 'source' (so apt is not asked) and make replaced."""
    cache = tmp_path / "cache"
    source = cache / "images" / "linux-source_9.9.1-1"
    (source / "fs").mkdir(parents=True)
    (source / "Makefile").write_text("# fake\n")
    (source / "fs" / "Kconfig").write_text("config TMPFS\n\tbool\n\tdepends on SHMEM\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "make", FAKE_MAKE)
    for tool in debian.BUILD_TOOLS:
        if shutil.which(tool) is None:
            _script(bin_dir / tool, "exit 0")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("JHLAB_CACHE", str(cache))
    monkeypatch.setenv("CALLS", str(tmp_path / "calls"))
    monkeypatch.setattr(debian, "BUILD_HEADERS", {})  # host headers are not under test here
    return cache


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "images").iterdir()
                  if p.name.startswith(("tmp-", "linux-cell-kernel-")))


def test_guest_kernel_is_built_once_then_found(fake_build: Path, tmp_path: Path) -> None:
    fragment = _fragment(tmp_path, "CONFIG_TMPFS=y\nCONFIG_E1000E=y\n", "linux-cell.config")
    folder = linux_cell.guest_kernel("9.9.1-1", fragment=fragment, quiet=True)
    assert (folder / "bzImage").read_text() == "kernel\n"
    assert "CONFIG_E1000E=y" in (folder / "config").read_text()
    assert "netdev.o" in (folder / "build.log").read_text()
    assert linux_cell.guest_kernel("9.9.1-1", fragment=fragment, quiet=True) == folder
    assert (tmp_path / "calls").read_text().split() == ["allnoconfig", "bzImage"]


def test_option_that_does_not_survive_fails_clearly_and_leaves_nothing(
        fake_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DROP", "CONFIG_TMPFS")
    fragment = _fragment(tmp_path, "CONFIG_TMPFS=y\nCONFIG_E1000E=y\n", "linux-cell.config")
    with pytest.raises(KernelConfigError) as info:
        linux_cell.guest_kernel("9.9.1-1", fragment=fragment, quiet=True)
    message = str(info.value)
    assert "CONFIG_TMPFS=y (linux-cell.config): olddefconfig gave n" in message
    assert "depends on SHMEM (fs/Kconfig)" in message
    assert _leftovers(fake_build) == []
    assert info.value.log.is_file() and "CONFIG_E1000E=y" in info.value.log.read_text()
    assert (tmp_path / "calls").read_text().split() == ["allnoconfig"]  # no compile after it


def test_compile_error_fails_clearly_and_leaves_nothing(
        fake_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAIL", "expected ';' before '}'")
    fragment = _fragment(tmp_path, "CONFIG_E1000E=y\n", "linux-cell.config")
    with pytest.raises(KernelBuildError) as info:
        linux_cell.guest_kernel("9.9.1-1", fragment=fragment, quiet=True)
    message = str(info.value)
    assert message.startswith("compiling the kernel failed (exit status 2)")
    assert "netdev.c:7:1: error: expected ';' before '}'" in message
    assert f"full log: {info.value.log}" in message and info.value.log.is_file()
    assert _leftovers(fake_build) == []


def test_root_file_system_key_follows_the_files_it_carries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The root file system is rebuilt when a carried file (the guest kernel) changes,
    or when it carries a file elsewhere; the same inputs give the same key."""
    from harness.images import ImageBuilder

    monkeypatch.setenv("JHLAB_CACHE", str(tmp_path / "cache"))
    kernel = Kernel("linux-image-6.1.0-57-amd64", "6.1.192-3", tmp_path / "k", variant="kvm-1")
    guest = tmp_path / "bzImage"
    guest.write_bytes(b"kernel 1")
    builder = ImageBuilder(quiet=True)
    key = builder.rootfs_key(kernel, {"usr/share/jailhouse/linux/bzImage": guest})
    assert key == builder.rootfs_key(kernel, {"usr/share/jailhouse/linux/bzImage": guest})
    assert key != builder.rootfs_key(kernel, {"usr/share/jailhouse/bzImage": guest})
    assert key != builder.rootfs_key(kernel)
    assert key != builder.rootfs_key(Kernel(kernel.package, kernel.version, kernel.root),
                                     {"usr/share/jailhouse/linux/bzImage": guest})
    guest.write_bytes(b"kernel 2")
    assert key != builder.rootfs_key(kernel, {"usr/share/jailhouse/linux/bzImage": guest})


# -- jhlab's root-cell modules -------------------------------------------------------------


def _debian_headers_tree(root: Path, release: str, *, include: str | None = None,
                         scripts: str | None = None) -> Path:
    """The flavour tree of a Debian linux-headers package, as extracted."""
    abi = release.rsplit("-", 1)[0]
    tree = root / "usr" / "src" / f"linux-headers-{release}"
    tree.mkdir(parents=True)
    common = include or f"/usr/src/linux-headers-{abi}-common/Makefile"
    (tree / "Makefile").write_text(f"include {common}\n")
    (tree / "scripts").symlink_to(scripts or "../../lib/linux-kbuild-6.1/scripts")
    return tree


def test_debian_headers_name_the_packages_they_include(tmp_path: Path) -> None:
    """The common tree comes from the flavour Makefile's include, the kbuild package from
    the scripts link; anything else is refused with what was found."""
    tree = _debian_headers_tree(tmp_path / "a", "6.1.0-57-amd64")
    assert modules._included_packages(tree) == ("linux-headers-6.1.0-57-common",
                                                     "linux-kbuild-6.1")
    odd = _debian_headers_tree(tmp_path / "b", "6.1.0-57-amd64", scripts="../scripts")
    with pytest.raises(ImageError, match="not laid out as Debian's headers"):
        modules._included_packages(odd)


def test_module_folders_are_those_with_a_kbuild(tmp_path: Path) -> None:
    (tmp_path / "b_mod").mkdir()
    (tmp_path / "b_mod" / "Kbuild").write_text("obj-m := b_mod.o\n")
    (tmp_path / "a_mod").mkdir()
    (tmp_path / "a_mod" / "Kbuild").write_text("obj-m := a_mod.o\n")
    (tmp_path / "notes").mkdir()
    assert [p.name for p in modules.module_sources(tmp_path)] == ["a_mod", "b_mod"]
    assert modules.module_sources(tmp_path / "missing") == []
    assert [p.name for p in modules.module_sources()] == ["jhlab_gsi"]


def test_jhlab_gsi_builds_against_debians_headers(tmp_path: Path) -> None:
    """jhlab_gsi compiles without a warning against the Debian headers in the cache
    (``jhlab images build`` fetches them), and carries the lab kernel's vermagic."""
    images = debian.images_dir()
    trees = sorted(images.glob("linux-headers_*/usr/src/linux-headers-*-amd64"))
    kernels = sorted(images.glob("kernel-linux-image-*+kvm-*"))
    if not trees or not kernels:
        pytest.skip("no Debian headers or root kernel in the cache ('jhlab images build')")
    tree, folder = trees[-1], kernels[-1]
    package, version = folder.name.removeprefix("kernel-").split("+", 1)[0].split("_", 1)
    kernel = Kernel(package, version, folder)
    if f"linux-headers-{kernel.release}" != tree.name:
        pytest.skip(f"cached headers {tree.name} are not those of {kernel.release}")
    compiler = debian.compiler_of(parse_config((tree / ".config").read_text()))
    staged = tmp_path / "out"
    staged.mkdir()
    with BuildLog(tmp_path / "build.log", Step("Building kmod"), quiet=True) as log:
        built = modules._build_module(modules.module_sources()[0], tmp_path, staged,
                                           tree, compiler, kernel, log)
    assert built == {"jhlab_gsi.ko": "jhlab_gsi"}
    text = (tmp_path / "build.log").read_text()
    assert "warning:" not in text and "error:" not in text, text[-3000:]
    assert root_kvm.modinfo_field(staged / "jhlab_gsi.ko", "license") == "GPL"
