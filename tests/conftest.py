"""Shared pytest fixtures.

Real data is looked up in ``$ECHOCARE_DATA``, else in ``../shared/data`` beside the
checkout; tests that need it skip cleanly when neither exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_real_data() -> Path | None:
    """The real-data root, or None when this machine has none."""
    env = os.environ.get("ECHOCARE_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Root of the real ultrasound data (skips the test when absent)."""
    root = find_real_data()
    if root is None:
        pytest.skip("no real data: set ECHOCARE_DATA or place shared/data beside the checkout")
    return root
