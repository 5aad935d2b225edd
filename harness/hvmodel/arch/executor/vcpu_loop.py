"""The executor's vCPU loop: one thread per cell CPU running its KVM vCPU; models
``arch_park_cpu``, ``arch_reset_cpu``, ``arch_suspend_cpu`` and ``arch_resume_cpu`` of
``hypervisor/arch/x86/control.c`` and the guest-entry loop of ``vmx.c`` / ``svm.c``.

Each thread is pinned to its CPU with ``sched_setaffinity`` (when asked). A CPU is
*parked* when its thread does not enter KVM_RUN (Jailhouse: ``cli; hlt`` in the parking
page), *suspended* while a management operation holds it, *running* after
:meth:`VcpuThreads.reset`, which its own thread performs: Jailhouse's start state
(:func:`~harness.hvmodel.arch.vcpu.jailhouse_vcpu_reset`: real mode at
``cpu_reset_address``, x2APIC), every CPU of the cell released at once. Orders are fields
of the :class:`~.cells.CellCpu` under the table's condition, followed by a kick
(:meth:`~harness.hvmodel.arch.kvm.Vcpu.kick`) that makes KVM_RUN return. HLT blocks in
KVM (in-kernel local APIC).

**Exits and management operations.** Each exit goes to the
:class:`~.exits.ExitDispatcher`, unless the CPU was parked, reset or stopped after the
exit was taken: such an exit belongs to the old run and is dropped (a reset completes its
instruction first). When a cell approved a shutdown request (or timed out), the model is
about to suspend it: :meth:`VcpuThreads.quiesce` first lets every exit of that cell
already on its way into the model finish, then holds new ones until the CPUs are parked
or reset, so no exit of the old run reaches the model after the CPUs changed hands.
Limit: for a PASSIVE_COMMREG cell there is no message, so an exit that is already waiting
for the model's lock when a management operation takes the cell's CPU is delivered after
it, and the model judges it against the CPU's new owner. Closing that needs the model:
exit entry points that name the cell the exit came from, or that ignore exits of parked
and suspended CPUs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ..kvm import IntrExit, KvmError
from ..portio import IoBitmapLoop
from ..vcpu import jailhouse_vcpu_reset
from .cells import CellCpu, CellTable, CellVm, CpuState
from .exits import ExitDispatcher

if TYPE_CHECKING:
    from ..exitstats import VcpuExitTrace

__all__ = ["VcpuThreads"]

LOG = logging.getLogger(__name__)

#: seconds a quiesce waits for exits already on their way into the model
DRAIN_TIMEOUT: Final = 2.0


class VcpuThreads:
    """The threads of the cells' CPUs and the orders they carry out (module docstring).

    Lifecycle per cell: :meth:`add` (threads start, CPUs parked) -> :meth:`reset` /
    :meth:`park` / :meth:`suspend` / :meth:`resume` any number of times -> :meth:`remove`
    (threads told to stop) -> :meth:`join`.

    :param table: the cells and CPUs; its condition guards the orders
    :param exits: where the threads deliver exits
    :param pin: pin each thread to its CPU
    :param trace: opens the exit trace of the calling vCPU thread (None: no trace)
    """

    def __init__(
        self,
        table: CellTable,
        exits: ExitDispatcher,
        *,
        pin: bool,
        trace: Callable[[], VcpuExitTrace | None] = lambda: None,
    ) -> None:
        self.table = table
        self.exits = exits
        self.pin = pin
        self._trace = trace

    # --- cells -------------------------------------------------------------------------

    def add(self, cell: CellVm) -> None:
        """Enter the cell in the table and start one parked thread per CPU."""
        with self.table.cond:
            self.table.cells[cell.id] = cell
            self.table.cpus.update(cell.cpus)
        for cpu in cell.cpus.values():
            cpu.thread = threading.Thread(
                target=self._main, args=(cpu,), name=f"cell{cell.id}-cpu{cpu.id}", daemon=True
            )
            cpu.thread.start()

    def remove(self, cell_id: int) -> tuple[CellVm, list[CellCpu]] | None:
        """Take the cell out of the table and tell its threads to stop.

        :return: the cell and its CPUs whose threads are inside a call into the model now
            (they cannot end while the caller holds the model's lock); None for a cell
            not in the table
        """
        cond = self.table.cond
        with cond:
            cell = self.table.cells.pop(cell_id, None)
            if cell is None:
                return None
            for cpu in cell.cpus.values():
                cpu.state = CpuState.STOPPED
                cpu.generation += 1
                self.table.cpus.pop(cpu.id, None)
            cell.gate_closed = False
            busy = [cpu for cpu in cell.cpus.values() if cpu.in_model]
            cond.notify_all()
        return cell, busy

    @staticmethod
    def join(cell: CellVm, busy: list[CellCpu], timeout: float) -> list[CellCpu]:
        """Kick the removed cell's threads out of the guest and wait for them to end.

        :param busy: threads not to wait for (inside the model, from :meth:`remove`)
        :return: ``busy`` plus the threads still alive after ``timeout`` seconds
        """
        for cpu in cell.cpus.values():
            with contextlib.suppress(KvmError):
                cpu.vcpu.kick()
        deadline = time.monotonic() + timeout
        still = list(busy)
        for cpu in cell.cpus.values():
            if cpu in busy or cpu.thread is None:
                continue
            cpu.thread.join(max(deadline - time.monotonic(), 0.0))
            if cpu.thread.is_alive():
                still.append(cpu)
        return still

    # --- orders ------------------------------------------------------------------------

    def park(self, cpu: int) -> None:
        """The CPU's thread stops entering the guest until :meth:`reset` (``arch_park_cpu``)."""
        with self.table.cond:
            data = self.table.cpus.get(cpu)
            if data is None:
                return
            data.state = CpuState.PARKED
            data.pending_reset = None
            data.suspended = False
            data.generation += 1
            self.table.cond.notify_all()
        self._kick(data)

    def reset(self, cpu: int, reset_address: int) -> None:
        """The CPU's thread puts its vCPU in Jailhouse's start state and runs it
        (``arch_reset_cpu``)."""
        with self.table.cond:
            data = self.table.cpus.get(cpu)
            if data is None:
                return
            data.state = CpuState.RUNNING
            data.pending_reset = reset_address
            data.suspended = False
            data.generation += 1
            data.cell.gate_closed = False
            self.table.cond.notify_all()
        self._kick(data)

    def suspend(self, cpu: int) -> None:
        """Hold the CPU: no guest code, no exit delivered, until :meth:`resume`
        (``arch_suspend_cpu``)."""
        with self.table.cond:
            data = self.table.cpus.get(cpu)
            if data is None:
                return
            data.suspended = True
        self._kick(data)

    def resume(self, cpu: int) -> None:
        """Let a suspended CPU go on (``arch_resume_cpu``)."""
        with self.table.cond:
            data = self.table.cpus.get(cpu)
            if data is None:
                return
            data.suspended = False
            data.cell.gate_closed = False
            self.table.cond.notify_all()

    def quiesce(self, cell_id: int) -> None:
        """Hold new exits of the cell and wait for those already in the model to end.

        Called without the model's lock, so exits on their way in can finish; after this,
        none reaches the model until the CPUs are parked, reset or resumed.
        """
        deadline = time.monotonic() + DRAIN_TIMEOUT
        cond = self.table.cond
        with cond:
            cell = self.table.cells.get(cell_id)
            if cell is None:
                return
            cell.gate_closed = True
            cond.notify_all()
            while any(cpu.in_model for cpu in cell.cpus.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    LOG.warning("cell %d: exits still in the model after %.1f s", cell_id, DRAIN_TIMEOUT)
                    break
                cond.wait(remaining)

    def park_locally(self, cpu: CellCpu, text: str) -> None:
        """Park a CPU the model could not be told about (executor-side failure)."""
        LOG.error("CPU %d: FATAL: %s", cpu.id, text)
        with self.table.cond:
            if cpu.state is CpuState.RUNNING:
                cpu.state = CpuState.PARKED
                cpu.generation += 1
                self.table.cond.notify_all()

    @staticmethod
    def _kick(cpu: CellCpu) -> None:
        try:
            cpu.vcpu.kick()
        except KvmError as exc:
            LOG.warning("CPU %d: %s", cpu.id, exc)

    # --- the thread ----------------------------------------------------------------------

    def _main(self, cpu: CellCpu) -> None:
        if self.pin:
            try:
                os.sched_setaffinity(0, {cpu.id})
                cpu.affinity = frozenset(os.sched_getaffinity(0))
            except OSError as exc:
                LOG.warning("CPU %d: cannot pin the vCPU thread: %s", cpu.id, exc)
        trace = self._trace()  # this thread's exits in KVM, before its first run
        with self.table.cond:
            cpu.trace = trace
        try:
            self._loop(cpu)
        except Exception as exc:  # the thread must not die silently
            LOG.exception("CPU %d: executor error", cpu.id)
            self.park_locally(cpu, f"executor error: {exc}")
        finally:
            with self.table.cond:
                cpu.in_model = False
                cpu.ended = True
                cpu.trace = None
                self.table.cond.notify_all()
            if trace is not None:
                trace.close()

    def _loop(self, cpu: CellCpu) -> None:
        vcpu = cpu.vcpu
        cond = self.table.cond
        io_loop: IoBitmapLoop | None = None  # this run's (None: every exit comes here)
        while True:
            with cond:
                while cpu.state is not CpuState.STOPPED and not cpu.runnable():
                    cond.wait()
                if cpu.state is CpuState.STOPPED:
                    return
                reset, cpu.pending_reset = cpu.pending_reset, None
                generation = cpu.generation
            try:
                if reset is not None:
                    jailhouse_vcpu_reset(vcpu, reset)
                    io_loop = self.exits.io_bitmap_loop(cpu)
                    with cond:
                        if cpu.io_loop is not None:
                            cpu.exits["IoExit"] += cpu.io_loop.served
                            cpu.native_io += cpu.io_loop.served
                        cpu.io_loop = io_loop
                exit_ = vcpu.run() if io_loop is None else vcpu.run_native(io_loop)
            except KvmError as exc:
                text = f"executor: {exc}"
                self.exits.report_fatal(cpu, text)
                # The model parked it (or could not): either way the CPU does not run on.
                self.park_locally(cpu, text)
                continue
            if isinstance(exit_, IntrExit):
                continue
            with cond:
                while cpu.generation == generation and cpu.state is CpuState.RUNNING and cpu.held():
                    cond.wait()
                if cpu.generation != generation or cpu.state is not CpuState.RUNNING:
                    # Parked, reset or stopped meanwhile: the exit belongs to the old run.
                    # A reset flushes the half-done instruction (complete_pending).
                    cpu.dropped += 1
                    continue
                cpu.in_model = True
            try:
                failure = self.exits.handle_exit(cpu, exit_)
                if failure is not None:
                    self.park_locally(cpu, failure)
            finally:
                with cond:
                    cpu.in_model = False
                    cond.notify_all()
