"""The root cell's kernel with cells' hypercalls delivered to user space: Debian's kernel
with its KVM modules rebuilt with ``CONFIG_KVM_XEN`` (``kernel_configs/hypercalls.config``).

Why only the modules: in Debian's 6.1 source, ``CONFIG_KVM_XEN`` is tested only inside
``arch/x86/kvm`` (``Makefile``: ``xen.o``; ``x86.c``, ``irq_comm.c``, ``xen.h``). The
structures KVM shares with the rest of the kernel (``struct kvm_arch`` and
``kvm_vcpu_arch`` in ``asm/kvm_host.h``, ``include/linux/kvm_host.h``) hold their Xen
members unconditionally, and no other Kconfig option depends on it. So kvm.ko,
kvm-amd.ko and kvm-intel.ko built from Debian's source, with Debian's config plus the
fragment, Debian's compiler and Debian's ``Module.symvers``, fit Debian's unchanged
vmlinux and every other Debian module. The build checks that instead of trusting it:

* after ``olddefconfig`` the config differs from Debian's in the fragment's options
  only (``CONFIG_CC_VERSION_TEXT`` may differ in the compiler's Debian revision);
* the rebuilt modules carry Debian's ``vermagic``;
* every symbol Debian's KVM modules export is exported with the same CRC (the CRC
  covers the full type of what the symbol's signature reaches, ``struct kvm``
  included), so modules built against Debian's KVM still load.

The modules are built as external modules (``M=``) of a ``modules_prepare``'d tree
holding Debian's ``Module.symvers``: that is what makes modpost record Debian's CRC for
every kernel symbol they use, so the running kernel checks each of them at load time.
Being external and unsigned to Debian's kernel, loading them taints it (``O``, ``E``),
nothing else. Cost: ``modules_prepare`` plus the three modules (README, "Kernels").

The result is a kernel folder like Debian's extracted one (``vmlinuz`` linked, modules
linked except the rebuilt three, ``depmod`` run, ``config`` = the build's config), in
``images/kernel-<package>_<version>+kvm-<key>/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from harness.errors import ImageError
from harness.images import Kernel, cache_lock, run_tool
from harness.progress import step
from harness.recipes import find_recipes

from .debian import compiler_of, debian_build_config, images_dir, require_build_tools, source_tree
from .kconfig import Fragment, config_changes, parse_config
from .process import BuildLog
from .tree import TreeBuild, artefact_key, log_path

LOG = logging.getLogger(__name__)

#: Bump when the procedure changes in a way the hashed inputs do not show.
RECIPE: Final = "root-kvm 1"
#: what the root kernel gets on top of Debian's config (in ``kernel_configs/``)
HYPERCALLS_FRAGMENT: Final = "hypercalls.config"
#: the modules rebuilt, where Debian's module tree has them
KVM_DIR: Final = "arch/x86/kvm"
KVM_MODULES: Final = ("kvm.ko", "kvm-amd.ko", "kvm-intel.ko")
#: KVM's generic half: arch/x86/kvm's Makefile reaches it as ../../../virt/kvm
KVM_GENERIC_DIR: Final = "virt/kvm"
#: config options that may differ from Debian's: the compiler's banner (its Debian
#: revision), as long as CONFIG_GCC_VERSION is the same
_BANNER: Final = "CONFIG_CC_VERSION_TEXT"
#: seconds for ``modules_prepare`` and for compiling the modules (each)
PREPARE_TIMEOUT: Final = 3600.0
COMPILE_TIMEOUT: Final = 3600.0
#: depmod's outputs, regenerated for the new tree rather than linked from Debian's
_DEPMOD_OUTPUTS: Final = frozenset({
    "modules.dep", "modules.dep.bin", "modules.alias", "modules.alias.bin",
    "modules.symbols", "modules.symbols.bin", "modules.softdep", "modules.devname",
    "modules.builtin.bin", "modules.builtin.alias.bin", "modules.weakdep"})


def root_kernel(debian: Kernel, *, fragments: Sequence[Path] | None = None,
                quiet: bool = False) -> Kernel:
    """Debian's kernel ``debian`` with its KVM modules rebuilt with ``fragments``, built
    on first use and cached by the hash of the source version, the fragments and this
    recipe.

    :raise KernelConfigError: when a fragment option does not survive ``olddefconfig``
    :raise ImageError: when the fragments change more than the KVM modules can carry, or
        the rebuilt modules do not fit Debian's kernel (vermagic, export CRCs)
    :raise KernelBuildError: when a build step fails (with the log's tail and path)
    """
    if fragments is None:
        fragments = (find_recipes().kernel_configs / HYPERCALLS_FRAGMENT,)
    loaded = [Fragment.load(path) for path in fragments]
    kernel = rebuilt_kernel(debian, loaded)
    folder = kernel.root
    with cache_lock(folder.name):
        if kernel.vmlinuz.exists():
            return kernel
        options = ", ".join(f"{n}={v}" for f in loaded for n, v in f.options.items())
        with step(f"Building KVM modules for {debian.release} with {options}", quiet=quiet) as st, \
                BuildLog(log_path(folder.name), st, quiet=quiet) as log, \
                tempfile.TemporaryDirectory(dir=folder.parent, prefix="tmp-kbuild-kvm-") as tmp:
            _build(debian, loaded, kernel, Path(tmp), log, quiet=quiet)
            st.result = kernel.variant
    return kernel


def rebuilt_kernel(debian: Kernel, fragments: Sequence[Fragment]) -> Kernel:
    """The kernel ``debian`` becomes with ``fragments`` (where the cache keeps it; built or
    not): its variant and folder carry the hash of the source version, the fragments
    (names and options) and :data:`RECIPE`."""
    key = artefact_key(RECIPE, debian.package, debian.version,
                       *(f"{f.path.name}\0{f.text()}" for f in fragments))
    variant = f"kvm-{key}"
    folder = images_dir() / f"kernel-{debian.package}_{debian.version}+{variant}"
    return Kernel(debian.package, debian.version, folder, variant=variant)


def _build(debian: Kernel, fragments: list[Fragment], kernel: Kernel, work: Path, log: BuildLog,
           *, quiet: bool) -> None:
    with log.phase("fetching sources"):
        source = source_tree(debian.version, quiet=quiet)
        debian_config = debian_build_config(debian.release, debian.version, quiet=quiet)
        base = parse_config(debian_config.config.read_text())
        compiler = compiler_of(base)
        require_build_tools({compiler: compiler})
    tree = TreeBuild(source, work / "obj", log,
                     [f"CC={compiler}", f"KERNELRELEASE={debian.release}"])
    config = tree.configure(fragments, base=debian_config.config)
    with log.phase("comparing with Debian's config"):
        check_only_fragment_changed(base, config, fragments)
    tree.make("modules_prepare", phase="make modules_prepare", timeout=PREPARE_TIMEOUT)
    shutil.copyfile(debian_config.symvers, tree.obj / "Module.symvers")
    # External-module build of a copy (M= builds write next to the sources).
    ext = work / "ext"
    for sub in (KVM_DIR, KVM_GENERIC_DIR):
        shutil.copytree(source.root / sub, ext / sub)
    tree.make("modules", phase="compiling KVM", timeout=COMPILE_TIMEOUT,
              variables=[f"M={ext / KVM_DIR}"])
    built = ext / KVM_DIR
    with log.phase("checking the modules against Debian's kernel"):
        for name in KVM_MODULES:
            run_tool(["strip", "--strip-debug", str(built / name)], what=f"stripping {name}")
            check_vermagic(built / name, debian.modules / "kernel" / KVM_DIR / name)
        check_export_crcs(debian_config.symvers, built / "Module.symvers")
    with log.phase("assembling the kernel folder"):
        _assemble(debian, kernel, config_text=tree.config_path.read_text(), built=built,
                  provenance={"recipe": RECIPE, "source": f"{source.package} {source.version}",
                              "fragments": {f.path.name: f.options for f in fragments},
                              "compiler": compiler, "phases": log.phase_times,
                              "cpu": log.cpu_times}, log=log)


def check_only_fragment_changed(base: dict[str, str], config: dict[str, str],
                                fragments: Sequence[Fragment]) -> None:
    """The rebuilt modules fit Debian's vmlinux only when nothing but the fragment's
    options changed.

    :raise ImageError: listing every other option that changed
    """
    wanted = {name for fragment in fragments for name in fragment.options}
    changes = config_changes(base, config)
    others = {name: change for name, change in changes.items() if name not in wanted}
    if _BANNER in others and base.get("CONFIG_GCC_VERSION") == config.get("CONFIG_GCC_VERSION"):
        del others[_BANNER]
    if others:
        listed = "\n".join(f"  {name}: Debian {old}, here {new}" for name, (old, new) in others.items())
        raise ImageError(
            "the fragment changes more of Debian's config than its own options, so "
            "rebuilt KVM modules would not fit Debian's kernel:\n"
            f"{listed}\nKeep the fragment to options used only inside {KVM_DIR} (and the same "
            "compiler Debian used), or build a whole root kernel")


def modinfo_field(module: Path, field: str) -> str:
    """One ``modinfo`` field of a module file."""
    return run_tool(["modinfo", "-F", field, str(module)], what=f"modinfo {module.name}").strip()


def check_vermagic(built: Path, debian: Path) -> None:
    """:raise ImageError: when ``built`` would not load into the kernel ``debian`` is from"""
    ours, theirs = modinfo_field(built, "vermagic"), modinfo_field(debian, "vermagic")
    if ours != theirs:
        raise ImageError(f"rebuilt {built.name} has vermagic {ours!r}, Debian's kernel wants "
                         f"{theirs!r}")


def read_symvers(path: Path) -> dict[str, tuple[str, str]]:
    """``Module.symvers``: symbol -> (CRC, module)."""
    table: dict[str, tuple[str, str]] = {}
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 3:
            table[fields[1]] = (fields[0], fields[2])
    return table


def check_export_crcs(debian_symvers: Path, built_symvers: Path) -> None:
    """Every symbol Debian's KVM modules export is exported by the rebuilt ones with the
    same CRC.

    :raise ImageError: naming the symbols that are missing or changed
    """
    debian = read_symvers(debian_symvers)
    built = read_symvers(built_symvers)
    kvm_prefix = f"{KVM_DIR}/"
    problems = []
    for symbol, (crc, module) in sorted(debian.items()):
        if not module.startswith(kvm_prefix):
            continue
        if symbol not in built:
            problems.append(f"{symbol} ({module}): no longer exported")
        elif built[symbol][0] != crc:
            problems.append(f"{symbol} ({module}): CRC {built[symbol][0]}, Debian's {crc}")
    if problems:
        raise ImageError("the rebuilt KVM modules do not match the interface of Debian's:\n  "
                         + "\n  ".join(problems[:20]))


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a module file (the tree is mostly Debian's, unchanged); copy when the
    file system cannot link, and copy depmod's inputs, which must not be shared."""
    try:
        if src.endswith(".ko"):
            os.link(src, dst)
            return
    except OSError:
        pass
    shutil.copy2(src, dst)


def _assemble(debian: Kernel, kernel: Kernel, *, config_text: str, built: Path,
              provenance: dict[str, object], log: BuildLog) -> None:
    staged = kernel.root.with_name(kernel.root.name + ".partial")
    if staged.exists():
        shutil.rmtree(staged)
    try:
        modules = staged / "lib" / "modules" / debian.release
        shutil.copytree(debian.modules, modules, symlinks=True, copy_function=_link_or_copy,
                        ignore=lambda _dir, names: [n for n in names if n in _DEPMOD_OUTPUTS])
        for name in KVM_MODULES:
            target = modules / "kernel" / KVM_DIR / name
            target.unlink()  # a link to Debian's file: never write through it
            shutil.copy2(built / name, target)
        run_tool(["depmod", "-b", str(staged), debian.release], what="depmod")
        try:
            os.link(debian.vmlinuz, staged / "vmlinuz")
        except OSError:
            shutil.copy2(debian.vmlinuz, staged / "vmlinuz")
        (staged / "config").write_text(config_text)
        (staged / "kbuild.json").write_text(json.dumps(provenance, indent=2) + "\n")
        log.close()
        shutil.copyfile(log.path, staged / "build.log")
        staged.rename(kernel.root)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
