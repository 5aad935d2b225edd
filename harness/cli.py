"""``jhlab``: bring labs up and down, reach their root cell, build images, work with
Jailhouse configs, run suites and benchmarks.

Exit status: 0 ok, 1 failure, 2 usage.  Errors are one paragraph; ``-v`` adds logs and
tracebacks.

A lab brought up with ``jhlab up`` keeps running after the command returns: a small
supervisor process owns QEMU (and QEMU dies with it, whatever kills it) until
``jhlab down``.  Its state (ssh port, key, log folder, run directory) is in the runtime
directory (:mod:`harness.runtime`).  Other processes reach it through the supervisor:
``jhlab qmp`` and ``Lab.attach`` over its QMP relay, ``jhlab events`` from its event
log, ``jhlab run``/``shell``/``cp`` over ssh.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from harness import runtime
from harness.errors import JhlabError, LabFileError
from harness.progress import console
from harness.runtime import RunningLab

if TYPE_CHECKING:
    from harness.qmp import QmpSession
    from harness.ssh import SshShell

LOG = logging.getLogger("jhlab")

READY_MARK = "JHLAB-SUPERVISOR-READY"


def _lab_name(lab: str) -> str:
    """The name of lab ``lab``: a running lab's own name (also of one brought up from a
    lab file elsewhere), else the name in the built-in lab or lab file ``lab``."""
    from harness.labfile import load_lab

    if "/" not in lab and not lab.endswith(".toml") and runtime.read(lab) is not None:
        return lab
    try:
        return load_lab(lab).name
    except LabFileError as exc:
        up = ", ".join(runtime.running()) or "none"
        raise LabFileError(exc.path, f"{exc.message}; and no lab of that name is up "
                           f"(labs up: {up})") from exc


def _print_summary(summary: Mapping[str, Any]) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    features = " ".join(summary["cpu_features"]) or "none"
    kvm = "KVM available in the root cell" if summary["kvm_in_guest"] else "no /dev/kvm inside"
    table.add_row("accelerator", f"{summary['accel']} — {summary['accel_reason']}")
    table.add_row("boot", f"{summary['boot_seconds']:.1f} s to root cell ready")
    table.add_row("guest kernel", summary["kernel"])
    table.add_row("virtualization", f"{features} ({kvm})")
    table.add_row("IOMMU groups", str(summary["iommu_groups"]))
    table.add_row("reserved", summary["reserve"])
    table.add_row("ssh", f"jhlab shell {summary['name']}  (127.0.0.1:{summary['ssh_port']})")
    table.add_row("logs", summary["log_dir"])
    console.print(f"[bold green]Lab {summary['name']} is up[/]")
    console.print(table)


# -- up / down / status --------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    name = _lab_name(args.lab)
    running = runtime.read(name)
    if running is not None:
        console.print(f"Lab {name} is already up (supervisor pid {running.supervisor}).")
        if args.json:
            print(json.dumps(dict(running.summary), indent=2))
        else:
            _print_summary(running.summary)
        return 0
    if args.foreground:
        return _up_foreground(args)
    cmd = [sys.executable, "-m", "harness.cli", "_supervise", args.lab]
    if args.accel:
        cmd += ["--accel", args.accel]
    if args.ssh_port:
        cmd += ["--ssh-port", str(args.ssh_port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    assert proc.stdout is not None  # PIPE requested
    ready = False
    try:
        for line in proc.stdout:
            if line.strip() == READY_MARK:
                ready = True
                break
            sys.stderr.write(line)
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(30)
        raise
    finally:
        proc.stdout.close()
    if not ready:
        status = proc.wait(60)
        console.print(f"[red]jhlab up: lab {name} did not come up (supervisor status {status})[/]")
        return 1
    state = runtime.read(name)
    if state is None:
        console.print(f"[red]jhlab up: lab {name} stopped right after it came up[/]")
        return 1
    if args.json:
        print(json.dumps(dict(state.summary), indent=2))
    else:
        _print_summary(state.summary)
    return 0


def _up_foreground(args: argparse.Namespace) -> int:
    from harness.lab import Lab

    lab = Lab(args.lab, accel=args.accel, ssh_port=args.ssh_port)
    with lab:
        summary = lab.summary
        assert summary is not None  # set by up()
        runtime.register(runtime.record_of(lab))
        try:
            _print_summary(summary.as_dict())
            console.print("Lab runs in the foreground; Ctrl-C stops it.")
            while lab.machine is not None and lab.machine.alive():
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("stopping ...")
        finally:
            runtime.unregister(lab.spec.name, supervisor=os.getpid())
    return 0


def cmd_supervise(args: argparse.Namespace) -> int:
    """Hidden: own one lab until SIGTERM (started by ``jhlab up``)."""
    from harness.lab import Lab

    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    lab = Lab(args.lab, accel=args.accel, ssh_port=args.ssh_port)
    try:
        lab.up()
    except JhlabError as exc:
        from harness.lab import describe_failure

        print(f"jhlab up: {describe_failure(exc, lab)}", flush=True)
        return 1
    assert lab.log_dir is not None  # set by up()
    runtime.register(runtime.record_of(lab))
    print(READY_MARK, flush=True)
    # From here on nobody reads our output: send it to the lab's log folder.
    with open(lab.log_dir / "supervisor.log", "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        while not stop and lab.machine is not None and lab.machine.alive():
            time.sleep(0.5)
        if not stop:
            LOG.warning("QEMU exited on its own; supervisor ends")
    finally:
        lab.down()
        runtime.unregister(lab.spec.name, supervisor=os.getpid())
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    name = _lab_name(args.lab)
    state = runtime.read(name)
    if state is None:
        console.print(f"Lab {name} is not up.")
        return 0
    if not runtime.stop(state):
        console.print(f"supervisor {state.supervisor} did not stop in {runtime.STOP_TIMEOUT:.0f} s; "
                      "it was killed (QEMU died with it)")
    console.print(f"Lab {name} is down; logs in {state.log_dir}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Labs that are up (``jhlab up``, test sessions' labs) and labs of test sessions
    still booting, with what each is doing (:mod:`harness.activity`)."""
    from harness.activity import current

    states = runtime.running()
    doing = {record.name: record for record in current()}
    if args.json:
        listed: dict[str, dict[str, Any]] = {k: dict(v.summary) | {
            "supervisor": v.supervisor, "qemu": v.qemu,
            "qmp": str(v.run_dir / "qmp.sock") if v.run_dir is not None else None}
            for k, v in states.items()}
        for name, record in doing.items():
            entry = listed.setdefault(name, {"name": name, "supervisor": record.pid,
                                             "log_dir": record.log_dir})
            entry |= {"doing": record.doing, "since": record.since, "session": record.session,
                      "worker": record.worker}
        print(json.dumps(listed, indent=2))
        return 0
    if not states and not doing:
        console.print("No lab is up.")
        return 0
    table = Table("lab", "doing", "accel", "ssh", "owner", "qemu", "logs")
    now = time.time()
    for name in sorted(set(states) | set(doing)):
        state, claimed = states.get(name), doing.get(name)
        what = f"{claimed.doing} ({now - claimed.since:.0f} s)" if claimed else "up"
        owner = f"{claimed.pid} ({claimed.worker})" if claimed else str(state.supervisor if state else "")
        if state is None:
            table.add_row(name, what, "", "", owner, "", claimed.log_dir if claimed else "")
        else:
            table.add_row(name, what, state.summary["accel"], f"127.0.0.1:{state.ssh_port}", owner,
                          str(state.qemu), str(state.log_dir))
    console.print(table)
    return 0


def _running(lab: str) -> RunningLab:
    name = _lab_name(lab)
    state = runtime.read(name)
    if state is None:
        raise JhlabError(f"lab {name} is not up: start it with 'jhlab up {lab}'")
    return state


def _shell_of(state: RunningLab) -> SshShell:
    from harness.ssh import SshShell

    return SshShell(state.ssh_port, state.key)


def cmd_shell(args: argparse.Namespace) -> int:
    state = _running(args.lab)
    ssh = shutil.which("ssh")
    if ssh is None:
        raise JhlabError("ssh (openssh-client) is needed for an interactive shell: "
                         "apt-get install openssh-client, or use 'jhlab run'")
    argv = [ssh, "-i", str(state.key), "-p", str(state.ssh_port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "root@127.0.0.1", *args.command]
    os.execv(ssh, argv)
    return 1  # not reached


def cmd_run(args: argparse.Namespace) -> int:
    state = _running(args.lab)
    if not args.command:
        raise JhlabError("jhlab run: give a command after --, e.g. jhlab run -- uname -a")
    shell = _shell_of(state)
    try:
        result = shell.run(" ".join(args.command), timeout=args.timeout)
    finally:
        shell.close()
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.status


def cmd_sync(args: argparse.Namespace) -> int:
    """Copy this checkout's guest code into a running lab's /opt/jhlab (no reboot)."""
    import tempfile

    from harness.images import build_payload

    state = _running(args.lab)
    shell = _shell_of(state)
    try:
        with tempfile.TemporaryDirectory(prefix="jhlab-sync-") as tmp:
            key = state.key.with_suffix(".pub").read_text()
            from harness.images import ImageBuilder

            inmates = ImageBuilder(quiet=True).inmates()
            payload = build_payload(Path(tmp) / "payload.cpio.gz", authorized_key=key,
                                    inmates=inmates)
            shell.put(payload.read_bytes(), "/tmp/jhlab-sync.cpio.gz")
        shell.run("cd / && gzip -dc /tmp/jhlab-sync.cpio.gz | busybox cpio -idmu 2>/dev/null && "
                  "rm -rf /opt/jhlab/lib /opt/jhlab/bin /opt/jhlab/configs /opt/jhlab/libexec && "
                  "cp -a /jhlab/. /opt/jhlab/ && "
                  "rm -rf /jhlab /tmp/jhlab-sync.cpio.gz", check=True)
    finally:
        shell.close()
    console.print(f"guest code of lab {state.name} updated from this checkout")
    return 0


def _relay_session(state: RunningLab) -> QmpSession:
    from harness.qmp import QmpSession

    relay = state.run_dir / "qmp.sock" if state.run_dir is not None else None
    if relay is None or not relay.exists():
        raise JhlabError(f"lab {state.name} offers no QMP relay (brought up by an older jhlab?): "
                         f"'jhlab down {state.name}' and 'jhlab up' again")
    return QmpSession(relay, name=f"{state.name}-qmp")


def cmd_qmp(args: argparse.Namespace) -> int:
    """``jhlab qmp [LAB] COMMAND [JSON-ARGS]``: one QMP command through the lab's relay;
    its return value as JSON on stdout, an error as ``CLASS: desc`` on stderr (status 1)."""
    words = list(args.words)
    arguments: Any = {}
    if len(words) >= 2 and words[-1].lstrip().startswith(("{", "[")):
        try:
            arguments = json.loads(words.pop())
        except ValueError as exc:
            raise JhlabError(f"the arguments are not JSON ({exc}): give an object, e.g. "
                             '\'{"id": "edu"}\'') from exc
        if not isinstance(arguments, dict):
            raise JhlabError('the arguments must be a JSON object, e.g. \'{"id": "edu"}\'')
    if len(words) == 1:
        lab, command = "default", words[0]
    elif len(words) == 2:
        lab, command = words
    else:
        raise JhlabError("usage: jhlab qmp [LAB] COMMAND ['{JSON ARGUMENTS}']")
    session = _relay_session(_running(lab))
    session.connect()
    try:
        reply = session.reply(command, arguments, timeout=args.timeout)
    finally:
        session.close()
    if "error" in reply:
        error = reply["error"]
        print(f"{error.get('class', 'GenericError')}: {error.get('desc', error)}", file=sys.stderr)
        return 1
    value = reply.get("return")
    if isinstance(value, str):
        sys.stdout.write(value if value.endswith("\n") or not value else value + "\n")
    else:
        print(json.dumps(value, indent=2))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    """``jhlab events [LAB] [-f] [--since MARK] [--json] [--mark]``: the lab's QMP event
    log; MARK is an event index (``--mark`` prints the next one)."""
    from harness.qmp.eventlog import EVENT_LOG, count, follow_events, read_events

    state = _running(args.lab)
    log = state.log_dir / EVENT_LOG
    if args.mark:
        print(count(log))
        return 0
    if args.since < 0:
        raise JhlabError(f"--since {args.since}: a mark is an event index, 0 or more")
    events = (follow_events(log, args.since, lambda: runtime.pid_alive(state.supervisor))
              if args.follow else read_events(log, args.since))
    for event in events:
        print(json.dumps(event.as_json()) if args.json else event.line(), flush=args.follow)
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    """``jhlab cp [-r] [LAB:]SRC [LAB:]DST`` over SFTP on the lab's ssh session."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from harness.transfer import copy, parse_location

    source, dest = parse_location(args.source), parse_location(args.dest)
    lab = source.lab or dest.lab
    if lab is None or (source.lab is not None and dest.lab is not None):
        raise JhlabError(f"copy {source} to {dest}: one side must be in a lab (LAB:PATH, "
                         "e.g. default:/root/x), the other on this host")
    shell = _shell_of(_running(lab))
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    try:
        sftp = shell.sftp()
        with sftp, Progress(*columns, console=console, transient=True,
                            disable=args.quiet) as bar:
            tasks: dict[str, Any] = {}

            def report(path: str, done: int, total: int) -> None:
                if path not in tasks:
                    tasks[path] = bar.add_task(path, total=total)
                bar.update(tasks[path], completed=done)

            written = copy(source, dest, sftp, recursive=args.recursive, progress=report)
    finally:
        shell.close()
    if not args.quiet:
        console.print(f"copied {source} to {dest} ({len(written)} file{'s' * (len(written) != 1)})")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    state = _running(args.lab)
    log = state.log_dir / ("serial1.log" if args.cell else "serial0.log")
    with open(log, "rb") as handle:
        sys.stdout.buffer.write(handle.read())
        sys.stdout.flush()
        while args.follow:
            chunk = handle.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            else:
                time.sleep(0.2)
    return 0


# -- images, config, test, bench -------------------------------------------------------------


def cmd_images(args: argparse.Namespace) -> int:
    """``jhlab images build``, ``jhlab images key`` (the key of the build's inputs, for a
    CI cache; nothing is built)."""
    from harness.images import ImageBuilder

    if args.action == "key":
        print(ImageBuilder(quiet=True).inputs_key())
        return 0
    images = ImageBuilder().build()
    print(f"kernel     {images.kernel.vmlinuz}  ({images.kernel.release})")
    print(f"initramfs  {images.initramfs}")
    print(f"rootfs     {images.rootfs}")
    if images.linux_cell is not None:
        print(f"linux cell {images.linux_cell.kernel}  {images.linux_cell.rootfs}")
    if images.root_modules is not None:
        modules = " ".join(sorted(p.name for p in images.root_modules.glob("*.ko"))) or "none"
        print(f"modules    {images.root_modules}  ({modules})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """``jhlab config ...``: the config CLI of :mod:`harness.hvmodel.config`.

    ``create`` gets a host side: ``--lab NAME`` (default ``default``) picks a running lab;
    without ``--facts`` the collector runs in that lab's root cell over ssh (its source is
    sent along, so labs booted from older code work too) and the generator gets its
    document. For the default lab (Jailhouse's QEMU target) the ivshmem devices come from
    ``harness/configs/qemu-x86.toml`` unless ``--ivshmem-from`` says otherwise (``''``:
    none).
    """
    import tempfile

    from harness.hvmodel.config import collect as collect_module
    from harness.hvmodel.config.cli import main as config_main

    prog = "jhlab config"
    rest = list(args.rest)
    if rest[:1] != ["create"] or any(a in ("-h", "--help") for a in rest):
        return config_main(rest, prog)
    picker = argparse.ArgumentParser(add_help=False)
    picker.add_argument("--lab", default="default")
    known, create_args = picker.parse_known_args(rest[1:])
    name = _lab_name(known.lab)
    given = {a.split("=", 1)[0] for a in create_args}
    if "--ivshmem-from" not in given and name == "default":
        from harness.recipes import CONFIGS

        reference = CONFIGS / "qemu-x86.toml"
        create_args += ["--ivshmem-from", str(reference)]
    if "--facts" in given:
        return config_main(["create", *create_args], prog)
    state = _running(known.lab)
    source = Path(collect_module.__file__).read_text(encoding="utf-8")
    shell = _shell_of(state)
    try:
        result = shell.run("python3 -", stdin=source, timeout=120, check=True)
    finally:
        shell.close()
    sys.stderr.write(result.stderr)
    with tempfile.TemporaryDirectory(prefix="jhlab-config-") as tmp:
        facts = Path(tmp) / "facts.json"
        facts.write_text(result.stdout, encoding="utf-8")
        return config_main(["create", "--facts", str(facts), "--facts-label",
                            f"collected in lab {name}", *create_args], prog)


#: stored test durations that shards are cut by (pytest-split), in the source tree
DURATIONS = Path("ci") / "test-durations.json"


def _shard(text: str) -> tuple[int, int]:
    """``I/N`` of ``--shard``: shard I (from 1) of N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise JhlabError(f"--shard {text}: give I/N, e.g. --shard 2/4 (the second of four)") from None
    if not 1 <= index <= count:
        raise JhlabError(f"--shard {text}: I must be 1 to N")
    return index, count


def cmd_test(args: argparse.Namespace) -> int:
    """``jhlab test [SUITE] [-n N] [--shard I/N] [--junit F] [--report F] [PYTEST ARGS]``."""
    import pytest

    from harness.recipes import find_recipes

    recipes = find_recipes()
    suites_dir = recipes.test_suites
    target = suites_dir
    if args.suite:
        target = target / args.suite
        if not target.exists():
            suites = sorted(p.name for p in suites_dir.iterdir() if p.is_dir()
                            and not p.name.startswith("_"))
            raise JhlabError(f"no suite {args.suite!r} (suites: {', '.join(suites)})")
    # "jhlab test e2e --junit F": argparse's REMAINDER after SUITE swallows our options too.
    extra = list(args.pytest_args)
    values = {"--junit": args.junit, "--report": args.report, "--shard": args.shard,
              "-n": args.workers, "--bench": args.bench}
    for option in values:
        while option in extra[: extra.index("--") if "--" in extra else len(extra)]:
            at = extra.index(option)
            if at + 1 >= len(extra):
                raise JhlabError(f"{option} needs a value")
            values[option] = extra[at + 1]
            del extra[at:at + 2]
    if extra[:1] == ["--"]:
        extra = extra[1:]
    pytest_args = [str(target)]
    if values["--junit"]:
        pytest_args.append(f"--junitxml={values['--junit']}")
        if not values["--report"]:  # the report goes next to the JUnit file
            values["--report"] = str(Path(values["--junit"]).with_name("report.html"))
    if values["--report"]:
        pytest_args.append(f"--lab-report={values['--report']}")
        if values["--bench"]:
            pytest_args.append(f"--lab-report-bench={values['--bench']}")
    if values["-n"] is not None:
        # a worker runs whole modules: a module-scoped lab (or other setup) is made once
        # (in collection order: long lab modules first, short unit modules even out the end)
        pytest_args += ["-n", str(values["-n"]), "--dist", "loadscope", "--no-loadscope-reorder"]
    if values["--shard"]:
        index, count = _shard(str(values["--shard"]))
        pytest_args += [f"--splits={count}", f"--group={index}", "--splitting-algorithm=least_duration",
                        f"--durations-path={recipes.root / DURATIONS}"]
    if not {"-v", "-vv", "--verbose"} & set(extra):
        pytest_args += ["-q", "-o", "console_output_style=classic", "--lab-progress"]
    return int(pytest.main(pytest_args + extra))


def cmd_report(args: argparse.Namespace) -> int:
    """``jhlab report -o PAGE [--bench FILE|DIR] RUN.json ...``: one page from the records
    of one or more runs (the shards of a CI pipeline, merged)."""
    from harness.report import RunRecord, merge_runs, write_report

    try:
        runs = [RunRecord.read(Path(path)) for path in args.runs]
        merged = merge_runs(runs)
        page = write_report(merged, Path(args.output), bench=Path(args.bench) if args.bench else None)
    except ValueError as exc:
        raise JhlabError(str(exc)) from exc
    console.print(f"report of {len(runs)} run{'s' * (len(runs) != 1)}: {page}")
    if args.durations:
        # pytest-split's format: seconds per test id, all phases summed
        durations = {test.nodeid: round(test.duration, 3) for test in merged.tests}
        Path(args.durations).write_text(json.dumps(durations, indent=1, sort_keys=True) + "\n")
        console.print(f"durations of {len(durations)} tests: {args.durations}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from harness.bench import main as bench_main

    return bench_main(list(args.rest))


# -- main ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jhlab", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="logs and tracebacks")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="bring a lab up and report its readiness")
    up.add_argument("lab", nargs="?", default="default", help="built-in lab name or lab file")
    up.add_argument("--accel", choices=["auto", "kvm", "tcg"], help="override the lab's choice")
    up.add_argument("--ssh-port", type=int, help="host port for the root cell's ssh")
    up.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops")
    up.add_argument("--json", action="store_true", help="print the summary as JSON")
    up.set_defaults(func=cmd_up)

    sup = sub.add_parser("_supervise")
    sup.add_argument("lab")
    sup.add_argument("--accel")
    sup.add_argument("--ssh-port", type=int)
    sup.set_defaults(func=cmd_supervise)

    for verb, func, text in (("down", cmd_down, "stop a lab (logs are kept)"),):
        p = sub.add_parser(verb, help=text)
        p.add_argument("lab", nargs="?", default="default")
        p.set_defaults(func=func)

    status = sub.add_parser("status", help="list labs that are up")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    shell = sub.add_parser("shell", help="interactive shell in the root cell (ssh)")
    shell.add_argument("lab", nargs="?", default="default")
    shell.add_argument("command", nargs="*", help=argparse.SUPPRESS)
    shell.set_defaults(func=cmd_shell)

    run = sub.add_parser("run", help="run a command in the root cell: jhlab run [LAB] -- CMD")
    run.add_argument("lab", nargs="?", default="default")
    run.add_argument("--timeout", type=float, default=300.0)
    run.add_argument("command", nargs=argparse.REMAINDER)
    run.set_defaults(func=cmd_run)

    sync = sub.add_parser("sync", help="copy this checkout's guest code into a running lab")
    sync.add_argument("lab", nargs="?", default="default")
    sync.set_defaults(func=cmd_sync)

    qmp = sub.add_parser("qmp", help="one QMP command: jhlab qmp [LAB] COMMAND ['{JSON-ARGS}']")
    qmp.add_argument("words", nargs="+", metavar="[LAB] COMMAND [JSON-ARGS]")
    qmp.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    qmp.set_defaults(func=cmd_qmp)

    events = sub.add_parser("events", help="the lab's QMP event log (-f: follow it)")
    events.add_argument("lab", nargs="?", default="default")
    events.add_argument("-f", "--follow", action="store_true", help="wait for new events until "
                        "the lab ends (Ctrl-C stops)")
    events.add_argument("--since", type=int, default=0, metavar="MARK",
                        help="only events from this index on (see --mark)")
    events.add_argument("--mark", action="store_true", help="print the index the next event gets")
    events.add_argument("--json", action="store_true", help="one JSON object per event")
    events.set_defaults(func=cmd_events)

    cp = sub.add_parser("cp", help="copy files: jhlab cp [-r] [LAB:]SRC [LAB:]DST (SFTP)")
    cp.add_argument("-r", "--recursive", action="store_true", help="copy directories")
    cp.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    cp.add_argument("source", metavar="[LAB:]SRC")
    cp.add_argument("dest", metavar="[LAB:]DST")
    cp.set_defaults(func=cmd_cp)

    cons = sub.add_parser("console", help="print a serial transcript (root console by default)")
    cons.add_argument("lab", nargs="?", default="default")
    cons.add_argument("--cell", action="store_true", help="serial 1, the cells' UART")
    cons.add_argument("-f", "--follow", action="store_true")
    cons.set_defaults(func=cmd_console)

    images = sub.add_parser("images", help="build (or find cached) lab images; key: the key of "
                            "their inputs (for a CI cache)")
    images.add_argument("action", choices=["build", "key"])
    images.set_defaults(func=cmd_images)

    config = sub.add_parser("config", help="Jailhouse configs: show, check, compile, create, ...",
                            add_help=False)
    config.add_argument("rest", nargs=argparse.REMAINDER)
    config.set_defaults(func=cmd_config)

    test = sub.add_parser("test", help="run test suites (pytest)")
    test.add_argument("suite", nargs="?",
                      help="unit, hvmodel, inmates, integration, e2e (default: all)")
    test.add_argument("--junit", help="write a JUnit XML report (and the HTML report beside it)")
    test.add_argument("--report", help="write the HTML report here (default: report.html next "
                      "to --junit)")
    test.add_argument("-n", "--workers", help="labs in parallel: pytest-xdist workers, each with "
                      "its own lab (a number, or auto)")
    test.add_argument("--shard", metavar="I/N", help="run shard I of N, cut by the stored test "
                      f"durations ({DURATIONS})")
    test.add_argument("--bench", metavar="FILE|DIR", help="plot these bench figures in the report")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    test.set_defaults(func=cmd_test)

    report = sub.add_parser("report", help="the HTML report of runs: jhlab report -o PAGE RUN.json ...")
    report.add_argument("runs", nargs="+", metavar="RUN.json",
                        help="report.json files written beside reports (--lab-report), e.g. one per shard")
    report.add_argument("-o", "--output", required=True, metavar="PAGE", help="the HTML page to write")
    report.add_argument("--bench", metavar="FILE|DIR", help="plot these bench figures (a jhlab bench "
                        "--json file or a --history folder)")
    report.add_argument("--durations", metavar="FILE", help=f"also write the tests' durations for "
                        f"sharding (pytest-split's format; {DURATIONS} is the stored one)")
    report.set_defaults(func=cmd_report)

    bench = sub.add_parser("bench", help="benchmarks (ratios measured side by side)",
                           add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # "jhlab bench ARGS": the benchmarks parse their own options (-h included)
    if argv[:1] == ["bench"]:
        from harness.bench import main as bench_main

        return bench_main(argv[1:])
    # "jhlab run [LAB] -- CMD ...": everything after "--" is the command
    command: list[str] | None = None
    if argv[:1] in (["run"], ["shell"]) and "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    args = parser.parse_args(argv)
    if command is not None:
        args.command = command
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except JhlabError as exc:
        if args.verbose:
            LOG.exception("jhlab %s failed", args.cmd)
        console.print(f"[red]jhlab {args.cmd}: {exc}[/]")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
