"""The checked driver's way to its guest half (:mod:`harness.guest.checked`).

Under nested TCG a new guest Python costs more than most steps: start-up and imports
take ~0.55 s, a ``jailhouse cell create`` ~0.2 s. So a :class:`GuestChannel` keeps one
guest program running per checked driver and sends it one request line per round trip
(labs that can start programs, :class:`~harness.protocol.ProgramRunner`: SSH, or this
host for unit tests). Where no program can be started (SSH down, the root console as
fallback), every request is a run of its own, as one line on the program's stdin.

Lifecycle: construct → :meth:`GuestChannel.request` ... → :meth:`GuestChannel.close`.
A program found dead before a request (the lab was reset, its SSH connection replaced)
is started again; one that dies during a request fails that request.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from harness.errors import ConsoleError, JhlabError
from harness.guest.checked import Request
from harness.protocol import CommandRunner, LineProgram, ProgramRunner

LOG = logging.getLogger(__name__)


class GuestChannel:
    """Requests to the guest program, answered by one long-running program when the lab
    can start one (see the module docstring).

    :param lab: where the program runs
    :param command: the program's command line (``sh -c`` semantics)
    """

    def __init__(self, lab: CommandRunner, command: str) -> None:
        self.lab = lab
        self.command = command
        self._program: LineProgram | None = None
        #: whether requests run one by one (the lab cannot start programs, or it failed)
        self.one_shot = not isinstance(lab, ProgramRunner)
        #: how many programs were started
        self.starts = 0

    def __repr__(self) -> str:
        mode = "one run per request" if self.one_shot else repr(self._program)
        return f"GuestChannel({mode})"

    def request(self, request: Request, timeout: float) -> dict[str, Any]:
        """Send ``request``; the program's reply.

        :param timeout: seconds the guest program may take to answer
        :raise JhlabError: when the program fails, ends, or does not answer in time
        """
        line = json.dumps(request)
        program = self._running()
        if program is None:
            result = self.lab.run(self.command, stdin=line, timeout=timeout)
            if result.status != 0:
                raise JhlabError(f"the checked driver's guest program failed (status {result.status}):\n"
                                 f"{result.stderr or result.stdout}")
            answer = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        else:
            try:
                program.send(line)
                answer = program.receive(timeout)
            except ConsoleError as exc:
                self.close()
                raise JhlabError(f"the checked driver's guest program failed: {exc}") from exc
        try:
            data = json.loads(answer)
        except ValueError as exc:
            raise JhlabError(f"the guest program printed no result:\n{answer}") from exc
        if not isinstance(data, dict):
            raise JhlabError(f"the guest program's reply is not an object:\n{answer}")
        return data

    @property
    def program(self) -> LineProgram | None:
        """The guest program started last, while it is kept (None before the first
        request, after :meth:`close`, and in one-shot mode)."""
        return self._program

    def _running(self) -> LineProgram | None:
        """The program to ask (started if needed); None when requests run one by one."""
        if self.one_shot:
            return None
        if self._program is not None and not self._program.alive:
            LOG.info("%r: the guest program ended; starting it again", self)
            self.close()
        if self._program is None:
            assert isinstance(self.lab, ProgramRunner)  # else one_shot
            try:
                self._program = self.lab.start(self.command)
                self.starts += 1
            except ConsoleError as exc:
                LOG.warning("cannot start the checked driver's guest program (%s); "
                            "running it once per request", exc)
                self.one_shot = True
                return None
        return self._program

    def close(self) -> None:
        """End the running program (it ends when its input closes); idempotent."""
        program, self._program = self._program, None
        if program is not None:
            program.close()
