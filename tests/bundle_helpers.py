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


def blob_dataset(
    root: Path,
    n: int,
    classification: bool,
    shape: tuple[int, int] = (48, 56),
    radius: tuple[int, int] = (6, 3),
    centres: tuple[tuple[int, int], tuple[int, int]] = ((16, 32), (16, 40)),
) -> Path:
    """A small learnable dataset for the bundles without a phantom (ddti_seg, busbra_cls): grey
    ``shape`` images with a bright ellipse of radius ``radius[0] + radius[1] * (i % 4)`` pixels,
    centred in the ``centres`` (y, x) ranges; masks stored as 0/255 (as DDTI's), or class = the
    ellipse's size quartile (4 classes, as BUS-BRA's BI-RADS). Writes ``root/datalist.json``
    (the last 4 items for validation) and returns ``root``."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    items = []
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        r = radius[0] + radius[1] * (i % 4)
        cy, cx = rng.integers(*centres[0]), rng.integers(*centres[1])
        inside = ((yy - cy) / r) ** 2 + ((xx - cx) / (r * 1.3)) ** 2 <= 1
        image = np.clip(rng.normal(60, 20, shape) + 120 * inside, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"b{i}.png")
        item = {"image": f"images/b{i}.png", "case": f"P{i}"}
        if classification:
            item["label"] = i % 4
        else:
            (root / "masks").mkdir(exist_ok=True)
            Image.fromarray((inside * 255).astype(np.uint8)).save(root / "masks" / f"b{i}.png")
            item["label"] = f"masks/b{i}.png"
        items.append(item)
    content = {"training": items[: n - 4], "validation": items[n - 4 :]}
    if not classification:
        content["mask_values"] = {"background": 0, "nodule": 255}
    (root / "datalist.json").write_text(json.dumps(content))
    return root


def checkpoint_readable(path: Path) -> bool:
    """Whether ``path`` is a whole checkpoint yet (a run being killed may leave one half-written)."""
    import torch

    try:
        torch.load(path, weights_only=True)
        return True
    except Exception:
        return False
