"""Runs in the lab's root cell (python3, standard library): checks that every store to
memory survives a snapshot and its restore.

It sweeps a buffer of pages over and over; on each page it first checks that the page
still holds what the previous sweep stored there, then stores the next value.  Had a
snapshot lost a store (a torn save: the page saved from before the store, the program
from after it), the restored program finds an older value in that page on its next
sweep.  After every sweep it rewrites its status file, one line::

    sweeps=N errors=E first=<page: found, expected>

Usage: ``python3 guest_sweeper.py STATUS_FILE [PAGES]`` (runs until killed).
"""

from __future__ import annotations

import os
import sys

PAGE = 4096
WORD = 8


def main(status: str, pages: int) -> None:
    buffer = bytearray(pages * PAGE)
    view = memoryview(buffer)
    sweep = errors = 0
    first = ""
    while True:
        for page in range(pages):
            at = page * PAGE
            found = int.from_bytes(view[at:at + WORD], "little")
            if found != sweep:
                errors += 1
                first = first or f"{page}: {found}, {sweep}"
            view[at:at + WORD] = (sweep + 1).to_bytes(WORD, "little")
        sweep += 1
        with open(status + ".new", "w") as out:
            out.write(f"sweeps={sweep} errors={errors} first={first}\n")
        os.replace(status + ".new", status)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16384)
