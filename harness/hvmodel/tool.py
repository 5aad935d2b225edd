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
* ``enable`` starts the daemon (``python3 -m harness.hvmodel.daemon``, new session, stdio
  let go) and waits until it listens, then sends the ioctl.

jhlab additions: ``cell stats`` has a one-shot text mode (``-n``, and whenever stdout is
not a terminal); ``config check``/``config show`` run :func:`harness.hvmodel.config.cli.main`;
``hardware check`` checks what the executor needs. Not provided: ``cell linux``, ``config
create``, ``config collect``. ``console -f`` ends (exit 0) when the daemon ends.

Environment: ``JAILHOUSE_RUN_DIR`` (run directory), ``JAILHOUSE_ARCH`` (``--arch`` of a
daemon ``enable`` starts), ``JAILHOUSE_DAEMON_ARGS`` (more daemon options, shell words;
relative paths are relative to ``/``), ``JAILHOUSE_TIMEOUT`` (seconds to wait for one
reply, default 600).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import selectors
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

from .control import HvParams
from .ipc import (
    CELL_ID_UNUSED,
    CELL_NAME_MAXLEN,
    CellId,
    DriverClient,
    RunDir,
    b64encode,
    reply,
)

__all__ = ["USAGE", "main", "strtoll"]

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
    ("cell", "stats", "{ ID | [--name] NAME } [-n | --non-interactive]"),
    ("config", "check", "[-h] SYSCONFIG [CELLCONFIG [CELLCONFIG ...]]"),
    ("config", "show", "[-h] [--json] FILE"),
    ("hardware", "check", ""),
)
DEVICE: Final = "/dev/jailhouse"
#: ``%-8d%-24s%-18s%-24s%-24s`` of ``cell_list()``
LIST_HEADER: Final = "%-8s%-24s%-18s%-24s%-24s\n" % ("ID", "Name", "State", "Assigned CPUs", "Failed CPUs")
LIST_ROW: Final = "%-8d%-24s%-18s%-24s%-24s\n"
#: seconds ``enable`` waits for a daemon it started to listen
READY_TIMEOUT: Final = 60.0
#: seconds ``disable`` waits for the daemon to end
EXIT_TIMEOUT: Final = 60.0
DEFAULT_TIMEOUT: Final = 600.0
#: exit status of a daemon that found another one running (``daemon.EXIT_BUSY``)
DAEMON_BUSY: Final = 75
LLONG_MAX: Final = (1 << 63) - 1
KVM_GET_API_VERSION: Final = 0xAE00


class _Exit(Exception):
    """Leave the command with ``status`` (``exit()`` of the C tool)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


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
    slow to reap it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


class _OfflineDriver:
    """The driver with the hypervisor disabled and no daemon (the module loaded, nothing
    enabled): every ioctl fails with EINVAL; the console serves ``last_console``."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self._console: tuple[int, bytes] | None = None
        try:
            saved = json.loads(run.last_console.read_text(encoding="utf-8"))
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


_Client = DriverClient | _OfflineDriver


class Tool:
    """One run of the ``jailhouse`` command.

    :param argv: the whole command line (``argv[0]`` is the program)
    :param run: the driver's run directory
    :param out: standard output
    :param err: standard error
    """

    def __init__(self, argv: Sequence[str], run: RunDir, out: TextIO, err: TextIO) -> None:
        self.argv = list(argv)
        self.prog = os.path.basename(self.argv[0]) if self.argv else "jailhouse"
        self.run = run
        self.out = out
        self.err = err
        try:
            self.timeout = float(os.environ.get("JAILHOUSE_TIMEOUT") or DEFAULT_TIMEOUT)
        except ValueError:
            self.timeout = DEFAULT_TIMEOUT

    # -- C library stand-ins ----------------------------------------------------------

    def help(self, status: int) -> _Exit:
        """``help(argv[0], status)``: the usage on stdout; raise the returned exit."""
        self.out.write(USAGE % self.prog)
        for cmd, sub, synopsis in EXTENSIONS:
            self.out.write(f"   {cmd} {sub} {synopsis}\n")
        self.out.flush()
        return _Exit(status)

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
            raise _Exit(1) from exc
        try:
            try:
                size = os.fstat(fd).st_size
            except OSError as exc:
                self.perror("fstat", exc.errno or errno.EIO)
                raise _Exit(1) from exc
            try:
                return os.read(fd, size)
            except OSError as exc:
                self.err.write(f"reading {name}: {os.strerror(exc.errno or errno.EIO)}\n")
                raise _Exit(1) from exc
        finally:
            os.close(fd)

    # -- the device ---------------------------------------------------------------------

    def _module_loaded(self) -> bool:
        return (self.run.sysfs / "enabled").exists()

    def open_dev(self) -> _Client:
        """``open_dev()``: connect to the daemon, else the offline driver, else exit 1."""
        try:
            return DriverClient(self.run.socket, timeout=self.timeout)
        except OSError as exc:
            code = exc.errno or errno.EIO
            if code == errno.ENOENT and self._module_loaded():
                return _OfflineDriver(self.run)
            self.perror(f"opening {DEVICE}", code)
            raise _Exit(1) from exc

    def open_dev_for_enable(self) -> DriverClient:
        """Connect to the daemon, starting one first when none runs."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                return DriverClient(self.run.socket, timeout=self.timeout)
            except OSError as exc:
                code = exc.errno or errno.EIO
                if code not in (errno.ENOENT, errno.ECONNREFUSED):
                    self.perror(f"opening {DEVICE}", code)
                    raise _Exit(1) from exc
            if time.monotonic() > deadline:
                self.perror(f"opening {DEVICE}", errno.ETIMEDOUT)
                raise _Exit(1)
            if not self._start_daemon(deadline):
                time.sleep(0.2)  # another daemon is starting up; connect to it

    def _daemon_command(self) -> list[str]:
        command = [sys.executable, "-m", "harness.hvmodel.daemon",
                   "--run-dir", os.fspath(self.run.path.resolve())]
        arch = os.environ.get("JAILHOUSE_ARCH")
        if arch:
            command += ["--arch", arch]
        command += shlex.split(os.environ.get("JAILHOUSE_DAEMON_ARGS", ""))
        return command

    def _start_daemon(self, deadline: float) -> bool:
        """Start a daemon and wait until it listens.

        :return: False when another daemon holds the run directory
        """
        import harness

        lib = os.fspath(Path(harness.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = lib + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.Popen(
                self._daemon_command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True, env=env, cwd="/",
            )
        except OSError as exc:
            self.perror(f"opening {DEVICE}", exc.errno or errno.ENODEV)
            raise _Exit(1) from exc
        assert proc.stdout is not None and proc.stderr is not None  # PIPE
        ready = False
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while not ready:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if not sel.select(remaining):
                    continue
                line = proc.stdout.readline()
                if not line:
                    break
                ready = line.startswith(b"ready")
        if ready:
            proc.stdout.close()
            proc.stderr.close()
            return True
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))  # it closed stdout: it ends
        if proc.poll() is None:  # neither ready nor gone by the deadline
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
            status = -1
        else:
            status = proc.wait()
        problem = proc.stderr.read().decode("utf-8", "replace").strip()
        proc.stdout.close()
        proc.stderr.close()
        if status == DAEMON_BUSY:
            return False
        if problem:
            self.err.write(problem + "\n")
        self.perror(f"opening {DEVICE}", errno.ETIMEDOUT if status == -1 else errno.ENODEV)
        raise _Exit(1)

    def ioctl(self, client: _Client, name: str, op: str, **fields: Any) -> int:
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
            self.out.write(f"Jailhouse management tool {HvParams().version}\n")
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
            raw = os.fsencode(args[pos])[:CELL_NAME_MAXLEN]
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

    def _refresh_sysfs(self) -> None:
        """Ask a running daemon to bring the sysfs files up to date (best effort)."""
        try:
            with DriverClient(self.run.socket, timeout=self.timeout) as client:
                client.request("sysfs")
        except OSError:
            pass

    def _read_cell_string(self, cell: str, entry: str) -> str:
        """``read_sysfs_cell_string()``: the file without its trailing line feed."""
        path = os.fspath(self.run.cells / cell / entry)
        data = self.read_file(path)
        if not data:
            self.perror(f"reading {path}", errno.ENODATA)
            raise _Exit(1)
        if data.endswith(b"\n"):
            data = data[:-1]
        return data.split(b"\0", 1)[0].decode("utf-8", "replace")

    def cell_list(self) -> int:
        if len(self.argv) != 3:
            raise self.help(1)
        self._refresh_sysfs()
        try:
            names = sorted(name for name in os.listdir(self.run.cells) if not name.startswith("."))
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
                self._read_cell_string(name, "name")[:CELL_NAME_MAXLEN],
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
        if len(argv) >= 3:
            handlers: dict[tuple[str, str], Callable[[list[str]], int]] = {
                ("cell", "stats"): self.cell_stats,
                ("config", "check"): self.config,
                ("config", "show"): self.config,
                ("hardware", "check"): self.hardware_check,
            }
            handler = handlers.get((command, argv[2]))
            if handler is not None:
                return handler(argv[2:])
        raise self.help(1)

    def config(self, args: list[str]) -> int:
        """``jailhouse config check|show ...``."""
        from .config.cli import main as config_main

        self.out.flush()
        return config_main(args, prog=f"{self.prog} config")

    def cell_stats(self, args: list[str]) -> int:
        """``jailhouse cell stats { ID | [--name] NAME } [-n] [-i SECONDS] [-c CPU]``."""
        stats = CellStats(self, args[1:])
        return stats.run()

    def hardware_check(self, args: list[str]) -> int:
        """``jailhouse hardware check``: what the executor needs, Jailhouse's format."""
        return HardwareCheck(self.out, self.err).run()


class CellStats:
    """``tools/jailhouse-cell-stats``: the counters of a cell, from the sysfs files.

    Interactive (curses, keys q quit, c next CPU, a all CPUs) on a terminal; otherwise,
    or with ``-n``, one text rendering of the same layout: the title, a blank line, the
    header ``COUNTER`` / ``SUM`` / ``PER SEC`` (columns at 0, 30 and 40, ``%10s``), one
    row per counter (``%10u``), ordered as the curses tool orders them. ``PER SEC``
    comes from two readings ``--interval`` seconds apart (default 1; 0 leaves it empty).

    :param tool: the running command
    :param args: the arguments after ``cell stats``
    """

    USAGE = "usage: %s cell stats { ID | [--name] NAME } [-n | --non-interactive] " \
        "[-i | --interval SECONDS] [-c | --cpu CPU]\n"

    def __init__(self, tool: Tool, args: list[str]) -> None:
        self.tool = tool
        self.args = args
        self.interactive = True
        self.interval = 1.0
        self.cpu: int | None = None

    def usage(self, status: int) -> _Exit:
        self.tool.out.write(self.USAGE % self.tool.prog)
        return _Exit(status)

    def _parse(self) -> tuple[str | None, str | None]:
        args = self.args
        cell_id: str | None = None
        name: str | None = None
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in ("-h", "--help"):
                raise self.usage(0)
            if arg in ("-n", "--non-interactive"):
                self.interactive = False
            elif arg in ("-i", "--interval", "-c", "--cpu"):
                if i + 1 >= len(args):
                    raise self.usage(1)
                try:
                    if arg in ("-i", "--interval"):
                        self.interval = float(args[i + 1])
                    else:
                        self.cpu = int(args[i + 1])
                except ValueError as exc:
                    raise self.usage(1) from exc
                if self.interval < 0:
                    raise self.usage(1)
                i += 1
            elif arg == "--name" and cell_id is None and name is None and i + 1 < len(args):
                name = args[i + 1]
                i += 1
            elif cell_id is None and name is None:
                cell_id = arg
            else:
                raise self.usage(1)
            i += 1
        if cell_id is None and name is None:
            raise self.usage(1)
        return cell_id, name

    def _fail(self, code: int) -> _Exit:
        self.tool.err.write(f"reading stats: {os.strerror(code)}\n")
        return _Exit(1)

    def _resolve(self, cell_id: str | None, name: str | None) -> tuple[str, str]:
        cells = self.tool.run.cells
        try:
            entries = sorted(os.listdir(cells))
        except OSError as exc:
            raise self._fail(exc.errno or errno.EIO) from exc
        if cell_id is not None and cell_id.isdigit():
            directory = str(int(cell_id))
            if directory not in entries:
                raise self._fail(errno.ENOENT)
            try:
                text = (cells / directory / "name").read_text(encoding="utf-8")
            except OSError as exc:
                raise self._fail(exc.errno or errno.EIO) from exc
            return directory, text.rstrip("\n")
        wanted = cell_id if name is None else name
        for directory in entries:
            try:
                text = (cells / directory / "name").read_text(encoding="utf-8").rstrip("\n")
            except OSError:
                continue
            if text == wanted:
                return directory, text
        raise self._fail(errno.ENOENT)

    def _stats_dir(self, directory: str) -> Path:
        base = self.tool.run.cells / directory / "statistics"
        return base if self.cpu is None else base / f"cpu{self.cpu}"

    def _read(self, directory: str) -> dict[str, int]:
        self.tool._refresh_sysfs()
        folder = self._stats_dir(directory)
        values: dict[str, int] = {}
        try:
            for entry in sorted(os.listdir(folder)):
                path = folder / entry
                if path.is_file():
                    values[entry] = int(path.read_text(encoding="ascii"))
        except (OSError, ValueError) as exc:
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
            raise self._fail(code) from exc
        return values

    @staticmethod
    def order(values: dict[str, int], old: dict[str, int] | None) -> list[str]:
        """The curses tool's row order: biggest change first, then biggest value."""
        if old is None:
            return sorted(values, key=lambda name: (-values[name], name))
        return sorted(values, key=lambda name: (old.get(name, values[name]) - values[name],
                                                -values[name], name))

    def render(self, name: str, values: dict[str, int], old: dict[str, int] | None,
               seconds: float) -> str:
        """The text of one screen."""
        title = f"Statistics for {name} cell"
        if self.cpu is not None:
            title += f", CPU {self.cpu}"
        lines = [title, "", "COUNTER".ljust(30) + "%10s" % "SUM" + "%10s" % "PER SEC"]
        for counter in self.order(values, old):
            row = counter.ljust(30) + "%10u" % values[counter]
            if old is not None and seconds > 0:
                row += "%10u" % round((values[counter] - old.get(counter, values[counter])) / seconds)
            lines.append(row)
        return "\n".join(lines) + "\n"

    def run(self) -> int:
        cell_id, name = self._parse()
        directory, cell_name = self._resolve(cell_id, name)
        if self.interactive and self.tool.out.isatty() and sys.stdin.isatty():
            return self._curses(directory, cell_name)
        first = self._read(directory)
        if self.interval <= 0:
            self.tool.out.write(self.render(cell_name, first, None, 0.0))
            return 0
        started = time.monotonic()
        time.sleep(self.interval)
        second = self._read(directory)
        self.tool.out.write(self.render(cell_name, second, first, time.monotonic() - started))
        return 0

    def _curses(self, directory: str, cell_name: str) -> int:
        import curses

        cpus = sorted(
            int(entry[3:]) for entry in os.listdir(self.tool.run.cells / directory / "statistics")
            if entry.startswith("cpu") and entry[3:].isdigit()
        )

        def screen(stdscr: Any) -> None:
            with_suppress = (curses.error,)
            try:
                curses.use_default_colors()
                curses.curs_set(0)
            except with_suppress:
                pass
            curses.noecho()
            curses.halfdelay(10)
            old: dict[str, int] | None = None
            last = time.monotonic()
            while True:
                values = self._read(directory)
                now = time.monotonic()
                text = self.render(cell_name, values, old, now - last).splitlines()
                stdscr.erase()
                height, width = stdscr.getmaxyx()
                for row, line in enumerate(text[: max(0, height - 1)]):
                    attr = curses.A_REVERSE if row == 2 else curses.A_NORMAL
                    try:
                        stdscr.addstr(row, 0, line.ljust(width - 1)[: width - 1], attr)
                        stdscr.addstr(height - 1, 0, " Q - Quit  C - next CPU  A - all CPUs"
                                      .ljust(width - 1)[: width - 1], curses.A_REVERSE)
                    except curses.error:
                        pass
                stdscr.refresh()
                old, last = values, now
                try:
                    key = stdscr.getch()
                except KeyboardInterrupt:
                    return
                if key == ord("q"):
                    return
                if key == ord("a"):
                    self.cpu, old = None, None
                elif key == ord("c") and cpus:
                    self.cpu = cpus[0] if self.cpu is None or self.cpu not in cpus \
                        else cpus[(cpus.index(self.cpu) + 1) % len(cpus)]
                    old = None
                curses.halfdelay(10 if old is None else 40)

        curses.wrapper(screen)
        return 0


class HardwareCheck:
    """``tools/jailhouse-hardware-check`` for jhlab: the features the executor needs,
    one ``%-32s`` line each ending ``ok``, ``MISSING`` or ``missing (optional)``, then
    ``Check passed!`` (exit 0) or ``Check FAILED!`` (exit 2).

    :param out: where the report goes
    :param err: where errors go
    :param root: prefix for the files read (tests)
    """

    def __init__(self, out: TextIO, err: TextIO, root: str = "") -> None:
        self.out = out
        self.err = err
        self.root = root
        self.passed = True

    def check(self, message: str, ok: bool, optional: bool = False) -> bool:
        """``check_feature()``."""
        if not (ok or optional):
            self.passed = False
        state = "ok" if ok else "missing (optional)" if optional else "MISSING"
        self.out.write("%-32s%s\n" % (message, state))
        return ok

    def _path(self, path: str) -> str:
        return self.root + path

    def _kvm(self) -> bool:
        try:
            fd = os.open(self._path("/dev/kvm"), os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            return fcntl.ioctl(fd, KVM_GET_API_VERSION) == 12
        except OSError:
            return False
        finally:
            os.close(fd)

    def run(self) -> int:
        if os.uname().machine not in ("x86_64", "i686") and not self.root:
            self.err.write("Unsupported architecture\n")
            return 1
        flags: set[str] = set()
        vmx_flags: set[str] = set()
        cpus = 0
        try:
            with open(self._path("/proc/cpuinfo"), encoding="ascii", errors="replace") as info:
                for line in info:
                    key, _, value = line.partition(":")
                    key = key.strip()
                    if key == "processor":
                        cpus += 1
                    elif key == "flags" and not flags:
                        flags = set(value.split())
                    elif key == "vmx flags" and not vmx_flags:
                        vmx_flags = set(value.split())
        except OSError as exc:
            self.err.write(f"reading /proc/cpuinfo: {exc.strerror}\n")
            return 1
        out = self.out
        out.write("Feature                         Availability\n")
        out.write("------------------------------  ------------------\n")
        self.check("Number of CPUs > 1", cpus > 1)
        self.check("Long mode", "lm" in flags)
        self.check("x2APIC", "x2apic" in flags, True)
        out.write("\n")
        if "svm" in flags:
            self.check("AMD-V (SVM)", True)
            self.check("  NPT", "npt" in flags)
            self.check("  Decode assist", "decodeassists" in flags, True)
        elif "vmx" in flags:
            self.check("VT-x (VMX)", True)
            self.check("  EPT", "ept" in flags or "ept" in vmx_flags)
            self.check("  Unrestricted guest", "unrestricted_guest" in vmx_flags
                       or not vmx_flags, True)
        else:
            self.check("VT-x (VMX) or AMD-V (SVM)", False)
        self.check("KVM (/dev/kvm)", self._kvm())
        out.write("\n")
        try:
            groups = len(os.listdir(self._path("/sys/kernel/iommu_groups")))
        except OSError:
            groups = 0
        self.check("IOMMU (VT-d or AMD-Vi)", groups > 0)
        self.check("  VFIO (/dev/vfio/vfio)", os.path.exists(self._path("/dev/vfio/vfio")), True)
        out.write("\n")
        self.check("/dev/mem", os.access(self._path("/dev/mem"), os.R_OK | os.W_OK))
        self.check("/dev/port", os.access(self._path("/dev/port"), os.R_OK | os.W_OK))
        try:
            with open(self._path("/sys/fs/cgroup/cgroup.controllers"), encoding="ascii") as ctl:
                cpuset = "cpuset" in ctl.read().split()
        except OSError:
            cpuset = False
        self.check("cgroup2 cpuset", cpuset)
        out.write("\nCheck %s!\n" % ("passed" if self.passed else "FAILED"))
        return 0 if self.passed else 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``jailhouse``; return the exit status.

    :param argv: the whole command line, ``argv[0]`` included (default: ``sys.argv``)
    """
    tool = Tool(sys.argv if argv is None else argv, RunDir.from_env(), sys.stdout, sys.stderr)
    try:
        return tool.run_command()
    except _Exit as done:
        return done.status
    except BrokenPipeError:
        # The reader went away (| head): no more output, and none at interpreter exit.
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        return 1
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    finally:
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.flush()
