"""Long build commands (``make``, ``tar``) with a log file, live progress and a deadline.

Every command of a kernel build appends its output to the build's log file; the step's
status line shows the phase, the elapsed time and the last line the command printed
(``CC arch/x86/kvm/x86.o``), and a terminal-less run (CI) gets a line every
:data:`HEARTBEAT` seconds instead. A command that fails or outlives its deadline raises
:class:`KernelBuildError` with the log's telling lines and the log's path.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import resource
import select
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Final

from harness.errors import ImageError
from harness.images import require_tool
from harness.progress import Step, console

LOG = logging.getLogger(__name__)

#: seconds between progress lines when stderr is not a terminal
HEARTBEAT: Final = 60.0
#: seconds a command gets to end after SIGTERM before SIGKILL
KILL_GRACE: Final = 10.0
#: lines of the log an error shows
TAIL_LINES: Final = 25
#: compiler and linker complaints worth showing even when they scrolled out of the tail
_TELLING = re.compile(rb"(error:|Error \d|\*\*\*|No such file|not found|undefined reference)")


class KernelBuildError(ImageError):
    """A kernel build command failed.

    :param what: the phase that failed, e.g. ``"compiling kernel linux-cell"``
    :param log: the full build log (kept after the failure)
    :param excerpt: the log lines that tell what went wrong
    """

    def __init__(self, what: str, log: Path, excerpt: str) -> None:
        self.what = what
        self.log = log
        self.excerpt = excerpt
        super().__init__(f"{what}\n--- from the build log ---\n{excerpt.rstrip()}\n"
                         f"full log: {log}")


def _children_cpu() -> float:
    """CPU seconds used by this process's ended (and waited-for) children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def format_elapsed(seconds: float) -> str:
    """``75.2`` -> ``"1m15s"``."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class BuildLog:
    """The log of one artefact's build, shared by its commands.

    :param path: the log file (truncated when opened)
    :param step: the progress step whose status line shows the commands' output
    :param quiet: no heartbeat lines (progress is logged only)
    """

    def __init__(self, path: Path, step: Step, *, quiet: bool = False) -> None:
        self.path = path
        self.step = step
        self.quiet = quiet
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: IO[bytes] = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._last_heartbeat = time.monotonic()
        self._phase_times: dict[str, float] = {}
        self._cpu_times: dict[str, float] = {}

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> BuildLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def phase_times(self) -> dict[str, float]:
        """Seconds each finished phase took, in the order they ran."""
        return dict(self._phase_times)

    @property
    def cpu_times(self) -> dict[str, float]:
        """CPU seconds (user + system) the commands of each phase used: on a shared
        machine a steadier measure of a build's cost than its wall time."""
        return dict(self._cpu_times)

    def note(self, text: str) -> None:
        """Write a line of our own into the log."""
        self._handle.write(f"### {text}\n".encode())
        self._handle.flush()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase that is not one command (copying, checking)."""
        started = time.monotonic()
        self.note(name)
        self.step.note(name)
        yield
        self._phase_times[name] = self._phase_times.get(name, 0.0) + time.monotonic() - started

    def run(self, cmd: Sequence[str], *, phase: str, timeout: float, cwd: Path | None = None,
            env: Mapping[str, str] | None = None) -> None:
        """Run ``cmd`` to completion, its output into the log.

        :param phase: what the command does, for the status line and errors
        :param timeout: seconds it may take; then it and its children are killed
        :raise KernelBuildError: when it fails or times out
        :raise MissingToolError: when ``cmd[0]`` is not installed
        """
        exe = require_tool(cmd[0], f"for {phase}")
        self.note(f"{phase}: {' '.join(cmd)}" + (f"  (in {cwd})" if cwd else ""))
        started = time.monotonic()
        deadline = started + timeout
        tail: collections.deque[bytes] = collections.deque(maxlen=TAIL_LINES)
        telling: list[bytes] = []
        last = ""
        partial = b""
        full_env = {**os.environ, "LC_ALL": "C", **(env or {})}
        cpu_before = _children_cpu()
        # A session of its own: a timeout or an interrupt ends make and every compiler
        # it started (by the group id, which is this child's pid).
        proc = subprocess.Popen([exe, *cmd[1:]], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        assert proc.stdout is not None  # stdout=PIPE
        try:
            fd = proc.stdout.fileno()
            while True:
                if time.monotonic() > deadline:
                    self._kill(proc)
                    raise KernelBuildError(
                        f"{phase} did not finish within {format_elapsed(timeout)}",
                        self.path, self._excerpt(telling, tail))
                ready, _, _ = select.select([fd], [], [], 1.0)
                if ready:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    self._handle.write(chunk)
                    lines = (partial + chunk).split(b"\n")
                    partial = lines.pop()
                    for line in lines:
                        tail.append(line)
                        if _TELLING.search(line) and len(telling) < 10:
                            telling.append(line)
                        if line.strip():
                            last = line.decode(errors="replace").strip()
                self._progress(phase, started, last)
            status = proc.wait(timeout=KILL_GRACE)
        except BaseException:
            self._kill(proc)
            raise
        finally:
            proc.stdout.close()
            self._handle.flush()
        self._phase_times[phase] = self._phase_times.get(phase, 0.0) + time.monotonic() - started
        self._cpu_times[phase] = self._cpu_times.get(phase, 0.0) + _children_cpu() - cpu_before
        if status != 0:
            raise KernelBuildError(f"{phase} failed (exit status {status}): {' '.join(cmd)}",
                                   self.path, self._excerpt(telling, tail))

    def _progress(self, phase: str, started: float, last: str) -> None:
        now = time.monotonic()
        elapsed = format_elapsed(now - started)
        self.step.note(f"{phase} {elapsed}" + (f" · {last[:70]}" if last else ""))
        if self.quiet or console.is_terminal or now - self._last_heartbeat < HEARTBEAT:
            return
        self._last_heartbeat = now
        console.print(f"  … {self.step.title}: {phase} ({elapsed}, "
                      f"{format_elapsed(self.step.elapsed)} in all)", highlight=False, soft_wrap=True)

    @staticmethod
    def _excerpt(telling: list[bytes], tail: collections.deque[bytes]) -> str:
        lines = [line for line in telling if line not in tail] + list(tail)
        return b"\n".join(lines).decode(errors="replace")

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
