"""The driver process; stands where ``driver/main.c`` and ``driver/sysfs.c`` (the Linux
module ``jailhouse.ko``) are, and feeds the hypervisor's debug UART.

In jhlab the hypervisor is a Python model, so its "driver" is a long-running process that
owns the :class:`~harness.hvmodel.driver.Driver`, the
:class:`~harness.hvmodel.control.Hypervisor` it creates and the
:class:`~harness.hvmodel.arch.Arch` underneath (the KVM executor, or the bookkeeping
oracle). ``jailhouse enable`` starts it; a successful ``jailhouse disable`` ends it.

What it does, all of it in the run directory (:class:`~harness.hvmodel.ipc.RunDir`):

* serves the ioctls and the console read on ``driver.sock`` (mode 0600), JSON lines
  (:mod:`harness.hvmodel.ipc`), one thread per connection; management operations are
  serialised by one lock (the driver's ``jailhouse_lock``), console readers never take
  it, so ``jailhouse console -f`` does not hold up other commands;
* writes Jailhouse's sysfs tree (:func:`~harness.hvmodel.sysfs.sysfs_tree`) as real files
  under ``sys/devices/jailhouse`` (:mod:`~harness.hvmodel.sysfs_files`): after every
  operation, on request (``sysfs``) and, while a non-root cell runs, every ``--refresh``
  seconds (states, failed CPUs and statistics change on their own then). Each refresh
  reads every file, so it costs the root CPU the hypercalls a reader of the real tree
  would cause;
* keeps the hypervisor console: a 2048-byte ring read as the driver's ``read()`` does
  (``<missed N bytes of console log>``, :mod:`~harness.hvmodel.console_ring`), followed
  by ``console -f`` readers, saved to ``last_console`` at exit (the driver's
  ``last_console``);
* writes every console character to the system config's debug console, an 8250 UART at
  ``debug_console.address`` (0x3f8 for qemu-x86), through ``/dev/port`` with the 8250
  protocol (wait for THRE in LSR, then THR; ``\\n`` becomes ``\\r\\n``), where Jailhouse's
  own hypervisor prints (``--debug-console``, :mod:`~harness.hvmodel.uart`);
* logs to ``daemon.log``; the lines the Linux driver would print (``pr_err``/``pr_info``)
  go to that log, to each reply's ``kernel_log`` and, with ``--kmsg``, to ``/dev/kmsg``;
* on ``disable`` and on SIGTERM/SIGINT shuts down cleanly: cells destroyed through the
  model (a refusing cell is asked again), the machine released, the sysfs tree put back
  to the disabled one, the socket removed; then the process ends.

Differences from the real driver, by construction: the daemon exists only while the
hypervisor is enabled (a failed enable ends it too), so "module loaded but disabled" is
played by the ``jailhouse`` command from the files left in the run directory; the binary
``core`` file is not written; console readers following with ``-f`` get end-of-file when
the daemon ends instead of blocking until the next enable.

The Arch (:mod:`~harness.hvmodel.archfactory`) runs behind a tap: its
:meth:`~harness.hvmodel.arch.Arch.console_write` is not called, the daemon owns the debug
console itself. The host is probed by :mod:`~harness.hvmodel.hostprobe`.

Usage: ``python3 -m harness.hvmodel.daemon [--run-dir DIR] [--arch auto|executor|oracle]
...`` (``--help``); normally started by ``jailhouse enable``. Exit status: 0 after a clean
shutdown, 1 on failure, 2 for usage errors, 75 when another daemon holds the run directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, cast

from . import faults
from .abi import CELL_ID_UNUSED, CellState
from .archfactory import ArchTap, make_arch
from .config import SysFlags
from .console_ring import ConsoleRing
from .daemon_options import DaemonOptions, build_parser, options_from_args
from .driver import CellRef, Driver, HostInfo, Image
from .errors import DaemonBusy, DaemonError, Errno, HvError
from .hostprobe import host_from_wire, host_to_wire, probe_host
from .ipc import (
    EXIT_BUSY,
    MAX_LINE,
    PROTOCOL_VERSION,
    READY_LINE,
    CellId,
    b64decode,
    decode,
    encode,
    reply,
)
from .sysfs import sysfs_tree
from .sysfs_files import SysfsWriter
from .uart import DebugConsole, open_target

if TYPE_CHECKING:
    from .arch import Arch

__all__ = [
    "EXIT_BUSY",
    "READY_LINE",
    "Daemon",
    "DaemonBusy",
    "DaemonError",
    "DaemonOptions",
    "build_parser",
    "host_from_wire",
    "main",
]

LOG = logging.getLogger("harness.hvmodel.daemon")

#: how long shutdown waits for the management lock, the UART queue, readers
SHUTDOWN_TIMEOUT: Final = 30.0
#: how long an operation's reply waits for its console lines to be out on the UART
DEBUG_CONSOLE_FLUSH_TIMEOUT: Final = 5.0
#: a daemon that was not enabled this long after its start ends (its starter died)
ENABLE_TIMEOUT: Final = 120.0

#: driver error texts (HvError messages of :class:`~harness.hvmodel.driver.Driver`) and
#: the kernel log lines the Linux driver prints for them
_PR_ERR: Final[dict[str, tuple[str, ...]]] = {
    "Missing or unsupported HVM technology": ("jailhouse: Missing or unsupported HVM technology",),
    "Not a system configuration": ("jailhouse: Not a system configuration",),
    "Configuration revision mismatch": ("jailhouse: Configuration revision mismatch",),
    "Configuration architecture mismatch": ("jailhouse: Configuration architecture mismatch",),
    "VT-x disabled by Firmware/BIOS": ("jailhouse: VT-x disabled by Firmware/BIOS",),
    'Did you reserve the memory with "memmap=" or "mem="?': (
        "jailhouse: request_mem_region failed for hypervisor memory.",
        'jailhouse: Did you reserve the memory with "memmap=" or "mem="?',
    ),
    "Not a cell configuration": ("jailhouse: Not a cell configuration",),
    "Cannot assign CPU 0 to other cells": ("Cannot assign CPU 0 to other cells",),
}



# =======================================================================================
# the daemon
# =======================================================================================


class Daemon:
    """The driver process.

    Lifecycle: :meth:`start` (run directory locked, log, Arch, driver, sysfs, socket),
    :meth:`serve` (until a successful disable or a signal), :meth:`shutdown` (cells
    destroyed, machine released, files reset) -- :meth:`run` does all three.

    :param options: the command line
    """

    def __init__(self, options: DaemonOptions) -> None:
        self.options = options
        self.run_dir = options.run_dir
        self.arch_name = ""
        self.arch: Arch | None = None
        self.driver: Driver | None = None
        self.host: HostInfo | None = None
        self.ring = ConsoleRing()
        self.debug_console: DebugConsole | None = None
        self.sysfs = SysfsWriter(self.run_dir.sysfs)
        self.console_available = False
        self.refresh_interval = 0.0
        self.kmsg = False
        #: the management lock (``jailhouse_lock``)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        #: set once the machine is released and the console final (readers may end)
        self._closing = threading.Event()
        self._stop_reason = ""
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._handlers: set[threading.Thread] = set()
        self._handlers_lock = threading.Lock()
        #: connections closed only by the process exit (the one that disabled)
        self._held: list[socket.socket] = []
        self._dir_fd = -1
        self._was_running = False
        self._log_handler: logging.Handler | None = None
        self._profiles = 0

    # -- start --------------------------------------------------------------------------

    def start(self) -> None:
        """Take the run directory, build the machine and open the socket.

        :raise DaemonError: when another daemon runs here or the Arch cannot be had
        :raise OSError: when the run directory or socket cannot be set up
        """
        options = self.options
        path = self.run_dir.path
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._dir_fd)
            self._dir_fd = -1
            raise DaemonBusy(f"another daemon runs in {path}") from exc
        self._setup_logging()
        LOG.info("daemon %d starting in %s (protocol %d)", os.getpid(), path, PROTOCOL_VERSION)
        faults.load_env()  # test-only fault injection ($JHLAB_FAULT, harness/hvmodel/faults.py)
        arch, self.arch_name = make_arch(options.arch, options.responders, rebind_pci=options.rebind_pci,
                                         native_pio=options.native_pio, exit_trace=options.exit_trace)
        self.arch = arch
        host_mode = options.host or ("probe" if self.arch_name == "executor" else "model")
        if host_mode not in ("probe", "model"):
            raise DaemonError(f"unknown host mode {host_mode!r}")
        self.host = self._probe_host() if host_mode == "probe" else HostInfo()
        tap = cast("Arch", ArchTap(arch, self._console_write))
        driver = self.driver = Driver(tap, self.host, test_device=options.test_device)
        attach = getattr(arch, "attach", None)
        if callable(attach):
            # The executor's vCPU threads send their exits to the current hypervisor.
            attach(lambda: driver.hv)
        refresh = options.refresh
        self.refresh_interval = (1.0 if self.arch_name == "executor" else 0.0) if refresh is None else refresh
        kmsg = options.kmsg
        self.kmsg = (self.arch_name == "executor") if kmsg is None else kmsg
        LOG.info("arch %s, host %s %s, refresh %s s, kmsg %s", self.arch_name, host_mode,
                 host_to_wire(self.host), self.refresh_interval, self.kmsg)
        self.debug_console = DebugConsole()
        self.sysfs.clear()
        self.sysfs.write(sysfs_tree(self.driver))
        self._listen()

    def _probe_host(self) -> HostInfo:
        """This machine for the driver: the executor's ``host_info`` (timer frequencies as
        KVM gives them to cells, measured on the VM it keeps anyway: no scratch VM comes
        and goes) when it runs the cells, else :func:`probe_host`."""
        measure = getattr(self.arch, "host_info", None)
        if self.arch_name == "executor" and callable(measure):
            try:
                return cast(HostInfo, measure())
            except Exception:
                LOG.exception("the executor's host_info failed; probing /proc and /sys")
        return probe_host()

    def _setup_logging(self) -> None:
        root = logging.getLogger()
        handler = logging.FileHandler(self.run_dir.log, encoding="utf-8")
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(process)d %(threadName)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        if self.options.foreground:
            root.addHandler(logging.StreamHandler(sys.stderr))
        root.setLevel(logging.DEBUG if self.options.verbose else logging.INFO)
        self._log_handler = handler

    def _listen(self) -> None:
        sock_path = self.run_dir.socket
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()  # stale: we hold the lock, so nobody serves it
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(os.fspath(sock_path))
        finally:
            os.umask(old_umask)
        os.chmod(sock_path, 0o600)
        listener.listen(16)
        listener.settimeout(0.5)
        self._listener = listener

    # -- serve ----------------------------------------------------------------------------

    def serve(self) -> str:
        """Accept connections until stopped; refresh sysfs meanwhile.

        :return: why it stopped (``disable``, ``enable failed``, ``signal SIGTERM``)
        """
        self._accept_thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self._accept_thread.start()
        started = time.monotonic()
        driver = self.driver
        assert driver is not None  # set by start()
        while not self._stop.is_set():
            interval = self.refresh_interval
            self._stop.wait(interval if interval > 0 else 1.0)
            if interval > 0 and not self._stop.is_set():
                self._periodic_refresh()
            if not driver.enabled and time.monotonic() - started > ENABLE_TIMEOUT \
                    and not self._lock.locked():
                self.stop("never enabled")
        return self._stop_reason

    def stop(self, reason: str) -> None:
        """Ask :meth:`serve` to return (thread- and signal-safe)."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None  # set by start()
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            conn.settimeout(None)
            thread = threading.Thread(target=self._serve_connection, args=(conn,),
                                      name="conn", daemon=True)
            with self._handlers_lock:
                self._handlers = {t for t in self._handlers if t.is_alive()}
                self._handlers.add(thread)
            thread.start()

    def _serve_connection(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        hold = False
        try:
            while True:
                line = reader.readline(MAX_LINE)
                if not line:
                    return
                try:
                    request = decode(line)
                    op = request.get("op")
                except ValueError as exc:
                    conn.sendall(encode(reply(-errno.EINVAL, detail=f"malformed request: {exc}")))
                    continue
                if op == "console" and request.get("follow"):
                    self._follow_console(conn, request)
                    return
                answer = self._dispatch(op, request)
                driver = self.driver
                ending = (op == "disable" and answer["result"] == 0) or (
                    op == "enable" and driver is not None and not driver.enabled)
                if ending:
                    # No hypervisor, no driver: the daemon ends after a successful disable
                    # and after a failed enable. The asking connection stays open until
                    # the process exits, so the command can wait for the end.
                    answer["ending"] = True
                    answer["pid"] = os.getpid()
                    hold = True
                    self._held.append(conn)
                conn.sendall(encode(answer))
                if ending:
                    self.stop("disable" if op == "disable" else "enable failed")
                    return
        except OSError as exc:
            LOG.debug("connection ended: %s", exc)
        finally:
            reader.close()
            if not hold:
                conn.close()

    def _dispatch(self, op: object, request: dict[str, Any]) -> dict[str, Any]:
        handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "enable": self._op_enable,
            "disable": self._op_disable,
            "cell_create": self._op_cell_create,
            "cell_load": self._op_cell_load,
            "cell_start": self._op_cell_start,
            "cell_destroy": self._op_cell_destroy,
            "console": self._op_console,
            "sysfs": self._op_sysfs,
            "state": self._op_state,
        }
        handler = handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            # Any other ioctl: -EINVAL (jailhouse_ioctl's default).
            return reply(-errno.EINVAL, detail=f"unknown op {op!r}")
        try:
            return handler(request)
        except (KeyError, TypeError, ValueError) as exc:
            return reply(-errno.EINVAL, detail=f"malformed {op} request: {exc!r}")

    # -- operations ---------------------------------------------------------------------------

    def _call(self, name: str, operation: Callable[[Driver], object],
              extra_lines: Callable[[HvError], list[str]] | None = None) -> dict[str, Any]:
        """Run one driver command under the management lock, refresh sysfs, build the reply."""
        if self.options.profile is None:
            return self._call_locked(name, operation, extra_lines)
        import cProfile

        profiler = cProfile.Profile()
        try:
            return profiler.runcall(self._call_locked, name, operation, extra_lines)
        finally:
            self._profiles += 1
            path = os.path.join(self.options.profile, f"{self._profiles:03d}-{name}.prof")
            try:
                os.makedirs(self.options.profile, exist_ok=True)
                profiler.dump_stats(path)
            except OSError as exc:
                LOG.warning("profile %s: %s", path, exc)

    def _call_locked(self, name: str, operation: Callable[[Driver], object],
                     extra_lines: Callable[[HvError], list[str]] | None) -> dict[str, Any]:
        driver = self.driver
        assert driver is not None  # set by start()
        with self._lock:
            log_mark = len(driver.kernel_log)
            console_mark = self.ring.tail
            detail = ""
            errors: list[str] = []
            started = time.monotonic()
            try:
                operation(driver)
                result = 0
            except HvError as err:
                result = err.code
                detail = str(err)
                errors = list(_PR_ERR.get(err.message, ()))
                if extra_lines is not None:
                    errors += extra_lines(err)
            except Exception as exc:  # a model bug must not take the driver down
                LOG.exception("%s failed inside the model", name)
                result = -errno.EIO
                detail = f"{type(exc).__name__}: {exc}"
            info = driver.kernel_log[log_mark:]
            self._refresh_locked()
        self._flush_debug_console()
        console = self.ring.since(console_mark).decode("latin-1")
        LOG.info("%s -> %d%s (%.3f s)", name, result, f" [{detail}]" if detail else "",
                 time.monotonic() - started)
        self._kernel_log(info, errors)
        return reply(result, kernel_log=info + errors, console=console, detail=detail)

    def _kernel_log(self, info: list[str], errors: list[str]) -> None:
        # The driver model logs its own lines; the error lines are the daemon's.
        for line in errors:
            LOG.error("kernel: %s", line)
        if not self.kmsg or not (info or errors):
            return
        try:
            with open("/dev/kmsg", "w", encoding="utf-8") as kmsg:
                for level, lines in ((6, info), (3, errors)):
                    for line in lines:
                        kmsg.write(f"<{level}>{line}\n")
                        kmsg.flush()
        except OSError as exc:
            LOG.warning("/dev/kmsg: %s", exc)

    def _op_enable(self, request: dict[str, Any]) -> dict[str, Any]:
        data = b64decode(request["config"])

        def enable(drv: Driver) -> None:
            if not drv.enabled:
                # A fresh hypervisor: fresh console (last_console.valid = false), and the
                # debug console chosen before the hypervisor prints its banner.
                with contextlib.suppress(FileNotFoundError):
                    self.run_dir.last_console.unlink()
                self._configure_debug_console(data)
            drv.enable(data)
            system = drv.system
            self.console_available = bool(
                system is not None and system.flags & SysFlags.VIRTUAL_DEBUG_CONSOLE)

        def missing_image(err: HvError) -> list[str]:
            if err.message != "Missing hypervisor image":
                return []
            host = self.host
            firmware = "jailhouse-amd.bin" if host is not None and host.cpu_vendor == "amd" \
                else "jailhouse-intel.bin"
            return [f"jailhouse: Missing hypervisor image {firmware}"]

        return self._call("enable", enable, missing_image)

    def _op_disable(self, request: dict[str, Any]) -> dict[str, Any]:
        driver = self.driver
        assert driver is not None  # set by start()
        first_cell = ""

        def disable(drv: Driver) -> None:
            nonlocal first_cell
            remaining = sorted(cell_id for cell_id in drv.cells if cell_id != 0)
            first_cell = drv.cells[remaining[0]].name if remaining else ""
            drv.disable()

        def failed_destroy(err: HvError) -> list[str]:
            # jailhouse_cmd_cell_destroy_non_root names the cell that refused.
            if err.message != "hypercall CELL_DESTROY":
                return []
            remaining = sorted(cell_id for cell_id in driver.cells if cell_id != 0)
            name = driver.cells[remaining[0]].name if remaining else first_cell
            return [f'Jailhouse: failed to destroy cell "{name}"']

        return self._call("disable", disable, failed_destroy)

    def _op_cell_create(self, request: dict[str, Any]) -> dict[str, Any]:
        data = b64decode(request["config"])
        return self._call("cell_create", lambda drv: drv.cell_create(data))

    @staticmethod
    def _cell_ref(request: dict[str, Any]) -> CellRef:
        cell = CellId.from_wire(request["cell"])
        return cell.name if cell.id == CELL_ID_UNUSED else cell.id

    @staticmethod
    def _require_enabled(drv: Driver) -> None:
        # cell_management_prologue: -EINVAL while disabled (before looking the cell up)
        if not drv.enabled:
            raise HvError(Errno.EINVAL, "hypervisor not enabled")

    def _op_cell_load(self, request: dict[str, Any]) -> dict[str, Any]:
        ref = self._cell_ref(request)
        images = []
        for item in request.get("images", []):
            target = int(item["target"]) & 0xFFFFFFFFFFFFFFFF
            data = b64decode(item["data"])
            if data:  # load_image: an empty image is skipped
                images.append(Image(data, target))

        def load(drv: Driver) -> None:
            self._require_enabled(drv)
            drv.cell_load(ref, images)

        return self._call("cell_load", load)

    def _op_cell_start(self, request: dict[str, Any]) -> dict[str, Any]:
        ref = self._cell_ref(request)

        def start(drv: Driver) -> None:
            self._require_enabled(drv)
            drv.cell_start(ref)

        return self._call("cell_start", start)

    def _op_cell_destroy(self, request: dict[str, Any]) -> dict[str, Any]:
        ref = self._cell_ref(request)

        def destroy(drv: Driver) -> None:
            self._require_enabled(drv)
            drv.cell_destroy(ref)

        return self._call("cell_destroy", destroy)

    def _console_error(self) -> int:
        driver = self.driver
        if driver is None or not driver.enabled:
            return -errno.EAGAIN
        if not self.console_available:
            return -errno.EPERM
        return 0

    def _op_console(self, request: dict[str, Any]) -> dict[str, Any]:
        head = int(request.get("head", 0))
        size = max(1, int(request.get("size", 65536)))
        error = self._console_error()
        if error:
            return reply(error)
        data, head = self.ring.read(head, size)
        return reply(len(data), data=data.decode("latin-1"), head=head)

    def _follow_console(self, conn: socket.socket, request: dict[str, Any]) -> None:
        """``read()`` without O_NONBLOCK, repeated: stream chunks until the daemon ends
        or the reader goes away."""
        head = int(request.get("head", 0))
        size = max(1, int(request.get("size", 65536)))
        error = self._console_error()
        if error:
            conn.sendall(encode(reply(error)))
            return
        while True:
            data, head = self.ring.read(head, size)
            if data:
                conn.sendall(encode(reply(len(data), data=data.decode("latin-1"), head=head)))
                continue
            if self._closing.is_set():
                conn.sendall(encode(reply(0, data="", head=head, eof=True)))
                return
            self.ring.wait_beyond(head, 0.5)
            # A reader that went away shows as a readable socket at EOF.
            readable, _, _ = select.select([conn], [], [], 0)
            if readable and not conn.recv(1, socket.MSG_PEEK):
                return

    def _op_sysfs(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._refresh_locked()
        return reply(0)

    def _op_state(self, request: dict[str, Any]) -> dict[str, Any]:
        driver = self.driver
        assert driver is not None and self.host is not None  # set by start()
        with self._lock:
            cells = [
                {"id": cell.id, "name": cell.name, "cpus": sorted(cell.cpus_assigned)}
                for _, cell in sorted(driver.cells.items())
            ]
            enabled = driver.enabled
        return reply(
            0, pid=os.getpid(), protocol=PROTOCOL_VERSION, arch=self.arch_name,
            enabled=enabled, host=host_to_wire(self.host), run_dir=os.fspath(self.run_dir.path),
            debug_console=self.debug_console.description if self.debug_console else "none",
            refresh=self.refresh_interval, cells=cells, console_tail=self.ring.tail,
            executor=self._executor_status(),
        )

    def _executor_status(self) -> dict[str, Any] | None:
        """The executor's own state (threads, cells, passthrough), None with the oracle."""
        status = getattr(self.arch, "status", None)
        return cast("dict[str, Any]", status()) if callable(status) else None

    # -- console and sysfs --------------------------------------------------------------------

    def _console_write(self, text: str) -> None:
        """The Arch tap's console sink (called from the model, its lock held)."""
        data = text.encode("latin-1", "replace")
        self.ring.append(data)
        if self.debug_console is not None:
            self.debug_console.write(data)

    def _configure_debug_console(self, system_data: bytes) -> None:
        console = self.debug_console
        assert console is not None  # set by start()
        target, description = open_target(self.options.debug_console, system_data,
                                          self.options.port_device)
        console.set_target(target, description)

    def _flush_debug_console(self) -> None:
        """Wait (bounded) until this operation's console lines are out on the debug
        console: on Jailhouse they are on the UART when the hypercall returns."""
        console = self.debug_console
        if console is not None and not console.flush(DEBUG_CONSOLE_FLUSH_TIMEOUT):
            LOG.warning("debug console: output still queued after %.1f s",
                        DEBUG_CONSOLE_FLUSH_TIMEOUT)

    def _refresh_locked(self) -> None:
        """Rewrite the sysfs files (management lock held)."""
        driver = self.driver
        assert driver is not None  # set by start()
        try:
            self.sysfs.write(sysfs_tree(driver))
        except OSError as exc:
            LOG.error("sysfs refresh failed: %s", exc)
        except Exception:  # a model inconsistency must not take the driver down
            LOG.exception("sysfs refresh failed inside the model")

    def _cells_running(self) -> bool:
        driver = self.driver
        hv = driver.hv if driver is not None else None
        if hv is None:
            return False
        live = (CellState.RUNNING, CellState.RUNNING_LOCKED)
        return any(cell.state in live for cell in list(hv.cells)[1:])

    def _periodic_refresh(self) -> None:
        running = self._cells_running()
        if not (running or self._was_running):
            return
        if not self._lock.acquire(timeout=0.5):
            return  # a management operation runs; it refreshes when done
        try:
            self._refresh_locked()
        finally:
            self._lock.release()
        self._was_running = running

    # -- shutdown --------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Release everything: socket, cells and hypervisor, machine, files; idempotent."""
        self._stop.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.run_dir.socket.unlink()
        if self._accept_thread is not None:
            self._accept_thread.join(2.0)
        self.ring.wake()
        if self._lock.acquire(timeout=SHUTDOWN_TIMEOUT):
            try:
                self._release_machine()
            finally:
                self._lock.release()
        else:
            LOG.error("a management operation still runs after %.0f s; releasing anyway",
                      SHUTDOWN_TIMEOUT)
            self._release_machine()
        self._save_last_console()
        self._closing.set()
        self.ring.wake()
        deadline = time.monotonic() + 2.0
        with self._handlers_lock:
            handlers = list(self._handlers)
        for thread in handlers:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.debug_console is not None:
            self.debug_console.close()
            self.debug_console = None
        LOG.info("daemon %d ends (%s)", os.getpid(), self._stop_reason or "shutdown")
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self._dir_fd >= 0:
            os.close(self._dir_fd)  # releases the run directory lock
            self._dir_fd = -1

    def _release_machine(self) -> None:
        driver = self.driver
        if driver is None:
            return
        if driver.enabled:
            # SIGTERM while enabled: disable as the driver's reboot notifier does. A cell
            # that refuses (apic-demo) is asked again.
            for attempt in range(1, 4):
                try:
                    driver.disable()
                    LOG.info("hypervisor disabled at shutdown")
                    break
                except HvError as err:
                    LOG.warning("disable at shutdown, attempt %d: %s", attempt, err)
                except Exception:
                    LOG.exception("disable at shutdown failed inside the model")
                    break
            if driver.enabled:
                LOG.error("the hypervisor could not be disabled; releasing the machine anyway")
                with contextlib.suppress(Exception):
                    driver.arch.shutdown()
        try:
            self.sysfs.write(sysfs_tree(driver))
        except Exception:
            LOG.exception("writing the disabled sysfs tree failed")
        close = getattr(self.arch, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                LOG.exception("closing the Arch failed")

    def _save_last_console(self) -> None:
        tail, content = self.ring.snapshot()
        if not tail:
            return
        data = {"tail": tail, "content": content.decode("latin-1")}
        temp = self.run_dir.last_console.with_name(".last_console.tmp")
        try:
            temp.write_text(json.dumps(data), encoding="utf-8")
            os.replace(temp, self.run_dir.last_console)
        except OSError as exc:
            LOG.error("saving the last console failed: %s", exc)

    # -- all together ----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the daemon cleanly; SIGHUP is ignored (main thread only)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            self.stop(f"signal {signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _detach_stdio() -> None:
    """Point stdin, stdout and stderr at /dev/null (the starter's pipes are let go)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the daemon; return its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    prog = "jailhouse-daemon"
    try:
        options = options_from_args(args)
    except DaemonError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 2
    daemon = Daemon(options)
    try:
        daemon.install_signal_handlers()
        daemon.start()
    except DaemonError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        daemon.shutdown()
        return EXIT_BUSY if isinstance(exc, DaemonBusy) else 1
    except Exception as exc:  # OSError, or the Arch failing to build: say it, clean up
        LOG.exception("the daemon cannot start")
        sys.stderr.write(f"{prog}: cannot start: {exc}\n")
        daemon.shutdown()
        return 1
    if not options.foreground:
        try:
            sys.stdout.write(f"{READY_LINE} {os.getpid()}\n")
            sys.stdout.flush()
        except OSError:  # the starter is gone: nobody will enable this daemon
            LOG.warning("the starting command went away; ending")
            daemon.stop("starter gone")
        _detach_stdio()
    try:
        reason = daemon.serve()
        LOG.info("stopping: %s", reason)
    finally:
        daemon.shutdown()
    return 0


if __name__ == "__main__":
    # os._exit: the connection a disable came on is closed by the kernel as the process
    # ends, not earlier by interpreter finalization, so "closed" means "gone" for the
    # command waiting on it. Everything else was released by Daemon.shutdown().
    _status = main()
    with contextlib.suppress(OSError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(_status)
