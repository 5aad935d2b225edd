"""Fault injection for validation tests (test-only; no Jailhouse counterpart).

The suites check that the harness notices when the hypervisor in the lab breaks one of
Jailhouse's rules. To prove it, a test asks the daemon it starts for a broken model:
``JHLAB_FAULT=NAME jailhouse enable ...`` (the variable reaches the daemon through the
command's environment; several names may be given, comma-separated). The daemon calls
:func:`load_env` once at start; the model consults :func:`active` in exactly one place per
fault. Nothing else reads this module, and with the variable unset every rule is intact.

Faults (each changes one rule of the reference, in one place):

``destroy-leaks-pages``
    ``cell_destroy`` does not give the cell's ``struct cell`` + config pages back to the
    memory pool (reference §3.8: "free it"). Effect: ``mem_pool_used`` stays higher after
    destroy, and the console's ``Page pool usage after cell destruction`` line shows it.
``shutdown-ignores-denial``
    ``cell_exchange_message`` treats a denial (or any invalid reply) as approval
    (reference §3.2: "any other non-zero reply returns not ok"). Effect: apic-demo's first
    ``jailhouse cell shutdown`` succeeds instead of failing with EPERM.

The switch is process-wide on purpose: it stands for "the hypervisor image in this lab
was built with a bug", and only the daemon ever sets it. The host-side oracle never does,
so the two disagree exactly where the rule matters. Unit tests use :func:`injected`,
which restores the previous set.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Final

__all__ = ["ENV", "FAULTS", "active", "clear", "enabled", "injected", "load_env"]

LOG = logging.getLogger(__name__)

#: the environment variable the daemon reads at start
ENV: Final = "JHLAB_FAULT"
#: every fault there is, with the rule it breaks
FAULTS: Final[Mapping[str, str]] = {
    "destroy-leaks-pages": "cell_destroy keeps the cell's pages out of the memory pool",
    "shutdown-ignores-denial": "a denied shutdown request counts as approved",
}

_active: set[str] = set()


def active(name: str) -> bool:
    """Whether fault ``name`` is injected (the model's one question)."""
    return name in _active


def enabled() -> frozenset[str]:
    """The faults injected now."""
    return frozenset(_active)


def clear() -> None:
    """Remove every injected fault."""
    _active.clear()


def _parse(text: str) -> set[str]:
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = names - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown fault(s) {', '.join(sorted(unknown))}; known: {', '.join(FAULTS)}")
    return names


def load_env(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Inject the faults named in ``$JHLAB_FAULT`` (replacing any injected before).

    :return: the faults now injected
    :raise ValueError: for a name that is not in :data:`FAULTS`
    """
    names = _parse((os.environ if environ is None else environ).get(ENV, ""))
    _active.clear()
    _active.update(names)
    for name in sorted(names):
        LOG.warning("FAULT INJECTED (test only): %s: %s", name, FAULTS[name])
    return frozenset(names)


@contextlib.contextmanager
def injected(*names: str) -> Iterator[None]:
    """Inject ``names`` for the ``with`` block, then restore what was injected before.

    :raise ValueError: for a name that is not in :data:`FAULTS`
    """
    wanted = _parse(",".join(names))
    before = set(_active)
    _active.update(wanted)
    try:
        yield
    finally:
        _active.clear()
        _active.update(before)
