"""``python3 -m harness.hvmodel.config``: Jailhouse's ``tools/jailhouse-config-*`` commands.

See :mod:`.cli` for the subcommands (show, check, compile, decompile).
"""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
