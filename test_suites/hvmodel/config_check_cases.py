"""Config sets with what Jailhouse's ``tools/jailhouse-config-check`` prints for them.

Each :class:`Case` is a command line (files named relative to the working directory), the
files it reads, and the tool's standard output, standard error and exit status, written
out from the tool's code (anchored revision: master ``e57d1eff``) and its ``pyjailhouse``
modules: ``print`` calls, ``MemRegion.__str__``, ``flag_str``, the ``RuntimeError``
messages of ``config_parser.py``, argparse's usage errors on Python 3.11. Every case was
also run, side by side, through Jailhouse's own tool; the tests need none of its code.

The files are built here with ``struct`` (:mod:`test_config_vectors`), not with jhlab's
writer; only jhlab's own inmate cells are compiled from their TOML sources.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from test_config_vectors import (
    CONFIGS_DIR,
    LOAD,
    R,
    W,
    X,
    apic_demo,
    cell_desc,
    cell_file,
    console,
    e1000_demo,
    ioapic_demo,
    irqchip,
    ivshmem_demo,
    linux_x86_demo,
    mem,
    pci_demo,
    qemu_x86,
    same,
    smp_demo,
    tiny_demo,
)

import harness
from harness.hvmodel.config import load_source

INMATE_CELLS = Path(harness.__file__).resolve().parent.parent / "images" / "inmates" / "cells"
JHLAB_CELLS = ("apic-timer", "e1000e", "edu", "hello", "ivshmem", "ivshmem-2", "mmio-access",
               "pci-probe", "pio-loop", "rogue", "smp")
DEMOS: dict[str, Callable[[], bytes]] = {
    "apic-demo": apic_demo, "tiny-demo": tiny_demo, "smp-demo": smp_demo,
    "ioapic-demo": ioapic_demo, "pci-demo": pci_demo, "e1000-demo": e1000_demo,
    "ivshmem-demo": ivshmem_demo, "linux-x86-demo": linux_x86_demo,
}

SYS = "qemu-x86.cell"
PROG = "jailhouse config check"
USAGE = f"usage: {PROG} [-h] SYSCONFIG [CELLCONFIG ...]\n"
HELP = (
    USAGE
    + "\nCheck system and cell configurations.\n"
    "\npositional arguments:\n"
    "  SYSCONFIG   system configuration file\n"
    "  CELLCONFIG  cell configuration file\n"
    "\noptions:\n"
    "  -h, --help  show this help message and exit\n"
)

# The flags as flag_str() prints them.
F_R = "JAILHOUSE_MEM_READ"
F_RW = "JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE"
F_RWXL = ("JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE | JAILHOUSE_MEM_EXECUTE | "
          "JAILHOUSE_MEM_LOADABLE")
F_RWXD = ("JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE | JAILHOUSE_MEM_EXECUTE | "
          "JAILHOUSE_MEM_DMA")

T_INSIDE = "Overlapping memory regions inside cell"
T_HV = "Overlapping memory regions with hypervisor"
T_MMCONFIG = "Missing PCI MMCONFIG interceptions"
T_IOMMU = "Missing IOMMU interceptions"
T_X86 = "Missing resource interceptions for architecture x86"
T_ARM64 = "Missing resource interceptions for architecture arm64"


def none(title: str) -> str:
    """A check that found nothing: ``print(title, end='')``, then ``print(" None")``."""
    return f"{title}: None\n"


CLEAN = none(T_INSIDE) + none(T_HV) + none(T_MMCONFIG) + none(T_IOMMU) + none(T_X86)


def block(title: str, *findings: str) -> str:
    """A check with findings: each after a blank line, then ``print("\\n")``."""
    return f"{title}:" + "".join(f"\n\n{text}" for text in findings) + "\n\n"


def dump(phys: int, virt: int, size: int, flags: str = "") -> str:
    """``str(MemRegion)``."""
    return (f"  phys_start: 0x{phys:016x}\n  virt_start: 0x{virt:016x}\n"
            f"  size:       0x{size:016x}\n  flags:      {flags}")


def finding(cell: str, index: int, region: str, what: str, other: str) -> str:
    """One finding: the cell's region, what it overlaps, the other region or resource."""
    return f"In cell '{cell}', region {index}\n{region}\n{what}\n{other}"


def header(*cells: str, root: str = f"QEMU-VM ({SYS})", arch: str = "x86") -> str:
    """``Reading configuration set:`` and the set (``NAME (FILE)`` each)."""
    lines = ["Reading configuration set:", f"  Architecture:  {arch}", f"  Root cell:     {root}"]
    lines += [f"  Non-root cell: {cell}" for cell in cells]
    return "\n".join(lines) + "\n"


READING = "Reading configuration set:\n"
QEMU_HEADER = header()

# --- building files -------------------------------------------------------------------------

ROOT = 356  # offset of the root cell descriptor in a system config
DESC = 132  # size of a cell descriptor


def patch(data: bytes, offset: int, raw: bytes) -> bytes:
    """``data`` with ``raw`` written at ``offset``."""
    return data[:offset] + raw + data[offset + len(raw):]


def _counts(data: bytes, cell: int) -> tuple[int, ...]:
    """cpu_set_size and the seven counts of the descriptor at ``cell``."""
    return struct.unpack_from("<8I", data, cell + 48)


def with_regions(data: bytes, *regions: bytes, cell: int = 0) -> bytes:
    """The config with memory regions appended to the cell at offset ``cell``."""
    set_size, num_mem, *_ = _counts(data, cell)
    end = cell + DESC + set_size + 32 * num_mem
    data = patch(data, cell + 52, struct.pack("<I", num_mem + len(regions)))
    return data[:end] + b"".join(regions) + data[end:]


def with_irqchip(data: bytes, chip: bytes, *, cell: int = 0) -> bytes:
    """The config with an irqchip appended to the cell at offset ``cell``."""
    set_size, num_mem, num_caches, num_chips, *_ = _counts(data, cell)
    end = cell + DESC + set_size + 32 * num_mem + 12 * num_caches + 32 * num_chips
    data = patch(data, cell + 60, struct.pack("<I", num_chips + 1))
    return data[:end] + chip + data[end:]


def with_name(data: bytes, name: bytes, *, cell: int = 0) -> bytes:
    """The config with the 32-byte name field of the cell at ``cell`` replaced."""
    return patch(data, cell + 8, name.ljust(32, b"\0"))


def iommu_slot(slot: int, kind: int, base: int, size: int) -> Callable[[bytes], bytes]:
    """A patch writing IOMMU slot ``slot`` of a system config."""
    return lambda data: patch(data, 88 + 28 * slot, struct.pack("<IQI12s", kind, base, size,
                                                                bytes(12)))


def qemu(*patches: Callable[[bytes], bytes]) -> bytes:
    """qemu-x86.cell with patches applied in order."""
    data = qemu_x86()
    for change in patches:
        data = change(data)
    return data


def compiled(path: Path) -> bytes:
    """A TOML source compiled by jhlab (jhlab's own cells have no hand-built vector)."""
    return load_source(path).to_bytes()


def arm64_system(gic_version: int) -> bytes:
    """An arm64 system config: GIC at 0x8000000.., root RAM over all of it, no IOMMU,
    no MMCONFIG, no hypervisor memory."""
    head = b"JHSYS" + struct.pack("<BHI", 2, 14, 0) + mem(0, 0, 0, 0) + console()
    head += struct.pack("<QBBH", 0, 0, 0, 0) + bytes(28) * 8
    head += struct.pack("<BB2xQQQQQ", 25, gic_version, 0x8000000, 0x8010000, 0x8030000,
                        0x8040000, 0x80A0000)
    root = cell_desc(signature=bytes(5), arch=2, revision=0, name=b"arm", flags=0,
                     cpu_set_size=8, counts=(1, 0, 0, 0, 0, 0, 0), con=console())
    return head + root + struct.pack("<Q", 0xF) + same(0x8000000, 0x100000, R | W)


def arm64_cell() -> bytes:
    """An arm64 cell config."""
    desc = cell_desc(signature=b"JHCLL", arch=2, revision=14, name=b"arm-inmate", flags=0,
                     cpu_set_size=8, counts=(1, 0, 0, 0, 0, 0, 0), con=console())
    return desc + struct.pack("<Q", 0x2) + same(0x9000000, 0x10000, R | W | X | LOAD)


# --- cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One command line of ``jailhouse config check`` and the tool's answer.

    :param id: test id
    :param args: the arguments
    :param files: builds the files the arguments name (``dir/name`` makes ``dir``)
    :param stdout: the tool's standard output
    :param stderr: its standard error
    :param status: its exit status
    :param stdin: bytes on standard input
    :param uncaught: the tool ends with a traceback: ``stderr`` is its last line
    :param jailhouse_only: a usage, stdin or TOML case, where ``jhlab config check`` (its
        own options and file reading) does not answer the same
    """

    id: str
    args: tuple[str, ...]
    files: Callable[[], dict[str, bytes]]
    stdout: str
    stderr: str = ""
    status: int = 0
    stdin: bytes = b""
    uncaught: bool = False
    jailhouse_only: bool = False


def _sys_and(**cells: Callable[[], bytes]) -> Callable[[], dict[str, bytes]]:
    def build() -> dict[str, bytes]:
        files = {SYS: qemu_x86()}
        files.update({name: make() for name, make in cells.items()})
        return files
    return build


def _set_case(case_id: str, cells: dict[str, Callable[[], bytes]]) -> Case:
    """A clean set: qemu-x86 and the given cells (file NAME.cell, cell name NAME)."""
    return Case(
        id=case_id, args=(SYS, *(f"{name}.cell" for name in cells)),
        files=_sys_and(**{f"{name}.cell": make for name, make in cells.items()}),
        stdout=header(*(f"{name} ({name}.cell)" for name in cells)) + CLEAN,
    )


def _inmate(name: str) -> Callable[[], bytes]:
    return lambda: compiled(INMATE_CELLS / f"{name}.toml")


APIC = f"apic-demo ({'{}'})"
APIC_RAM = dump(0x3EF00000, 0, 0x100000, F_RWXL)
HV = dump(0x3A000000, 0, 0x600000)
WIDE_FLAGS = R | W | 0x200 | 0x40000 | 1 << 40


def _clean_sets() -> list[Case]:
    reference = ("apic-demo", "ivshmem-demo", "linux-x86-demo", "e1000-demo")
    cases = [
        _set_case("system-alone", {}),
        # Reference §1.15: the demo set Jailhouse's own documentation runs together.
        _set_case("reference-set", {name: DEMOS[name] for name in reference}),
        # Cells sharing RAM (tiny/smp/pci/ioapic/e1000 at 0x3ee00000) and CPUs: the tool
        # does not look between non-root cells, so this passes (exit 0).
        _set_case("all-demos", dict(DEMOS)),
        _set_case("jhlab-cells", {name: _inmate(name) for name in JHLAB_CELLS}),
    ]
    cases += [_set_case(f"demo-{name}", {name: make}) for name, make in DEMOS.items()]
    cases += [_set_case(f"jhlab-{name}", {name: _inmate(name)}) for name in JHLAB_CELLS]
    return cases


def _finding_cases() -> list[Case]:
    both = mem(0x3EF80000, 0x80000, 0x1000, R | W)
    virt_only, phys_only = mem(0x3E000000, 0, 0x1000, R | W), mem(0x3EF00000, 0x200000, 0x2000, R)
    on_hv = mem(0x3A100000, 0x200000, 0x1000, R | W)
    hv_finding = finding("apic-demo", 2, dump(0x3A100000, 0x200000, 0x1000, F_RW),
                         "overlaps with hypervisor memory region", HV)
    chips = mem(0xFEC00000, 0x200000, 0x2000, WIDE_FLAGS)
    wide = "JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE | 0x200 | JAILHOUSE_MEM_IO_32 | 0x10000000000"
    return [
        Case(
            id="overlap-physically-and-virtually", args=(SYS, "a.cell"),
            files=_sys_and(**{"a.cell": lambda: with_regions(apic_demo(), both)}),
            stdout=header(APIC.format("a.cell")) + block(T_INSIDE, finding(
                "apic-demo", 0, APIC_RAM, "physically and virtually overlaps with region 2",
                dump(0x3EF80000, 0x80000, 0x1000, F_RW)))
            + none(T_HV) + none(T_MMCONFIG) + none(T_IOMMU) + none(T_X86),
            status=1,
        ),
        Case(
            id="overlap-kinds-root-first", args=("sys.cell", "a.cell"),
            files=lambda: {
                "sys.cell": with_regions(qemu_x86(), same(0x1000, 0x1000, R), cell=ROOT),
                "a.cell": with_regions(apic_demo(), virt_only, phys_only),
            },
            stdout=header(APIC.format("a.cell"), root="QEMU-VM (sys.cell)") + block(
                T_INSIDE,
                finding("QEMU-VM", 17, dump(0, 0, 0x3A000000, F_RWXD),
                        "physically and virtually overlaps with region 31",
                        dump(0x1000, 0x1000, 0x1000, F_R)),
                finding("apic-demo", 0, APIC_RAM, "virtually overlaps with region 2",
                        dump(0x3E000000, 0, 0x1000, F_RW)),
                finding("apic-demo", 0, APIC_RAM, "physically overlaps with region 3",
                        dump(0x3EF00000, 0x200000, 0x2000, F_R)),
            ) + none(T_HV) + none(T_MMCONFIG) + none(T_IOMMU) + none(T_X86),
            status=1,
        ),
        Case(
            # The MMCONFIG check inherits the hypervisor check's "found": an empty block.
            id="hypervisor-overlap-and-mmconfig-quirk", args=(SYS, "a.cell"),
            files=_sys_and(**{"a.cell": lambda: with_regions(apic_demo(), on_hv)}),
            stdout=header(APIC.format("a.cell")) + none(T_INSIDE) + block(T_HV, hv_finding)
            + f"{T_MMCONFIG}:\n\n" + none(T_IOMMU) + none(T_X86),
            status=1,
        ),
        Case(
            id="hypervisor-overlap-without-mmconfig", args=("sys.cell", "a.cell"),
            files=lambda: {"sys.cell": patch(qemu_x86(), 76, bytes(8)),
                           "a.cell": with_regions(apic_demo(), on_hv)},
            stdout=header(APIC.format("a.cell"), root="QEMU-VM (sys.cell)") + none(T_INSIDE)
            + block(T_HV, hv_finding) + none(T_IOMMU) + none(T_X86),
            status=1,
        ),
        Case(
            id="mmconfig-mapped", args=(SYS, "a.cell"),
            files=_sys_and(**{"a.cell": lambda: with_regions(
                apic_demo(), mem(0xB0100000, 0x200000, 0x1000, R | W))}),
            stdout=header(APIC.format("a.cell")) + none(T_INSIDE) + none(T_HV) + block(
                T_MMCONFIG, finding("apic-demo", 2, dump(0xB0100000, 0x200000, 0x1000, F_RW),
                                    "overlaps with MMCONFIG",
                                    dump(0xB0000000, 0xB0000000, 0x10000000)))
            + none(T_IOMMU) + none(T_X86),
            status=1,
        ),
        Case(
            # Two units (VT-d and an AMD one): one finding per unit, as "IOMMU" each.
            id="iommu-mapped", args=("sys.cell", "a.cell"),
            files=lambda: {
                "sys.cell": qemu(iommu_slot(1, 1, 0xFED91000, 0x1000)),
                "a.cell": with_regions(apic_demo(), mem(0xFED90000, 0x200000, 0x2000, R | W)),
            },
            stdout=header(APIC.format("a.cell"), root="QEMU-VM (sys.cell)") + none(T_INSIDE)
            + none(T_HV) + none(T_MMCONFIG) + block(
                T_IOMMU,
                finding("apic-demo", 2, dump(0xFED90000, 0x200000, 0x2000, F_RW),
                        "overlaps with IOMMU", dump(0xFED90000, 0xFED90000, 0x1000)),
                finding("apic-demo", 2, dump(0xFED90000, 0x200000, 0x2000, F_RW),
                        "overlaps with IOMMU", dump(0xFED91000, 0xFED91000, 0x1000)),
            ) + none(T_X86),
            status=1,
        ),
        Case(
            # The root's irqchips (two here) are IOAPIC pages; a region without flags and
            # one with flag bits pyjailhouse has no name for.
            id="xapic-and-ioapic-mapped", args=("sys.cell", "a.cell"),
            files=lambda: {
                "sys.cell": with_irqchip(qemu_x86(), irqchip(0xFEC01000, 0xFF01, 1), cell=ROOT),
                "a.cell": with_regions(apic_demo(), chips, mem(0xFEE00000, 0x300000, 0x1000, 0)),
            },
            stdout=header(APIC.format("a.cell"), root="QEMU-VM (sys.cell)") + none(T_INSIDE)
            + none(T_HV) + none(T_MMCONFIG) + none(T_IOMMU) + block(
                T_X86,
                finding("apic-demo", 2, dump(0xFEC00000, 0x200000, 0x2000, wide),
                        "overlaps with IOAPIC", dump(0xFEC00000, 0xFEC00000, 0x1000)),
                finding("apic-demo", 2, dump(0xFEC00000, 0x200000, 0x2000, wide),
                        "overlaps with IOAPIC", dump(0xFEC01000, 0xFEC01000, 0x1000)),
                finding("apic-demo", 3, dump(0xFEE00000, 0x300000, 0x1000),
                        "overlaps with xAPIC", dump(0xFEE00000, 0xFEE00000, 0x1000)),
            ),
            status=1,
        ),
        Case(
            id="root-maps-xapic", args=("sys.cell",),
            files=lambda: {"sys.cell": with_regions(qemu_x86(), same(0xFEE00000, 0x1000, R | W),
                                                    cell=ROOT)},
            stdout=header(root="QEMU-VM (sys.cell)") + none(T_INSIDE) + none(T_HV)
            + none(T_MMCONFIG) + none(T_IOMMU) + block(T_X86, finding(
                "QEMU-VM", 31, dump(0xFEE00000, 0xFEE00000, 0x1000, F_RW),
                "overlaps with xAPIC", dump(0xFEE00000, 0xFEE00000, 0x1000))),
            status=1,
        ),
        Case(
            # Zero-size regions overlap nothing, wherever they point.
            id="zero-size-regions", args=(SYS, "a.cell"),
            files=_sys_and(**{"a.cell": lambda: with_regions(
                apic_demo(), mem(0x3EF00000, 0, 0, R | W), same(0xFEE00000, 0, R | W),
                same(0x3A000000, 0, R))}),
            stdout=header(APIC.format("a.cell")) + CLEAN,
        ),
        Case(
            # Findings in several checks, of several cells: order and exit status.
            id="findings-everywhere", args=(SYS, "a.cell", "b.cell"),
            files=_sys_and(**{
                "a.cell": lambda: with_regions(apic_demo(), both, on_hv),
                "b.cell": lambda: with_regions(tiny_demo(), same(0xFED90000, 0x1000, R | W),
                                               same(0xFEC00000, 0x1000, R | W)),
            }),
            stdout=header(APIC.format("a.cell"), "tiny-demo (b.cell)") + block(
                T_INSIDE, finding("apic-demo", 0, APIC_RAM,
                                  "physically and virtually overlaps with region 2",
                                  dump(0x3EF80000, 0x80000, 0x1000, F_RW)))
            + block(T_HV, finding("apic-demo", 3, dump(0x3A100000, 0x200000, 0x1000, F_RW),
                                  "overlaps with hypervisor memory region", HV))
            + f"{T_MMCONFIG}:\n\n"
            + block(T_IOMMU, finding("tiny-demo", 2, dump(0xFED90000, 0xFED90000, 0x1000, F_RW),
                                     "overlaps with IOMMU", dump(0xFED90000, 0xFED90000, 0x1000)))
            + block(T_X86, finding("tiny-demo", 3, dump(0xFEC00000, 0xFEC00000, 0x1000, F_RW),
                                   "overlaps with IOAPIC", dump(0xFEC00000, 0xFEC00000, 0x1000))),
            status=1,
        ),
    ]


def _refused(case_id: str, args: tuple[str, ...], files: Callable[[], dict[str, bytes]],
             stdout: str, stderr: str, *, uncaught: bool = False) -> Case:
    """A config set the tool refuses to read (exit 1)."""
    return Case(id=case_id, args=args, files=files, stdout=stdout, stderr=stderr, status=1,
                uncaught=uncaught)


def _reading_cases() -> list[Case]:
    big_cpus = cell_desc(signature=b"JHCLL", arch=0, revision=14, name=b"big-cpus", flags=0,
                         cpu_set_size=0xFFFFFFFF, counts=(0,) * 7, con=console())
    big_cpus_pio = cell_desc(signature=b"JHCLL", arch=0, revision=14, name=b"big-cpus",
                             flags=0, cpu_set_size=0xFFFFFFFF, counts=(0, 0, 0, 1, 0, 0, 0),
                             con=console())
    return [
        _refused("empty-system", ("empty.cell",), lambda: {"empty.cell": b""}, READING,
                 "Not a root cell configuration: empty.cell\n"),
        _refused("cell-as-system", ("apic-demo.cell",), lambda: {"apic-demo.cell": apic_demo()},
                 READING, "Not a root cell configuration: apic-demo.cell\n"),
        _refused("system-revision", ("rev13.cell",),
                 lambda: {"rev13.cell": patch(qemu_x86(), 6, struct.pack("<H", 13))},
                 READING, "Configuration file revision mismatch: rev13.cell\n"),
        # A v0.12 config: "JHSYST" starts with "JHSYS", so its revision is what fails.
        _refused("system-revision-12", ("rev12.cell",),
                 lambda: {"rev12.cell": b"JHSYST" + struct.pack("<H", 12) + qemu_x86()[8:]},
                 READING, "Configuration file revision mismatch: rev12.cell\n"),
        _refused("system-architecture", ("arch3.cell",),
                 lambda: {"arch3.cell": patch(qemu_x86(), 5, b"\x03")}, READING,
                 "Configuration has unsupported architecture: arch3.cell\n"),
        _refused("root-cell-architecture", ("arch9.cell",),
                 lambda: {"arch9.cell": patch(qemu_x86(), ROOT + 5, b"\x09")}, READING,
                 "Configuration has unsupported architecture: arch9.cell\n"),
        _refused("unknown-iommu-type", ("iommu9.cell",),
                 lambda: {"iommu9.cell": qemu(iommu_slot(2, 9, 0xFED92000, 0x1000))}, READING,
                 "Unknown IOMMU type: 9: iommu9.cell\n"),
        _refused("system-cut-in-root-regions", ("cut.cell",),
                 lambda: {"cut.cell": qemu_x86()[:ROOT + DESC + 8 + 10 * 32 + 5]}, READING,
                 "Not a root cell configuration: cut.cell\n"),
        _refused("system-cut-in-header", ("cut.cell",), lambda: {"cut.cell": qemu_x86()[:200]},
                 READING, "Not a root cell configuration: cut.cell\n"),
        _refused("root-cell-name-not-utf8", ("sys.cell",),
                 lambda: {"sys.cell": with_name(qemu_x86(), b"\xffQEMU", cell=ROOT)}, READING,
                 "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0: "
                 "invalid start byte\n", uncaught=True),
        _refused("system-as-cell", (SYS, SYS), lambda: {SYS: qemu_x86()}, QEMU_HEADER,
                 f"Not a cell configuration: {SYS}\n"),
        _refused("empty-cell", (SYS, "empty.cell"), _sys_and(**{"empty.cell": lambda: b""}),
                 QEMU_HEADER, "Not a cell configuration: empty.cell\n"),
        _refused("cell-revision", (SYS, "rev13.cell"),
                 _sys_and(**{"rev13.cell": lambda: patch(apic_demo(), 6, struct.pack("<H", 13))}),
                 QEMU_HEADER, "Configuration file revision mismatch: rev13.cell\n"),
        _refused("cell-revision-12", (SYS, "rev12.cell"),
                 _sys_and(**{"rev12.cell": lambda: b"JHCELL" + struct.pack("<H", 12)
                             + apic_demo()[8:]}),
                 QEMU_HEADER, "Not a cell configuration: rev12.cell\n"),
        _refused("cell-architecture", (SYS, "arch3.cell"),
                 _sys_and(**{"arch3.cell": lambda: patch(apic_demo(), 5, b"\x03")}),
                 QEMU_HEADER, "Configuration has unsupported architecture: arch3.cell\n"),
        # Cells before the refused one are listed.
        _refused("cell-architecture-mismatch", (SYS, "apic-demo.cell", "arm.cell"),
                 _sys_and(**{"apic-demo.cell": apic_demo, "arm.cell": arm64_cell}),
                 header("apic-demo (apic-demo.cell)"),
                 "Cell architecture mismatch: arm64: arm.cell\n"),
        _refused("cell-cut-in-descriptor", (SYS, "cut.cell"),
                 _sys_and(**{"cut.cell": lambda: apic_demo()[:100]}), QEMU_HEADER,
                 "Not a cell configuration: cut.cell\n"),
        _refused("cell-cut-in-pio", (SYS, "cut.cell"),
                 _sys_and(**{"cut.cell": lambda: apic_demo()[:226]}), QEMU_HEADER,
                 "Not a cell configuration: cut.cell\n"),
        _refused("cell-name-not-utf8", (SYS, "apic-demo.cell", "bad.cell"),
                 _sys_and(**{"apic-demo.cell": apic_demo,
                             "bad.cell": lambda: with_name(apic_demo(), b"apic\xe9")}),
                 header("apic-demo (apic-demo.cell)"),
                 "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9 in position 4: "
                 "invalid continuation byte\n", uncaught=True),
        _refused("cpu-set-beyond-the-file-with-pio", (SYS, "cpus.cell"),
                 _sys_and(**{"cpus.cell": lambda: big_cpus_pio + bytes(8)}), QEMU_HEADER,
                 "Not a cell configuration: cpus.cell\n"),
        # What the tool does not read is not checked: a file cut inside the PCI devices,
        # bytes after the last array, a CPU set running past the end (nothing after it
        # read), the root cell's own architecture byte, a name without NUL or with bytes
        # after its NUL, any UTF-8.
        Case(id="system-cut-in-pci-devices", args=("cut.cell",),
             files=lambda: {"cut.cell": qemu_x86()[:1600]},
             stdout=header(root="QEMU-VM (cut.cell)") + CLEAN),
        Case(id="trailing-bytes", args=(SYS, "long.cell"),
             files=_sys_and(**{"long.cell": lambda: apic_demo() + b"\xff" * 7}),
             stdout=header(APIC.format("long.cell")) + CLEAN),
        Case(id="pci-devices-cut", args=(SYS, "cut.cell"),
             files=_sys_and(**{"cut.cell": lambda: pci_demo()[:260]}),
             stdout=header("pci-demo (cut.cell)") + CLEAN),
        Case(id="cpu-set-beyond-the-file", args=(SYS, "cpus.cell"),
             files=_sys_and(**{"cpus.cell": lambda: big_cpus + bytes(8)}),
             stdout=header("big-cpus (cpus.cell)") + CLEAN),
        Case(id="root-cell-architecture-not-compared", args=("sys.cell",),
             files=lambda: {"sys.cell": patch(qemu_x86(), ROOT + 5, b"\x02")},
             stdout=header(root="QEMU-VM (sys.cell)") + CLEAN),
        Case(id="names", args=(SYS, "long.cell", "nul.cell", "utf8.cell"),
             files=_sys_and(**{
                 "long.cell": lambda: with_name(apic_demo(), b"n" * 32),
                 "nul.cell": lambda: with_name(apic_demo(), b"\0\0demo\0junk"),
                 "utf8.cell": lambda: with_name(apic_demo(), "café-démo".encode()),
             }),
             stdout=header(f"{'n' * 32} (long.cell)", "demo\0junk (nul.cell)",
                           "café-démo (utf8.cell)") + CLEAN),
        Case(id="toml-source", args=("qemu-x86.toml",),
             files=lambda: {"qemu-x86.toml": (CONFIGS_DIR / "qemu-x86.toml").read_bytes()},
             stdout=READING, stderr="Not a root cell configuration: qemu-x86.toml\n", status=1,
             jailhouse_only=True),
    ]


def _usage_cases() -> list[Case]:
    def error(text: str) -> str:
        return f"{USAGE}{PROG}: error: {text}\n"

    return [
        # argparse (3.11) counts the "*" positional as required too when none are given.
        Case(id="no-arguments", args=(), files=dict, stdout="", status=2, jailhouse_only=True,
             stderr=error("the following arguments are required: SYSCONFIG, CELLCONFIG")),
        Case(id="help", args=("-h",), files=dict, stdout=HELP, jailhouse_only=True),
        Case(id="help-long-after-files", args=(SYS, "--help"), files=_sys_and(), stdout=HELP,
             jailhouse_only=True),
        Case(id="missing-system", args=("missing.cell",), files=dict, stdout="", status=2,
             jailhouse_only=True, stderr=error(
                 "argument SYSCONFIG: can't open 'missing.cell': [Errno 2] No such file or "
                 "directory: 'missing.cell'")),
        Case(id="missing-cell", args=(SYS, "apic-demo.cell", "nope.cell"),
             files=_sys_and(**{"apic-demo.cell": apic_demo}), stdout="", status=2,
             jailhouse_only=True, stderr=error(
                 "argument CELLCONFIG: can't open 'nope.cell': [Errno 2] No such file or "
                 "directory: 'nope.cell'")),
        Case(id="directory", args=("configs",), files=lambda: {"configs/x.cell": b""},
             stdout="", status=2, jailhouse_only=True, stderr=error(
                 "argument SYSCONFIG: can't open 'configs': [Errno 21] Is a directory: "
                 "'configs'")),
        Case(id="unknown-option", args=(SYS, "--jhlab"), files=_sys_and(), stdout="", status=2,
             jailhouse_only=True, stderr=error("unrecognized arguments: --jhlab")),
        Case(id="stdin", args=("-",), files=dict, stdin=qemu_x86(), jailhouse_only=True,
             stdout=header(root="QEMU-VM (<stdin>)") + CLEAN),
        # Standard input read twice: the second read is empty.
        Case(id="stdin-twice", args=("-", "-"), files=dict, stdin=qemu_x86(),
             jailhouse_only=True, stdout=header(root="QEMU-VM (<stdin>)"),
             stderr="Not a cell configuration: <stdin>\n", status=1),
    ]


def _arm_cases() -> list[Case]:
    ram = dump(0x8000000, 0x8000000, 0x100000, F_RW)
    arm_header = header(root="arm (arm.cell)", arch="arm64")

    def gic(name: str, base: int, size: int) -> str:
        return finding("arm", 0, ram, f"overlaps with {name}", dump(base, base, size))

    return [
        Case(id="arm64-gicv2", args=("arm.cell",), files=lambda: {"arm.cell": arm64_system(2)},
             stdout=arm_header + none(T_INSIDE) + none(T_HV) + block(
                 T_ARM64, gic("GICD", 0x8000000, 0x1000), gic("GICC", 0x8010000, 0x2000),
                 gic("GICH", 0x8030000, 0x2000), gic("GICV", 0x8040000, 0x2000)),
             status=1),
        Case(id="arm64-gicv3-with-cell", args=("arm.cell", "inmate.cell"),
             files=lambda: {"arm.cell": arm64_system(3), "inmate.cell": arm64_cell()},
             stdout=header("arm-inmate (inmate.cell)", root="arm (arm.cell)", arch="arm64")
             + none(T_INSIDE) + none(T_HV) + block(
                 T_ARM64, gic("GICD", 0x8000000, 0x10000), gic("GICR", 0x80A0000, 0x20000)),
             status=1),
        # An unknown GIC version raises after the title: no newline, a traceback, exit 1.
        Case(id="arm64-unknown-gic", args=("arm.cell",),
             files=lambda: {"arm.cell": arm64_system(4)},
             stdout=arm_header + none(T_INSIDE) + none(T_HV) + f"{T_ARM64}:",
             stderr="RuntimeError: Unknown GIC version: 4\n", status=1, uncaught=True),
    ]


CASES: list[Case] = _clean_sets() + _finding_cases() + _reading_cases() + _usage_cases() \
    + _arm_cases()

T_STARVATION = "Root cell CPU starvation"
T_CORES = "Overlapping cores between non-root cells"


def _cpus_cell(name: bytes, cpus: int, ram: int) -> Callable[[], bytes]:
    return lambda: cell_file(name, 0, cpus, [mem(ram, 0, 0x100000, R | W | X | LOAD)])


def _next_cases() -> list[Case]:
    reference = ("apic-demo", "ivshmem-demo", "linux-x86-demo", "e1000-demo")
    return [
        Case(id="next-system-alone", args=(SYS,), files=_sys_and(), stdout=QEMU_HEADER + CLEAN),
        Case(id="next-one-cell", args=(SYS, "apic-demo.cell"),
             files=_sys_and(**{"apic-demo.cell": apic_demo}),
             stdout=header(APIC.format("apic-demo.cell")) + CLEAN + none(T_STARVATION)),
        Case(id="next-reference-set", args=(SYS, *(f"{name}.cell" for name in reference)),
             files=_sys_and(**{f"{name}.cell": DEMOS[name] for name in reference}),
             stdout=header(*(f"{name} ({name}.cell)" for name in reference)) + CLEAN
             + none(T_STARVATION) + block(
                 T_CORES, "Cells 'apic-demo' and 'linux-x86-demo' share CPUs:\n3",
                 "Cells 'linux-x86-demo' and 'e1000-demo' share CPUs:\n2"),
             status=1),
        Case(id="next-root-starved", args=(SYS, "smp-demo.cell", "cpu0.cell"),
             files=_sys_and(**{"smp-demo.cell": smp_demo,
                               "cpu0.cell": _cpus_cell(b"cpu0", 0x1, 0x3E000000)}),
             stdout=header("smp-demo (smp-demo.cell)", "cpu0 (cpu0.cell)") + CLEAN
             + f"{T_STARVATION}:\n\nNo root cell CPUs left when all non-root cells are "
             "started\n\n" + none(T_CORES),
             status=1),
        # The shared CPUs as str() of a Python set prints them: {1, 8} as "8, 1".
        Case(id="next-set-order", args=(SYS, "a.cell", "b.cell"),
             files=_sys_and(**{"a.cell": _cpus_cell(b"a", 0x102, 0x3E000000),
                               "b.cell": _cpus_cell(b"b", 0x102, 0x3E100000)}),
             stdout=header("a (a.cell)", "b (b.cell)") + CLEAN + none(T_STARVATION)
             + block(T_CORES, "Cells 'a' and 'b' share CPUs:\n8, 1"),
             status=1),
        Case(id="next-cpu-set-beyond-the-file", args=(SYS, "cpus.cell"),
             files=_sys_and(**{"cpus.cell": lambda: cell_desc(
                 signature=b"JHCLL", arch=0, revision=14, name=b"big-cpus", flags=0,
                 cpu_set_size=0xFFFFFFFF, counts=(0,) * 7, con=console()) + bytes(8)}),
             stdout=QEMU_HEADER, stderr="Not a cell configuration: cpus.cell\n", status=1),
    ]


#: What Jailhouse's next branch prints (``jhlab config check --next``).
NEXT_CASES: list[Case] = _next_cases()


def materialize(case: Case, folder: Path) -> None:
    """Write the case's files into ``folder``."""
    for name, data in case.files().items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
