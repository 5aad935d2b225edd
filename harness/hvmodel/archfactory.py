"""The Arch the driver daemon runs on: the KVM executor when it can be had, else the
bookkeeping oracle (:func:`make_arch`), and the tap that routes the Arch's console to
the daemon (:class:`ArchTap`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from .errors import DaemonError

if TYPE_CHECKING:
    from .arch import Arch

__all__ = ["EXECUTOR_MODULE", "ArchTap", "executor_available", "make_arch"]

LOG = logging.getLogger(__name__)

EXECUTOR_MODULE: Final = __package__ + ".arch.executor"


def executor_available() -> tuple[bool, str]:
    """Whether the KVM executor can be used here, and why not."""
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    try:
        found = importlib.util.find_spec(EXECUTOR_MODULE) is not None
    except ImportError as exc:
        return False, f"cannot import {EXECUTOR_MODULE}: {exc}"
    if not found:
        return False, f"{EXECUTOR_MODULE} is not installed"
    return True, "executor available"


def make_arch(
    choice: str, responders: dict[str, str] | None = None, *, rebind_pci: bool = False,
    native_pio: bool = True, exit_trace: bool = True,
) -> tuple[Arch, str]:
    """Build the Arch the daemon runs on.

    :param choice: ``executor`` (KVM; fails if unavailable), ``oracle`` (bookkeeping
        only), ``auto`` (the executor when ``/dev/kvm`` exists and
        ``harness.hvmodel.arch.executor`` imports, else the oracle)
    :param responders: oracle only: cell name -> policy (``approve``,
        ``deny-first-shutdown``, ``deny``, ``silent``), how scripted cells answer
    :param rebind_pci: executor only: a passed-through device a cell releases goes back
        to the root driver it had (Jailhouse leaves it unbound)
    :param native_pio: executor only: whitelisted port I/O in its I/O bitmap loop
    :param exit_trace: executor only: count the exits KVM handles in the kernel
    :return: the Arch and its name
    :raise DaemonError: when the executor was asked for and cannot be had
    """
    if choice not in ("auto", "executor", "oracle"):
        raise DaemonError(f"unknown arch {choice!r}")
    if choice != "oracle":
        available, why = executor_available()
        if available:
            module = importlib.import_module(EXECUTOR_MODULE)
            # The daemon owns the debug console (see ArchTap): the executor's is off.
            arch = cast("Arch", module.ExecutorArch(console=False, rebind_released=rebind_pci,
                                                     native_pio=native_pio, exit_trace=exit_trace))
            if responders:
                LOG.warning("--responder is for the oracle; the executor's cells answer themselves")
            return arch, "executor"
        if choice == "executor":
            raise DaemonError(f"the executor is not available: {why}")
        LOG.info("arch auto: %s; using the oracle", why)
    from .arch.oracle import OracleArch, responder_for

    # Not recording: a daemon runs long and nobody reads the event list.
    oracle = OracleArch(record=False)
    for name, policy in (responders or {}).items():
        oracle.responders[name] = responder_for(policy)
    return oracle, "oracle"


class ArchTap:
    """The daemon's Arch: every hook goes to the real Arch, except
    :meth:`~harness.hvmodel.arch.Arch.console_write`, which feeds the daemon's console.

    Bound methods of the wrapped Arch are cached on first use, so a hook call costs
    what it costs on the Arch itself.
    """

    def __init__(self, inner: Arch, sink: Callable[[str], None]) -> None:
        self._inner = inner
        self._sink = sink

    def console_write(self, text: str) -> None:
        self._sink(text)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if callable(value):
            object.__setattr__(self, name, value)
        return value

