"""Lab descriptions: the default lab's values and every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import LabFileError
from harness.labfile import builtin_labs, format_size, load_lab, parse_lab, parse_size

MINIMAL = 'name = "mini"\n'


def test_default_lab_is_jailhouses_qemu_target() -> None:
    """The default lab reproduces the machine qemu-x86.cell was written for."""
    lab = load_lab("default")
    assert (lab.cpus, lab.memory, lab.iommu) == (4, 2**30, "intel")
    assert lab.reserve is not None
    assert lab.reserve.kernel_arg == "memmap=82M$0x3a000000"
    slots = {d.prop("addr"): d.driver for d in lab.devices if d.prop("addr") and not d.prop("bus")}
    assert slots["01.0"] == "VGA" and slots["02.0"] == "e1000e"
    assert slots["03.0"] == "pcie-pci-bridge" and slots["1b.0"] == "intel-hda"
    assert lab.management_nic == "1f.7"
    edu = next(d for d in lab.devices if d.driver == "edu")
    assert (edu.prop("bus"), edu.prop("addr")) == ("pcibr1", "01.0")
    assert "default" in builtin_labs()


def test_sizes() -> None:
    assert parse_size("82M", "x") == 82 * 2**20
    assert parse_size("0x1000", "x") == 4096
    assert parse_size("1G", "x") == 2**30
    assert format_size(82 * 2**20) == "82M"
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots", "machine.memory")


@pytest.mark.parametrize(("text", "message"), [
    ("name = ", "not valid TOML"),
    ("[machine]\ncpus = 2\n", 'missing "name"'),
    ('name = "a b"\n', "may only use letters"),
    (MINIMAL + "colour = 1\n", "unknown key colour"),
    (MINIMAL + "[machine]\nspeed = 1\n", r"unknown key speed in \[machine\]"),
    (MINIMAL + '[machine]\naccel = "hvf"\n', "machine.accel must be one of auto, kvm, tcg"),
    (MINIMAL + "[machine]\ncpus = 0\n", "machine.cpus must be 1..64"),
    (MINIMAL + '[machine]\ncpus = "4"\n', "machine.cpus must be int"),
    (MINIMAL + "[machine]\ncpus = true\n", "machine.cpus must be int"),
    (MINIMAL + '[machine]\nmemory = "lots"\n', "not a size"),
    (MINIMAL + '[machine]\nmemory = "128M"\n', "at least 256M"),
    (MINIMAL + '[machine]\nreserve = "82M"\n', "SIZE@ADDRESS"),
    (MINIMAL + '[machine]\nmemory = "512M"\nreserve = "82M@0x3a000000"\n', "beyond"),
    (MINIMAL + '[machine]\nmanagement_nic = "4"\n', "slot like 04.0"),
    (MINIMAL + '[[device]]\naddr = "05.0"\n', "needs driver"),
    (MINIMAL + '[[device]]\ndriver = "edu"\naddr = "zz"\n', "must look like 1b.0"),
    (MINIMAL + '[[device]]\ndriver = "edu"\naddr = "04.0"\n', "taken by the management NIC"),
    (MINIMAL + '[[device]]\ndriver = "edu"\naddr = "05.0"\n[[device]]\ndriver = "VGA"\n'
     'addr = "05.0"\n', "already taken by edu"),
    (MINIMAL + '[[device]]\ndriver = "e1000e"\nnetdev = "lan"\n', "no \\[\\[netdev\\]\\] defines"),
    (MINIMAL + '[[device]]\ndriver = "edu"\nid = "mgmt"\n', "reserved for the harness"),
    (MINIMAL + '[[netdev]]\nid = "lan"\ntype = "vde"\n', 'must be "user" or "tap"'),
    (MINIMAL + '[[netdev]]\nid = "lan"\naddress = "10.0.0.1/24"\n', "only applies to type"),
    (MINIMAL + '[[netdev]]\nid = "lan"\ntype = "tap"\naddress = "10.0.0.1"\n', "must look like"),
])
def test_bad_lab_files_name_the_problem(text: str, message: str) -> None:
    """Each malformed lab file fails with an error naming the key and the fix."""
    with pytest.raises(LabFileError, match=message) as info:
        parse_lab(text, "bad.toml")
    assert info.value.path == "bad.toml"


def test_unknown_lab_lists_the_built_in_ones(tmp_path: Path) -> None:
    with pytest.raises(LabFileError, match="built-in: default"):
        load_lab("nosuchlab")
    with pytest.raises(LabFileError, match="cannot read"):
        load_lab(tmp_path / "missing.toml")


def test_device_properties_become_qemu_arguments() -> None:
    lab = parse_lab(MINIMAL + '[[device]]\ndriver = "edu"\naddr = "06.0"\ndma_mask = 64\n'
                    'x-flag = true\n')
    assert lab.devices[0].qemu_arg() == "edu,addr=06.0,dma_mask=64,x-flag=on"
