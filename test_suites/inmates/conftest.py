"""Shared fixtures of the inmate tests: one build of every demo per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.recipes import build_inmates, missing_build_tools


@pytest.fixture(scope="session")
def toolchain() -> None:
    """Skip when the build tools are missing (gcc, ld, objcopy, nm, make)."""
    missing = missing_build_tools()
    if missing:
        pytest.skip(f"missing build tools: {', '.join(missing)}")


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory, toolchain: None) -> Path:
    """Every demo image plus tools/kvmrun, built once."""
    out = tmp_path_factory.mktemp("inmates")
    build_inmates(out)
    build_inmates(out, "kvmrun")
    return out
