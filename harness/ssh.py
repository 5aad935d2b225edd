r"""Commands in the root cell: over SSH (paramiko), or over the root console as fallback.

Both shells are :class:`~harness.protocol.CommandRunner`\ s (:class:`SshShell` also a
:class:`~harness.protocol.FileTransfer`): they return the same
:class:`~harness.protocol.CommandResult` and raise :class:`~harness.errors.CommandError`
on a non-zero status when asked to check.  SSH uses the lab's own key pair (generated per lab
run directory) and pins the root file system's host key recorded at image build time.
"""

from __future__ import annotations

import io
import logging
import secrets
import shlex
import time
from pathlib import Path

import paramiko

from harness.errors import CommandError, ConsoleError
from harness.protocol import COMMAND_TIMEOUT, CommandResult, Console

#: the most of a program's standard error kept for its error message (bytes)
STDERR_KEPT = 65536
#: seconds to wait for a program's exit status once its output ended
EXIT_STATUS_WAIT = 2.0

LOG = logging.getLogger(__name__)
COMMANDS_LOG = logging.getLogger("jhlab.commands")


def _log_result(via: str, result: CommandResult) -> None:
    # one record per command, so parallel runs do not interleave
    COMMANDS_LOG.info("[%s] $ %s\n(status %d)\n%s", via, result.command, result.status,
                      result.output.rstrip())


def generate_key(path: Path) -> str:
    """Create an RSA key pair at ``path`` (private, mode 0600) and ``path.pub``;
    return the public key line."""
    key = paramiko.RSAKey.generate(2048)
    path.touch(mode=0o600)
    key.write_private_key_file(str(path))
    public = f"{key.get_name()} {key.get_base64()} jhlab"
    path.with_suffix(".pub").write_text(public + "\n")
    return public


class SshShell:
    """Run commands in the root cell over SSH.

    :param port: the host port forwarded to the guest's port 22 (on 127.0.0.1)
    :param key_path: the lab's private key
    :param host_keys: known_hosts-style file with the guest's host keys, if recorded
    """

    def __init__(self, port: int, key_path: Path, host_keys: Path | None = None,
                 host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.key_path = key_path
        self.host_keys = host_keys
        self._client: paramiko.SSHClient | None = None

    def __repr__(self) -> str:
        return f"SshShell({self.host}:{self.port}, {'open' if self._client else 'closed'})"

    def connect(self, timeout: float = 60.0) -> None:
        """Connect, retrying until sshd answers or ``timeout`` passes."""
        if self._client is not None:
            return
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            client = paramiko.SSHClient()
            if self.host_keys is not None and self.host_keys.exists():
                client.load_host_keys(str(self.host_keys))
                client.set_missing_host_key_policy(paramiko.RejectPolicy())
            else:
                client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            try:
                client.connect(
                    self.host, port=self.port, username="root", key_filename=str(self.key_path),
                    timeout=min(10.0, max(1.0, deadline - time.monotonic())),
                    banner_timeout=10, auth_timeout=10, look_for_keys=False, allow_agent=False,
                )
                self._client = client
                return
            except (paramiko.SSHException, OSError, EOFError) as exc:
                client.close()
                if isinstance(exc, paramiko.BadHostKeyException):
                    raise ConsoleError(f"ssh: the lab's host key does not match "
                                       f"{self.host_keys}: {exc}") from exc
                last = exc
                time.sleep(0.5)
        raise ConsoleError(f"ssh: root cell did not answer on {self.host}:{self.port} within "
                           f"{timeout:.0f} s: {last}")

    def run(self, command: str, *, timeout: float = COMMAND_TIMEOUT, check: bool = False,
            stdin: str | None = None) -> CommandResult:
        """Run ``command`` with ``sh -c`` semantics and wait for its exit status."""
        if self._client is None:
            self.connect()
        assert self._client is not None  # connect() sets it or raises
        try:
            chan_in, chan_out, chan_err = self._client.exec_command(command, timeout=timeout)
            if stdin is not None:
                chan_in.write(stdin)
            chan_in.channel.shutdown_write()
            out = chan_out.read().decode("utf-8", "replace")
            err = chan_err.read().decode("utf-8", "replace")
            status = chan_out.channel.recv_exit_status()
        except TimeoutError as exc:
            raise CommandError(command, -1, f"no exit status within {timeout:.0f} s") from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise ConsoleError(f"ssh: connection lost while running {command!r}: {exc}") from exc
        result = CommandResult(command, status, out, err)
        _log_result("ssh", result)
        return result.check() if check else result

    def start(self, command: str, timeout: float = 30.0) -> SshProgram:
        """Start ``command`` (``sh -c`` semantics) on a channel of its own
        (:class:`~harness.protocol.ProgramRunner`).

        :param timeout: seconds to wait for the channel to open
        :raise ConsoleError: when the connection cannot carry a new channel
        """
        if self._client is None:
            self.connect()
        assert self._client is not None  # connect() sets it or raises
        transport = self._client.get_transport()
        try:
            if transport is None or not transport.is_active():
                raise paramiko.SSHException("the connection is closed")
            channel = transport.open_session(timeout=timeout)
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise ConsoleError(f"ssh: cannot start {command!r}: {exc}") from exc
        COMMANDS_LOG.info("[ssh] $ %s &", command)
        return SshProgram(channel, command)

    def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the root cell."""
        if self._client is None:
            self.connect()
        assert self._client is not None  # connect() sets it or raises
        with self._client.open_sftp() as sftp:
            # putfo pipelines the writes (no wait for each 32 KiB's acknowledgement): under
            # TCG that is several times faster than writing the file block by block
            sftp.putfo(io.BytesIO(data), path)
            sftp.chmod(path, mode)

    def get(self, path: str) -> bytes:
        """Read ``path`` from the root cell."""
        if self._client is None:
            self.connect()
        assert self._client is not None  # connect() sets it or raises
        buffer = io.BytesIO()
        with self._client.open_sftp() as sftp:
            sftp.getfo(path, buffer)  # prefetches (reads ahead), as putfo pipelines
        return buffer.getvalue()

    def sftp(self) -> paramiko.SFTPClient:
        """An SFTP session on this connection (the caller closes it)."""
        if self._client is None:
            self.connect()
        assert self._client is not None  # connect() sets it or raises
        try:
            return self._client.open_sftp()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise ConsoleError(f"ssh: cannot open an SFTP session: {exc}") from exc

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


class SshProgram:
    """A program on an SSH channel of its own: lines to its standard input, lines back
    from its standard output (:class:`~harness.protocol.LineProgram`).

    Lifecycle: :meth:`SshShell.start` → :meth:`send`/:meth:`receive` → :meth:`close`
    (also when the lab's connection went away: it is then already dead).
    """

    def __init__(self, channel: paramiko.Channel, command: str) -> None:
        self.command = command
        self._channel = channel
        self._buffer = b""
        self._stderr = b""

    def __repr__(self) -> str:
        return f"SshProgram({self.command!r}, {'alive' if self.alive else 'ended'})"

    @property
    def alive(self) -> bool:
        transport = self._channel.get_transport()
        return (not self._channel.closed and not self._channel.exit_status_ready()
                and transport is not None and transport.is_active())

    def send(self, line: str) -> None:
        try:
            self._channel.sendall((line + "\n").encode())
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConsoleError(f"ssh: {self.command!r} does not take input: {exc}"
                               f"{self._errors()}") from exc

    def receive(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConsoleError(f"ssh: {self.command!r} answered nothing within "
                                   f"{timeout:.0f} s{self._errors()}")
            self._channel.settimeout(min(remaining, 1.0))
            try:
                chunk = self._channel.recv(65536)
            except TimeoutError:
                self._errors()  # keep its standard error flowing
                continue
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise ConsoleError(f"ssh: connection lost while {self.command!r} ran: "
                                   f"{exc}") from exc
            if not chunk:
                # OpenSSH sends the exit status right after the end of output
                ended = self._channel.status_event.wait(EXIT_STATUS_WAIT)
                status = self._channel.exit_status if ended else "unknown"
                raise ConsoleError(f"ssh: {self.command!r} ended (status {status}) without an "
                                   f"answer{self._errors()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace")

    def _errors(self) -> str:
        """Read what its standard error has; return all of it kept as a message tail."""
        try:
            while self._channel.recv_stderr_ready():
                self._stderr = (self._stderr + self._channel.recv_stderr(65536))[-STDERR_KEPT:]
        except (paramiko.SSHException, OSError, EOFError):
            pass  # the channel is gone; what was read stays
        text = self._stderr.decode("utf-8", "replace").strip()
        return f":\n{text}" if text else ""

    def close(self) -> None:
        try:
            if not self._channel.closed:
                self._channel.shutdown_write()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            LOG.debug("%r: closing its input: %s", self, exc)
        self._channel.close()


class SerialShell:
    """Run commands on the root console's shell (fallback when SSH is not available).

    Output and status are framed by a random marker, so the shell's echo of the command
    line never matches.
    """

    PROMPT = r"jhlab# "

    def __init__(self, console: Console) -> None:
        self.console = console
        self._ready = False

    def _prepare(self, timeout: float) -> None:
        if self._ready:
            return
        self.console.sendline("")
        self.console.expect(self.PROMPT, timeout=timeout)
        self.console.sendline("stty -echo")
        self.console.expect(self.PROMPT, timeout=timeout)
        self._ready = True

    def run(self, command: str, *, timeout: float = COMMAND_TIMEOUT, check: bool = False,
            stdin: str | None = None) -> CommandResult:
        """Run ``command`` in the console shell; output is stdout and stderr merged."""
        self._prepare(min(timeout, 30.0))
        tag = secrets.token_hex(4)
        wrapped = f"sh -c {shlex.quote(command)}"
        if stdin is not None:
            wrapped = f"printf %s {shlex.quote(stdin)} | {wrapped}"
        self.console.discard()
        self.console.sendline(
            f"{wrapped} 2>&1; printf '\\n%s%d%s\\n' '<<{tag}:' \"$?\" ':{tag}>>'"
        )
        match = self.console.expect(rf"<<{tag}:(\d+):{tag}>>", timeout=timeout)
        before = self.console.before.replace("\r", "")
        output = before[:-1] if before.endswith("\n") else before
        result = CommandResult(command, int(match.group(1)), output)
        _log_result("serial", result)
        return result.check() if check else result

