"""The ``jailhouse`` command; models ``tools/jailhouse.c`` and its extension scripts
``tools/jailhouse-cell-stats`` and ``tools/jailhouse-hardware-check``.

Same verbs, arguments, output and exit codes as Jailhouse's tool (v0.12 / master): the
argument grammar is parsed the way ``jailhouse.c`` parses it (``strtoll`` base 0 for ids
and addresses, ``--name``, ``-s``/``--string``, ``-a``/``--address``), usage errors print
the usage text on stdout and exit 1, failing ioctls print ``perror("JAILHOUSE_<CMD>")``
(``JAILHOUSE_CELL_CREATE: File exists``) and exit 1, unreadable files print
``opening FILE: <strerror>``. ``cell list`` reads the sysfs files (``%-8d%-24s%-18s%-24s%-24s``
rows in ``alphasort`` order of the id directories).

The device is the driver daemon's socket (:mod:`harness.hvmodel.ipc`); messages still say
``/dev/jailhouse``, as scripts expect. Without a running daemon:

* if the run directory has no sysfs tree, the "module is not loaded": every command
  that opens the device prints ``opening /dev/jailhouse: No such file or directory`` and
  exits 1; ``cell list`` prints nothing and exits 0;
* if a daemon ran there before (the tree says ``enabled`` 0), the "module is loaded, the
  hypervisor disabled": ``disable`` and the cell commands fail with ``Invalid argument``
  (EINVAL, as the driver answers), ``console`` prints the console kept at disable (the
  driver's ``last_console``) or fails with ``read(console): Resource temporarily
  unavailable``;
* ``enable`` starts the daemon (forked by the driver loader, :mod:`harness.hvmodel.loader`,
  when one runs, else ``python3 -m harness.hvmodel.daemon``; new session, stdio let go)
  and waits until it listens, then sends the ioctl.

The command starts in a fraction of a second in the lab's root cell, where Python runs
under nested TCG: this module imports only what the interpreter has built in or frozen,
and :mod:`harness.hvmodel.ipc`; the extensions (:mod:`harness.hvmodel.tool_extensions`)
and what starting a daemon needs are imported when used.

jhlab additions: ``cell stats`` has a one-shot text mode (``-n``, and whenever stdout is
not a terminal); ``config check`` is Jailhouse's ``jailhouse-config-check``
(:func:`harness.hvmodel.config.cli.jailhouse_config_check`), ``config show`` runs
:func:`harness.hvmodel.config.cli.main`;
``hardware check`` checks what the executor needs; ``cell linux`` is Jailhouse's
``jailhouse-cell-linux`` for x86 cells (:mod:`harness.hvmodel.tool_linux`). Not provided:
``config create``, ``config collect``. ``console -f`` ends (exit 0) when the daemon ends.

Environment: ``JAILHOUSE_RUN_DIR`` (run directory), ``JAILHOUSE_ARCH`` (``--arch`` of a
daemon ``enable`` starts), ``JAILHOUSE_DAEMON_ARGS`` (more daemon options, shell words;
relative paths are relative to ``/``), ``JAILHOUSE_TIMEOUT`` (seconds to wait for one
reply, default 600), ``JAILHOUSE_LOADER`` (the loader's socket).
"""

from __future__ import annotations

import errno
import os
import sys
import time

from . import JAILHOUSE_VERSION
from .abi import CELL_ID_NAMELEN, CELL_ID_UNUSED
from .errors import Exit
from .ipc import (
    CELLS_PATH,
    EXIT_BUSY,
    LAST_CONSOLE_NAME,
    READY_LINE,
    SOCKET_NAME,
    SYSFS_PATH,
    CellId,
    DriverClient,
    b64encode,
    decode,
    reply,
    run_dir_path,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, Final, TextIO

    from .tool_extensions import CellStats, HardwareCheck

__all__ = ["USAGE", "CellStats", "Exit", "HardwareCheck", "Tool", "main", "strtoll"]

#: ``printf`` format of ``help()`` in ``tools/jailhouse.c`` (``%s`` = program name)
USAGE: Final = (
    "Usage: %s { COMMAND | --help | --version }\n"
    "\n"
    "Available commands:\n"
    "   enable SYSCONFIG\n"
    "   disable\n"
    "   console [-f | --follow]\n"
    "   cell create CELLCONFIG\n"
    "   cell list\n"
    '   cell load { ID | [--name] NAME } { IMAGE | { -s | --string } "STRING" }\n'
    "             [-a | --address ADDRESS] ...\n"
    "   cell start { ID | [--name] NAME }\n"
    "   cell shutdown { ID | [--name] NAME }\n"
    "   cell destroy { ID | [--name] NAME }\n"
)
#: the extensions jhlab provides: (command, subcommand, synopsis), printed as in
#: ``help()`` (``"   %s %s %s\n"``)
EXTENSIONS: Final = (
    # master's synopsis (its jailhouse-cell-linux's argparse usage, in three lines)
    ("cell", "linux", '[-h] [-d DTB] [-i INITRD] [-c "CMDLINE"] [-w PARAMS_FILE]\n'
                      "              [-a ARCH] [-k FACTOR]\n"
                      "              CELLCONFIG KERNEL"),
    ("cell", "stats", "{ ID | [--name] NAME } [-n | --non-interactive]"),
    ("config", "check", "[-h] SYSCONFIG [CELLCONFIG [CELLCONFIG ...]]"),
    ("config", "show", "[-h] [--json] FILE"),
    ("hardware", "check", ""),
)
EXTENSION_NAMES: Final = frozenset((cmd, sub) for cmd, sub, _ in EXTENSIONS)
DEVICE: Final = "/dev/jailhouse"
#: ``%-8d%-24s%-18s%-24s%-24s`` of ``cell_list()``
LIST_HEADER: Final = "%-8s%-24s%-18s%-24s%-24s\n" % ("ID", "Name", "State", "Assigned CPUs", "Failed CPUs")
LIST_ROW: Final = "%-8d%-24s%-18s%-24s%-24s\n"
#: seconds ``enable`` waits for a daemon it started to listen
READY_TIMEOUT: Final = 60.0
#: seconds ``disable`` waits for the daemon to end
EXIT_TIMEOUT: Final = 60.0
DEFAULT_TIMEOUT: Final = 600.0
LLONG_MAX: Final = (1 << 63) - 1
#: ``signal.SIGINT`` and ``SIGTERM`` (the signal module would cost an enum import here)
_SIGINT: Final = 2
_SIGTERM: Final = 15
_SIGKILL: Final = 9


def __getattr__(name: str) -> object:
    # The extensions' classes, still reachable here, imported only when asked for.
    if name in ("CellStats", "HardwareCheck"):
        from . import tool_extensions

        return getattr(tool_extensions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def strtoll(text: str) -> tuple[int, bool]:
    """C ``strtoll(text, &end, 0)`` followed by ``errno == 0 && *end == 0``.

    :return: the value (clamped on overflow) and whether that check passes: leading
        white space and a sign are allowed, ``0x`` means hex and a leading ``0`` octal,
        nothing may follow the digits; the empty string is 0 and passes, as in C
    """
    i, n = 0, len(text)
    while i < n and text[i] in " \t\n\v\f\r":
        i += 1
    negative = False
    if i < n and text[i] in "+-":
        negative = text[i] == "-"
        i += 1
    base = 10
    if text[i : i + 2].lower() == "0x" and i + 2 < n and text[i + 2] in "0123456789abcdefABCDEF":
        base, i = 16, i + 2
    elif i < n and text[i] == "0":
        base = 8
    start = i
    value = 0
    while i < n and text[i].isascii() and text[i].isalnum() and int(text[i], 36) < base:
        value = value * base + int(text[i], 36)
        i += 1
    if i == start:
        return 0, n == 0  # no digits: end = the whole string
    if negative:
        value = -value
    overflow = not -LLONG_MAX - 1 <= value <= LLONG_MAX
    value = max(-LLONG_MAX - 1, min(LLONG_MAX, value))
    return value, not overflow and i == n


def _s32(value: int) -> int:
    """``int`` conversion of a ``long long`` (two's complement wrap)."""
    return ((value + (1 << 31)) % (1 << 32)) - (1 << 31)


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait until process ``pid`` has exited (a zombie counts as gone: its parent may be
    slow to reap it); a pidfd becomes readable exactly then."""
    import select

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError as exc:
        # The number names a thread, not a process, now: ours was reaped (Linux 6.1 says
        # EINVAL, later kernels ENOENT).
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return True
        raise
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout) * 1000))
    finally:
        os.close(pidfd)


class _OfflineDriver:
    """The driver with the hypervisor disabled and no daemon (the module loaded, nothing
    enabled): every ioctl fails with EINVAL; the console serves ``last_console``.

    :param run_dir: the run directory
    """

    def __init__(self, run_dir: str) -> None:
        self._console: tuple[int, bytes] | None = None
        try:
            with open(os.path.join(run_dir, LAST_CONSOLE_NAME), "rb") as handle:
                saved = decode(handle.read())
            self._console = (int(saved["tail"]), str(saved["content"]).encode("latin-1"))
        except (OSError, ValueError, KeyError, TypeError):
            self._console = None
        self._done = False

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        if op != "console":
            return reply(-errno.EINVAL)
        from .console_ring import dump_delta

        if self._console is None or self._done:
            return reply(-errno.EAGAIN if self._console is None else 0, data="", head=0)
        tail, content = self._console
        data, head = dump_delta(tail, content, int(fields.get("head", 0)), int(fields.get("size", 65536)))
        if not data:
            self._done = True  # last_console consumed: the next read is EAGAIN, but
            return reply(0, data="", head=head)  # this one ends a non-blocking dump
        return reply(len(data), data=data.decode("latin-1"), head=head)

    def close(self) -> None:
        """Nothing to close."""


class Tool:
    """One run of the ``jailhouse`` command.

    :param argv: the whole command line (``argv[0]`` is the program)
    :param run: the driver's run directory (:class:`~harness.hvmodel.ipc.RunDir` or a path)
    :param out: standard output
    :param err: standard error
    """

    def __init__(self, argv: Sequence[str], run: str | os.PathLike[str], out: TextIO,
                 err: TextIO) -> None:
        self.argv = list(argv)
        self.prog = os.path.basename(self.argv[0]) if self.argv else "jailhouse"
        self.run_dir = os.fspath(run)
        self.socket_path = os.path.join(self.run_dir, SOCKET_NAME)
        self.sysfs_path = os.path.join(self.run_dir, SYSFS_PATH)
        self.cells_path = os.path.join(self.run_dir, CELLS_PATH)
        self.out = out
        self.err = err
        try:
            self.timeout = float(os.environ.get("JAILHOUSE_TIMEOUT") or DEFAULT_TIMEOUT)
        except ValueError:
            self.timeout = DEFAULT_TIMEOUT

    # -- C library stand-ins ----------------------------------------------------------

    def help(self, status: int) -> Exit:
        """``help(argv[0], status)``: the usage on stdout; raise the returned exit."""
        self.out.write(USAGE % self.prog)
        for cmd, sub, synopsis in EXTENSIONS:
            self.out.write(f"   {cmd} {sub} {synopsis}\n")
        self.out.flush()
        return Exit(status)

    def perror(self, what: str, code: int) -> None:
        """``perror(what)`` with ``errno`` = ``code``."""
        self.err.write(f"{what}: {os.strerror(code)}\n")
        self.err.flush()

    def read_file(self, name: str) -> bytes:
        """``read_file()``: the whole file, or exit 1 with ``opening NAME: ...``."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.err.write(f"opening {name}: {os.strerror(exc.errno or errno.EIO)}\n")
            raise Exit(1) from exc
        try:
            try:
                size = os.fstat(fd).st_size
            except OSError as exc:
                self.perror("fstat", exc.errno or errno.EIO)
                raise Exit(1) from exc
            try:
                return os.read(fd, size)
            except OSError as exc:
                self.err.write(f"reading {name}: {os.strerror(exc.errno or errno.EIO)}\n")
                raise Exit(1) from exc
        finally:
            os.close(fd)

    # -- the device ---------------------------------------------------------------------

    def _module_loaded(self) -> bool:
        return os.path.exists(os.path.join(self.sysfs_path, "enabled"))

    def open_dev(self) -> DriverClient | _OfflineDriver:
        """``open_dev()``: connect to the daemon, else the offline driver, else exit 1."""
        try:
            return DriverClient(self.socket_path, timeout=self.timeout)
        except OSError as exc:
            code = exc.errno or errno.EIO
            if code == errno.ENOENT and self._module_loaded():
                return _OfflineDriver(self.run_dir)
            self.perror(f"opening {DEVICE}", code)
            raise Exit(1) from exc

    def open_dev_for_enable(self) -> DriverClient:
        """Connect to the daemon, starting one first when none runs."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                return DriverClient(self.socket_path, timeout=self.timeout)
            except OSError as exc:
                code = exc.errno or errno.EIO
                if code not in (errno.ENOENT, errno.ECONNREFUSED):
                    self.perror(f"opening {DEVICE}", code)
                    raise Exit(1) from exc
            if time.monotonic() > deadline:
                self.perror(f"opening {DEVICE}", errno.ETIMEDOUT)
                raise Exit(1)
            if not self._start_daemon(deadline):
                time.sleep(0.05)  # another enable's daemon is starting up; connect to it

    def _daemon_command(self) -> list[str]:
        import shlex

        # -S: the daemon needs only the standard library and the model (no site packages)
        command = [sys.executable, "-S", "-m", "harness.hvmodel.daemon",
                   "--run-dir", os.path.realpath(self.run_dir)]
        arch = os.environ.get("JAILHOUSE_ARCH")
        if arch:
            command += ["--arch", arch]
        command += shlex.split(os.environ.get("JAILHOUSE_DAEMON_ARGS", ""))
        return command

    def _start_daemon(self, deadline: float) -> bool:
        """Start a daemon (forked by the loader, else spawned) and wait until it listens.

        :return: False when another daemon holds the run directory
        """
        from .daemon_start import start_daemon

        # the directory holding the ``harness`` package this module belongs to
        lib = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = lib + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            daemon = start_daemon(self._daemon_command(), env, cwd="/", deadline=deadline)
        except OSError as exc:
            self.perror(f"opening {DEVICE}", exc.errno or errno.ENODEV)
            raise Exit(1) from exc
        try:
            line = daemon.read_ready(deadline)
            if line is not None and line.startswith(READY_LINE.encode()):
                return True
            status = daemon.wait(max(0.0, deadline - time.monotonic()))  # it closed stdout: it ends
            if status is None:  # neither ready nor gone by the deadline
                daemon.signal(_SIGTERM)
                if daemon.wait(5.0) is None:
                    daemon.signal(_SIGKILL)
                    daemon.wait(5.0)
                status = -1
            problem = daemon.read_errors().strip()
        finally:
            daemon.close()
        if status == EXIT_BUSY:
            return False
        if problem:
            self.err.write(problem + "\n")
        self.perror(f"opening {DEVICE}", errno.ETIMEDOUT if status == -1 else errno.ENODEV)
        raise Exit(1)

    def ioctl(self, client: DriverClient | _OfflineDriver, name: str, op: str, **fields: Any) -> int:
        """One ioctl: 0, or ``perror(name)`` and -1. When the daemon says it ends after
        this request (disable, failed enable), wait until it has."""
        try:
            answer = client.request(op, **fields)
        except OSError as exc:
            self.perror(name, exc.errno or errno.EIO)
            return -1
        result = answer.get("result", -errno.EIO)
        if answer.get("ending") and isinstance(client, DriverClient):
            pid = answer.get("pid")
            if not (client.wait_closed(EXIT_TIMEOUT) and (not isinstance(pid, int) or _wait_gone(pid))):
                self.err.write(f"{self.prog}: the driver daemon did not end within {EXIT_TIMEOUT:.0f} s\n")
        if not isinstance(result, int) or result < 0:
            self.perror(name, -result if isinstance(result, int) else errno.EIO)
            return -1
        return 0

    # -- commands -------------------------------------------------------------------------

    def run_command(self) -> int:
        """``main()``."""
        argv = self.argv
        if len(argv) < 2:
            raise self.help(1)
        command = argv[1]
        if command == "enable":
            return self.enable()
        if command == "disable":
            return self.disable()
        if command == "cell":
            return self.cell_management()
        if command == "console":
            return self.console()
        if command in ("config", "hardware"):
            return self.extension(command)
        if command == "--version":
            self.out.write(f"Jailhouse management tool {JAILHOUSE_VERSION}\n")
            return 0
        if command == "--help":
            raise self.help(0)
        raise self.help(1)

    def enable(self) -> int:
        if len(self.argv) != 3:
            raise self.help(1)
        config = self.read_file(self.argv[2])
        client = self.open_dev_for_enable()
        try:
            err = self.ioctl(client, "JAILHOUSE_ENABLE", "enable", config=b64encode(config))
        finally:
            client.close()
        return 1 if err else 0

    def disable(self) -> int:
        client = self.open_dev()
        try:
            err = self.ioctl(client, "JAILHOUSE_DISABLE", "disable")
        finally:
            client.close()
        return 1 if err else 0

    def cell_management(self) -> int:
        argv = self.argv
        if len(argv) < 3:
            raise self.help(1)
        sub = argv[2]
        if sub == "create":
            return self.cell_create()
        if sub == "list":
            return self.cell_list()
        if sub == "load":
            return self.cell_shutdown_load(load=True)
        if sub == "start":
            return self.cell_simple("JAILHOUSE_CELL_START", "cell_start")
        if sub == "shutdown":
            return self.cell_shutdown_load(load=False)
        if sub == "destroy":
            return self.cell_simple("JAILHOUSE_CELL_DESTROY", "cell_destroy")
        return self.extension("cell")

    def cell_create(self) -> int:
        if len(self.argv) != 4:
            raise self.help(1)
        config = self.read_file(self.argv[3])
        client = self.open_dev()
        try:
            err = self.ioctl(client, "JAILHOUSE_CELL_CREATE", "cell_create", config=b64encode(config))
        finally:
            client.close()
        return 1 if err else 0

    @staticmethod
    def parse_cell_id(args: Sequence[str]) -> tuple[CellId, int]:
        """``parse_cell_id()``: the cell and how many arguments named it (0: none)."""
        if not args:
            return CellId(), 0
        use_name = False
        pos = 0
        cell_id = 0
        if args[0] == "--name":
            if len(args) < 2:
                return CellId(), 0
            pos, use_name = 1, True
        else:
            value, ok = strtoll(args[0])
            cell_id = _s32(value)
            use_name = not ok or cell_id < 0
        if use_name:
            raw = os.fsencode(args[pos])[:CELL_ID_NAMELEN]
            return CellId(CELL_ID_UNUSED, os.fsdecode(raw)), pos + 1
        return CellId(cell_id, ""), pos + 1

    def cell_shutdown_load(self, *, load: bool) -> int:
        argv = self.argv
        argc = len(argv)
        cell, id_args = self.parse_cell_id(argv[3:])
        arg = 3 + id_args
        if id_args == 0 or (not load and arg != argc) or (load and arg == argc):
            raise self.help(1)
        count = 0
        while arg < argc:
            if argv[arg] in ("-s", "--string"):
                if arg + 1 >= argc:
                    raise self.help(1)
                arg += 1
            count += 1
            arg += 1
            if arg < argc and argv[arg] in ("-a", "--address"):
                if arg + 1 >= argc:
                    raise self.help(1)
                arg += 2
        images = []
        arg = 3 + id_args
        for _ in range(count):
            if argv[arg] in ("-s", "--string"):
                data = os.fsencode(argv[arg + 1]) + b"\0"
                arg += 2
            else:
                data = self.read_file(argv[arg])
                arg += 1
            target = 0
            if arg < argc and argv[arg] in ("-a", "--address"):
                target, ok = strtoll(argv[arg + 1])
                if not ok:
                    raise self.help(1)
                arg += 2
            images.append({"data": b64encode(data), "target": target & 0xFFFFFFFFFFFFFFFF})
        client = self.open_dev()
        try:
            err = self.ioctl(client, "JAILHOUSE_CELL_LOAD", "cell_load", cell=cell.to_wire(),
                             images=images)
        finally:
            client.close()
        return 1 if err else 0

    def cell_simple(self, name: str, op: str) -> int:
        cell, id_args = self.parse_cell_id(self.argv[3:])
        if id_args == 0 or 3 + id_args != len(self.argv):
            raise self.help(1)
        client = self.open_dev()
        try:
            err = self.ioctl(client, name, op, cell=cell.to_wire())
        finally:
            client.close()
        return 1 if err else 0

    def refresh_sysfs(self) -> None:
        """Ask a running daemon to bring the sysfs files up to date (best effort)."""
        try:
            with DriverClient(self.socket_path, timeout=self.timeout) as client:
                client.request("sysfs")
        except OSError:
            pass

    def _read_cell_string(self, cell: str, entry: str) -> str:
        """``read_sysfs_cell_string()``: the file without its trailing line feed."""
        path = os.path.join(self.cells_path, cell, entry)
        data = self.read_file(path)
        if not data:
            self.perror(f"reading {path}", errno.ENODATA)
            raise Exit(1)
        if data.endswith(b"\n"):
            data = data[:-1]
        return data.split(b"\0", 1)[0].decode("utf-8", "replace")

    def cell_list(self) -> int:
        if len(self.argv) != 3:
            raise self.help(1)
        self.refresh_sysfs()
        try:
            names = sorted(name for name in os.listdir(self.cells_path) if not name.startswith("."))
        except FileNotFoundError:
            return 0  # silently, as with the module not loaded
        except OSError as exc:
            self.perror("scandir", exc.errno or errno.EIO)
            return 1
        if names:
            self.out.write(LIST_HEADER)
        for name in names:
            digits = len(name) - len(name.lstrip("0123456789"))
            cell_id = int(name[:digits]) if digits else 0  # strtoul(d_name, NULL, 10)
            row = (
                _s32(cell_id),
                self._read_cell_string(name, "name")[:CELL_ID_NAMELEN],
                self._read_cell_string(name, "state"),
                self._read_cell_string(name, "cpus_assigned_list"),
                self._read_cell_string(name, "cpus_failed_list"),
            )
            self.out.write(LIST_ROW % row)
        return 0

    def console(self) -> int:
        argv = self.argv
        follow = False
        if len(argv) == 3:
            if argv[2] in ("-f", "--follow"):
                follow = True
            else:
                raise self.help(1)
        client = self.open_dev()
        out = self.out
        out.flush()
        stdout = getattr(out, "buffer", None)

        def emit(text: str) -> None:
            data = text.encode("latin-1", "replace")
            if stdout is not None:
                stdout.write(data)
                stdout.flush()
            else:
                out.write(text)
                out.flush()

        try:
            if follow and isinstance(client, DriverClient):
                try:
                    for message in client.stream("console", head=0, follow=True):
                        result = message.get("result", -errno.EIO)
                        if result < 0:
                            self.perror("read(console)", -result)
                            return 1
                        emit(message.get("data", ""))
                except OSError as exc:
                    self.perror("read(console)", exc.errno or errno.EIO)
                    return 1
                return 0
            head = 0
            while True:
                try:
                    message = client.request("console", head=head, follow=False)
                except OSError as exc:
                    self.perror("read(console)", exc.errno or errno.EIO)
                    return 1
                result = message.get("result", -errno.EIO)
                if result < 0:
                    self.perror("read(console)", -result)
                    return 1
                if result == 0:
                    return 0
                emit(message.get("data", ""))
                head = int(message.get("head", head))
        finally:
            client.close()

    # -- extensions -------------------------------------------------------------------------

    def extension(self, command: str) -> int:
        """``call_extension_script()``: run a provided extension, else usage (exit 1)."""
        argv = self.argv
        if len(argv) >= 3 and (command, argv[2]) in EXTENSION_NAMES:
            if (command, argv[2]) == ("cell", "linux"):
                from .tool_linux import cell_linux

                return cell_linux(self, argv[2:])
            from . import tool_extensions

            handlers: dict[tuple[str, str], Callable[[Tool, list[str]], int]] = {
                ("cell", "stats"): tool_extensions.cell_stats,
                ("config", "check"): tool_extensions.config,
                ("config", "show"): tool_extensions.config,
                ("hardware", "check"): tool_extensions.hardware_check,
            }
            return handlers[(command, argv[2])](self, argv[2:])
        raise self.help(1)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``jailhouse``; return the exit status.

    :param argv: the whole command line, ``argv[0]`` included (default: ``sys.argv``)
    """
    tool = Tool(sys.argv if argv is None else argv, run_dir_path(), sys.stdout, sys.stderr)
    try:
        return tool.run_command()
    except Exit as done:
        return done.status
    except BrokenPipeError:
        # The reader went away (| head): no more output, and none at interpreter exit.
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        return 1
    except KeyboardInterrupt:
        return 128 + _SIGINT
    finally:
        try:  # noqa: SIM105 - contextlib would cost an import on every command
            sys.stdout.flush()
        except BrokenPipeError:
            pass
