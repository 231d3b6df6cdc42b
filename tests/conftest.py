"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_path() -> Path:
    """The shared read-only data folder: ``$RULEWRITER_SHARED`` or ``../shared`` beside the project root."""
    env = os.environ.get("RULEWRITER_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder; skips the test when it is absent (a fresh checkout does not have it)."""
    d = shared_path()
    if not d.is_dir():
        pytest.skip(f"shared data folder not found at {d} (set RULEWRITER_SHARED to its location)")
    return d
