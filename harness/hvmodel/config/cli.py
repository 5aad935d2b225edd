"""Command line for configs; the counterpart of ``tools/jailhouse-config-*``.

``python3 -m harness.hvmodel.config`` (inside the lab, nothing else installed) and the host's
``jhlab config`` (which delegates to :func:`main`) offer:

* ``show [--json] FILE``: decode a ``.cell`` (or a ``.toml`` source) for reading;
* ``check [--jailhouse-only] [--no-next] SYS [CELL ...]``: ``jailhouse config check``, plus
  jhlab's checks; exit status 1 on findings;
* ``compile SOURCE.toml [-o OUT.cell]``: TOML source to binary;
* ``decompile FILE.cell [-o OUT.toml]``: binary to an editable TOML source that compiles
  back to the same bytes;
* ``create [--facts FACTS.json] [-o OUT.cell] [--toml OUT.toml] [...]``: ``jailhouse config
  create``: a system config for this machine (facts collected here, as root) or for the
  machine a facts document describes (:mod:`.create`); the TOML source goes to stdout when
  neither output is named. The host's ``jhlab config create`` collects in a running lab.

Exit status: 0 ok, 1 failure or findings, 2 usage. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError
from .check import check, render_check
from .create import (
    DEFAULT_MEM_HV,
    DEFAULT_NAME,
    CreateOptions,
    create,
    parse_size,
    render_toml,
)
from .decompile import decompile
from .model import (
    CellConfig,
)
from .parser import load
from .show import render_text, to_dict
from .sysfs_parser import Facts, load_facts
from .system import SystemConfig
from .toml import load_source

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
    cre = sub.add_parser(
        "create", help="generate a system config from what the root cell sees",
        epilog="On the host, 'jhlab config create' takes --lab NAME (default: default) and, "
               "without --facts, collects in that running lab over ssh; for the default lab "
               "--ivshmem-from defaults to harness/configs/qemu-x86.toml ('' for none).")
    cre.add_argument("--facts", metavar="FACTS.json",
                     help="facts collected before (default: collect here, needs root)")
    cre.add_argument("-o", "--output", metavar="OUT.cell", help="write the binary config")
    cre.add_argument("--toml", metavar="OUT.toml",
                     help="write the commented TOML source (stdout without -o and --toml)")
    cre.add_argument("--name", default=DEFAULT_NAME, help=f"root cell name ({DEFAULT_NAME})")
    cre.add_argument("--mem-hv", default="6M", metavar="SIZE",
                     help="hypervisor memory at the start of the memmap= window (6M)")
    cre.add_argument("--mem-inmates", metavar="SIZE",
                     help="inmate RAM after it (default: the rest of the window)")
    cre.add_argument("--ivshmem-from", metavar="SYSCONFIG",
                     help="copy the ivshmem devices and their shared-memory layout of this "
                          "system config (.cell or .toml)")
    cre.add_argument("--console", default="ttyS0", metavar="TTY",
                     help="the debug console's UART (ttyS0)")
    cre.add_argument("--no-quirks", action="store_true",
                     help="do not add jhlab's known driver needs (PCI_QUIRKS)")
    cre.add_argument("--save-facts", metavar="FILE", help="also write the facts used")
    cre.add_argument("--facts-label", help=argparse.SUPPRESS)  # names --facts in messages
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
    if args.command == "create":
        return _create(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse restricts choices


def _size_arg(value: str | None, option: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ConfigError(str(exc), source=option) from exc


def _create(args: argparse.Namespace) -> int:
    if args.facts:
        facts = load_facts(args.facts)
        if args.facts_label:
            facts = dataclasses.replace(facts, source=args.facts_label)
        raw = None
    else:
        from .collect import collect  # lazy: keeps "python3 -m ...collect" free of warnings

        raw = collect()
        facts = Facts.from_json(raw, "<collected here>")
    if args.save_facts:
        if raw is None:
            raw = json.loads(Path(args.facts).read_text(encoding="utf-8"))
        _write(args.save_facts, (json.dumps(raw, indent=1) + "\n").encode("utf-8"))
    template: SystemConfig | None = None
    if args.ivshmem_from:
        loaded = load(args.ivshmem_from)
        if not isinstance(loaded, SystemConfig):
            raise ConfigError("not a system configuration", source=args.ivshmem_from)
        template = loaded
    options = CreateOptions(
        name=args.name, mem_hv=_size_arg(args.mem_hv, "--mem-hv") or DEFAULT_MEM_HV,
        mem_inmates=_size_arg(args.mem_inmates, "--mem-inmates"), ivshmem_from=template,
        console=args.console, quirks=not args.no_quirks)
    result = create(facts, options)
    text = render_toml(result)
    if args.output:
        _write(args.output, result.config.to_bytes())
    if args.toml and args.toml != "-":
        _write(args.toml, text.encode("utf-8"))
    elif args.toml == "-" or not args.output:
        sys.stdout.write(text)
    for warning in result.warnings:
        sys.stderr.write(f"WARNING: {warning}\n")
    report = check(result.config, system_source=args.output or "<generated>")
    if not report.ok:
        sys.stderr.write("The generated config does not pass config check:\n")
        sys.stderr.write(render_check(report))
    return report.exit_status


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
