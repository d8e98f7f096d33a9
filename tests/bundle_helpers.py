"""Running bundles as a user does (``python -m monai.bundle run ...``) and reading their MLflow store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bundle(*args: str, timeout: int = 600, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run ARGS`` from the repository root; raises with the output on failure."""
    command = [sys.executable, "-m", "monai.bundle", "run", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"bundle run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


_SEQUENCE = """
import sys, json, fire
from monai.bundle import run
for args in json.loads(sys.argv[1]):
    fire.Fire({"run": run}, command=["run", *args])
"""


def bundles_in_one_process(*commands: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """Several ``python -m monai.bundle run ARGS`` in one fresh interpreter, in order (the same command-line
    parsing through fire; one start-up of torch and MONAI instead of one per command)."""
    import json

    command = [sys.executable, "-c", _SEQUENCE, json.dumps([list(c) for c in commands])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(f"bundle runs failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def mlflow_runs(store: Path) -> list:
    """(client, runs) of every experiment in the SQLite store ``store``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments)
