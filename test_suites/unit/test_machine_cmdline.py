"""The QEMU command line built from a lab description, and the accelerator choice."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import machine as machine_mod
from harness.errors import MissingToolError
from harness.images import ImageSet, Kernel
from harness.labfile import load_lab, parse_lab
from harness.machine import TCG_CPU, AccelChoice, Machine, choose_accel


def _images(tmp_path: Path) -> ImageSet:
    kernel = Kernel("linux-image-6.1.0-99-amd64", "6.1.1-1", tmp_path / "kernel")
    return ImageSet(kernel=kernel, initramfs=tmp_path / "initrd", rootfs=tmp_path / "root.img")


def test_default_command_line(tmp_path: Path) -> None:
    """q35 with split irqchip, intel-iommu before every device, memmap window, serials
    logged to files, ssh forwarded on 127.0.0.1 only, devices at their slots."""
    spec = load_lab("default")
    m = Machine(spec, _images(tmp_path), AccelChoice("tcg", TCG_CPU, "test"), log_dir=tmp_path)
    cmd = m.command_line(tmp_path / "run", tmp_path / "initrd.img", 2222)
    joined = " ".join(cmd)
    assert cmd[cmd.index("-machine") + 1] == "q35,kernel-irqchip=split"
    assert cmd[cmd.index("-cpu") + 1] == TCG_CPU and cmd[cmd.index("-smp") + 1] == "4"
    iommu = cmd.index("intel-iommu,intremap=on,caching-mode=on")
    first_device = min(i for i, a in enumerate(cmd) if a.startswith(("VGA", "e1000e", "edu")))
    assert iommu < first_device
    append = cmd[cmd.index("-append") + 1]
    assert "memmap=82M$0x3a000000" in append and "intel_iommu=on" in append
    assert "no_timer_check" in append.split()
    assert "tsc=reliable" in append.split()  # TCG's TSCs are synchronized (machine.py)
    assert "clocksource=hpet" in append.split()  # but the kernel's clock is not the TSC
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in joined
    assert f"logfile={tmp_path / 'serial0.log'}" in joined
    assert f"logfile={tmp_path / 'serial1.log'}" in joined
    assert "-S" in cmd and "panic=pause" in cmd
    assert "e1000e,addr=02.0,netdev=lan" in cmd and "edu,bus=pcibr1,addr=01.0,id=edu" in cmd
    assert "virtio-net-pci,netdev=mgmt,addr=1f.7,id=mgmt,romfile=" in cmd


def test_no_iommu_lab(tmp_path: Path) -> None:
    spec = parse_lab('name = "plain"\n[machine]\niommu = "none"\nreserve = ""\n')
    m = Machine(spec, _images(tmp_path), AccelChoice("kvm", "host", "t"), log_dir=tmp_path)
    cmd = m.command_line(tmp_path, tmp_path / "i", 1)
    assert cmd[cmd.index("-machine") + 1] == "q35"
    assert not any("intel-iommu" in a for a in cmd)
    assert "memmap" not in cmd[cmd.index("-append") + 1]
    # on KVM the host's CPU flags tell the guest's Linux about its TSC
    assert "tsc=reliable" not in cmd[cmd.index("-append") + 1].split()


def test_missing_qemu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("harness.machine.shutil.which", lambda name: None)
    with pytest.raises(MissingToolError, match="apt-get install qemu-system-x86"):
        machine_mod.qemu_binary()


def test_accel_choice_without_usable_kvm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Explicit choices are honoured; auto falls back to TCG and says why."""
    images = _images(tmp_path)
    assert choose_accel("tcg", images, log_dir=tmp_path).accel == "tcg"
    assert choose_accel("kvm", images, log_dir=tmp_path).accel == "kvm"
    monkeypatch.setattr("harness.machine.os.access", lambda path, mode: False)
    choice = choose_accel("auto", images, log_dir=tmp_path)
    assert (choice.accel, choice.cpu) == ("tcg", TCG_CPU)
    assert "no usable /dev/kvm" in choice.reason
    monkeypatch.setattr("harness.machine.os.access", lambda path, mode: True)
    monkeypatch.setattr(machine_mod, "_host_virt_flags", lambda: set())
    assert "neither vmx nor svm" in choose_accel("auto", images, log_dir=tmp_path).reason


def test_tcg_cpu_hides_what_nested_guests_cannot_keep() -> None:
    """The TCG CPU has no XSAVE and none of the VEX-encoded extensions that need it: QEMU
    7.2's TCG loses a nested guest's XCR0 (no XSETBV intercept), so cells must not see them."""
    flags = TCG_CPU.split(",")
    assert flags[0] == "max"
    assert {f"{name}=off" for name in ("xsave", "avx", "avx2", "fma", "f16c", "vaes")} <= set(flags)
