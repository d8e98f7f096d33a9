"""What every phantom writer shares: phantom folders (replaced only when a phantom run wrote
them), case numbering, scanner settings held for a recording, and the run of a dataset's own
converter with a re-split by case."""

from __future__ import annotations

import posixpath
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from echocare.datasets.converters import DATALIST_CONVERTERS, grouped_split

__all__ = [
    "PHANTOM_MARKER",
    "case_indices",
    "describe_phantom",
    "fresh_phantom_dir",
    "rebase_paths",
    "resplit_by_case",
    "run_converter",
    "scanner_settings",
]

#: the file that marks a folder as written by ``echocare demo-data`` (so a rerun may replace it)
PHANTOM_MARKER = ".echocare_phantom"


def fresh_phantom_dir(path: Path) -> Path:
    """Create ``path`` empty with the phantom marker; replace it only if we wrote it."""
    if path.exists():
        if (path / PHANTOM_MARKER).is_file():
            shutil.rmtree(path)
        elif not path.is_dir() or any(path.iterdir()):
            raise FileExistsError(
                f"{path} exists and was not written by the phantom generator; refusing to "
                "replace it (choose another output folder)"
            )
    path.mkdir(parents=True, exist_ok=True)
    (path / PHANTOM_MARKER).write_text("phantom data written by echocare demo-data; replaced on the next run\n")
    return path


def scanner_settings(
    rng: np.random.Generator, atten_db=(30.0, 42.0), saturation_db=(14.0, 19.0), dynamic_range_db=(40.0, 48.0)
) -> dict:
    """Display settings held for a whole recording (a cine clip keeps its gain)."""
    return {
        "dynamic_range_db": float(rng.uniform(*dynamic_range_db)),
        "atten_db": float(rng.uniform(*atten_db)),
        "tgc": float(rng.uniform(0.6, 0.8)),
        "saturation_db": float(rng.uniform(*saturation_db)),
    }


def rebase_paths(datalist: dict, prefix: str) -> dict:
    """Paths relative to the dataset folder -> relative to its parent (``out``)."""
    for key in ("training", "validation", "test"):
        for item in datalist.get(key, []):
            for k in ("image", "label", "mask"):
                if isinstance(item.get(k), str):
                    item[k] = posixpath.normpath(posixpath.join(prefix, item[k]))
    return datalist


def resplit_by_case(
    datalist: dict, seed: int, val_fraction: float, classes_of: Callable[[dict], set]
) -> dict:
    """Re-split by case with grouped_split: the first seed from ``seed`` whose training list
    holds every class and whose validation list is not empty, preferring one whose
    validation list holds every class too."""
    items = sorted(datalist["training"] + datalist["validation"], key=lambda it: str(it["image"]))
    wanted = set().union(*(classes_of(it) for it in items))
    if len({str(it["case"]) for it in items}) < 2:
        raise ValueError("the phantom has fewer than two cases: no validation list is possible")
    choice = None
    for tier in (2, 1):
        for k in range(seed, seed + 200):
            train, val = grouped_split(items, k, val_fraction)
            if not val or set().union(*(classes_of(it) for it in train)) != wanted:
                continue
            if tier == 2 and set().union(*(classes_of(it) for it in val)) != wanted:
                continue
            choice = (k, train, val)
            break
        if choice:
            break
    if choice is None:
        raise ValueError(f"no split puts every class ({sorted(wanted)}) in training; use a larger n")
    k, datalist["training"], datalist["validation"] = choice
    datalist["split_seed"] = k
    return datalist


def run_converter(name: str, root: Path, out: Path, seed: int) -> dict:
    """Run the dataset's converter on ``root`` (its ``out`` argument decides where derived
    files go: ``out/<name>_clips`` etc.; nothing is written to ``out/datalist.json`` here)."""
    return DATALIST_CONVERTERS[name](root, out / "datalist.json", None, seed)


def describe_phantom(datalist: dict, task: str, folder: str, seed: int, detail: str) -> dict:
    datalist["description"] = (
        f"PHANTOM data (echocare demo-data --task {task}, seed {seed}) in the official layout under "
        f"{folder}/; {detail} Converter: {datalist.get('description', '')} Re-split by case with "
        f"split seed {datalist.get('split_seed')}."
    )
    return datalist


def case_indices(n: int, per_case: int, min_cases: int) -> list[int]:
    """Case index of each of ``n`` items, ``per_case`` items per case but at least
    ``min_cases`` cases when ``n`` allows."""
    per = max(1, min(int(per_case), n // max(min_cases, 1)))
    return [i // per for i in range(n)]
