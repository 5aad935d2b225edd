"""The driver daemon's command line and options (``python3 -m harness.hvmodel.daemon
--help``): :class:`DaemonOptions`, what :class:`~harness.hvmodel.daemon.Daemon` is built
from, and the parser that makes them from arguments.
"""

from __future__ import annotations

import argparse
import dataclasses

from .arch.oracle import RESPONDER_POLICIES
from .errors import DaemonError
from .ipc import RunDir

__all__ = ["DaemonOptions", "build_parser", "options_from_args"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DaemonOptions:
    """How the daemon runs (its command line).

    :param run_dir: the run directory
    :param arch: ``auto``, ``executor`` or ``oracle``
    :param host: ``probe`` (this machine) or ``model`` (the driver's default machine:
        4 CPUs, Intel); None: ``probe`` with the executor, ``model`` with the oracle
    :param debug_console: ``auto`` (the config's 8250 through the port device if it can
        be opened), ``none``, ``uart`` (the config's 8250, an error if impossible),
        ``uart:PORT`` (an 8250 at PORT) or ``file:PATH`` (append the byte stream to PATH)
    :param port_device: the port device for the UART
    :param responders: oracle only: cell name -> answer policy
    :param refresh: seconds between sysfs refreshes while a cell runs (0: never);
        None: 1 s with the executor, never with the oracle (nothing changes on its own)
    :param kmsg: copy the driver's kernel log lines to ``/dev/kmsg``; None: with the
        executor only
    :param foreground: keep stdio and log to stderr too (no ready line)
    :param verbose: log at DEBUG
    :param test_device: the hypervisor is built with ``CONFIG_TEST_DEVICE`` (the test
        device for cells with the ``TEST_DEVICE`` flag, :mod:`~harness.hvmodel.testdev`)
    :param rebind_pci: give released passed-through devices back to their root driver
    :param native_pio: the executor performs whitelisted port I/O in machine code (its
        I/O bitmap loop); off: every port exit goes through Python
    :param exit_trace: the executor counts the exits KVM handles in the kernel (CPUID,
        MSRs ...) through KVM's tracepoints; off: ``cell stats`` shows the model's only
    :param profile: a directory to write a ``cProfile`` dump of each operation to
        (``NNN-OP.prof``, read with ``python3 -m pstats``); None: no profiling
    """

    run_dir: RunDir
    arch: str = "auto"
    host: str | None = None
    debug_console: str = "auto"
    port_device: str = "/dev/port"
    responders: dict[str, str] = dataclasses.field(default_factory=dict)
    refresh: float | None = None
    kmsg: bool | None = None
    foreground: bool = False
    verbose: bool = False
    test_device: bool = False
    rebind_pci: bool = False
    native_pio: bool = True
    exit_trace: bool = True
    profile: str | None = None


def build_parser() -> argparse.ArgumentParser:
    """The daemon's command line."""
    parser = argparse.ArgumentParser(
        prog="python3 -m harness.hvmodel.daemon",
        description="jhlab's Jailhouse driver: serves the jailhouse command, runs the model.")
    parser.add_argument("--run-dir", help="run directory (default: $JAILHOUSE_RUN_DIR or /run/jailhouse)")
    parser.add_argument("--arch", default="auto", choices=["auto", "executor", "oracle"],
                        help="what runs the cells (default: auto)")
    parser.add_argument("--host", choices=["probe", "model"],
                        help="the Linux the driver sees: this machine, or the model's 4-CPU default "
                             "(default: probe with the executor, model with the oracle)")
    parser.add_argument("--debug-console", default="auto", metavar="TARGET",
                        help="auto, none, uart, uart:PORT or file:PATH (default: auto)")
    parser.add_argument("--port-device", default="/dev/port", help="port device for the UART")
    parser.add_argument("--responder", action="append", default=[], metavar="CELL=POLICY",
                        help="oracle: how CELL answers messages: " + ", ".join(RESPONDER_POLICIES))
    parser.add_argument("--refresh", type=float, metavar="SECONDS",
                        help="sysfs refresh period while cells run (0: off)")
    parser.add_argument("--kmsg", action=argparse.BooleanOptionalAction, default=None,
                        help="copy driver messages to /dev/kmsg (default: with the executor)")
    parser.add_argument("--test-device", action="store_true",
                        help="the hypervisor has CONFIG_TEST_DEVICE (test page for TEST_DEVICE cells)")
    parser.add_argument("--rebind-pci", action="store_true",
                        help="give devices a destroyed cell releases back to their root driver "
                             "(Jailhouse leaves them unbound)")
    parser.add_argument("--native-pio", action=argparse.BooleanOptionalAction, default=True,
                        help="executor: whitelisted port I/O in machine code, not through "
                             "Python (default: on)")
    parser.add_argument("--exit-trace", action=argparse.BooleanOptionalAction, default=True,
                        help="executor: count the exits KVM handles in the kernel (CPUID, MSRs, "
                             "CR writes ...) through its tracepoints (default: on)")
    parser.add_argument("--profile", metavar="DIR",
                        help="write a cProfile dump of each operation to DIR (NNN-OP.prof)")
    parser.add_argument("--foreground", action="store_true", help="keep stdio, log to stderr too")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    return parser


def options_from_args(args: argparse.Namespace) -> DaemonOptions:
    """The options a parsed command line asks for.

    :raise DaemonError: for a bad ``--responder`` or ``--debug-console`` value
    """
    responders: dict[str, str] = {}
    for item in args.responder:
        name, sep, policy = item.partition("=")
        if not sep or not name or policy not in RESPONDER_POLICIES:
            raise DaemonError(f"--responder {item!r}: expected CELL=" + "|".join(RESPONDER_POLICIES))
        responders[name] = policy
    mode = args.debug_console
    if not (mode in ("auto", "none", "uart") or mode.startswith(("file:", "uart:"))):
        raise DaemonError(f"--debug-console {mode!r}: expected auto, none, uart, uart:PORT or file:PATH")
    if mode.startswith("uart:"):
        try:
            int(mode[len("uart:"):], 0)
        except ValueError as exc:
            raise DaemonError(f"--debug-console {mode!r}: bad port") from exc
    return DaemonOptions(
        run_dir=RunDir.from_env(args.run_dir), arch=args.arch, host=args.host,
        debug_console=mode, port_device=args.port_device, responders=responders,
        refresh=args.refresh, kmsg=args.kmsg, foreground=args.foreground, verbose=args.verbose,
        test_device=args.test_device, rebind_pci=args.rebind_pci, native_pio=args.native_pio,
        exit_trace=args.exit_trace, profile=args.profile,
    )
