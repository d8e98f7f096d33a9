"""Shared pytest fixtures.

Real data is looked up in ``$ECHOCARE_DATA``, else in ``../shared/data`` beside the
checkout; tests that need it skip cleanly when neither exists.
"""

from __future__ import annotations

import os
import shutil
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
def model_stores_index(request: pytest.FixtureRequest) -> Path:
    """Registering a model records its store in the user's index (echocare.registered_models);
    tests record into a file of their own, which the bundle runs they start inherit."""
    index = _session_folder(request.config) / "model_stores.json"
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


# Module fixtures' folders (tmp_path_factory.mktemp) live until the session ends under pytest's own
# policy; bundle runs write checkpoints of ~0.1 GB each, so they are removed as soon as their module
# ends, unless a test of the module failed (kept for the post-mortem, as tmp_path_retention_policy
# = failed keeps a failed test's tmp_path). The session's own folder (_session_folder) is made
# before the first snapshot and is never touched.
_module_start_entries: dict[str, set[Path]] = {}
_failed_modules: set[str] = set()


_session_folder_key = pytest.StashKey[Path]()


def _basetemp(config: pytest.Config) -> Path:
    return config._tmp_path_factory.getbasetemp()


def _session_folder(config: pytest.Config) -> Path:
    """The session's own folder under pytest's basetemp, made before any module's snapshot."""
    if _session_folder_key not in config.stash:
        config.stash[_session_folder_key] = config._tmp_path_factory.mktemp("echocare_session")
    return config.stash[_session_folder_key]


def pytest_runtest_setup(item: pytest.Item) -> None:
    module = item.nodeid.split("::")[0]
    if module not in _module_start_entries:
        _session_folder(item.config)
        _module_start_entries[module] = set(_basetemp(item.config).iterdir())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _failed_modules.add(report.nodeid.split("::")[0])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    result = yield
    module = item.nodeid.split("::")[0]
    module_ended = nextitem is None or nextitem.nodeid.split("::")[0] != module
    if module_ended and module not in _failed_modules and module in _module_start_entries:
        for entry in set(_basetemp(item.config).iterdir()) - _module_start_entries[module]:
            if entry.is_symlink():  # pytest's "<name>current" link to the newest numbered folder
                entry.unlink(missing_ok=True)
            else:
                shutil.rmtree(entry, ignore_errors=True)
    return result
