"""The preloaded hypervisor model in the lab's root cell: it forks the driver daemons and
runs the ``jailhouse`` commands, so that neither starts a Python interpreter of its own.

``jailhouse enable`` starts the driver daemon (:mod:`harness.hvmodel.daemon`) when none
runs. Spawned as ``python3 -m harness.hvmodel.daemon``, the new interpreter first imports
the model, the executor and the config package: seconds in the lab's root cell, where
Python runs under nested TCG; and every ``jailhouse`` command is an interpreter start of
its own (a few tenths of a second there). The **loader** stands where loading
``jailhouse.ko`` does before any ``enable``: a process started once at boot (``python3
-m harness.hvmodel.loader``, by the lab's ``jhlab-guest-setup``) that imports all of
that and then waits. On request it forks a child that becomes

* a daemon (``start``), with the command line, environment and stdout/stderr of the
  ``jailhouse enable`` that asked, in a session of its own: the same process ``python3
  -m harness.hvmodel.daemon`` would be, without the imports;
* a ``jailhouse`` command (``run``), for the launcher ``/opt/jhlab/bin/jailhouse``
  (``images/guest/src/jailhouse.c``), with the launcher's arguments, environment,
  working directory and standard input, output and error: what ``python3 -IS
  jailhouse ARGS`` would be.

The daemon's lifecycle does not change: it still ends at ``disable`` (or a failed
``enable``); the loader stays and forks the next one. The loader only ever runs one
thread, so forking it is safe. It serves one request at a time on its socket
(``$JAILHOUSE_LOADER``, default ``/run/jailhouse-loader.sock``, mode 0600), one JSON line
each way (:func:`~harness.hvmodel.ipc.encode`); the request carries the child's
descriptors as ``SCM_RIGHTS``; strings carry bytes as ``surrogateescape`` code points::

    -> {"op": "start", "argv": [...], "env": {...}, "cwd": "/"}   + fds (stdout, stderr)
    -> {"op": "run", "argv": [...], "env": {...}, "cwd": DIR}     + fds (stdin, stdout, stderr)
    <- {"result": 0, "pid": PID}         or {"result": -errno, "detail": "..."}
    <- {"exit": STATUS}                  when the child ended while the asker was still
                                         connected (STATUS as Popen.returncode)

Code that changed under the loader (``jhlab sync``) is noticed before a fork: the loader
answers ``ESTALE``, the asker starts an interpreter itself this once, and the loader
replaces itself (``exec``) with a fresh one that preloads the new code.

``enable``'s side, asking the loader or spawning an interpreter, is
:mod:`harness.hvmodel.daemon_start`.

Usage: ``python3 -m harness.hvmodel.loader [--socket PATH] [--log PATH]``; runs until
SIGTERM or SIGINT (exit status 0), 1 when it cannot listen.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import sys
import time

from .daemon_start import DEFAULT_SOCKET, LOADER_ENV, recv_line, socket_path
from .ipc import decode, encode

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    import socket
    from collections.abc import Sequence
    from typing import Final

__all__ = ["DAEMON_PROCESS_NAME", "PRELOAD", "Loader", "main"]

#: what the loader imports before it serves: everything a daemon imports when it starts
#: and enables (the config parser for the debug console included)
PRELOAD: Final = (
    "harness.hvmodel.tool",
    "harness.hvmodel.tool_extensions",
    "harness.hvmodel.tool_linux",
    "harness.hvmodel.daemon",
    "harness.hvmodel.arch.executor",
    "harness.hvmodel.arch.oracle",
    "harness.hvmodel.config",
)
#: the name (``/proc/PID/comm``, what ``ps`` and ``top`` show) of a daemon the loader
#: forked: its command line stays the loader's
DAEMON_PROCESS_NAME: Final = "jhlab-daemon"
#: seconds the loader waits for a connected command to send its request
REQUEST_TIMEOUT: Final = 10.0
#: the requests and the file descriptors each carries: a daemon's stdout and stderr
#: (start); the command's stdin, stdout and stderr (run)
_FDS: Final = {"start": 2, "run": 3}


# =======================================================================================
# the loader
# =======================================================================================


def _code_stamp() -> dict[str, tuple[int, int, int, int]]:
    """Identity of every loaded ``harness`` module file (inode, size, mtime, ctime):
    a copy over it (``jhlab sync``) or an edit changes it."""
    stamp = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not name.startswith("harness.") or not path:
            continue
        try:
            info = os.stat(path)
        except OSError:
            info = None
        stamp[path] = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns) if info \
            else (0, -1, 0, 0)
    return stamp


class Loader:
    """The resident loader: listens, preloads, forks daemons on request.

    Lifecycle: :meth:`listen` (socket first, so commands that come early wait for the
    preload instead of spawning a second interpreter beside it) -> :meth:`preload` ->
    :meth:`serve` (until SIGTERM/SIGINT, or until loaded code changed: then
    :attr:`stale`) -> :meth:`close`. Signals reach :meth:`serve` through a wake-up pipe
    (``signal.set_wakeup_fd``); SIGCHLD makes it reap the daemons that ended, including
    any a replaced loader forked.

    :param path: the socket
    :param log: the loader's logger
    """

    def __init__(self, path: str, log: logging.Logger) -> None:
        self.path = path
        self.log = log
        self.stale = False
        self.stopping = False
        self._listener: socket.socket | None = None
        self._stamp: dict[str, tuple[int, int, int, int]] = {}
        #: daemon pid -> the connection of the command that asked for it (told its exit)
        self._children: dict[int, socket.socket] = {}
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT end :meth:`serve`; SIGCHLD wakes it (main thread only)."""
        import signal

        def stop(signum: int, frame: object) -> None:
            self.stopping = True

        signal.set_wakeup_fd(self._wake_write)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def listen(self) -> None:
        """Bind and listen (mode 0600; a stale socket is replaced)."""
        import socket

        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old_umask)
        listener.listen(16)
        self._listener = listener

    def preload(self) -> None:
        """Import :data:`PRELOAD` and note the files' identity."""
        import importlib

        started = time.monotonic()
        for name in PRELOAD:
            importlib.import_module(name)
        self._stamp = _code_stamp()
        self.log.info("preloaded %d modules in %.2f s", len(self._stamp), time.monotonic() - started)

    def serve(self) -> None:
        """Serve requests and reap daemons until stopped or stale."""
        listener = self._listener
        assert listener is not None  # listen() first
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        self._reap()  # daemons of a loader this one replaced may have ended meanwhile
        while not (self.stale or self.stopping):
            for fd, _ in poller.poll():
                if fd == self._wake_read:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_read, 4096)
                    self._reap()
                elif fd == listener.fileno() and not self.stopping:
                    self._accept(listener)

    def _accept(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        fds: list[int] = []
        pid = 0
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            line, fds = recv_line(conn, max(_FDS.values()))
            request = decode(line)
            if _code_stamp() != self._stamp:  # first: a newer asker may speak a newer wire
                self.log.info("code changed since the preload; replacing this loader")
                self.stale = True
                conn.sendall(encode({"result": -errno.ESTALE, "detail": "loader code is stale"}))
                conn.close()
                return
            op = request.get("op")
            if op not in _FDS or len(fds) != _FDS[op]:
                raise ValueError("expected a start request with two descriptors "
                                 "or a run request with three")
            argv, env, cwd = request["argv"], request["env"], request.get("cwd", "/")
            if not (isinstance(argv, list) and isinstance(env, dict) and isinstance(cwd, str)):
                raise ValueError("argv, env, cwd: expected a list, an object and a string")
            pid = self._fork(op, [_os_string(a) for a in argv],
                             {_os_string(k): _os_string(v) for k, v in env.items()},
                             _os_string(cwd), fds)
            self._children[pid] = conn
            conn.sendall(encode({"result": 0, "pid": pid}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.log.warning("request failed: %s", exc)
            if pid:
                return  # forked; the asker went away: the child is reaped all the same
            with contextlib.suppress(OSError):
                conn.sendall(encode({"result": -errno.EINVAL, "detail": str(exc)}))
            conn.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.log.info("%s %d forked: %s", "daemon" if op == "start" else "command", pid, " ".join(argv))

    def _fork(self, op: str, argv: list[str], env: dict[str, str], cwd: str, fds: list[int]) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        # The child: become what ``python3 -m harness.hvmodel.daemon ARGS`` (start) or
        # ``python3 -IS jailhouse.py ARGS`` (run) would be.
        status = 1
        try:
            import signal

            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if op == "start":
                _name_process(DAEMON_PROCESS_NAME)
                os.setsid()
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(fds[0], 1)
                os.dup2(fds[1], 2)
            else:
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the loader's sockets and pipes
            os.environ.clear()
            os.environ.update(env)
            os.chdir(cwd)
            for handler in list(self.log.handlers):
                self.log.removeHandler(handler)
            if op == "start":
                from . import daemon

                status = daemon.main(_daemon_args(argv))
            else:
                status = _run_tool(argv)
        except BaseException:  # the child never returns to the loader's code
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(status)  # as daemon's __main__: the held connection closes at exit

    def _reap(self) -> None:
        """Collect every ended child; tell the command that asked for it, if still there."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            code = os.waitstatus_to_exitcode(status)
            self.log.info("process %d ended with status %d", pid, code)
            conn = self._children.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):  # the command may be gone: it had what it needed
                    conn.sendall(encode({"exit": code}))
                conn.close()

    def close(self) -> None:
        """Stop listening and remove the socket; idempotent. Daemons live on."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for conn in self._children.values():
            conn.close()
        self._children.clear()


def _name_process(name: str) -> None:
    """Set this process's name (its main thread's ``comm``, at most 15 bytes); best effort."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name[:15])


def _os_string(value: object) -> str:
    """A string of a request as the interpreter would have made it from the bytes (the
    command line, the environment, a path: file system encoding, surrogateescape); the
    launcher sends those bytes as surrogateescape code points."""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return os.fsdecode(os.fsencode(value))


def _run_tool(argv: list[str]) -> int:
    """Run the ``jailhouse`` command in this (forked) process on descriptors 0-2, with
    the standard streams Python gives a command in the lab (UTF-8 mode)."""
    from . import tool

    # open() line-buffers a terminal, as the interpreter's own stdout does
    sys.stdin = open(0, encoding="utf-8", errors="surrogateescape", closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", encoding="utf-8", errors="surrogateescape", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace",  # noqa: SIM115
                      closefd=False)
    # named as the interpreter names them: argparse's '-' and Jailhouse's config check
    # print sys.stdin's name ('<stdin>', not 0)
    for stream, name in ((sys.stdin, "<stdin>"), (sys.stdout, "<stdout>"), (sys.stderr, "<stderr>")):
        stream.buffer.raw.name = name  # type: ignore[attr-defined]
    sys.argv = argv
    return tool.main(argv)


def _daemon_args(argv: Sequence[str]) -> list[str]:
    """The daemon's arguments in a start request's command line (what follows ``-m
    harness.hvmodel.daemon``; the whole list when it does not have that form)."""
    for index in range(len(argv) - 1):
        if argv[index] == "-m" and argv[index + 1].endswith("hvmodel.daemon"):
            return list(argv[index + 2:])
    return list(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the loader; return its exit status."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(
        prog="python3 -m harness.hvmodel.loader",
        description="jhlab's driver loader: preloads the hypervisor model, forks a driver "
                    "daemon per enable and runs jailhouse commands for the launcher.")
    parser.add_argument("--socket", default=None,
                        help=f"socket (default: ${LOADER_ENV} or {DEFAULT_SOCKET})")
    parser.add_argument("--log", default=None, help="log file (default: stderr)")
    args = parser.parse_args(argv)
    path = args.socket or socket_path()
    log = logging.getLogger("harness.hvmodel.loader")
    log.propagate = False  # daemons forked from here set up logging of their own
    # backslashreplace: a command line may hold any bytes (surrogateescape'd)
    handler: logging.Handler = (logging.FileHandler(args.log, errors="backslashreplace") if args.log
                                else logging.StreamHandler())
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    loader = Loader(path, log)
    loader.install_signal_handlers()
    try:
        loader.listen()
    except OSError as exc:
        log.error("cannot listen on %s: %s", path, exc)
        return 1
    log.info("loader %d listening on %s", os.getpid(), path)
    try:
        loader.preload()
        loader.serve()
    finally:
        loader.close()
    if loader.stale:
        handler.close()
        os.execv(sys.executable, [sys.executable, "-m", "harness.hvmodel.loader", "--socket", path,
                                  *(["--log", args.log] if args.log else [])])
    log.info("loader %d ends", os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
