"""VFIO passthrough of QEMU's ``edu`` device in a live lab, through ``harness.hvmodel.arch.vfio``.

Each test sends a Python script to the lab's root cell (``python3 -`` in
``/opt/jhlab/lib``); the script claims ``01:01.0`` for ``vfio-pci``, drives the device
through VFIO, releases it in a ``finally`` block and prints one ``RESULT`` line of JSON,
which the test checks. A fixture checks afterwards, from a shell, that the device is back
as it was: no driver (or the one it had), no ``driver_override``, nothing new bound to
``vfio-pci``.

The edu device (QEMU ``hw/misc/edu.c``, ``docs/specs/edu.rst``): BAR0 is 1 MiB of 32-bit
registers (4- and 8-byte accesses only): 0x00 ID ``0x010000ed``, 0x04 liveness (reads the
inverse of the last write), 0x08 factorial, 0x20 status (bit 0 computing, bit 7 interrupt
when done), 0x24 interrupt status, 0x60 raise, 0x64 acknowledge; DMA 0x80 source, 0x88
destination, 0x90 count, 0x98 command (bit 0 start, bit 1 direction: **0 = RAM to the
device, 1 = device to RAM**, bit 2 interrupt 0x100 when done), its buffer at 0x40000 in
its own address space. Two traps: the DMA addresses are masked to 28 bits, and a DMA
range not *strictly* inside the 4 KiB buffer (QEMU 7.2's check is off by one: a full
4096-byte transfer fails) **aborts the whole QEMU** (``hw_error``), so the scripts check
every DMA before starting it and move at most 2 KiB.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from harness.hvmodel.arch.vfio.structs import DeviceFlags
from harness.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]

EDU = "0000:01:01.0"
EDU_SYSFS = f"/sys/bus/pci/devices/{EDU}"
EDU_ID = 0x010000ED
#: A page range of the lab's memmap= window (0x3a000000-0x3f200000) no shipped cell config uses.
CELL_RAM_PHYS = 0x3D000000
SCRIPT_TIMEOUT = 240.0

# Shared by every guest script: the device, the stub, deadlines and guarded edu DMA.
PRELUDE = r'''
import json, logging, time
logging.basicConfig(level=logging.INFO)
from harness.hvmodel.arch import vfio
from harness.hvmodel.arch.hostmem import PhysMapping, anonymous_memory

EDU = "01:01.0"
ID, LIVENESS, FACTORIAL, STATUS, IRQ_STATUS, IRQ_RAISE, IRQ_ACK = 0x00, 0x04, 0x08, 0x20, 0x24, 0x60, 0x64
DMA_SRC, DMA_DST, DMA_COUNT, DMA_CMD = 0x80, 0x88, 0x90, 0x98
STATUS_COMPUTING, STATUS_IRQ_FACT = 0x01, 0x80
DMA_START, DMA_TO_RAM, DMA_IRQ = 0x1, 0x2, 0x4
IRQ_FACT, IRQ_DMA = 0x1, 0x100
BUFFER, BUFFER_SIZE, DMA_MASK = 0x40000, 0x1000, (1 << 28) - 1
result = {}

def poll(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)

def ack(bar):
    status = bar.read_value(IRQ_STATUS, 4)
    bar.write_value(IRQ_ACK, 4, status)
    return status

def edu_dma(bar, event, ram, device, count, to_ram):
    """One DMA between IOVA ram and device offset device; True when its MSI came."""
    # edu aborts QEMU (hw_error) unless BUFFER <= device and device + count < BUFFER + BUFFER_SIZE
    if not (BUFFER <= device and device + count < BUFFER + BUFFER_SIZE and 0 < count):
        raise ValueError(f"edu DMA {device:#x}+{count:#x} would abort QEMU")
    if ram & ~DMA_MASK or (ram + count - 1) & ~DMA_MASK:
        raise ValueError(f"IOVA {ram:#x} beyond edu's 28-bit DMA mask")
    src, dst = (device, ram) if to_ram else (ram, device)
    bar.write_value(DMA_SRC, 4, src); bar.write_value(DMA_SRC + 4, 4, 0)
    bar.write_value(DMA_DST, 4, dst); bar.write_value(DMA_DST + 4, 4, 0)
    bar.write_value(DMA_COUNT, 4, count)
    bar.write_value(DMA_CMD, 4, DMA_START | (DMA_TO_RAM if to_ram else 0) | DMA_IRQ)
    poll(lambda: not bar.read_value(DMA_CMD, 4) & DMA_START, 10.0, "edu DMA completion")
    fired = event.wait(10.0)
    return bool(fired) and ack(bar) & IRQ_DMA == IRQ_DMA

stub = vfio.PciStub()
'''


def run_guest(lab: Lab, body: str, **params: Any) -> dict[str, Any]:
    """Run PRELUDE + ``body`` in the root cell (``params`` as its ``PARAMS`` dict); return
    its RESULT document."""
    script = (
        PRELUDE
        + f"PARAMS = json.loads({json.dumps(params)!r})\n"
        + body
        + '\nprint("RESULT " + json.dumps(result), flush=True)\n'
    )
    run = lab.run("cd /opt/jhlab/lib && python3 -", stdin=script, timeout=SCRIPT_TIMEOUT)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.status == 0 and lines, f"guest script failed ({run.status}):\n{run.stdout}\n{run.stderr}"
    doc: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return doc


def edu_state(lab: Lab) -> dict[str, str]:
    """Driver, override and what is bound to vfio-pci, seen from a shell."""
    command = (
        f"echo driver=$(basename $(readlink {EDU_SYSFS}/driver) 2>/dev/null); "
        f"echo override=$(cat {EDU_SYSFS}/driver_override); "
        "echo vfio=$(ls /sys/bus/pci/drivers/vfio-pci 2>/dev/null | grep : | tr '\\n' ' ')"
    )
    out = lab.run(command, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture
def edu(lab: Lab) -> Iterator[dict[str, str]]:
    """The edu device's state before the test; afterwards: restored, or forced back."""
    if lab.run(f"test -d {EDU_SYSFS}").status != 0:
        pytest.skip(f"the lab has no edu device at {EDU}")
    before = edu_state(lab)
    yield before
    after = edu_state(lab)
    if after != before:
        # Put it back however the test left it, then fail: leaking a claim is a bug.
        lab.run(
            f"[ -e {EDU_SYSFS}/driver ] && echo {EDU} > {EDU_SYSFS}/driver/unbind; "
            f"echo > {EDU_SYSFS}/driver_override",
            timeout=60,
        )
        pytest.fail(f"edu left changed: before {before}, after {after}")


def test_edu_through_vfio(lab: Lab, edu: dict[str, str]) -> None:
    """Claim edu, read its ID through the mmap'd BAR0, compute a factorial, take its MSIs
    through an eventfd, DMA both ways through IOVA-mapped memory (an anonymous mmap, and a
    cell's DMA region backed by /dev/mem at its virt_start), release it, see it in the root."""
    body = r"""
claim = stub.claim(EDU)
result["claim"] = {"group": claim.group, "original_driver": claim.original_driver,
                   "driver": stub.driver_of(EDU), "override": stub.override_of(EDU)}
try:
    with vfio.Container() as container:
        device = container.device(EDU, stub=stub)
        result["device_flags"] = int(device.info.flags)
        result["bar0"] = [device.region_info(vfio.PciRegion.BAR0).size,
                          vfio.RegionFlags.MMAP in device.region_info(vfio.PciRegion.BAR0).flags]
        result["config_ids"] = device.config_read(0, 4)
        result["msi_vectors"] = device.irqs.info(vfio.PciIrq.MSI).count
        bar = device.mmap_region(vfio.PciRegion.BAR0)
        result["id_mmap"] = bar.read_value(ID, 4)
        result["id_pread"] = device.read_value(vfio.PciRegion.BAR0, ID, 4)
        bar.write_value(LIVENESS, 4, 0x12345678)
        result["liveness"] = bar.read_value(LIVENESS, 4)
        try:
            device.reset()
            result["reset"] = "done"
        except vfio.VfioError as exc:
            result["reset"] = str(exc)

        device.set_bus_master(True)
        (event,) = device.irqs.enable_msi(1)
        bar.write_value(STATUS, 4, STATUS_IRQ_FACT)
        bar.write_value(FACTORIAL, 4, 10)
        result["factorial_msi"] = event.wait(10.0)
        poll(lambda: not bar.read_value(STATUS, 4) & STATUS_COMPUTING, 10.0, "factorial")
        result["factorial"] = bar.read_value(FACTORIAL, 4)
        result["factorial_irq_status"] = ack(bar)
        bar.write_value(STATUS, 4, 0)
        bar.write_value(IRQ_RAISE, 4, 0x40)
        result["raise_msi"] = event.wait(10.0)
        result["raise_irq_status"] = ack(bar)
        result["spurious"] = event.wait(0.2)

        pattern = bytes((i * 7 + 3) & 0xFF for i in range(0x800))
        memory = anonymous_memory(0x2000)
        mapping = container.dma_map(0x100000, memory)
        memory[0:0x800] = pattern
        result["anon_to_device_msi"] = edu_dma(bar, event, 0x100000, BUFFER, 0x800, to_ram=False)
        result["anon_to_ram_msi"] = edu_dma(bar, event, 0x101000, BUFFER, 0x800, to_ram=True)
        result["anon_equal"] = memory[0x1000:0x1800] == pattern
        result["anon_rest_untouched"] = memory[0x1800:0x2000] == bytes(0x800)
        result["unmapped"] = container.dma_unmap(mapping)
        memory.close()

        from harness.hvmodel.config import MemFlags, MemoryRegion
        rw, phys_start = int(MemFlags.READ | MemFlags.WRITE), PARAMS["phys"]
        ram = MemoryRegion(phys_start=phys_start, virt_start=0x0, size=0x10000, flags=rw | int(MemFlags.DMA))
        no_dma = MemoryRegion(phys_start=phys_start + 0x10000, virt_start=0x20000, size=0x1000, flags=rw)
        with PhysMapping(ram.phys_start, ram.size) as phys:
            maps = vfio.dma_map_regions(container, [ram, no_dma],
                                        lambda region: (phys.mmap, phys.offset))
            result["cell_maps"] = [[m.iova, m.size, m.read, m.write] for m in maps]
            phys.write(0x1000, pattern[::-1])
            phys.write(0x3000, bytes(0x800))
            result["cell_to_device_msi"] = edu_dma(bar, event, 0x1000, BUFFER + 0x100, 0x800, to_ram=False)
            result["cell_to_ram_msi"] = edu_dma(bar, event, 0x3000, BUFFER + 0x100, 0x800, to_ram=True)
            result["cell_equal"] = phys.read(0x3000, 0x800) == pattern[::-1]
            for m in maps:
                container.dma_unmap(m)
        device.irqs.disable(vfio.PciIrq.MSI)
        result["irqs_after_disable"] = sorted(device.irqs.enabled)
finally:
    stub.release(EDU)
result["released"] = {"driver": stub.driver_of(EDU), "override": stub.override_of(EDU)}

import ctypes, mmap, os
fd = os.open("/sys/bus/pci/devices/0000:01:01.0/resource0", os.O_RDWR | os.O_SYNC)
try:
    window = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    cell = ctypes.c_uint32.from_buffer(window, 0)
    result["root_id"] = cell.value
    del cell
    window.close()
finally:
    os.close(fd)
"""
    # Linux shows reset_method only for a device it can reset (FLR, PM, bus, ...): the
    # root's own account of what VFIO_DEVICE_RESET must find.
    methods = lab.run(f"cat {EDU_SYSFS}/reset_method 2>/dev/null", timeout=60).stdout.split()
    doc = run_guest(lab, body, phys=CELL_RAM_PHYS)

    assert doc["claim"]["driver"] == "vfio-pci" and doc["claim"]["override"] == "vfio-pci"
    assert doc["claim"]["original_driver"] == (edu["driver"] or None)
    assert doc["bar0"] == [0x100000, True]
    assert doc["config_ids"] == 0x11E81234
    assert doc["msi_vectors"] == 1
    assert doc["id_mmap"] == doc["id_pread"] == EDU_ID
    assert doc["liveness"] == 0x12345678 ^ 0xFFFFFFFF
    # VFIO offers a reset (VFIO_DEVICE_FLAGS_RESET) exactly when Linux has a method for it
    assert bool(doc["device_flags"] & DeviceFlags.RESET) == bool(methods), (doc, methods)
    if methods:
        assert doc["reset"] == "done"
    else:
        assert "no reset method" in doc["reset"]

    assert doc["factorial_msi"] == 1
    assert doc["factorial"] == 3628800
    assert doc["factorial_irq_status"] == 0x1
    assert doc["raise_msi"] == 1 and doc["raise_irq_status"] == 0x40
    assert doc["spurious"] == 0

    assert doc["anon_to_device_msi"] and doc["anon_to_ram_msi"]
    assert doc["anon_equal"] and doc["anon_rest_untouched"]
    assert doc["unmapped"] == 0x2000
    assert doc["cell_maps"] == [[0x0, 0x10000, True, True]]  # the non-DMA region is not mapped
    assert doc["cell_to_device_msi"] and doc["cell_to_ram_msi"] and doc["cell_equal"]
    assert doc["irqs_after_disable"] == []

    assert doc["released"] == {"driver": None, "override": None}  # Jailhouse leaves it unbound
    assert doc["root_id"] == EDU_ID  # the root reaches the device again (sysfs resource0)


@pytest.mark.kvm
@pytest.mark.parametrize("irqchip", ["split", "full"])
def test_edu_msi_reaches_a_kvm_vm(lab: Lab, edu: dict[str, str], irqchip: str) -> None:
    """An edu MSI routed to a KVM VM (GSI route + irqfd) lands in the vCPU's local APIC
    IRR with the vector the route names, without passing through user space; with the
    split irqchip the executor uses, and with the full one (KVM's default routes kept)."""
    body = r"""
import os
from harness.hvmodel.arch.kvm import Cap, Kvm, Vm
if not os.path.exists("/dev/kvm"):
    result["skip"] = "no /dev/kvm in the lab"
else:
    claim = stub.claim(EDU)
    try:
        with vfio.Container() as container, Kvm() as kvm, Vm(kvm) as vm:
            device = container.device(EDU, stub=stub)
            bar = device.mmap_region(vfio.PciRegion.BAR0)
            device.set_bus_master(True)
            if PARAMS["irqchip"] == "split":
                vm.enable_cap(Cap.SPLIT_IRQCHIP, 24)
            else:
                vm.create_irqchip()
            vcpu = vm.create_vcpu(0)
            page = vcpu.get_lapic()
            page[0xF0:0xF4] = (0x1FF).to_bytes(4, "little")  # APIC software-enabled
            vcpu.set_lapic(page)
            (event,) = device.irqs.enable_msi(1)
            router = vfio.MsiRouter(vm)
            vector = router.route(event, 0xFEE00000, 0x41)  # physical, APIC ID 0, vector 0x41
            result["gsi"] = vector.gsi

            def irr(vec):
                regs = vcpu.get_lapic()
                word = int.from_bytes(regs[0x200 + (vec // 32) * 0x10:][:4], "little")
                return word >> (vec % 32) & 1

            result["irr_before"] = irr(0x41)
            bar.write_value(IRQ_RAISE, 4, 0x2)
            poll(lambda: irr(0x41) == 1, 10.0, "vector 0x41 in the IRR")
            result["irr_after"] = irr(0x41)
            result["eventfd_left"] = event.read()  # KVM consumed it
            ack(bar)
            router.update(vector, 0xFEE00000, 0x42)
            bar.write_value(IRQ_RAISE, 4, 0x2)
            poll(lambda: irr(0x42) == 1, 10.0, "vector 0x42 in the IRR")
            result["irr_updated"] = irr(0x42)
            ack(bar)
            router.close()
            device.irqs.disable(vfio.PciIrq.MSI)
    finally:
        stub.release(EDU)
"""
    doc = run_guest(lab, body, irqchip=irqchip)
    if "skip" in doc:
        pytest.skip(doc["skip"])
    assert doc["gsi"] == 24  # above the split irqchip's IOAPIC pins
    assert doc["irr_before"] == 0
    assert doc["irr_after"] == 1
    assert doc["eventfd_left"] == 0
    assert doc["irr_updated"] == 1


#: A PCI driver in the lab's kernel that binds edu harmlessly through driver_override
#: (it reads one byte of BAR0 and writes only at a kernel panic, with no events enabled).
STAND_IN_DRIVER = "pvpanic-pci"


def test_release_rebinds_the_original_driver(lab: Lab, edu: dict[str, str]) -> None:
    """With a root driver on edu (a stand-in: the lab has no edu driver), claim takes it
    over, release refuses while the group is open, and release(rebind=True) gives the
    device back to that driver with its driver_override as it was."""
    if edu["driver"]:
        pytest.skip(f"edu is bound to {edu['driver']} in this lab; the test needs it unbound")
    if lab.run(f"test -d /sys/bus/pci/drivers/{STAND_IN_DRIVER}").status != 0:
        pytest.skip(f"the lab's kernel has no {STAND_IN_DRIVER} driver")
    body = r"""
import os
DEV = "/sys/bus/pci/devices/0000:01:01.0"
def write(path, value):
    with open(path, "w") as file:
        file.write(value)
write(DEV + "/driver_override", PARAMS["stand_in"])
write("/sys/bus/pci/drivers_probe", "0000:01:01.0")
result["root_driver"] = stub.driver_of(EDU)
try:
    claim = stub.claim(EDU)
    result["claim"] = [claim.original_driver, claim.original_override, stub.driver_of(EDU)]
    with vfio.Container() as container:
        device = container.device(EDU, stub=stub)
        result["id"] = device.mmap_region(vfio.PciRegion.BAR0).read_value(ID, 4)
        try:
            stub.release(EDU)
            result["busy"] = "released while open"
        except vfio.VfioError as exc:
            result["busy"] = str(exc)
    stub.release(EDU, rebind=True)
    result["after"] = [stub.driver_of(EDU), stub.override_of(EDU)]
finally:
    if EDU in [a.short for a in stub.claims]:
        stub.release(EDU)
    if stub.driver_of(EDU):
        write(DEV + "/driver/unbind", "0000:01:01.0")
    write(DEV + "/driver_override", "\n")
result["final"] = [stub.driver_of(EDU), stub.override_of(EDU)]
"""
    doc = run_guest(lab, body, stand_in=STAND_IN_DRIVER)
    assert doc["root_driver"] == STAND_IN_DRIVER
    assert doc["claim"] == [STAND_IN_DRIVER, STAND_IN_DRIVER, "vfio-pci"]
    assert doc["id"] == EDU_ID
    assert doc["busy"].startswith("01:01.0: release: /dev/vfio/")
    assert "is still open by pid" in doc["busy"]
    assert doc["after"] == [STAND_IN_DRIVER, STAND_IN_DRIVER]
    assert doc["final"] == [None, None]
