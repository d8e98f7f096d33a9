"""Landmark localisation scores: radial errors in the original image's pixels (and mm).

Conventions (the same in ``summary.json``, MLflow and ``echocare compare``):

- Points are (x, y) in pixels of the ORIGINAL image (x right, y down, pixel centres at
  integer coordinates), whatever size the network ran at: predictions are mapped back
  before scoring (see :func:`echocare.tasks.landmarks.data.grid_to_original`).
- The radial error of a landmark is the Euclidean distance between its predicted and true
  points. Over the K landmarks of an image:
  ``mre_px`` = mean radial error; ``mse_px2`` = mean of the squared radial errors (px²);
  ``sdr_2px``, ``sdr_4px``, ``sdr_10px`` = successful detection rates, the fraction of
  landmarks whose radial error is LESS THAN OR EQUAL TO 2, 4, 10 px (``<=``: an error of
  exactly 2 px counts as detected at 2 px).
- Dataset values are the means of the per-image values (every image has the same K
  landmarks, so this equals the mean over all (image, landmark) pairs).
- Per landmark: ``mre_px_<name>`` (mean over images of that landmark's radial error),
  with the name as :func:`~echocare.tasks.supervised.segmentation_scoring.class_key` writes it.
- ``mre_mm``: the mean radial error in mm, for items whose pixel size (``spacing``
  [row mm, col mm]) is known; the x difference is scaled by the column size, the y
  difference by the row size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.transforms import MapTransform

from echocare.engines.metrics import MeanOfOutput
from echocare.tasks.landmarks.data import grid_to_original, load_landmark_datalist
from echocare.tasks.landmarks.network import decode_heatmaps
from echocare.tasks.supervised.segmentation_scoring import class_key

__all__ = [
    "LANDMARK_SCORE_NAMES",
    "SDR_RADII_PX",
    "LandmarkScored",
    "NanMeanOfOutput",
    "landmark_case_fields",
    "landmark_metrics",
    "landmark_scores",
    "mean_position_baseline",
    "radial_errors",
]

#: Radii (px) of the successful detection rates ``sdr_<r>px``.
SDR_RADII_PX = (2, 4, 10)
#: Per-image score names written by :func:`landmark_scores` (besides per-landmark errors).
LANDMARK_SCORE_NAMES = ("mre_px", "mse_px2", *(f"sdr_{r}px" for r in SDR_RADII_PX))


def _points(x: Any, what: str) -> np.ndarray:
    """(K, 2) float64 array of (x, y) points from a list, array or tensor."""
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what} must be (K, 2) points (x, y), got shape {arr.shape}")
    return arr


def radial_errors(pred: Any, true: Any, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Euclidean distance of each predicted point to its true point.

    Args:
        pred, true: (K, 2) points (x, y) in pixels.
        spacing: optional (row, col) pixel size; the errors are then in its units (mm).

    Returns:
        (K,) float64 radial errors.
    """
    p, t = _points(pred, "pred"), _points(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.shape[0]} landmarks, true has {t.shape[0]}")
    d = p - t
    if spacing is not None:
        row, col = (float(s) for s in spacing)
        d = d * np.array([col, row])
    return np.sqrt((d * d).sum(axis=1))


def landmark_scores(
    pred: Any,
    true: Any,
    landmark_names: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
) -> dict[str, float]:
    """Scores of one image: ``mre_px``, ``mse_px2``, ``sdr_2px``, ``sdr_4px``, ``sdr_10px``
    (see the module docstring; radius test ``<=``), ``error_px_<name>`` per landmark, and
    ``mre_mm`` when ``spacing`` (row, col mm) is given and finite.

    Args:
        pred, true: (K, 2) points (x, y) in original-image pixels.
        landmark_names: K names (default ``L1`` ... ``LK``).
        spacing: optional (row, col) pixel size in mm.
    """
    err = radial_errors(pred, true)
    names = list(landmark_names) if landmark_names is not None else [f"L{k + 1}" for k in range(len(err))]
    if len(names) != len(err):
        raise ValueError(f"{len(names)} landmark names for {len(err)} landmarks")
    scores = {"mre_px": float(err.mean()), "mse_px2": float((err * err).mean())}
    for r in SDR_RADII_PX:
        scores[f"sdr_{r}px"] = float((err <= r).mean())
    for name, e in zip(names, err):
        scores[f"error_px_{class_key(name)}"] = float(e)
    if spacing is not None and all(math.isfinite(float(s)) for s in spacing):
        scores["mre_mm"] = float(radial_errors(pred, true, spacing).mean())
    return scores


class LandmarkScored(MapTransform):
    """Evaluator postprocessing: decode ``d[pred_key]`` and score it against ``d[true_key]``.

    - ``d[pred_key]``: (K, h, w) heatmaps at the network's grid.
    - ``d[true_key]``: (K, 2) true points in original pixels.
    - ``d[size_key]``: (H, W) of the original image (set by
      :class:`~echocare.tasks.supervised.data.EvalSpacingd`).
    - ``d[spacing_key]`` (optional): (row, col) mm, NaN when unknown.

    Adds ``pred_landmarks`` ((K, 2) float tensor, original pixels) and the scores of
    :func:`landmark_scores`; with ``report_mm`` a ``mre_mm`` (NaN when the item has no
    pixel size) so every item has the same keys.
    """

    def __init__(
        self,
        landmark_names: Sequence[str],
        pred_key: str = "pred",
        true_key: str = "landmarks",
        size_key: str = "original_size",
        spacing_key: str = "spacing",
        report_mm: bool = False,
        output_key: str = "pred_landmarks",
    ) -> None:
        super().__init__(keys=[pred_key])
        self.landmark_names = list(landmark_names)
        self.pred_key, self.true_key, self.size_key = pred_key, true_key, size_key
        self.spacing_key, self.report_mm, self.output_key = spacing_key, bool(report_mm), output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:

        d = dict(data)
        heatmaps = torch.as_tensor(d[self.pred_key]).detach().float().cpu()
        grid_points = decode_heatmaps(heatmaps[None])[0]
        points = grid_to_original(grid_points, tuple(heatmaps.shape[-2:]), d[self.size_key])
        d[self.output_key] = points
        spacing = d.get(self.spacing_key)
        spacing = None if spacing is None else [float(s) for s in torch.as_tensor(spacing).reshape(-1)[:2]]
        scores = landmark_scores(points, d[self.true_key], self.landmark_names, spacing)
        if self.report_mm:
            scores.setdefault("mre_mm", float("nan"))
        d.update(scores)
        return d


class NanMeanOfOutput(MeanOfOutput):
    """Mean over items of ``key``, skipping NaN values (items without a pixel size)."""

    @reinit__is_reduced
    def update(self, output: Sequence[dict[str, Any]]) -> None:
        for item in output:
            value = float(item[self.key])
            if not math.isnan(value):
                self._sum += value
                self._count += 1

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        return float(self._sum / self._count) if int(self._count) else float("nan")


def landmark_case_fields(landmark_names: Sequence[str], report_mm: bool = False) -> list[str]:
    """Columns of a landmark evaluation's ``per_case.csv``: ``case``, the scores of
    :data:`LANDMARK_SCORE_NAMES`, ``mre_mm`` with ``report_mm``, then ``error_px_<name>`` per
    landmark, as :class:`LandmarkScored` writes them."""
    fields = ["case", *LANDMARK_SCORE_NAMES] + (["mre_mm"] if report_mm else [])
    return fields + [f"error_px_{class_key(n)}" for n in landmark_names]


def landmark_metrics(landmark_names: Sequence[str], key_metric: bool, report_mm: bool = False) -> dict[str, Metric]:
    """``{"mre_px"}`` (the key metric, lower is better) or the others: ``mse_px2``,
    ``sdr_2px``, ``sdr_4px``, ``sdr_10px``, ``mre_px_<name>`` per landmark and, with
    ``report_mm``, ``mre_mm``; each the mean over items of what :class:`LandmarkScored`
    stores."""
    if key_metric:
        return {"mre_px": MeanOfOutput(key="mre_px")}
    metrics: dict[str, Metric] = {n: MeanOfOutput(key=n) for n in LANDMARK_SCORE_NAMES[1:]}
    for name in landmark_names:
        metrics[f"mre_px_{class_key(name)}"] = MeanOfOutput(key=f"error_px_{class_key(name)}")
    if report_mm:
        metrics["mre_mm"] = NanMeanOfOutput(key="mre_mm")
    return metrics


def mean_position_baseline(
    datalist: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None = None,
    key: str = "validation",
) -> dict[str, float]:
    """The trivial baseline: every image of ``key`` gets the mean training landmark positions.

    Training points are normalised by their image's size (x / W, y / H, pixel centres:
    ``(x + 0.5) / W``), averaged per landmark, and mapped onto each evaluated image by its
    own size. Returns the dataset means of :func:`landmark_scores` (``mre_mm`` too when
    every item has a ``spacing``).
    """
    train = load_landmark_datalist(datalist, "training", base_dir=base_dir, with_sizes=True)
    evaluated = load_landmark_datalist(datalist, key, base_dir=base_dir, with_sizes=True)
    norm = np.mean(
        [(np.asarray(it["landmarks"], float) + 0.5) / np.array(it["original_size"][::-1], float) for it in train],
        axis=0,
    )
    per_item = []
    for it in evaluated:
        height, width = it["original_size"]
        pred = norm * np.array([width, height], float) - 0.5
        spacing = it.get("spacing")
        spacing = spacing if spacing is not None and all(math.isfinite(s) for s in spacing) else None
        per_item.append(landmark_scores(pred, it["landmarks"], spacing=spacing))
    keys = [k for k in per_item[0] if not k.startswith("error_px_") and all(k in s for s in per_item)]
    return {k: float(np.mean([s[k] for s in per_item])) for k in keys}
