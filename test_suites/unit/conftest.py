"""Fixtures of the unit tests that run tiny guests on this host's /dev/kvm."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.hvmodel.arch import kvm


@pytest.fixture(scope="module")
def kick_handler() -> None:
    """The vCPU kick signal handler (installed once, in the main thread)."""
    kvm.install_kick_handler()


@pytest.fixture
def vm(kick_handler: None) -> Iterator[kvm.Vm]:
    """A VM with an in-kernel irqchip, closed after the test."""
    with kvm.Kvm() as dev:
        machine = kvm.Vm(dev)
        try:
            machine.create_irqchip()
            yield machine
        finally:
            machine.close()
