"""Shared fixtures of the inmate tests: one build of every demo per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from inmates_helpers import make


@pytest.fixture(scope="session")
def toolchain() -> None:
    """Skip when the build tools are missing (gcc, ld, objcopy, make)."""
    missing = [tool for tool in ("make", "gcc", "ld", "objcopy", "nm") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"missing build tools: {', '.join(missing)}")


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory, toolchain: None) -> Path:
    """Every demo image plus tools/kvmrun, built once."""
    out = tmp_path_factory.mktemp("inmates")
    make(out)
    make(out, "kvmrun")
    return out
