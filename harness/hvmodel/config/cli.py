"""Command line for configs; the counterpart of ``tools/jailhouse-config-*``.

``python3 -m harness.hvmodel.config`` (inside the lab, nothing else installed) and the host's
``jhlab config`` (which delegates to :func:`main`) offer:

* ``show [--json] FILE``: decode a ``.cell`` (or a ``.toml`` source) for reading;
* ``check [--jailhouse-only] [--no-next] SYS [CELL ...]``: ``jailhouse config check``, plus
  jhlab's checks; exit status 1 on findings;
* ``compile SOURCE.toml [-o OUT.cell]``: TOML source to binary;
* ``decompile FILE.cell [-o OUT.toml]``: binary to an editable TOML source that compiles
  back to the same bytes.

Exit status: 0 ok, 1 failure or findings, 2 usage. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError
from .check import check, render_check
from .model import CellConfig, SystemConfig
from .parser import load
from .show import render_text, to_dict
from .toml import decompile, load_source

DEFAULT_PROG = "python3 -m harness.hvmodel.config"


def build_parser(prog: str = DEFAULT_PROG) -> argparse.ArgumentParser:
    """The argument parser (``prog`` is what usage lines call the command)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Read, check, compile and decompile Jailhouse configurations."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    show = sub.add_parser("show", help="decode a config for reading")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.add_argument("file", metavar="FILE", help=".cell file or .toml source")
    chk = sub.add_parser("check", help="check a system config and cells meant to run together")
    chk.add_argument("--jailhouse-only", action="store_true",
                     help="only the checks of jailhouse config check")
    chk.add_argument("--no-next", action="store_true",
                     help="leave out the CPU checks of Jailhouse's next branch")
    chk.add_argument("system", metavar="SYSCONFIG", help="system configuration file")
    chk.add_argument("cells", metavar="CELLCONFIG", nargs="*", help="cell configuration file")
    comp = sub.add_parser("compile", help="compile a TOML source to a binary config")
    comp.add_argument("source", metavar="SOURCE", help=".toml source")
    comp.add_argument("-o", "--output", metavar="OUT", help="output file (default: .cell "
                      "next to the source)")
    dec = sub.add_parser("decompile", help="turn a binary config into a TOML source")
    dec.add_argument("file", metavar="FILE", help=".cell file")
    dec.add_argument("-o", "--output", metavar="OUT", help="output file (default: stdout)")
    return parser


def _write(path: str, data: bytes) -> None:
    try:
        Path(path).write_bytes(data)
    except OSError as exc:
        raise ConfigError(f"cannot write: {exc.strerror or exc}", source=path) from exc


def _run(args: argparse.Namespace) -> int:
    if args.command == "show":
        config = load(args.file)
        if args.json:
            sys.stdout.write(json.dumps(to_dict(config), indent=2) + "\n")
        else:
            sys.stdout.write(render_text(config, args.file))
        return 0
    if args.command == "check":
        system = load(args.system)
        if not isinstance(system, SystemConfig):
            raise ConfigError("Not a root cell configuration", source=args.system)
        cells = []
        for name in args.cells:
            cell = load(name)
            if not isinstance(cell, CellConfig):
                raise ConfigError("Not a cell configuration", source=name)
            cells.append(cell)
        report = check(system, cells, sources=args.cells, system_source=args.system,
                       next_checks=not args.no_next, extra=not args.jailhouse_only)
        sys.stdout.write(render_check(report, jailhouse_only=args.jailhouse_only))
        return report.exit_status
    if args.command == "compile":
        config = load_source(args.source)
        output = args.output or os.fspath(Path(args.source).with_suffix(".cell"))
        _write(output, config.to_bytes())
        return 0
    if args.command == "decompile":
        config = load(args.file)
        text = decompile(config, os.path.basename(args.file))
        if args.output and args.output != "-":
            _write(args.output, text.encode("utf-8"))
        else:
            sys.stdout.write(text)
        return 0
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse restricts choices


def main(argv: Sequence[str] | None = None, prog: str = DEFAULT_PROG) -> int:
    """Run the command line; return the exit status (0 ok, 1 failure, 2 usage).

    :param argv: the arguments (default: ``sys.argv[1:]``)
    :param prog: the command name for usage and error lines (``jhlab config`` on the host)
    """
    parser = build_parser(prog)
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # argparse: 2 on usage errors, 0 for --help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _run(args)
    except ConfigError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 1
    except BrokenPipeError:  # the reader went away (| head): nothing more to say
        return 1
