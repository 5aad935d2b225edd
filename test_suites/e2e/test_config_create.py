"""``config create`` in a live lab: the collector runs in the root cell, the generator gets
its document, and the result matches the one made from the stored facts of the default lab
(``test_suites/hvmodel/data/default-lab-facts.json``) up to where QEMU put the BARs.

That stored document is what ``test_suites/hvmodel/test_config_create_qemu_x86.py``
compares with Jailhouse's ``qemu-x86`` config offline; this test shows the document still
describes the lab that boots today.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import pytest

from harness.hvmodel.config import SystemConfig, check, load_source, parse
from harness.hvmodel.config import collect as collect_module
from harness.hvmodel.config.create import CreateOptions, CreateResult, create
from harness.hvmodel.config.sysfs_parser import Facts, load_facts
from harness.lab import Lab
from harness.recipes import CONFIGS

pytestmark = [pytest.mark.lab, pytest.mark.slow]

STORED = Path(__file__).resolve().parents[1] / "hvmodel" / "data" / "default-lab-facts.json"
QEMU_X86 = CONFIGS / "qemu-x86.toml"
GUEST_PYTHON = "PYTHONPATH=/opt/jhlab/lib python3"


@pytest.fixture(scope="module")
def live_doc(lab: Lab) -> dict[str, Any]:
    """The facts document the collector prints in the lab's root cell."""
    result = lab.run(f"{GUEST_PYTHON} -m harness.hvmodel.config.collect", check=True,
                     timeout=120)
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def template() -> SystemConfig:
    config = load_source(QEMU_X86)
    assert isinstance(config, SystemConfig)
    return config


def portable(result: CreateResult) -> dict[str, Any]:
    """The generated config with BAR-relative instead of absolute device addresses."""
    facts = result.facts
    root = result.config.root_cell

    def bar_relative(address: int) -> tuple[str, int, int] | int:
        for function in facts.pci:
            for index, resource in enumerate(function.resources[:7]):
                if resource.contains(address, address):
                    return function.slot, index, address - resource.start
        return address

    memory = []
    for region, note in zip(root.memory_regions, result.regions, strict=True):
        where = (note.bdf, note.resource, note.offset) if note.kind == "device" \
            else region.phys_start
        memory.append((where, region.size, region.flags))
    devices = []
    for device in root.pci_devices:
        fields = {name: getattr(device, name) for name in device.__slots__}
        fields["msix_address"] = bar_relative(device.msix_address) if device.msix_address \
            else 0
        devices.append(fields)
    pio = [text.split(" : ", 1)[1] if text.endswith("(PCI I/O BAR)") else (p.base, p.length)
           for p, text in zip(root.pio_regions, result.pio, strict=True)]
    return {"header": result.config.header_bytes(), "cpus": root.cpus,
            "irqchips": root.irqchips, "caps": root.pci_caps, "memory": memory,
            "devices": devices, "pio": pio, "vectors": result.vectors}


def _region(entry: tuple[Any, int, int]) -> str:
    where, size, flags = entry
    start = f"{where:#x}" if isinstance(where, int) else repr(where)
    return f"{start} size {size:#x} flags {flags:#x}"


def differences(live: CreateResult, stored: CreateResult) -> list[str]:
    """What differs between two portable configs, each memory region with its note (the
    /proc/iomem line it came from), so a lab that booted differently says where."""
    ours, theirs = portable(live), portable(stored)
    lines = [f"{key}: live {ours[key]!r} != stored {theirs[key]!r}"
             for key in ours if key != "memory" and ours[key] != theirs[key]]
    matcher = difflib.SequenceMatcher(a=ours["memory"], b=theirs["memory"], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        for side, result, memory, indices in (("live", live, ours["memory"], range(i1, i2)),
                                              ("stored", stored, theirs["memory"], range(j1, j2))):
            lines += [f"memory #{index} {side}: {_region(memory[index])} {result.regions[index].text}"
                      for index in indices]
    return lines


def test_collector_runs_clean_in_the_root_cell(live_doc: dict[str, Any]) -> None:
    """As root the collector reads everything, the ACPI tables' addresses included."""
    assert live_doc["warnings"] == []
    assert live_doc["format"] == collect_module.FACTS_FORMAT
    assert "memmap=82M$0x3a000000" in live_doc["cmdline"]
    assert {"APIC", "DMAR", "FACP", "MCFG"} <= set(live_doc["acpi_tables"])
    located = {t["signature"] for t in live_doc["acpi_locations"]["tables"]}
    assert {"RSDT", "FACP", "DSDT", "FACS", "APIC", "DMAR", "MCFG"} <= located
    sizes = {p["slot"]: p["config_size"] for p in live_doc["pci"]}
    assert sizes["0000:00:02.0"] == 4096 and sizes["0000:00:1b.0"] == 256


def test_live_config_matches_the_stored_facts(live_doc: dict[str, Any]) -> None:
    """Generated from the live lab and from the stored facts: the same config, BAR
    placement aside; it passes check."""
    live = create(Facts.from_json(live_doc, "<live>"), CreateOptions(ivshmem_from=template()))
    stored = create(load_facts(STORED), CreateOptions(ivshmem_from=template()))
    assert live.warnings == ()
    report = check(live.config, next_checks=True, extra=True)
    assert report.ok, [f.details for f in report.findings]
    differ = differences(live, stored)
    assert not differ, "\n".join([*differ, "live /proc/iomem:", live_doc["iomem"]])


def test_collector_source_sent_over_stdin(lab: Lab, live_doc: dict[str, Any]) -> None:
    """What jhlab config create does: the collector's source piped to python3 - gives the
    same document as the installed module."""
    source = Path(collect_module.__file__).read_text(encoding="utf-8")
    piped = json.loads(lab.run("python3 -", stdin=source, check=True, timeout=120).stdout)
    assert piped == live_doc


def test_create_in_the_guest(lab: Lab, live_doc: dict[str, Any]) -> None:
    """In the root cell, create collects by itself; the .cell equals the host's result."""
    lab.run(f"{GUEST_PYTHON} -m harness.hvmodel.config create -o /tmp/jhlab-created.cell "
            "--toml /tmp/jhlab-created.toml", check=True, timeout=120)
    lab.run(f"{GUEST_PYTHON} -m harness.hvmodel.config check /tmp/jhlab-created.cell",
            check=True, timeout=120)
    in_guest = parse(lab.ssh.get("/tmp/jhlab-created.cell"), "<guest>")
    on_host = create(Facts.from_json(live_doc, "<live>")).config
    assert in_guest.to_bytes() == on_host.to_bytes()
    lab.run("rm -f /tmp/jhlab-created.cell /tmp/jhlab-created.toml")
