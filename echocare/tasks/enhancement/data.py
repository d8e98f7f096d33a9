"""Datalists of the enhancement bundle (``usenhance``).

Paired items are ``{"image": low quality, "target": high quality}`` (docs/architecture.md,
"Datalist keys"), as :func:`~echocare.datasets.converters.convert_usenhance` and the phantom write them.
The real-data variant has high-quality images only: :func:`write_degradation_datalist`
lists images of several datasets with their converters' patient-level splits, and the
bundle makes each low-quality ``image`` from its ``target`` on the fly
(:class:`~echocare.tasks.enhancement.degradation.Degraded`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from echocare.datasets.converters import convert_datalist
from echocare.datasets.datalist import load_datalist, raise_problems
from echocare.io.readers import UltrasoundReadError, read_ultrasound
from echocare.tasks.supervised.data import subsample_training

__all__ = ["DEGRADATION_SOURCES", "load_enhancement_datalist", "write_degradation_datalist"]

#: Datasets of ``shared/data`` whose images the real-data variant degrades, with converter arguments.
DEGRADATION_SOURCES: dict[str, dict[str, Any]] = {"busbra": {"fold": 2}, "ddti": {}, "hc18": {}}


def _size(path: str) -> tuple[int, int]:
    frame = read_ultrasound(path, frames=0)  # (1, H, W, 3)
    return int(frame.shape[1]), int(frame.shape[2])


def load_enhancement_datalist(
    datalist: str | os.PathLike[str],
    key: str,
    base_dir: str | os.PathLike[str] | None = None,
    paired: bool = True,
    train_fraction: float = 1.0,
    seed: int = 0,
    check_images: bool = True,
    num_threads: int = 4,
) -> list[dict[str, Any]]:
    """Read and check one list of an enhancement datalist.

    Args:
        datalist: MONAI datalist JSON.
        key: ``training``, ``validation`` or ``test``.
        base_dir: root of relative paths (``dataset_dir``); default the datalist's folder.
        paired: items hold ``image`` (low) and ``target`` (high quality) of the same size;
            ``False``: each item's ``image`` is a high-quality image, returned as ``target``
            (the low-quality image is made from it by :class:`~echocare.tasks.enhancement.degradation.Degraded`).
        train_fraction: keep this seeded fraction of the items (see :func:`subsample_training`).
        check_images: decode every image once now (and compare the sizes of pairs).

    Returns:
        ``[{"image": abs path, "target": abs path, "case": str}, ...]`` (paired) or
        ``[{"target": abs path, "case": str}, ...]``.

    Raises:
        DatalistError: missing list or files, a pair without ``target``, unreadable images,
            a pair whose images differ in size; every problem at once, naming the files.
    """
    raw = load_datalist(datalist, key, base_dir=base_dir, image_keys=("image",), check_images=False)
    problems: list[str] = []
    items: list[dict[str, Any]] = []
    root = Path(base_dir) if base_dir else Path(datalist).parent
    for position, source in enumerate(raw):
        case = str(source.get("case") or source["image"])
        if not paired:
            items.append({"target": source["image"], "case": case})
            continue
        target = source.get("target")
        if not target:
            problems.append(f"item {position} ({source['image']}): no 'target' (high-quality image)")
            continue
        target_path = Path(target) if Path(target).is_absolute() else root / target
        if not target_path.is_file():
            problems.append(f"item {position}: target {target_path} not found")
            continue
        items.append({"image": source["image"], "target": str(target_path), "case": case})
    if not problems and check_images:

        def check(position_item: tuple[int, dict[str, Any]]) -> str | None:
            position, item = position_item
            try:
                sizes = {k: _size(item[k]) for k in ("image", "target") if k in item}
            except UltrasoundReadError as error:
                return f"item {position}: {error}"
            if len(set(sizes.values())) > 1:
                return (f"item {position}: image {item['image']} is {sizes['image'][0]}x{sizes['image'][1]} pixels but "
                        f"its target {item['target']} is {sizes['target'][0]}x{sizes['target'][1]}")
            return None

        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            problems.extend(p for p in pool.map(check, enumerate(items)) if p is not None)
    raise_problems(datalist, key, problems)
    return subsample_training(items, train_fraction, seed, stratify_key=None)


def write_degradation_datalist(
    data_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    datasets: Sequence[str] = tuple(DEGRADATION_SOURCES),
    max_training: int | None = None,
    max_validation: int | None = None,
) -> str:
    """The real-data variant's datalist: high-quality images of several datasets, each with
    its converter's split (patient-level where the dataset has patients: BUS-BRA's official
    fold 2, DDTI's and HC18's case splits), so no validation patient is trained on.

    Args:
        data_root: folder holding one folder per dataset (``shared/data``); item paths are
            relative to it (the bundle's ``dataset_dir``).
        out: the JSON to write.
        datasets: names of :data:`DEGRADATION_SOURCES` (converter names).
        max_training, max_validation: keep at most this many items per dataset and list
            (the first ones in each converter's order), to bound CPU time.

    Returns:
        ``out`` as a string (so a bundle config can use the call as its ``datalist``).
    """
    data_root = Path(data_root)
    lists: dict[str, list[dict[str, Any]]] = {"training": [], "validation": []}
    for name in datasets:
        if name not in DEGRADATION_SOURCES:
            raise ValueError(f"unknown degradation source {name!r}; known: {sorted(DEGRADATION_SOURCES)}")
        converted = convert_datalist(name, data_root / name, **DEGRADATION_SOURCES[name])
        for key, limit in (("training", max_training), ("validation", max_validation)):
            chosen = converted.get(key, [])[: limit if limit is not None else None]
            lists[key] += [{"image": f"{name}/{item['image']}", "case": f"{name}/{item.get('case', item['image'])}",
                            "dataset": name} for item in chosen]
    content = {
        "name": "degraded",
        "description": "High-quality images for on-the-fly degraded pairs (bundles/usenhance/configs/degraded.yaml): "
        + ", ".join(f"{n} ({DEGRADATION_SOURCES[n] or 'converter split'})" for n in datasets),
        **lists,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(content, indent=1) + "\n")
    return str(out)
