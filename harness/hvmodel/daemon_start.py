"""``jailhouse enable``'s way to a driver daemon: forked by the loader
(:mod:`harness.hvmodel.loader`) when its socket answers, else a spawned interpreter.

Either way the command gets a :class:`StartedDaemon` and reads the daemon's ``ready``
line from its stdout. The loader's wire is described in :mod:`harness.hvmodel.loader`;
this module holds the asking side and what both sides share (the socket's path, reading
one line with its descriptors).
"""

from __future__ import annotations

import _socket
import abc
import contextlib
import errno
import os
import select
import sys
import time

from .ipc import MAX_LINE, decode, encode

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Mapping, Sequence
    from typing import Final

__all__ = ["DEFAULT_SOCKET", "FD_SIZE", "LOADER_ENV", "StartedDaemon", "recv_line", "socket_path",
           "start_daemon"]

#: where the loader listens unless ``$JAILHOUSE_LOADER`` says otherwise
DEFAULT_SOCKET: Final = "/run/jailhouse-loader.sock"
LOADER_ENV: Final = "JAILHOUSE_LOADER"
FD_SIZE: Final = 4  # sizeof(int), the unit of SCM_RIGHTS data


def socket_path() -> str:
    """The loader's socket: ``$JAILHOUSE_LOADER``, else :data:`DEFAULT_SOCKET`."""
    return os.environ.get(LOADER_ENV) or DEFAULT_SOCKET


def recv_line(sock: _socket.socket, want_fds: int = 0) -> tuple[bytes, list[int]]:
    """One line from ``sock`` and the descriptors that came with it."""
    data = b""
    fds: list[int] = []
    space = _socket.CMSG_SPACE(want_fds * FD_SIZE) if want_fds else 0
    while not data.endswith(b"\n"):
        if len(data) > MAX_LINE:
            raise OSError(errno.EMSGSIZE, "request too long")
        chunk, ancillary, _, _ = sock.recvmsg(65536, space)
        for level, kind, payload in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % FD_SIZE
                fds += [int.from_bytes(payload[i:i + FD_SIZE], sys.byteorder)
                        for i in range(0, usable, FD_SIZE)]
        if not chunk:
            break
        data += chunk
    return data, fds





class StartedDaemon(abc.ABC):
    """A daemon process just started: its stdout and stderr (read ends) and how to wait
    for it or stop it, whether it was forked by the loader or spawned.

    :param pid: the daemon's process id
    :param stdout: read end of its stdout
    :param stderr: read end of its stderr
    """

    def __init__(self, pid: int, stdout: int, stderr: int) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr

    @abc.abstractmethod
    def wait(self, timeout: float) -> int | None:
        """Its exit status (``Popen.returncode`` style), or None when it still runs after
        ``timeout`` seconds."""

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the daemon (gone already: nothing)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def read_ready(self, deadline: float) -> bytes | None:
        """The first line the daemon writes on stdout; None when it closed stdout first
        or the ``deadline`` (``time.monotonic``) passed."""
        data = b""
        poller = select.poll()
        poller.register(self.stdout, select.POLLIN)
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return None
            chunk = os.read(self.stdout, 4096)
            if not chunk:
                return None
            data += chunk
        return data.split(b"\n", 1)[0]

    def read_errors(self) -> str:
        """What the daemon wrote on stderr (call once it ended)."""
        chunks = []
        while chunk := os.read(self.stderr, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def close(self) -> None:
        """Let go of its stdout and stderr (and the loader connection)."""
        for fd in (self.stdout, self.stderr):
            if fd >= 0:
                os.close(fd)
        self.stdout = self.stderr = -1


class _SpawnedDaemon(StartedDaemon):
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None and proc.stderr is not None  # PIPE
        super().__init__(proc.pid, proc.stdout.fileno(), proc.stderr.fileno())
        self._proc = proc

    def wait(self, timeout: float) -> int | None:
        import subprocess

        try:
            return self._proc.wait(max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()
        self.stdout = self.stderr = -1


class _ForkedDaemon(StartedDaemon):
    def __init__(self, pid: int, stdout: int, stderr: int, connection: _socket.socket) -> None:
        super().__init__(pid, stdout, stderr)
        self._connection = connection
        self._status: int | None = None

    def wait(self, timeout: float) -> int | None:
        # The loader, the daemon's parent, reports its exit on this connection.
        if self._status is not None:
            return self._status
        self._connection.settimeout(max(0.001, timeout))
        try:
            line, _ = recv_line(self._connection)
            status = decode(line).get("exit") if line else None
        except (OSError, ValueError):
            return None
        if isinstance(status, int):
            self._status = status
        return self._status

    def close(self) -> None:
        super().close()
        self._connection.close()


def _start_by_loader(command: Sequence[str], env: Mapping[str, str], cwd: str,
                     deadline: float) -> StartedDaemon | None:
    """Ask the loader for a daemon; None when no loader answers or it cannot serve."""
    path = socket_path()
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        request = encode({"op": "start", "argv": list(command), "env": dict(env), "cwd": cwd})
        fds = out_write.to_bytes(FD_SIZE, sys.byteorder) + err_write.to_bytes(FD_SIZE, sys.byteorder)
        sock.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        line, _ = recv_line(sock)
        answer = decode(line) if line else {}
    except (OSError, ValueError):
        answer = {}
    finally:
        os.close(out_write)  # the daemon has its own copies now (or none: EOF at once)
        os.close(err_write)
    pid = answer.get("pid")
    if answer.get("result") != 0 or not isinstance(pid, int):
        sock.close()
        os.close(out_read)
        os.close(err_read)
        return None
    return _ForkedDaemon(pid, out_read, err_read, sock)


def _spawn(command: Sequence[str], env: Mapping[str, str], cwd: str) -> StartedDaemon:
    import subprocess

    proc = subprocess.Popen(
        list(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, env=dict(env), cwd=cwd,
    )
    return _SpawnedDaemon(proc)


def start_daemon(command: Sequence[str], env: Mapping[str, str], *, cwd: str = "/",
                 deadline: float) -> StartedDaemon:
    """Start a daemon: forked by the loader when one answers, else spawned.

    :param command: the daemon's command line (``python3 -m harness.hvmodel.daemon ...``;
        the loader uses the arguments after the module name)
    :param env: its environment
    :param cwd: its working directory
    :param deadline: ``time.monotonic`` by which the loader must have answered
    :raise OSError: when spawning fails
    """
    started = _start_by_loader(command, env, cwd, deadline)
    return started if started is not None else _spawn(command, env, cwd)
