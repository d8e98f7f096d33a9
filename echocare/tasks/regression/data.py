"""Data for the regression bundles: checked datalists of scalar targets, their normalisation
and its inverse.

Items (docs/architecture.md, "Datalist keys"): sequence regression ``{"image": sequence or video,
"ef": percent, optional "ed_frame", "es_frame"}``; scalar regression ``{"image", "value",
optional "spacing": [row_mm, col_mm]}``.

The network regresses a normalised target ``value / target_scale``; ``target_scale`` is kept
with each item so that predictions go back to the task's unit after the network:

- ``unit="value"``: ``target_scale`` = ``scale`` for every item (EF in percent with
  ``scale=100``: the network predicts the EF fraction).
- ``unit="extent"``: ``target_scale`` = ``scale`` x pixel size (mm) x the longest side of the
  original image (pixels): the network predicts a length as a fraction of the image's
  longest side, which the (aspect-preserving) resize does not change and which is the same
  for any pixel size; x pixel size x longest side gives mm again. Items without a known
  pixel size are in pixels (pixel size 1).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from echocare.datasets.datalist import list_inputs, load_datalist, raise_problems
from echocare.io.readers import UltrasoundReadError
from echocare.tasks.supervised.data import check_task_item, clip_frame_count, subsample_training

__all__ = [
    "TARGET_UNITS",
    "RegressionOutputd",
    "RegressionTargetd",
    "frame_index_problem",
    "load_regression_datalist",
    "regression_inputs",
]

#: How :class:`RegressionTargetd` normalises a target (see the module docstring).
TARGET_UNITS = ("value", "extent")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _frame_index(value: Any) -> int | None:
    """A frame index of the datalist (int >= 0), None when absent, or raises ValueError."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 0:
        raise ValueError(f"{value!r} is not a frame index (an integer >= 0)")
    return int(value)


def load_regression_datalist(
    datalist: str | os.PathLike[str],
    key: str,
    target_key: str = "value",
    base_dir: str | os.PathLike[str] | None = None,
    train_fraction: float = 1.0,
    seed: int = 0,
    check_images: bool = True,
    keep_keys: Sequence[str] = ("case",),
    frame_keys: Sequence[str] = ("ed_frame", "es_frame"),
) -> list[dict[str, Any]]:
    """Read and check one list of a regression datalist.

    Every problem is collected and raised at once, naming the datalist and each bad item:
    missing files, unreadable images or sequences, a missing or non-numeric target, a frame
    index that is not an integer or lies outside its sequence, a ``spacing`` that is not two
    positive numbers, an empty list.

    Args:
        datalist: MONAI datalist JSON.
        key: ``training``, ``validation`` or ``test``.
        target_key: the item key of the target (``ef`` for EF in percent, ``value``).
        base_dir: root of relative paths (``dataset_dir``); default the datalist's folder.
        train_fraction: keep this fraction of the items (seeded random subset, see
            :func:`~echocare.tasks.supervised.data.subsample_training`).
        seed: seed of the subset.
        check_images: decode the first frame of every image once now (and count the frames
            of sequences with frame indices).
        keep_keys: item keys kept as strings (missing ones become ``""`` so batches collate).
        frame_keys: optional frame-index keys (end-diastole, end-systole); missing ones are -1.

    Returns:
        Items ``{"image": abs path, "value": float, "spacing": [row, col] mm (NaN when
        unknown), <frame_keys>: int (-1 when unknown), **keep_keys}``.

    Raises:
        DatalistError: as above.
    """
    raw = load_datalist(datalist, key, base_dir=base_dir, image_keys=("image",), check_images=False)
    problems: list[str] = []
    items: list[dict[str, Any]] = []
    for position, source in enumerate(raw):
        where = f"item {position} ({source.get('image')})"
        value = _number(source.get(target_key))
        if value is None:
            problems.append(f"{where}: {target_key} {source.get(target_key)!r} is not a number")
            continue
        item: dict[str, Any] = {"image": source["image"], "value": value}
        spacing = source.get("spacing")
        if spacing in (None, "", []):
            item["spacing"] = [float("nan"), float("nan")]
        else:
            numbers = [_number(s) for s in spacing] if isinstance(spacing, (list, tuple)) else [None]
            if len(numbers) < 2 or any(s is None or s <= 0 for s in numbers[:2]):
                problems.append(f"{where}: spacing {spacing!r} is not two positive pixel sizes in mm")
                continue
            item["spacing"] = [float(s) for s in numbers[:2]]
        try:
            for name in frame_keys:
                index = _frame_index(source.get(name))
                item[name] = -1 if index is None else index
        except ValueError as error:
            problems.append(f"{where}: {name} {error}")
            continue
        for name in keep_keys:
            kept = source.get(name, "")
            item[name] = "" if kept is None else str(kept)
        items.append(item)
    if not problems and check_images:
        for position, item in enumerate(items):
            problem = check_task_item(item, "classification", 1)  # the image or sequence decodes
            if problem is None:
                problem = frame_index_problem(item, frame_keys)
            if problem is not None:
                problems.append(f"item {position}: {problem}")
    raise_problems(datalist, key, problems)
    return subsample_training(items, train_fraction, seed, stratify_key=None)


def frame_index_problem(item: Mapping[str, Any], frame_keys: Sequence[str] = ("ed_frame", "es_frame")) -> str | None:
    """None when every frame index of ``item`` (keys ``frame_keys``; missing or -1: none) lies
    inside the sequence ``item["image"]``; else one line naming the image, the indices past its
    end and its frame count (or why its frames cannot be counted)."""
    given = {name: item[name] for name in frame_keys if isinstance(item.get(name), int) and item[name] >= 0}
    if not given:
        return None
    try:
        count = clip_frame_count(item["image"])
    except UltrasoundReadError as error:
        return str(error)
    late = [f"{name}={index}" for name, index in given.items() if index >= count]
    return f"{item['image']}: {', '.join(late)} but the sequence has {count} frames" if late else None


def regression_inputs(
    source: str | os.PathLike[str],
    key: str = "validation",
    base_dir: str | os.PathLike[str] | None = None,
    frame_keys: Sequence[str] = ("ed_frame", "es_frame"),
) -> list[dict[str, Any]]:
    """Inference inputs of the regression bundles: :func:`~echocare.datasets.datalist.list_inputs`
    (a folder, one file, or a datalist JSON) plus, for every item, ``spacing`` (the datalist's
    pixel size in mm, else NaN: the image's own metadata is used) and the frame indices
    ``frame_keys`` (the datalist's, else -1: the whole sequence), the same keys in every item
    so that batches collate."""
    items = list_inputs(source, key, base_dir=base_dir)
    raw: list[dict[str, Any]] = [{}] * len(items)
    if Path(source).is_file() and str(source).lower().endswith(".json"):
        raw = load_datalist(source, key, base_dir=base_dir, check_images=False)
    out = []
    for item, extra in zip(items, raw):
        spacing = extra.get("spacing")
        numbers = [_number(v) for v in spacing] if isinstance(spacing, (list, tuple)) else []
        item = {**item, "spacing": [float(v) for v in numbers[:2]] if len(numbers) >= 2 and None not in numbers[:2] else [float("nan")] * 2}
        for name in frame_keys:
            try:
                index = _frame_index(extra.get(name))
            except ValueError:
                index = None
            item[name] = -1 if index is None else index
        out.append(item)
    return out


class RegressionTargetd(MapTransform):
    """Normalise an item's target for the network and record the factor back to its unit.

    Sets ``label`` = (1,) float32 ``value / target_scale`` when the item has ``value_key``
    (inference items may not), ``target_scale`` (0-d float64) and ``has_spacing`` (0-d bool:
    the pixel size was known, so ``extent`` values are in mm, not pixels). Run after the image is
    loaded and before it is resized (``unit="extent"`` reads the original size).

    Args:
        value_key: key of the target in the task's unit.
        unit: ``value`` or ``extent`` (see the module docstring).
        scale: constant factor (``value``: e.g. 100 for EF in percent; ``extent``: usually 1).
        image_key: the loaded image (``extent``).
        spacing_key: the item's ``[row_mm, col_mm]`` pixel size (``extent``); when it is
            missing or NaN the image's ``pixel_spacing_mm`` meta is used, else 1 (pixels).
    """

    def __init__(
        self,
        value_key: str = "value",
        unit: str = "value",
        scale: float = 1.0,
        image_key: str = "image",
        spacing_key: str = "spacing",
        label_key: str = "label",
    ) -> None:
        super().__init__(value_key, allow_missing_keys=True)
        if unit not in TARGET_UNITS:
            raise ValueError(f"unknown target unit {unit!r}; choose one of {list(TARGET_UNITS)}")
        if not float(scale) > 0:
            raise ValueError(f"target scale must be > 0, got {scale}")
        self.value_key, self.unit, self.scale = value_key, unit, float(scale)
        self.image_key, self.spacing_key, self.label_key = image_key, spacing_key, label_key

    def target_scale(self, d: Mapping[Hashable, Any]) -> tuple[float, bool]:
        """The item's factor from the normalised target to the task's unit, and whether its
        pixel size was known (always true for ``unit="value"``)."""
        if self.unit == "value":
            return self.scale, True
        image = d[self.image_key]
        longest = max(int(s) for s in image.shape[-2:])
        spacing = d.get(self.spacing_key)
        if spacing is None or any(not math.isfinite(float(s)) for s in np.asarray(spacing, dtype=float).reshape(-1)):
            spacing = (getattr(image, "meta", None) or {}).get("pixel_spacing_mm")
        pixel_mm, known = 1.0, False
        if spacing is not None and len(np.asarray(spacing).reshape(-1)) >= 2:
            row_mm, col_mm = (float(s) for s in np.asarray(spacing, dtype=float).reshape(-1)[:2])
            if math.isfinite(row_mm) and math.isfinite(col_mm):
                if abs(row_mm - col_mm) > 1e-3 * max(row_mm, col_mm):
                    source = (getattr(image, "meta", None) or {}).get("filename_or_obj", "?")
                    raise ValueError(f"{source}: pixels are not square ({row_mm} x {col_mm} mm); unit='extent' needs square pixels")
                pixel_mm, known = row_mm, True
        return self.scale * pixel_mm * longest, known

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        scale, known = self.target_scale(d)
        d["target_scale"] = torch.tensor(scale, dtype=torch.float64)
        d["has_spacing"] = torch.tensor(known)
        if self.value_key in d and d[self.value_key] is not None:
            d[self.label_key] = torch.tensor([float(d[self.value_key]) / scale], dtype=torch.float32)
        return d


class RegressionOutputd(MapTransform):
    """Evaluator postprocessing: the network's normalised output back in the task's unit.

    Sets ``predicted`` = ``pred`` x ``target_scale`` and, when ``label`` is present, ``true``
    = ``label`` x ``target_scale`` and ``error`` = ``predicted - true`` (floats), which
    :class:`~echocare.tasks.regression.RegressionScore` and the evaluation report read.
    """

    def __init__(self, pred_key: str = "pred", label_key: str = "label", scale_key: str = "target_scale") -> None:
        super().__init__(pred_key, allow_missing_keys=True)
        self.pred_key, self.label_key, self.scale_key = pred_key, label_key, scale_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        scale = float(torch.as_tensor(d[self.scale_key], dtype=torch.float64).reshape(-1)[0])
        d["predicted"] = float(torch.as_tensor(d[self.pred_key]).detach().double().reshape(-1)[0]) * scale
        if d.get(self.label_key) is not None:
            d["true"] = float(torch.as_tensor(d[self.label_key]).detach().double().reshape(-1)[0]) * scale
            d["error"] = d["predicted"] - d["true"]
        return d
