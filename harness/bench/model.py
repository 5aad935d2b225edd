"""Benchmark: cell create/destroy pairs per second of the pure hypervisor model.

Builds the default lab's hypervisor (qemu-x86, compiled from harness/configs/qemu-x86.toml)
on the bookkeeping oracle Arch (no event recording), stages apic-demo's config in root
memory once, then times CELL_CREATE + CELL_DESTROY hypercall pairs: everything the model
does for them (checks, units, CPU moves, mappings and page-table accounting, PIO bitmaps,
console lines with pool usage). Prints pairs/s as min/median/max over repeats.
Goal: at least 10 000 pairs/s.

Method: one warm-up batch, then ``--repeats`` batches of ``--pairs`` pairs, each batch
timed with time.perf_counter_ns; the figure of a batch is pairs / elapsed. The garbage
collector stays on. Timings are noisy on shared machines: compare figures from one run.

Run with ``jhlab bench model`` (or ``scripts/bench model``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

from harness.hvmodel.abi import Hypercall
from harness.hvmodel.arch.oracle import OracleArch
from harness.hvmodel.config import CellConfig, SystemConfig
from harness.hvmodel.config.toml import load_source
from harness.hvmodel.control import Hypervisor
from harness.recipes import CONFIGS

GOAL = 10_000.0


def bench(pairs: int = 2000, repeats: int = 7, cell: str = "apic-demo") -> dict[str, float]:
    """Time create/destroy pairs; figures in pairs per second.

    :param pairs: pairs per timed batch
    :param repeats: timed batches
    :param cell: demo cell config (name of a harness/configs/*.toml cell)
    :return: ``{"min": .., "median": .., "max": ..}``
    """
    system = load_source(CONFIGS / "qemu-x86.toml")
    config = load_source(CONFIGS / f"{cell}.toml")
    if not isinstance(system, SystemConfig) or not isinstance(config, CellConfig):
        raise SystemExit("qemu-x86.toml must be a system config and the cell a cell config")
    arch = OracleArch(record=False)
    hv = Hypervisor(system, arch)
    hv.enable(sorted(system.root_cell.cpus))
    address = arch.root_buffer_alloc(dataclasses.replace(config, id=1).to_bytes())
    hypercall = hv.hypercall
    create, destroy = Hypercall.CELL_CREATE, Hypercall.CELL_DESTROY

    def batch(count: int) -> float:
        start = time.perf_counter_ns()
        for _ in range(count):
            if hypercall(0, create, address) or hypercall(0, destroy, 1):
                raise SystemExit("create/destroy failed: " + hv.console.lines[-1])
        return count / ((time.perf_counter_ns() - start) / 1e9)

    batch(max(pairs // 10, 10))
    rates = [batch(pairs) for _ in range(repeats)]
    return {"min": min(rates), "median": statistics.median(rates), "max": max(rates)}


def main(argv: list[str] | None = None) -> int:
    """Print the figures; exit 1 when the median misses the goal."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="pairs per batch")
    parser.add_argument("--repeats", type=int, default=7, help="timed batches")
    parser.add_argument("--cell", default="apic-demo", help="cell config to create")
    args = parser.parse_args(argv)
    figures = bench(args.pairs, args.repeats, args.cell)
    print(
        f"model create+destroy ({args.cell}): pairs/s min {figures['min']:.0f} "
        f"median {figures['median']:.0f} max {figures['max']:.0f} "
        f"(goal >= {GOAL:.0f}; {args.repeats} x {args.pairs} pairs)"
    )
    return 0 if figures["median"] >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
