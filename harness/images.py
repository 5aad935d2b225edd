"""Images of the lab: the root-cell kernel, its initramfs and root file system.

Everything is built from the recipes in ``images/`` (found by
:func:`harness.recipes.find_recipes`) and Debian's packages (through the
machine's configured apt sources; no mirror is named here) into a cache directory keyed
by content hash, so an unchanged recipe is never built twice and two builds racing for
the same artefact wait for each other (a lock file per artefact) instead of colliding.

Cache layout (``$JHLAB_CACHE``, else ``$XDG_CACHE_HOME/jhlab``, else ``~/.cache/jhlab``)::

    images/kernel-<package>_<version>/     vmlinuz, config, lib/modules/<release>/
    images/kernel-<package>_<version>+kvm-<key>/   the same, KVM rebuilt (harness.kbuild)
    images/linux-cell-*                    Linux-cell guest kernel and initramfs (harness.kbuild)
    images/rootfs-<hash>.img               ext4, label jhlab-root, mounted read-only
    images/initramfs-<hash>.cpio.gz        busybox, storage modules, stage-1 init
    images/inmates-<hash>/                 demo inmates (flat binaries and map files)
    images/root-modules-<key>/             jhlab's root-cell kernel modules (harness.kbuild)
    locks/<artefact>.lock
    accel.json                             accelerator probe results

The per-boot guest payload (the hvmodel package, guest tools, compiled cell configs,
demo inmates, jhlab's root-cell kernel modules, the lab's SSH key) is a second, small
cpio archive appended to the initramfs at launch, so changing the model's code never
forces an image rebuild.  In the
root cell it appears where Jailhouse's images put things: configs in ``/etc/jailhouse``,
demos in ``/usr/libexec/jailhouse/demos`` (with Jailhouse's demo names as aliases).
"""

from __future__ import annotations

import compileall
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import ImageError, MissingToolError
from harness.progress import Step, step
from harness.recipes import CONFIGS, PACKAGE_DIR, Recipes, build_inmates, find_recipes

if TYPE_CHECKING:
    from harness.kbuild import LinuxCellImages

LOG = logging.getLogger(__name__)

#: Bump when the build procedure changes in a way the hashed inputs do not show.
RECIPE_VERSION = "1"
#: The harness modules (files or packages beside this one) whose code decides how images
#: are built: part of :meth:`ImageBuilder.inputs_key`.
IMAGE_CODE = ("images.py", "recipes.py", "kbuild.py", "kbuild")

KERNEL_META_PACKAGE = "linux-image-amd64"
DEBIAN_SUITE = "bookworm"
#: Busybox for the initramfs: the host's static build (package busybox-static).
HOST_BUSYBOX = Path("/bin/busybox")

TOOLS = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "mmdebstrap": "mmdebstrap",
    "depmod": "kmod",
    "mkfs.ext4": "e2fsprogs",
    "cpio": "cpio",
}

#: ``sys.implementation.cache_tag`` of the root cell's Python (Debian bookworm's python3):
#: the payload carries byte-compiled modules when the host's Python makes the same ones
GUEST_PYTHON_CACHE_TAG = "cpython-311"

#: Jailhouse's demo names for our inmates, so scripts written for Jailhouse find them.
DEMO_ALIASES = {
    "tiny-demo": "hello",
    "apic-demo": "apic-timer",
    "smp-demo": "smp",
    "pci-demo": "pci-probe",
    "ivshmem-demo": "ivshmem",
    "e1000-demo": "e1000e",
}


def cache_dir() -> Path:
    """The cache directory of built artefacts (created on demand)."""
    if env := os.environ.get("JHLAB_CACHE"):
        base = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = Path(xdg) / "jhlab"
    base.mkdir(parents=True, exist_ok=True)
    return base


def require_tool(tool: str, purpose: str = "to build images") -> str:
    """Return the path of ``tool`` or raise :class:`MissingToolError` naming its package."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path is None:
        raise MissingToolError(tool, TOOLS.get(tool, tool), purpose)
    return path


def run_tool(cmd: Sequence[str], *, cwd: Path | None = None, what: str = "") -> str:
    """Run a build command; on failure raise :class:`ImageError` with its output."""
    exe = require_tool(cmd[0])
    LOG.debug("running %s", " ".join(cmd))
    proc = subprocess.run(
        [exe, *cmd[1:]], cwd=cwd, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ImageError(
            f"{what or cmd[0]} failed (exit status {proc.returncode}): "
            f"{' '.join(cmd)}\n{tail}"
        )
    return proc.stdout


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock on artefact ``name`` (waits for a concurrent builder)."""
    locks = cache_dir() / "locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _hash_files(digest: hashlib._Hash, paths: Iterable[Path], root: Path) -> None:
    for path in sorted(paths):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            digest.update(f"{rel}\0->{os.readlink(path)}\0".encode())
            continue
        digest.update(f"{rel}\0{path.stat().st_mode & 0o777:o}\0".encode())
        digest.update(path.read_bytes())


def _recipe_files(base: Path) -> list[Path]:
    """Files and symlinks under ``base`` (a recipe folder)."""
    return [p for p in base.rglob("*") if p.is_symlink() or p.is_file()]


def _recipe_lines(path: Path) -> list[str]:
    """Non-empty, non-comment lines of a recipe list."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


@dataclass(frozen=True)
class Kernel:
    """An extracted Debian kernel package.

    :param variant: what was rebuilt on top of Debian's package (``""``: nothing)
    """

    package: str
    version: str
    root: Path
    variant: str = ""

    @property
    def release(self) -> str:
        """``uname -r`` of this kernel, e.g. ``6.1.0-56-amd64``."""
        return self.package.removeprefix("linux-image-")

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def config(self) -> Path:
        return self.root / "config"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @property
    def ident(self) -> str:
        return f"{self.package}_{self.version}" + (f"+{self.variant}" if self.variant else "")

    def module_closure(self, names: Iterable[str]) -> list[str]:
        """Module files (relative to :attr:`modules`) for ``names`` and everything they
        need, in an order that can be loaded front to back.  Built-in modules are
        skipped; an unknown name raises :class:`ImageError`."""
        deps: dict[str, list[str]] = {}
        for line in (self.modules / "modules.dep").read_text().splitlines():
            module, _, needs = line.partition(":")
            deps[module] = needs.split()
        by_name = {_module_name(m): m for m in deps}
        builtin = {
            _module_name(line.strip())
            for line in (self.modules / "modules.builtin").read_text().splitlines()
        }
        order: list[str] = []

        def visit(module: str) -> None:
            if module in order:
                return
            for dep in deps[module]:
                visit(dep)
            order.append(module)

        for name in names:
            key = name.replace("-", "_")
            if key in by_name:
                visit(by_name[key])
            elif key not in builtin:
                raise ImageError(f"kernel {self.release} has no module {name!r}")
        return order


def _module_name(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".ko", 1)[0].replace("-", "_")


@dataclass(frozen=True)
class ImageSet:
    """Everything a lab machine boots, and the inmates its cells run."""

    kernel: Kernel
    initramfs: Path
    rootfs: Path
    inmates: Path | None = None
    linux_cell: LinuxCellImages | None = None
    #: jhlab's root-cell kernel modules (``<name>.ko``), loaded at boot
    root_modules: Path | None = None


def _apt_lists_state(path: str = "/var/lib/apt/lists") -> str | None:
    """What changes when apt's package lists change (``apt-get update``): the newest
    modification of the lists folder and its files; None when it cannot be read."""
    try:
        with os.scandir(path) as entries:
            stamps = [entry.stat().st_mtime_ns for entry in entries if entry.is_file()]
        return f"{os.stat(path).st_mtime_ns}:{max(stamps, default=0)}:{len(stamps)}"
    except OSError:
        return None


class ImageBuilder:
    """Builds (or finds in the cache) the kernel, initramfs and root file system.

    :param quiet: log progress only, print nothing
    :param recipes: the recipe folders (default: :func:`~harness.recipes.find_recipes`)
    :raise ImageError: when no recipes are found
    """

    def __init__(self, *, quiet: bool = False, recipes: Recipes | None = None) -> None:
        self.quiet = quiet
        self.recipes = recipes or find_recipes()
        self.dir = cache_dir() / "images"
        self.dir.mkdir(parents=True, exist_ok=True)

    def inputs_key(self) -> str:
        """A key of everything the image set is built from, computed without building
        anything: the recipe version, the Debian suite and kernel package, the image
        recipes (every folder of ``images/`` but the per-boot guest payload's
        ``guest/``), the kernel configs, the host's busybox and the harness code that
        builds images (:data:`IMAGE_CODE`).  Equal keys mean :meth:`build` finds the same
        artefacts in the cache; CI keys its image cache with it (``jhlab images key``).

        :raise ImageError: when apt cannot name the kernel package
        :raise MissingToolError: when busybox-static is missing
        """
        package, version = self.resolve_kernel_package()
        digest = hashlib.sha256(f"{RECIPE_VERSION}\0{DEBIAN_SUITE}\0{package}_{version}\0".encode())
        recipes = self.recipes
        for base in (recipes.images, recipes.kernel_configs):
            files = [p for p in _recipe_files(base)
                     if not {"build", "guest"} & set(p.relative_to(base).parts[:-1])]
            _hash_files(digest, files, recipes.root)
        digest.update(self._busybox().read_bytes())
        for name in IMAGE_CODE:
            code = PACKAGE_DIR / name
            files = [code] if code.is_file() else _recipe_files(code) if code.is_dir() else []
            _hash_files(digest, [f for f in files if f.suffix == ".py"], PACKAGE_DIR)
        return digest.hexdigest()[:16]

    def build(self) -> ImageSet:
        """Return the image set, building whatever is missing."""
        from harness.kbuild import linux_cell_images, root_modules

        kernel = self.kernel()
        linux_cell = linux_cell_images(kernel.version, quiet=self.quiet)
        return ImageSet(kernel=kernel, initramfs=self.initramfs(kernel),
                        rootfs=self.rootfs(kernel, linux_cell.root_cell_files()),
                        inmates=self.inmates(), linux_cell=linux_cell,
                        root_modules=root_modules(kernel, quiet=self.quiet,
                                                  kmod=self.recipes.kmod))

    # -- kernel ---------------------------------------------------------------------

    def resolve_kernel_package(self) -> tuple[str, str]:
        """The concrete kernel package behind ``linux-image-amd64`` and its version.

        Asking apt takes about a second; the answer is kept in the cache with the state
        of apt's package lists it came from, and asked again when those change.
        """
        memo = self.dir / "kernel-package.json"
        lists = _apt_lists_state()
        try:
            known = json.loads(memo.read_text())
            if lists is not None and known["lists"] == lists:
                return str(known["package"]), str(known["version"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        package, version = self._ask_apt_for_kernel()
        if lists is not None:
            staged = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
            staged.write_text(json.dumps({"lists": lists, "package": package, "version": version}))
            os.replace(staged, memo)  # concurrent labs read a whole file or none
        return package, version

    def _ask_apt_for_kernel(self) -> tuple[str, str]:
        out = run_tool(
            ["apt-cache", "depends", "--important", KERNEL_META_PACKAGE],
            what="looking up the kernel package",
        )
        packages = [
            line.split(":", 1)[1].strip()
            for line in out.splitlines()
            if line.strip().startswith("Depends:") and "linux-image-" in line
        ]
        if not packages:
            raise ImageError(
                f"apt knows no {KERNEL_META_PACKAGE}: run 'apt-get update' (scripts/setup does)"
            )
        package = packages[0]
        policy = run_tool(["apt-cache", "policy", package], what="looking up the kernel version")
        for line in policy.splitlines():
            if line.strip().startswith("Candidate:"):
                version = line.split(":", 1)[1].strip()
                if version and version != "(none)":
                    return package, version
        raise ImageError(f"apt has no installable version of {package}: run 'apt-get update'")

    def kernel(self) -> Kernel:
        """The root cell's kernel: Debian's, with KVM rebuilt for cells' hypercalls
        (:func:`harness.kbuild.root_kernel`)."""
        from harness.kbuild import root_kernel

        return root_kernel(self.debian_kernel(), quiet=self.quiet)

    def debian_kernel(self) -> Kernel:
        """The extracted kernel package (downloaded once, never installed on the host)."""
        package, version = self.resolve_kernel_package()
        kernel = Kernel(package, version, self.dir / f"kernel-{package}_{version}")
        with cache_lock(kernel.root.name):
            if (kernel.root / "vmlinuz").exists():
                return kernel
            with step(f"Fetching kernel {package} {version}", quiet=self.quiet) as st:
                self._extract_kernel(kernel, st)
        return kernel

    def _extract_kernel(self, kernel: Kernel, st: Step) -> None:
        with tempfile.TemporaryDirectory(dir=self.dir, prefix="tmp-kernel-") as tmp:
            work = Path(tmp)
            st.note("apt-get download")
            run_tool(["apt-get", "download", f"{kernel.package}={kernel.version}"], cwd=work,
                     what="downloading the kernel package")
            debs = list(work.glob("*.deb"))
            if len(debs) != 1:
                raise ImageError(f"expected one kernel package in {work}, found {debs}")
            st.note("extracting")
            tree = work / "tree"
            run_tool(["dpkg-deb", "-x", str(debs[0]), str(tree)], what="extracting the kernel")
            staged = work / "kernel"
            (staged / "lib" / "modules").mkdir(parents=True)
            release = kernel.release
            shutil.copy2(tree / "boot" / f"vmlinuz-{release}", staged / "vmlinuz")
            shutil.copy2(tree / "boot" / f"config-{release}", staged / "config")
            shutil.move(tree / "lib" / "modules" / release, staged / "lib" / "modules" / release)
            st.note("depmod")
            run_tool(["depmod", "-b", str(staged), release], what="depmod")
            staged.rename(kernel.root)
            st.result = release

    # -- root file system -------------------------------------------------------------

    def rootfs_key(self, kernel: Kernel, extra: Mapping[str, Path] | None = None) -> str:
        digest = hashlib.sha256(f"{RECIPE_VERSION}\0{kernel.ident}\0{DEBIAN_SUITE}\0".encode())
        base = self.recipes.rootfs
        _hash_files(digest, _recipe_files(base), base)
        for target, source in sorted((extra or {}).items()):
            digest.update(f"{target}\0".encode())
            digest.update(source.read_bytes())
        return digest.hexdigest()[:16]

    def rootfs(self, kernel: Kernel, extra: Mapping[str, Path] | None = None) -> Path:
        """The root file system image (ext4, read-only in the guest).

        :param extra: more files it carries: path in the image (no leading slash) -> file
        """
        image = self.dir / f"rootfs-{self.rootfs_key(kernel, extra)}.img"
        with cache_lock(image.name):
            if image.exists():
                return image
            with step("Building root file system (mmdebstrap)", quiet=self.quiet) as st:
                self._build_rootfs(kernel, image, st, extra or {})
        return image

    def _build_rootfs(self, kernel: Kernel, image: Path, st: Step, extra: Mapping[str, Path]) -> None:
        recipe = self.recipes.rootfs
        packages = _recipe_lines(recipe / "packages.txt")
        with tempfile.TemporaryDirectory(dir=self.dir, prefix="tmp-rootfs-") as tmp:
            tree = Path(tmp) / "root"
            st.note(f"mmdebstrap {DEBIAN_SUITE} ({len(packages)} packages)")
            run_tool(
                ["mmdebstrap", "--variant=minbase", "--quiet",
                 f"--include={','.join(packages)}",
                 "--dpkgopt=path-exclude=/usr/share/doc/*",
                 "--dpkgopt=path-exclude=/usr/share/man/*",
                 "--dpkgopt=path-exclude=/usr/share/locale/*",
                 DEBIAN_SUITE, str(tree)],
                what="mmdebstrap",
            )
            st.note("kernel modules")
            self._install_modules(kernel, tree)
            st.note("overlay")
            shutil.copytree(recipe / "overlay", tree, dirs_exist_ok=True, symlinks=True)
            for target, source in extra.items():
                (tree / target).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, tree / target)
            (tree / "etc" / "machine-id").write_text("")
            (tree / "opt" / "jhlab").mkdir(parents=True, exist_ok=True)
            st.note("mkfs.ext4")
            used = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file() and not f.is_symlink())
            size_mb = int(used * 1.3 / 2**20) + 64
            partial = image.with_suffix(".partial")
            run_tool(
                ["mkfs.ext4", "-q", "-F", "-L", "jhlab-root", "-d", str(tree),
                 "-E", "root_owner=0:0", "-O", "^has_journal", str(partial), f"{size_mb}M"],
                what="mkfs.ext4",
            )
            partial.rename(image)
            st.result = f"{size_mb} MiB"

    def _install_modules(self, kernel: Kernel, tree: Path) -> None:
        wanted = _recipe_lines(self.recipes.rootfs / "modules.txt")
        dest = tree / "lib" / "modules" / kernel.release
        dest.mkdir(parents=True, exist_ok=True)
        for module in kernel.module_closure(wanted):
            target = dest / module
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(kernel.modules / module, target)
        for meta in kernel.modules.glob("modules.builtin*"):
            shutil.copy2(meta, dest / meta.name)
        shutil.copy2(kernel.modules / "modules.order", dest / "modules.order")
        run_tool(["depmod", "-b", str(tree), kernel.release], what="depmod (root file system)")
        (tree / "boot").mkdir(exist_ok=True)
        shutil.copy2(kernel.config, tree / "boot" / f"config-{kernel.release}")

    # -- initramfs ----------------------------------------------------------------------

    def initramfs_key(self, kernel: Kernel) -> str:
        digest = hashlib.sha256(f"{RECIPE_VERSION}\0{kernel.ident}\0".encode())
        base = self.recipes.initramfs
        _hash_files(digest, _recipe_files(base), base)
        digest.update(self._busybox().read_bytes())
        return digest.hexdigest()[:16]

    def _busybox(self) -> Path:
        if not HOST_BUSYBOX.exists():
            raise MissingToolError("busybox", "busybox-static", "for the initramfs")
        return HOST_BUSYBOX

    def initramfs(self, kernel: Kernel) -> Path:
        """The stage-1 initramfs (gzip'd newc cpio, reproducible)."""
        image = self.dir / f"initramfs-{self.initramfs_key(kernel)}.cpio.gz"
        with cache_lock(image.name):
            if image.exists():
                return image
            with step("Building initramfs", quiet=self.quiet) as st:
                with tempfile.TemporaryDirectory(dir=self.dir, prefix="tmp-initramfs-") as tmp:
                    tree = Path(tmp)
                    for sub in ("bin", "etc", "proc", "sys", "dev", "lib/modules"):
                        (tree / sub).mkdir(parents=True)
                    shutil.copy2(self._busybox(), tree / "bin" / "busybox")
                    shutil.copy2(self.recipes.initramfs / "init", tree / "init")
                    wanted = _recipe_lines(self.recipes.initramfs / "modules.txt")
                    order = []
                    for module in kernel.module_closure(wanted):
                        name = Path(module).name
                        shutil.copy2(kernel.modules / module, tree / "lib" / "modules" / name)
                        order.append(name)
                    (tree / "etc" / "modules.load").write_text("\n".join(order) + "\n")
                    write_cpio(tree, image)
                    st.result = f"{image.stat().st_size // 1024} KiB"
        return image


    # -- inmates --------------------------------------------------------------------------

    def inmates_key(self) -> str:
        digest = hashlib.sha256(f"{RECIPE_VERSION}\0".encode())
        base = self.recipes.inmates
        files = [p for p in _recipe_files(base) if "build" not in p.relative_to(base).parts]
        _hash_files(digest, files, base)
        return digest.hexdigest()[:16]

    def inmates(self) -> Path:
        """The demo inmates, built from ``images/inmates`` (reproducible flat binaries)."""
        folder = self.dir / f"inmates-{self.inmates_key()}"
        with cache_lock(folder.name):
            if folder.is_dir():
                return folder
            with step("Building inmates", quiet=self.quiet) as st:
                with tempfile.TemporaryDirectory(dir=self.dir, prefix="tmp-inmates-") as tmp:
                    out = Path(tmp) / "out"
                    build_inmates(out, recipes=self.recipes)
                    for junk in out.rglob("*.o"):
                        junk.unlink()
                    out.rename(folder)
                st.result = f"{len(list(folder.glob('*.bin')))} demos"
        return folder


def compiled_configs(recipes: Recipes | None = None) -> dict[str, bytes]:
    """Every shipped cell config compiled to ``.cell`` bytes: Jailhouse's QEMU configs
    (``harness/configs``) and the demo inmates' cells (``images/inmates/cells``)."""
    from harness.hvmodel.config import load_source

    configs: dict[str, bytes] = {}
    for folder in (CONFIGS, (recipes or find_recipes()).cells):
        for source in sorted(folder.glob("*.toml")):
            configs[f"{source.stem}.cell"] = load_source(source).to_bytes()
    return configs


def write_cpio(tree: Path, dest: Path) -> None:
    """Pack ``tree`` as a gzip'd newc cpio archive: sorted, owned by root, no timestamps."""
    names = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*"))
    for name in names:
        os.utime(tree / name, (0, 0), follow_symlinks=False)
    proc = subprocess.run(
        [require_tool("cpio"), "--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"],
        input=("\n".join(names) + "\n").encode(), cwd=tree, capture_output=True, check=False,
    )
    if proc.returncode != 0:
        raise ImageError(f"cpio failed: {proc.stderr.decode(errors='replace')}")
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=6) as packed:
        packed.write(proc.stdout)
    partial = dest.with_suffix(".partial")
    partial.write_bytes(buffer.getvalue())
    partial.rename(dest)


def build_payload(dest: Path, *, authorized_key: str, inmates: Path | None = None,
                  modules: Path | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """Build this boot's guest payload: a cpio archive unpacked at ``/jhlab`` by stage 1
    and copied to ``/opt/jhlab`` in the root cell.

    It holds the hypervisor model (``lib/harness/hvmodel``, byte-compiled when the host's
    Python is the guest's version, see :func:`compile_guest_modules`), the harness's guest
    programs (``lib/harness/guest``), the guest tools (``bin/``: the scripts of
    ``images/guest/bin`` and the ``jailhouse`` launcher built from ``images/guest/src``, see
    :func:`guest_programs`), ``libexec/`` (from ``images/guest/libexec``, seen as
    ``/usr/libexec/jailhouse``: Jailhouse's helper scripts and the Python ``jailhouse``
    command the launcher falls back to), the compiled cell configs (``configs/``, seen as
    ``/etc/jailhouse``), the demo inmates (``libexec/demos/``) and ``jailhouse cell linux``'s
    loader (``libexec/linux-loader.bin``), jhlab's root-cell kernel
    modules (``modules/``, loaded at boot by ``jhlab-guest-setup``) and the lab's SSH
    public key.
    """
    with tempfile.TemporaryDirectory(prefix="jhlab-payload-") as tmp:
        root = Path(tmp) / "jhlab"
        lib = root / "lib" / "harness"
        lib.mkdir(parents=True)
        shutil.copy2(PACKAGE_DIR / "__init__.py", lib / "__init__.py")
        for package in ("hvmodel", "guest"):
            shutil.copytree(
                PACKAGE_DIR / package, lib / package,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        compile_guest_modules(lib)
        recipes = find_recipes()
        (root / "bin").mkdir()
        if recipes.guest_bin.is_dir():
            shutil.copytree(recipes.guest_bin, root / "bin", dirs_exist_ok=True)
        shutil.copytree(guest_programs(recipes), root / "bin", dirs_exist_ok=True)
        # Jailhouse's helper scripts and the Python command, where Jailhouse installs its
        # tools (/usr/libexec/jailhouse)
        shutil.copytree(recipes.guest_libexec, root / "libexec")
        (root / "authorized_keys").write_text(authorized_key.strip() + "\n")
        configs = root / "configs"
        configs.mkdir()
        for name, data in compiled_configs(recipes).items():
            (configs / name).write_bytes(data)
        if inmates is not None:
            demos = root / "libexec" / "demos"
            demos.mkdir()
            for binary in sorted(inmates.glob("*.bin")):
                shutil.copy2(binary, demos / binary.name)
            for alias, demo in DEMO_ALIASES.items():
                if (inmates / f"{demo}.bin").exists():
                    shutil.copy2(inmates / f"{demo}.bin", demos / f"{alias}.bin")
            # jailhouse cell linux's loader, where Jailhouse installs it
            # (/usr/libexec/jailhouse/linux-loader.bin)
            if (inmates / "linux-loader.bin").exists():
                shutil.copy2(inmates / "linux-loader.bin", root / "libexec" / "linux-loader.bin")
        if modules is not None:
            (root / "modules").mkdir()
            for module in sorted(modules.glob("*.ko")):
                shutil.copy2(module, root / "modules" / module.name)
        for rel, data in (extra or {}).items():
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        write_cpio(Path(tmp), dest)
    return dest


def guest_programs(recipes: Recipes | None = None) -> Path:
    """The guest's compiled programs, built from ``images/guest/src`` (one static binary
    per C file, named after it) into the cache, once per source content.

    :raise MissingToolError: without gcc
    :raise ImageError: when a program does not compile
    """
    src = (recipes or find_recipes()).guest_src
    sources = sorted(src.glob("*.c"))
    digest = hashlib.sha256(f"{RECIPE_VERSION}\0guest-programs\0".encode())
    _hash_files(digest, sources, src)
    folder = cache_dir() / "images" / f"guest-programs-{digest.hexdigest()[:16]}"
    with cache_lock(folder.name):
        if folder.is_dir():
            return folder
        require_tool("gcc", "to build the guest's jailhouse command")
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix="tmp-guest-") as tmp:
            out = Path(tmp) / "out"
            out.mkdir()
            for source in sources:
                run_tool(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
                          str(out / source.stem), str(source)], what=f"building {source.name}")
            out.rename(folder)
    return folder


def compile_guest_modules(lib: Path) -> bool:
    """Byte-compile the modules under ``lib`` for the root cell's Python, so that no
    command there compiles them first (seconds under nested TCG, and again after every
    boot: the overlay is fresh).

    The ``.pyc`` files are hash-checked (PEP 552): Python validates them against the
    source's content, not its time stamp (the payload's files all carry time 0), and an
    edited source is compiled anew as usual. Only a host Python of the guest's version
    (:data:`GUEST_PYTHON_CACHE_TAG`) writes files the guest uses; with another one
    nothing is compiled and the guest compiles on first import, as without this step.

    :return: whether modules were compiled
    """
    if sys.implementation.cache_tag != GUEST_PYTHON_CACHE_TAG:
        LOG.info("host Python %s is not the guest's %s: the payload carries sources only",
                 sys.implementation.cache_tag, GUEST_PYTHON_CACHE_TAG)
        return False
    compiled = compileall.compile_dir(
        lib, quiet=1, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    if not compiled:
        raise ImageError(f"byte-compiling the guest's modules in {lib} failed")
    return True


def check_kernel_config(fragment: str, config: str) -> list[str]:
    """Options of a ``kernel_configs`` fragment that ``config`` (a kernel .config) does
    not satisfy, each as ``"CONFIG_X: want y|m, have n"``.  Fragment values may list
    alternatives separated by ``|``."""
    have: dict[str, str] = {}
    for line in config.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            have[key] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            have[line[2:].split()[0]] = "n"
    problems = []
    for line in fragment.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, wanted = line.partition("=")
        allowed = wanted.split("|")
        value = have.get(key, "n")
        if value not in allowed:
            problems.append(f"{key}: want {wanted}, have {value}")
    return problems
