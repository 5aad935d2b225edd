"""User-visible steps: each long action shows a live status line (rich) and logs its
start, result and duration, so a user watching a terminal and a CI log reader both see
what the lab is doing and how long each part took."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from rich.console import Console

LOG = logging.getLogger(__name__)

#: Progress goes to stderr so that command output on stdout stays machine-readable.
console = Console(stderr=True, highlight=False)


@dataclass
class Step:
    """One running step; ``note()`` updates its status line, ``result`` is reported."""

    title: str
    started: float = field(default_factory=time.monotonic)
    result: str = ""
    _status: object | None = None

    @property
    def elapsed(self) -> float:
        """Seconds since the step started."""
        return time.monotonic() - self.started

    def note(self, text: str) -> None:
        """Show ``text`` as the step's current activity."""
        LOG.debug("%s: %s", self.title, text)
        if self._status is not None:
            self._status.update(f"{self.title}: {text}")  # type: ignore[attr-defined]


def _interactive() -> bool:
    return console.is_terminal and sys.stderr.isatty()


@contextlib.contextmanager
def step(title: str, *, quiet: bool = False) -> Iterator[Step]:
    """Run a block as a named step.

    :param title: what the step does, e.g. ``"Building root file system"``
    :param quiet: only log, print nothing (for steps inside tests)
    """
    current = Step(title)
    LOG.info("%s ...", title)
    status_cm: contextlib.AbstractContextManager[object]
    if not quiet and _interactive():
        status_cm = console.status(title)
    else:
        status_cm = contextlib.nullcontext()
    try:
        with status_cm as status:
            current._status = status
            yield current
    except BaseException as exc:
        LOG.info("%s failed after %.1f s: %s", title, current.elapsed, exc)
        if not quiet:
            console.print(f"[red]✗[/] {title} [dim]({current.elapsed:.1f} s)[/]")
        raise
    suffix = f": {current.result}" if current.result else ""
    LOG.info("%s done in %.1f s%s", title, current.elapsed, suffix)
    if not quiet:
        console.print(f"[green]✓[/] {title}{suffix} [dim]({current.elapsed:.1f} s)[/]")
