"""Look at a page as a person would: Debian's Chromium, headless, driven over the
DevTools protocol on a pipe (``--remote-debugging-pipe``: commands in on fd 3, answers out
on fd 4, each a JSON message ended by a NUL byte), so nothing listens on a port and no
websocket library is needed.

::

    with HeadlessChromium() as browser:
        page = browser.open(Path("out/report.html"))
        text = page.evaluate("document.body.innerText")      # what the page shows
        png = page.screenshot()

``innerText`` is the rendered text: what is folded away (a closed ``<details>``) or
hidden by style is not in it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.errors import JhlabError, MissingToolError

#: Chromium's options for a throwaway headless browser (no network of its own, no profile)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--remote-debugging-pipe")
#: seconds to wait for one answer, and for a page to load
TIMEOUT = 60.0


class BrowserError(JhlabError):
    """Chromium did not start, answer or load the page."""


class Page:
    """A page open in :class:`HeadlessChromium` (a DevTools session attached to it)."""

    def __init__(self, browser: HeadlessChromium, session: str) -> None:
        self.browser = browser
        self.session = session

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, session=self.session)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able values only).

        :raise BrowserError: when it throws
        """
        answer = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression!r} threw: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def screenshot(self) -> bytes:
        """The whole page as PNG."""
        return base64.b64decode(self.call("Page.captureScreenshot",
                                          {"captureBeyondViewport": True})["data"])


class HeadlessChromium:
    """One headless Chromium with a fresh profile (removed at the end).

    Lifecycle: ``with`` (or :meth:`start`) → :meth:`open` pages → :meth:`close`.

    :param binary: the browser (default: ``chromium`` on ``PATH``)
    """

    def __init__(self, binary: str | None = None) -> None:
        found = binary or shutil.which("chromium")
        if found is None:
            raise MissingToolError("chromium", "chromium", "to look at the report (./scripts/setup)")
        self.binary = found
        self.process: subprocess.Popen[bytes] | None = None
        self.profile: tempfile.TemporaryDirectory[str] | None = None
        self._to: int = -1
        self._from: int = -1
        self._buffer = b""
        self._next_id = 0

    def __enter__(self) -> HeadlessChromium:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.profile = tempfile.TemporaryDirectory(prefix="jhlab-chromium-")
        commands_read, commands_write = os.pipe()
        answers_read, answers_write = os.pipe()
        # Chromium expects the pipe's ends as its fds 3 (commands) and 4 (answers): move
        # them out of the way first (either may be 3 or 4 already), then into place; dup2
        # makes them inheritable, every other descriptor of ours is close-on-exec.
        def child_fds() -> None:
            commands = fcntl.fcntl(commands_read, fcntl.F_DUPFD, 10)
            answers = fcntl.fcntl(answers_write, fcntl.F_DUPFD, 10)
            os.dup2(commands, 3)
            os.dup2(answers, 4)

        self.process = subprocess.Popen(
            [self.binary, *FLAGS, f"--user-data-dir={self.profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=child_fds)
        os.close(commands_read)
        os.close(answers_write)
        self._to, self._from = commands_write, answers_read

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             session: str | None = None, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Send one DevTools command and wait for its answer (events meanwhile are dropped).

        :raise BrowserError: on an error answer, a dead browser or no answer in time
        """
        if self.process is None:
            raise BrowserError("the browser is not started")
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._next_id:
                    if "error" in answer:
                        raise BrowserError(f"{method}: {answer['error']}")
                    return dict(answer.get("result", {}))
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                raise BrowserError(f"chromium gave no answer to {method} in {timeout:.0f} s "
                                   f"(exit status {self.process.poll()})")
            ready, _, _ = select.select([self._from], [], [], min(remaining, 1.0))
            if ready:
                chunk = os.read(self._from, 1 << 16)
                if not chunk:
                    raise BrowserError(f"chromium closed its pipe during {method}")
                self._buffer += chunk

    def open(self, path: Path, *, timeout: float = TIMEOUT) -> Page:
        """Open a local file in a new tab and wait until it has loaded (the tab starts
        on an empty document, which is "complete" at once: wait for this one)."""
        url = path.resolve().as_uri()
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        deadline = time.monotonic() + timeout
        loaded = (f"location.href === {json.dumps(url)} && document.readyState === 'complete'"
                  " && document.body !== null")
        while not page.evaluate(loaded):
            if time.monotonic() > deadline:
                raise BrowserError(f"{path} did not load in {timeout:.0f} s")
            time.sleep(0.1)
        return page

    def close(self) -> None:
        """End the browser (idempotent) and remove its profile."""
        if self.process is not None:
            with contextlib.suppress(BrowserError):  # it may end before it answers
                self.call("Browser.close", timeout=10)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None
            for fd in (self._to, self._from):
                os.close(fd)
        if self.profile is not None:
            self.profile.cleanup()
            self.profile = None
