"""Shared pytest fixtures.

Real data is looked up in ``$ECHOCARE_DATA``, else in ``../shared/data`` beside the
checkout; tests that need it skip cleanly when neither exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from process_helpers import cmdline, descendants

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


@pytest.fixture(scope="session", autouse=True)
def model_stores_index(tmp_path_factory) -> Path:
    """Registering a model records its store in the user's index (echocare.registered_models);
    tests record into a file of their own, which the bundle runs they start inherit."""
    index = tmp_path_factory.mktemp("echocare_config") / "model_stores.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ECHOCARE_MODEL_STORES", str(index))
        yield index


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance for a test module (2 CPUs, 127.0.0.1, no dashboard), started by the
    function every ``--engine ray`` command uses; its GCS address. Skips without Ray; fails when a
    Ray process outlives the module."""
    ray = pytest.importorskip("ray")
    from echocare.ray_cluster import start_local_ray

    context = start_local_ray(2)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
    leftover = [p for p in descendants(os.getpid()) if "ray" in cmdline(p) or "gcs_server" in cmdline(p)]
    assert not leftover, f"Ray processes outlived the module: {[cmdline(p) for p in leftover]}"
