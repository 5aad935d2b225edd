"""The ``jailhouse`` command's extensions; models ``tools/jailhouse-cell-stats`` and
``tools/jailhouse-hardware-check`` (the scripts ``call_extension_script()`` runs), and
hands ``config check``/``config show`` to :func:`harness.hvmodel.config.cli.main`.

Kept apart from :mod:`harness.hvmodel.tool` so that the built-in commands start without
importing what only these need (curses, the config package).
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol, TextIO

from .arch.kvm.structs import KVM_API_VERSION, KVM_GET_API_VERSION
from .errors import Exit
from .ipc import RunDir


class Tool(Protocol):
    """What an extension uses of the running command (:class:`harness.hvmodel.tool.Tool`),
    named here so that the tool can import its extensions without a circle."""

    prog: str
    run_dir: str
    out: TextIO
    err: TextIO

    def refresh_sysfs(self) -> None: ...

__all__ = ["CellStats", "HardwareCheck", "cell_stats", "config", "hardware_check"]


def cell_stats(tool: Tool, args: list[str]) -> int:
    """``jailhouse cell stats { ID | [--name] NAME } [-n] [-i SECONDS] [-c CPU]``."""
    return CellStats(tool, args[1:]).run()


def hardware_check(tool: Tool, args: list[str]) -> int:
    """``jailhouse hardware check``: what the executor needs, Jailhouse's format."""
    return HardwareCheck(tool.out, tool.err).run()


def config(tool: Tool, args: list[str]) -> int:
    """``jailhouse config check|show ...``: ``check`` is Jailhouse's
    ``jailhouse-config-check`` (as Jailhouse's tool execs it), ``show`` the config CLI."""
    from .config.cli import jailhouse_config_check
    from .config.cli import main as config_main

    tool.out.flush()
    if args[0] == "check":
        return jailhouse_config_check(args[1:], prog="jailhouse config check")
    return config_main(args, prog=f"{tool.prog} config")


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
        self.rundir = RunDir(tool.run_dir)
        self.interactive = True
        self.interval = 1.0
        self.cpu: int | None = None

    def usage(self, status: int) -> Exit:
        self.tool.out.write(self.USAGE % self.tool.prog)
        return Exit(status)

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

    def _fail(self, code: int) -> Exit:
        self.tool.err.write(f"reading stats: {os.strerror(code)}\n")
        return Exit(1)

    def _resolve(self, cell_id: str | None, name: str | None) -> tuple[str, str]:
        cells = self.rundir.cells
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
        base = self.rundir.cells / directory / "statistics"
        return base if self.cpu is None else base / f"cpu{self.cpu}"

    def _read(self, directory: str) -> dict[str, int]:
        self.tool.refresh_sysfs()
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
            int(entry[3:]) for entry in os.listdir(self.rundir.cells / directory / "statistics")
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
            return bool(fcntl.ioctl(fd, KVM_GET_API_VERSION) == KVM_API_VERSION)
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
