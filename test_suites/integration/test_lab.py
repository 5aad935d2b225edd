"""The lab machine end to end: a real VM booted from the lab's images, checked from
the host (QMP, serial transcripts) and from inside (ssh)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness import runtime
from harness.console import ConsoleFailure
from harness.errors import GuestPanic, LaunchError, MachineDied, MachineError
from harness.hvmodel.config import SystemConfig, load_source
from harness.images import check_kernel_config
from harness.lab import Lab
from harness.recipes import CONFIGS, find_recipes

pytestmark = [pytest.mark.lab, pytest.mark.slow]

WINDOW = 0x3A000000  # start of the default lab's reserved window (memmap=82M$0x3a000000)


def test_summary_shows_nested_virtualization_and_iommu(lab: Lab) -> None:
    """The readiness summary reports what the root cell really sees."""
    summary = lab.summary
    assert summary is not None
    assert summary.nested_virtualization, summary
    assert summary.iommu_groups >= 1
    assert summary.reserve.startswith("82M at 0x3a000000")
    flags = lab.run("grep -m1 '^flags' /proc/cpuinfo", check=True).stdout.split()
    assert {"svm", "vmx"} & set(flags) == {"svm", "vmx"} & set(summary.cpu_features)
    assert lab.run("test -c /dev/kvm && ls /sys/kernel/iommu_groups | wc -l",
                   check=True).stdout.strip() == str(summary.iommu_groups)


def write_window(lab: Lab, offset: int, data: bytes) -> None:
    """Write ``data`` at ``WINDOW + offset`` from the root cell (``/dev/mem``)."""
    script = (
        "import mmap, os\n"
        "fd = os.open('/dev/mem', os.O_RDWR)\n"
        f"m = mmap.mmap(fd, 0x10000, offset={WINDOW:#x})\n"
        f"m[{offset}:{offset + len(data)}] = bytes.fromhex('{data.hex()}')\n"
    )
    lab.run("python3 -", stdin=script, check=True)


def read_window(lab: Lab, offset: int, size: int) -> bytes:
    """Read ``size`` bytes at ``WINDOW + offset`` in the root cell (``/dev/mem``)."""
    script = (
        "import mmap, os\n"
        "fd = os.open('/dev/mem', os.O_RDONLY)\n"
        f"m = mmap.mmap(fd, 0x10000, prot=mmap.PROT_READ, offset={WINDOW:#x})\n"
        f"print(m[{offset}:{offset + size}].hex())\n"
    )
    return bytes.fromhex(lab.run("python3 -", stdin=script, check=True).stdout.strip())


def test_reserved_window_written_in_guest_is_read_by_host(lab: Lab) -> None:
    """Guest writes a pattern to physical memory through /dev/mem; QMP reads it back."""
    pattern = secrets.token_bytes(64)
    write_window(lab, 0x5000, pattern)
    assert lab.qmp.read_phys(WINDOW + 0x5000, len(pattern)) == pattern


def test_window_is_hidden_from_the_root_kernel(lab: Lab) -> None:
    """memmap= keeps the window out of the kernel's System RAM."""
    iomem = lab.run("cat /proc/iomem", check=True).stdout
    for line in iomem.splitlines():
        if "System RAM" in line:
            start, end = (int(x, 16) for x in line.split(":")[0].strip().split("-"))
            assert end < WINDOW or start >= WINDOW + 82 * 2**20, line


def test_edu_iommu_group_is_usable_by_vfio(lab: Lab) -> None:
    """The lab's edu device (behind the pcie-pci-bridge) shares its IOMMU group only with
    that bridge, which no driver holds, so the group is viable and edu binds to vfio-pci."""
    edu = "0000:01:01.0"
    dev = f"/sys/bus/pci/devices/{edu}"
    vendor = lab.run(f"cat {dev}/vendor {dev}/device", check=True).stdout.split()
    assert vendor == ["0x1234", "0x11e8"]
    group = lab.run(f"basename $(readlink {dev}/iommu_group)", check=True).stdout.strip()
    members = lab.run(f"ls /sys/kernel/iommu_groups/{group}/devices", check=True).stdout.split()
    assert members == ["0000:00:03.0", edu]
    assert lab.run("test -e /sys/bus/pci/devices/0000:00:03.0/driver").status == 1
    lab.run(f"echo vfio-pci > {dev}/driver_override && echo {edu} > "
            "/sys/bus/pci/drivers_probe", check=True)
    try:
        driver = lab.run(f"basename $(readlink {dev}/driver)", check=True).stdout.strip()
        assert driver == "vfio-pci"
        assert lab.run(f"test -c /dev/vfio/{group}").status == 0
    finally:
        lab.run(f"echo {edu} > {dev}/driver/unbind; echo > {dev}/driver_override")


def test_qmp_sees_the_lab_devices_at_jailhouse_slots(lab: Lab) -> None:
    """Devices sit where Jailhouse's qemu-x86 config expects them, and the firmware put
    every memory BAR where that config's root regions and MSI-X addresses say."""
    devices = {d["bdf"]: d for d in lab.qmp.pci_devices()}
    expected = {"00:01.0": 0x1111, "00:02.0": 0x10D3, "00:03.0": 0x000E, "00:1b.0": 0x2668,
                "00:1f.0": 0x2918, "00:1f.2": 0x2922, "00:1f.3": 0x2930, "00:1f.7": 0x1000,
                "01:01.0": 0x11E8}
    for bdf, device_id in expected.items():
        assert bdf in devices, f"{bdf} missing: {sorted(devices)}"
        assert devices[bdf]["id"]["device"] == device_id, (bdf, devices[bdf]["id"])
    bars = {(dev["bdf"], region["bar"]): region["address"] for dev in devices.values()
            for region in dev.get("regions", []) if region["type"] == "memory" and region["bar"] < 6}
    qemu_x86 = load_source(CONFIGS / "qemu-x86.toml")
    assert isinstance(qemu_x86, SystemConfig)
    windows = {mem.phys_start for mem in qemu_x86.root_cell.memory_regions}
    msix = {dev.msix_address for dev in qemu_x86.root_cell.pci_devices if dev.msix_address}
    for (bdf, bar), address in bars.items():
        if bdf == "01:01.0":
            assert address == 0xFE800000  # edu, in bus 1's window (not in qemu-x86)
        elif bdf == "00:03.0":
            assert address == 0xFEA99000  # the bridge's SHPC page, which qemu-x86 leaves out
        else:
            assert address in windows | msix, f"{bdf} BAR{bar} at {address:#x}: not in qemu-x86"


def test_kernel_matches_config_fragment(lab: Lab) -> None:
    """The root-cell kernel has every option kernel_configs/root-cell.config asks for."""
    release = lab.run("uname -r", check=True).stdout.strip()
    assert lab.summary is not None and release == lab.summary.kernel
    config = lab.run(f"cat /boot/config-{release}", check=True).stdout
    fragment = (find_recipes().kernel_configs / "root-cell.config").read_text()
    assert check_kernel_config(fragment, config) == []


def test_logs_record_serial_and_qmp_events(lab: Lab) -> None:
    """Transcripts and the QMP event log land in the lab's log folder."""
    assert lab.log_dir is not None
    marker = f"jhlab-log-check-{secrets.token_hex(4)}"
    lab.run(f"echo {marker} > /dev/ttyS0", check=True)
    lab.console.expect(marker, timeout=20)
    assert marker in (lab.log_dir / "serial0.log").read_text(errors="replace")
    lab.qmp.execute("stop")
    lab.qmp.execute("cont")
    lab.qmp.events.wait_for("RESUME", timeout=10, since=0)
    events = [json.loads(line)["event"] for line in
              (lab.log_dir / "qmp-events.jsonl").read_text().splitlines()]
    assert "STOP" in events and "RESUME" in events


def test_serial_fallback_runs_commands(lab: Lab) -> None:
    """Without ssh, commands run on the root console with their exit status."""
    from harness.ssh import SerialShell

    shell = SerialShell(lab.console)
    result = shell.run("echo hello; echo oops >&2; exit 7")
    assert result.status == 7
    assert result.stdout.splitlines() == ["hello", "oops"]


def test_programs_answer_lines_over_their_own_ssh_channel(lab: Lab) -> None:
    """A program started in the root cell answers line by line while other commands run
    beside it; one that ends says its status and standard error; close ends it."""
    from harness.errors import ConsoleError

    echo = lab.start("while read -r line; do echo \"got $line in $$\"; done")
    echo.send("one")
    first = echo.receive(timeout=30)
    assert first.startswith("got one in ")
    assert lab.run("echo beside", check=True).stdout == "beside\n"
    echo.send("two")
    assert echo.receive(timeout=30) == first.replace("one", "two")  # the same process
    pid = first.rsplit(" ", 1)[1]
    echo.close()
    assert not echo.alive
    lab.run(f"for i in $(seq 50); do [ -d /proc/{pid} ] || exit 0; sleep 0.1; done; exit 1", check=True)

    broken = lab.start("read -r line; echo \"no $line here\" >&2; exit 3")
    broken.send("answer")
    with pytest.raises(ConsoleError, match=r"ended \(status 3\) without an answer:\nno answer here"):
        broken.receive(timeout=30)
    broken.close()


@pytest.mark.dirty
def test_guest_panic_is_reported_at_once(lab: Lab) -> None:
    """A panicking guest ends a console wait immediately with the panic's tail, and a
    dead QEMU is reported as such. The session lab crashes (a reset from its snapshot
    brings it back afterwards, far faster than booting a lab to crash)."""
    if lab.attached:
        pytest.skip("it crashes its lab: not one attached with --lab-attach")
    crashing = lab
    mark = crashing.qmp.events.mark()
    crashing.console.sendline("")
    crashing.console.sendline("echo c > /proc/sysrq-trigger")
    started = time.monotonic()
    with pytest.raises((GuestPanic, ConsoleFailure)) as info:
        crashing.console.expect("this never appears", timeout=120)
    assert time.monotonic() - started < 60
    assert "Kernel panic" in str(info.value)
    # pvpanic tells QEMU, which keeps the guest paused for inspection
    crashing.qmp.events.wait_for("GUEST_PANICKED", timeout=60, since=mark)
    assert crashing.qmp.status() == "guest-panicked"
    with pytest.raises(MachineError, match="panicked"):
        crashing.run("true")
    # a VM that dies: QEMU killed behind the harness's back
    assert crashing.machine is not None and crashing.machine.process is not None
    os.kill(crashing.machine.process.pid, signal.SIGKILL)
    crashing.machine.process.wait(10)
    with pytest.raises(MachineDied, match="QEMU exited"):
        crashing.machine.check_alive()


def test_sigkill_of_the_harness_leaves_no_qemu(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """QEMU dies with the process that launched it, even on SIGKILL; the run directory it
    leaves is reaped (as the next Lab.up does), so the test run leaves nothing behind."""

    accel = request.config.getoption("--accel") or "auto"
    script = f"""
import pathlib, time
from harness.images import ImageBuilder
from harness.labfile import load_lab
from harness.machine import Machine, choose_accel
images = ImageBuilder(quiet=True).build()
log = pathlib.Path({str(tmp_path)!r})
machine = Machine(load_lab("default"), images, choose_accel({accel!r}, images, log_dir=log),
                  log_dir=log)
machine.launch()
print(machine.pid, machine.run_dir, flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    pid, run_dir = proc.stdout.readline().split()
    qemu_pid = int(pid)
    assert _alive(qemu_pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 10
    while _alive(qemu_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(qemu_pid)
    assert Path(run_dir).exists()  # no cleanup ran in the killed process
    assert Path(run_dir) in runtime.reap_run_dirs()
    assert not Path(run_dir).exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    """A taken ssh port fails the launch at once, names the port, leaves nothing."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        lab = Lab("default", accel="tcg", ssh_port=port, log_dir=tmp_path, quiet=True)
        with pytest.raises(LaunchError, match=f"127.0.0.1:{port}.*in use"):
            lab.up()
    assert lab.machine is not None and not lab.machine.alive()
    assert lab.machine.run_dir is None
    assert (tmp_path / "qemu.log").exists()


def test_reset_restores_the_snapshot(lab: Lab) -> None:
    """A reset brings back the saved state: files written later are gone, physical
    memory holds what it held at the snapshot (seen over QMP and from the guest), the
    consoles, QMP (the lab's own and its relay for other processes) and ssh work again
    on the restored machine, and devices QEMU cannot migrate (``edu``) decode their BARs
    again where the guest had put them."""
    from harness.qmp import QmpSession

    token = secrets.token_hex(4)
    saved, later = secrets.token_bytes(64), secrets.token_bytes(64)
    lab.run(f"echo {token} > /root/reset-marker", check=True)
    write_window(lab, 0x6000, saved)
    old_pid = lab.machine.pid if lab.machine else None
    lab.snapshot()
    lab.run("echo changed > /root/reset-marker; touch /root/after-snapshot", check=True)
    write_window(lab, 0x6000, later)
    assert lab.qmp.read_phys(WINDOW + 0x6000, 64) == later
    assert lab.run_dir is not None
    other = QmpSession(lab.run_dir / "qmp.sock", name="another process's view")  # the relay
    other.connect()
    try:
        lab.reset()
        assert other.status() == "running"  # the relay follows the restored QEMU
        assert other.execute("query-name") == {"name": f"jhlab-{lab.spec.name}"}
    finally:
        other.close()
    assert lab.machine is not None and lab.machine.pid != old_pid
    assert lab.run("cat /root/reset-marker", check=True).stdout.strip() == token
    assert lab.run("test -e /root/after-snapshot").status == 1
    assert lab.qmp.status() == "running"
    lab.run("echo restored-console > /dev/ttyS0", check=True)
    lab.console.expect("restored-console", timeout=20)
    assert lab.qmp.read_phys(WINDOW + 0x6000, 64) == saved  # the restored RAM, over QMP
    assert read_window(lab, 0x6000, 64) == saved                # and as the guest sees it
    edu = next(dev for dev in lab.qmp.pci_devices() if dev["bdf"] == "01:01.0")
    bar0 = lab.run("setpci -s 01:01.0 BASE_ADDRESS_0", check=True).stdout.strip()
    assert edu["regions"][0]["address"] == int(bar0, 16) & ~0xF != 0
    # the listing of labs that are up (jhlab status, --lab-attach) shows the new QEMU
    if not lab.attached:
        listed = runtime.read(lab.spec.name)
        assert listed is not None and lab.summary is not None
        assert (listed.qemu, listed.ssh_port) == (lab.machine.pid, lab.summary.ssh_port)


def test_guest_tools_are_on_the_path_over_ssh(lab: Lab) -> None:
    """Commands over ssh find the guest tools and the model like the console shell does."""
    out = lab.run("command -v jailhouse; python3 -c 'import harness.hvmodel.control'",
                  check=True)
    assert out.stdout.strip() == "/opt/jhlab/bin/jailhouse"


def test_jailhouse_commands_run_in_the_preloaded_loader(lab: Lab) -> None:
    """The lab's init starts the driver loader; ``jailhouse`` (the launcher) has it run the
    command, and without it (a socket that does not exist) runs the Python command: the
    same output either way."""
    served = lab.run("jailhouse --version && tail -n 20 /run/jhlab-loader.log", check=True).stdout
    version, _, log = served.partition("\n")
    assert version == "Jailhouse management tool v0.12 (jhlab)"
    assert "command " in log and "forked: jailhouse --version" in log
    alone = lab.run("JAILHOUSE_LOADER=/run/no-such-loader jailhouse --version", check=True)
    assert alone.stdout.strip() == version


def _own_run_dirs(label: str) -> list[Path]:
    """Run directories of ``label`` this process owns (their owner file names it)."""

    own = []
    for path in Path(tempfile.gettempdir()).glob(f"{runtime.RUN_DIR_PREFIX}{label}-*"):
        try:
            owner = json.loads((path / runtime.OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner.get("pid") == os.getpid():
            own.append(path)
    return own


def host_cpu_flags() -> set[str]:
    """The host CPU's vmx/svm flags, read here from /proc/cpuinfo (not through the code
    under test)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split()) & {"vmx", "svm"}
    return set()


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm here")
def test_kvm_probe_boot_decides_from_what_the_guest_shows(tmp_path: Path) -> None:
    """The probe really boots the lab kernel on KVM; it picks KVM only if the root cell
    comes up and shows vmx/svm, and otherwise falls back to TCG saying why. What it may
    decide follows from the host: a CPU without vmx/svm cannot give a guest nested
    virtualization, so the probe must fall back (on a PVM host because the stock kernel
    never comes up, which it names); ``auto`` then chooses TCG without probing at all."""
    from harness.images import ImageBuilder
    from harness.machine import TCG_CPU, _probe_kvm, choose_accel

    images = ImageBuilder(quiet=True).build()
    started = time.monotonic()
    choice = _probe_kvm(images, tmp_path, timeout=10)
    probe_seconds = time.monotonic() - started
    assert (tmp_path / "kvm-probe" / "qemu-cmdline.txt").read_text().count("-accel kvm") == 1
    assert not _own_run_dirs("kvm-probe")  # (other processes on this machine may probe meanwhile)
    flags = host_cpu_flags()
    if choice.accel == "kvm":
        assert flags, f"KVM chosen on a host CPU without vmx/svm: {choice.reason}"
        assert {"vmx", "svm"} & set(choice.reason.split())
        return
    assert choice.cpu == TCG_CPU
    if flags:
        assert "did not reach the root cell" in choice.reason or "no vmx/svm" in choice.reason
        return
    # This host cannot nest: the probe's guest shows no vmx/svm or never comes up.
    if Path("/sys/module/kvm_pvm").exists():
        assert choice.reason == ("a KVM probe boot did not reach the root cell within 10 s (this "
                                 "host's /dev/kvm is PVM, which cannot boot a stock kernel)")
        assert probe_seconds >= 10  # it waited for the root cell, it did not guess
    else:
        assert "did not reach the root cell" in choice.reason or "no vmx/svm" in choice.reason
    auto = choose_accel("auto", images, log_dir=tmp_path / "auto")
    assert (auto.accel, auto.cpu) == ("tcg", TCG_CPU)
    assert "neither vmx nor svm" in auto.reason
    assert not (tmp_path / "auto" / "kvm-probe").exists()  # decided without a probe boot


def test_configs_and_demos_sit_where_jailhouse_images_put_them(lab: Lab) -> None:
    """Scripts written for Jailhouse's images find /etc/jailhouse/*.cell and the demos."""
    from harness.images import compiled_configs

    expected = compiled_configs()["qemu-x86.cell"]
    assert lab.ssh.get("/etc/jailhouse/qemu-x86.cell") == expected
    demos = lab.run("ls /usr/libexec/jailhouse/demos", check=True).stdout.split()
    assert {"apic-demo.bin", "tiny-demo.bin", "hello.bin", "apic-timer.bin"} <= set(demos)
    assert lab.ssh.get("/usr/libexec/jailhouse/demos/apic-demo.bin")[:2] != b""


def test_kvm_is_held_for_the_labs_life(lab: Lab) -> None:
    """With KVM inside, one idle VM exists from boot on (the holder), so a hypervisor
    enable or disable is never KVM's first or last VM."""
    if not (lab.summary and lab.summary.kvm_in_guest):
        pytest.skip("no KVM inside the lab")
    # started right after the ready marker: give its python3 a moment under TCG
    lab.run("for i in $(seq 120); do grep -qs 'holding an idle KVM VM' /run/jhlab-kvm-holder.log "
            "&& exit 0; sleep 0.5; done; cat /run/jhlab-kvm-holder.log; exit 1", check=True, timeout=90)
    script = (
        "import os\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        cmd = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')\n"
        "        fds = [os.readlink(f'/proc/{pid}/fd/{fd}') for fd in os.listdir(f'/proc/{pid}/fd')]\n"
        "    except OSError:\n"
        "        continue\n"
        "    if b'harness.hvmodel.arch.holder' in cmd:\n"
        "        print(sum(fd == 'anon_inode:kvm-vm' for fd in fds),\n"
        "              sum(fd.startswith('anon_inode:kvm-vcpu:') for fd in fds))\n"
    )
    vms, vcpu_fds = lab.run("python3 -", stdin=script, check=True).stdout.split()
    assert vms == "1" and int(vcpu_fds) >= 1
