"""``jailhouse cell linux``; models Jailhouse's ``tools/jailhouse-cell-linux`` (master
``e57d1eff``) for x86 cells.

Same arguments, help and usage errors (argparse, as ``jailhouse cell linux``; exit 2),
same messages and exit status for configs the tool refuses (``Not a cell configuration:
FILE``, exit 1; where Jailhouse's tool ends in a Python traceback, such as ``x86
requires cpu_reset_address=0`` or a failing ioctl, the traceback's last line, exit 1),
the same images at the same addresses (:mod:`harness.hvmodel.linux_params`, the loader
``linux-loader.bin`` of ``images/inmates/tools``), loaded one ioctl each in the same
order (loader, kernel, initrd, parameters; a cell of that name that exists already is
used), then the cell is started. ``-w`` writes the parameters and prints the commands
that would load them, without the driver.

What jhlab adds (each line starts with ``jailhouse cell linux:``, on stderr):

* before the cell is created, what would fail only later: a kernel file without an x86
  boot header; an initrd inside the range the kernel unpacks itself into (``-k`` too
  small: the kernel would overwrite it); an image that no loadable region of the cell
  holds (Jailhouse's tool fails there after creating the cell; the last line is its
  ``OSError: [Errno 22] Invalid argument``); a kernel whose image shows it was built
  without ``CONFIG_JAILHOUSE_GUEST`` (:func:`~harness.hvmodel.linux_params.jailhouse_guest`).
  Nothing is created then;
* after the start, while the kernel command line names a ``console=``, the command
  watches the cell (at most ``JAILHOUSE_LINUX_WATCH`` seconds, default 60, 0 = not at
  all) until its console shows ``Hypervisor detected: Jailhouse``; if the cell fails or
  shuts down first, it reports the hypervisor's lines and the cell's last console lines
  (what the executor kept of its UART output) and exits 1.

Where the loader is: ``JAILHOUSE_LINUX_LOADER``, else ``libexec/linux-loader.bin`` beside
the ``lib`` folder this package is in (``/opt/jhlab`` in the lab), else Jailhouse's
``/usr/libexec/jailhouse/linux-loader.bin``.
"""

from __future__ import annotations

import argparse
import errno
import os
import platform
import time
from typing import IO, TYPE_CHECKING, Any, Final, NoReturn, Protocol, TextIO

from .abi import CELL_ID_UNUSED, MEM_LOADABLE, MEM_WRITE
from .config import SetReadError, read_cell
from .errors import Exit
from .ipc import CELLS_PATH, DriverClient, b64encode
from .linux_params import (
    KernelImage,
    KernelImageError,
    LinuxBoot,
    LinuxSetupError,
    compression_method,
    jailhouse_guest,
    linux_boot,
)

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

    from .config import SetCell

__all__ = ["GUEST_LINE", "PROG", "CellLinux", "Tool", "cell_linux"]

#: argparse's program name: Jailhouse's script calls itself ``jailhouse cell linux``
PROG: Final = "jailhouse cell linux"
#: what a Jailhouse guest kernel prints early (``init_hypervisor_platform``)
GUEST_LINE: Final = "Hypervisor detected: Jailhouse"
#: seconds the command watches a started cell unless ``JAILHOUSE_LINUX_WATCH`` says
WATCH_DEFAULT: Final = 60.0
WATCH_ENV: Final = "JAILHOUSE_LINUX_WATCH"
LOADER_ENV: Final = "JAILHOUSE_LINUX_LOADER"
LOADER_NAME: Final = "linux-loader.bin"
JAILHOUSE_LOADER: Final = "/usr/libexec/jailhouse/" + LOADER_NAME
DEVICE: Final = "/dev/jailhouse"
#: seconds between two looks at a watched cell
WATCH_PERIOD: Final = 0.5
#: cell memory flags an image target needs
_WRITE_LOADABLE: Final = MEM_WRITE | MEM_LOADABLE


class Tool(Protocol):
    """What the command uses of the running ``jailhouse`` (:class:`harness.hvmodel.tool.Tool`),
    named here so that the tool imports this module without a circle."""

    run_dir: str
    socket_path: str
    sysfs_path: str
    timeout: float
    out: TextIO
    err: TextIO


def cell_linux(tool: Tool, args: list[str]) -> int:
    """``jailhouse cell linux ...`` (``args`` from ``linux`` on)."""
    return CellLinux(tool, args[1:]).run()


class _Parser(argparse.ArgumentParser):
    """argparse with the command's streams, and Exit instead of ``sys.exit``."""

    def __init__(self, tool: Tool) -> None:
        super().__init__(prog=PROG, description="Boot Linux in a non-root cell.")
        self.tool = tool

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        if message:
            import sys

            (self.tool.out if file is sys.stdout else self.tool.err).write(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self.tool.err.write(message)
        raise Exit(status)


def _parser(tool: Tool) -> _Parser:
    """The arguments of master's ``jailhouse-cell-linux``, in its order, with its help."""
    parser = _Parser(tool)
    parser.add_argument("config", metavar="CELLCONFIG", type=argparse.FileType("rb"),
                        help="cell configuration file")
    parser.add_argument("kernel", metavar="KERNEL", type=argparse.FileType("rb"),
                        help="image of the kernel to be booted")
    parser.add_argument("-d", "--dtb", metavar="DTB", type=argparse.FileType("rb"),
                        help="device tree for the kernel [arm/arm64 only]")
    parser.add_argument("-i", "--initrd", metavar="INITRD", type=argparse.FileType("rb"),
                        help="initrd/initramfs for the kernel")
    parser.add_argument("-c", "--cmdline", metavar='"CMDLINE"', help="kernel command line")
    parser.add_argument("-w", "--write-params", metavar="PARAMS_FILE",
                        type=argparse.FileType("wb"),
                        help="only parse cell configuration, write out parameters into the "
                             "specified file and print required jailhouse cell commands to "
                             "boot Linux to the console")
    parser.add_argument("-a", "--arch", metavar="ARCH", help="target architecture")
    parser.add_argument("-k", "--kernel-decomp-factor", metavar="FACTOR", type=int,
                        help="decompression factor of the kernel image, used to reserve "
                             "space between the kernel and the initramfs")
    return parser


class CellLinux:
    """One run of ``jailhouse cell linux`` (module docstring).

    :param tool: the running ``jailhouse`` command (streams, run directory, timeout)
    :param argv: the arguments after ``cell linux``
    """

    def __init__(self, tool: Tool, argv: list[str]) -> None:
        self.tool = tool
        self.argv = argv
        self.files: list[IO[bytes]] = []

    # -- output ---------------------------------------------------------------------------

    def fail(self, *lines: str, status: int = 1) -> Exit:
        """Print ``lines`` on stderr; the exit to raise."""
        for line in lines:
            self.tool.err.write(line + "\n")
        self.tool.err.flush()
        return Exit(status)

    def say(self, text: str) -> str:
        """A jhlab line."""
        return f"{PROG}: {text}"

    @staticmethod
    def oserror_line(code: int, filename: str | None = None) -> str:
        """The last line of the traceback an ``OSError`` with ``code`` ends Python in
        (``FileNotFoundError: [Errno 2] No such file or directory: '/dev/jailhouse'``)."""
        exc = OSError(code, os.strerror(code)) if filename is None else OSError(
            code, os.strerror(code), filename)
        return f"{type(exc).__name__}: {exc}"

    # -- the command ------------------------------------------------------------------------

    def run(self) -> int:
        parser = _parser(self.tool)
        args = parser.parse_args(self.argv)
        self.files = [f for f in (args.config, args.kernel, args.dtb, args.initrd,
                                  args.write_params) if f is not None]
        try:
            return self._run(args)
        finally:
            for handle in self.files:
                handle.close()

    def _run(self, args: argparse.Namespace) -> int:
        self._resolve_arch(args.arch)
        config_data = args.config.read()
        try:
            config = read_cell(config_data, source=args.config.name)
        except SetReadError as exc:
            raise self.fail(exc.tool_line) from exc
        kernel_data = args.kernel.read()
        try:
            kernel = KernelImage.parse(kernel_data)
        except KernelImageError as exc:
            raise self.fail(self.say(f"{args.kernel.name}: not an x86 Linux kernel: {exc}")) from exc
        initrd_size = os.fstat(args.initrd.fileno()).st_size if args.initrd else None
        try:
            boot = linux_boot(kernel, config, initrd_size=initrd_size, cmdline=args.cmdline,
                              decomp_factor=args.kernel_decomp_factor)
        except LinuxSetupError as exc:
            raise self.fail(f"RuntimeError: {exc.message}" if exc.traceback else exc.message) from exc
        if args.write_params:
            return self._write_params(args, config, boot)
        loader = self._loader()
        initrd = args.initrd.read() if args.initrd else None
        images = [("the loader", loader, boot.loader_address),
                  ("the kernel", kernel_data, boot.kernel_address)]
        if initrd is not None:
            images.append(("the initrd", initrd, boot.initrd_address))
        images.append(("the boot parameters", boot.params, boot.params_address))
        self._check_guest(kernel, args.kernel.name)  # first: nothing else matters then
        self._check_initrd(kernel, boot, args.kernel_decomp_factor)
        self._check_fit(config, images)
        return self._boot(config.name, config_data, images, args.cmdline or "")

    def _resolve_arch(self, arch: str | None) -> None:
        """``resolve_arch``: x86 only in jhlab."""
        if arch not in ("x86", "arm", "arm64", None):
            raise self.fail("Unknown architecture")
        machine = platform.machine()
        if arch is None and machine not in ("i686", "x86_64", "armv7l", "aarch64"):
            raise self.fail("Unsupported architecture")
        if arch in ("arm", "arm64") or (arch is None and machine in ("armv7l", "aarch64")):
            raise self.fail(self.say(f"{arch or machine}: jhlab boots Linux in x86 cells only"))

    def _write_params(self, args: argparse.Namespace, config: SetCell, boot: LinuxBoot) -> int:
        """``X86.write_params``: the parameters to the file, then the commands."""
        args.write_params.write(boot.params)
        args.write_params.close()
        out = self.tool.out
        out.write("Boot parameters written. Start Linux with the following commands "
                  "(adjusting paths as needed):\n\n")
        out.write(f"jailhouse cell create {args.config.name}\n")
        out.write(f"jailhouse cell load {config.name} {LOADER_NAME} -a 0x{boot.loader_address:x} "
                  f"{args.kernel.name} -a 0x{boot.kernel_address:x} ")
        if args.initrd:
            out.write(f"{args.initrd.name} -a 0x{boot.initrd_address:x} ")
        out.write(f"{args.write_params.name} -a 0x{boot.params_address:x}\n")
        out.write(f"jailhouse cell start {config.name}\n")
        return 0

    def _loader(self) -> bytes:
        """The loader image (module docstring: where it is looked for)."""
        here = os.path.dirname(os.path.realpath(__file__))
        beside = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(here))),
                              "libexec", LOADER_NAME)
        candidates = [os.environ.get(LOADER_ENV) or "", beside, JAILHOUSE_LOADER]
        for path in candidates:
            if path and os.path.isfile(path):
                with open(path, "rb") as handle:
                    return handle.read()
        raise self.fail(
            self.say(f"no {LOADER_NAME} (looked for {', '.join(p for p in candidates if p)}; "
                     f"set {LOADER_ENV} to it)"),
            self.oserror_line(errno.ENOENT, JAILHOUSE_LOADER))

    # -- checks before anything is created -------------------------------------------------

    def _check_initrd(self, kernel: KernelImage, boot: LinuxBoot, factor: int | None) -> None:
        """The initrd must not lie where the kernel unpacks itself (``pref_address`` up to
        ``init_size`` beyond it, boot.rst)."""
        if not boot.initrd_size:
            return
        start, end = kernel.pref_address, kernel.pref_address + kernel.init_size
        if boot.initrd_address < end and start < boot.initrd_address + boot.initrd_size:
            need = -(-(end - kernel.load_address) // len(kernel.data))
            method = compression_method(kernel.payload_magic)
            raise self.fail(self.say(
                f"the initrd at 0x{boot.initrd_address:x} lies where the kernel unpacks itself "
                f"(0x{start:x}-0x{end:x}, its init_size): the decompression factor "
                f"{factor or 'for ' + method} is too small; use -k {need} or more"))

    def _check_fit(self, config: SetCell, images: list[tuple[str, bytes, int]]) -> None:
        """Each image inside one writable, loadable region (``jailhouse_cmd_cell_load``
        refuses the load with EINVAL otherwise)."""
        for what, data, target in images:
            for region in config.memory_regions:
                if region.virt_start <= target < region.virt_start + region.size:
                    if (region.flags & _WRITE_LOADABLE == _WRITE_LOADABLE
                            and target + len(data) <= region.virt_start + region.size):
                        break
                    raise self.fail(self.say(
                        f"{what} ({len(data)} bytes at 0x{target:x}) does not fit the loadable "
                        f"region at 0x{region.virt_start:x} ({region.size} bytes) of cell "
                        f'"{config.name}"; nothing was created'),
                        self.oserror_line(errno.EINVAL))
            else:
                raise self.fail(self.say(
                    f"{what} ({len(data)} bytes at 0x{target:x}) lies in no memory region of "
                    f'cell "{config.name}" (x86 Linux needs RAM at 0 and from the kernel\'s '
                    f"address 0x{target:x} on); nothing was created"),
                    self.oserror_line(errno.EINVAL))

    def _check_guest(self, kernel: KernelImage, name: str) -> None:
        """The kernel image shows it cannot run in a cell (``CONFIG_JAILHOUSE_GUEST`` off)."""
        if jailhouse_guest(kernel) is False:
            raise self.fail(self.say(
                f"{name} is not a Jailhouse guest: its kernel was built without "
                "CONFIG_JAILHOUSE_GUEST, so it would not find the cell's CPUs, timers and "
                "devices; build one with kernel_configs/linux-cell.config (jhlab images "
                "build), such as /usr/share/jailhouse/linux/bzImage; nothing was created"))

    # -- the driver -------------------------------------------------------------------------

    def _open(self) -> DriverClient | None:
        """``open('/dev/jailhouse')``; None when the module is loaded but nothing is
        enabled (every ioctl then fails with EINVAL)."""
        try:
            return DriverClient(self.tool.socket_path, timeout=self.tool.timeout)
        except OSError as exc:
            code = exc.errno or errno.EIO
            if code == errno.ENOENT and os.path.exists(os.path.join(self.tool.sysfs_path, "enabled")):
                return None
            raise self.fail(self.oserror_line(code, DEVICE)) from exc

    def _ioctl(self, client: DriverClient | None, op: str, **fields: Any) -> int:
        """One ioctl: 0 or ``-errno``."""
        if client is None:
            return -errno.EINVAL
        try:
            answer = client.request(op, **fields)
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        result = answer.get("result", -errno.EIO)
        return result if isinstance(result, int) else -errno.EIO

    def _boot(self, name: str, config_data: bytes, images: list[tuple[str, bytes, int]],
              cmdline: str) -> int:
        client = self._open()
        try:
            cell = {"id": CELL_ID_UNUSED, "name": name}
            result = self._ioctl(client, "cell_create", config=b64encode(config_data))
            if result < 0 and result != -errno.EEXIST:
                raise self.fail(self.oserror_line(-result))
            for _what, data, target in images:
                result = self._ioctl(client, "cell_load", cell=cell,
                                     images=[{"data": b64encode(data), "target": target}])
                if result < 0:
                    raise self.fail(self.oserror_line(-result))
            mark = self._console_mark(client)
            result = self._ioctl(client, "cell_start", cell=cell)
            if result < 0:
                raise self.fail(self.oserror_line(-result))
            if client is not None and "console=" in cmdline:
                return self._watch(client, name, mark)
            return 0
        finally:
            if client is not None:
                client.close()

    # -- after the start --------------------------------------------------------------------

    @staticmethod
    def _console_mark(client: DriverClient | None) -> int:
        """Where the hypervisor console ring stands (its lines from now on are this
        cell's start and what follows)."""
        if client is None:
            return 0
        try:
            tail = client.request("state").get("console_tail", 0)
        except OSError:
            return 0
        return tail if isinstance(tail, int) else 0

    def _watch(self, client: DriverClient, name: str, mark: int) -> int:
        """Watch the started cell (module docstring); 0, or the report and 1."""
        try:
            seconds = float(os.environ.get(WATCH_ENV) or WATCH_DEFAULT)
        except ValueError:
            seconds = WATCH_DEFAULT
        started = time.monotonic()
        deadline = started + seconds
        while time.monotonic() < deadline:
            state, console = self._cell_view(client, name)
            if GUEST_LINE in console:
                return 0
            if state is not None and state not in ("running", "running/locked"):
                return self._report(client, name, state, console, mark, time.monotonic() - started)
            time.sleep(WATCH_PERIOD)
        return 0

    def _cell_view(self, client: DriverClient, name: str) -> tuple[str | None, str]:
        """The cell's state (sysfs) and what the executor kept of its UART output."""
        try:
            status = client.request("state")
            client.request("sysfs")
        except OSError:
            return None, ""
        console = ""
        cells = (status.get("executor") or {}).get("cells") or {}
        for entry in cells.values():
            if isinstance(entry, dict) and entry.get("name") == name:
                # its first bytes too: the guest line is early, and a burst may have
                # pushed it out of the tail before this look
                console = str(entry.get("console_start", "")) + "\n" + str(entry.get("console", ""))
        return self._sysfs_state(name), console

    def _sysfs_state(self, name: str) -> str | None:
        cells = os.path.join(self.tool.run_dir, CELLS_PATH)
        try:
            for entry in os.listdir(cells):
                with open(os.path.join(cells, entry, "name"), encoding="utf-8") as handle:
                    if handle.read().rstrip("\n") != name:
                        continue
                with open(os.path.join(cells, entry, "state"), encoding="utf-8") as handle:
                    return handle.read().rstrip("\n")
        except OSError:
            return None
        return None

    def _report(self, client: DriverClient, name: str, state: str, console: str, mark: int,
                after: float) -> int:
        try:
            answer = client.request("console", head=mark, follow=False)
            hypervisor = str(answer.get("data", "")) if answer.get("result", -1) > 0 else ""
        except OSError:
            hypervisor = ""
        lines = [self.say(f'cell "{name}" is {state} {after:.0f} s after its start, before its '
                          f'console showed "{GUEST_LINE}": is the kernel a Jailhouse guest '
                          "(CONFIG_JAILHOUSE_GUEST)?")]
        fatal = [line for line in hypervisor.splitlines() if line.strip()]
        if fatal:
            lines.append(self.say("the hypervisor said:"))
            lines += [f"  {line}" for line in fatal[-10:]]
        tail = [line for line in console.splitlines() if line.strip()][-15:]
        lines.append(self.say("the cell's last console lines:" if tail
                              else "the cell printed nothing on its UARTs"))
        lines += [f"  {line}" for line in tail]
        raise self.fail(*lines)
