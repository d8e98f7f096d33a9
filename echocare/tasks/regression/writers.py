"""Handlers of the regression bundles (``camus_ef``: EF from sequences, HC from images):
evaluation pictures and the inference writer.

They read MONAI's decollated ``engine.state.batch`` / ``engine.state.output`` lists after the
bundles' postprocessing (:class:`~echocare.tasks.regression.RegressionOutputd`), which puts the
prediction and the target in the task's unit under ``predicted`` and ``true``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from echocare.tasks.regression.figures import save_bland_altman, save_regression_scatter
from echocare.engines.writers import PredictionWriter, RunFileWriter

__all__ = ["RegressionFigureWriter", "RegressionPredictionWriter"]

logger = logging.getLogger(__name__)


def _value(x: Any) -> float:
    return float(torch.as_tensor(x).detach().double().reshape(-1)[0])


def _frames_used(source: dict[str, Any]) -> list[int] | None:
    """Frame indices a clip loader recorded in the image's meta (None for still images)."""
    meta = getattr(source.get("image"), "meta", None) or {}
    indices = meta.get("frame_indices")
    if indices is None:
        return None
    return [int(torch.as_tensor(i).reshape(-1)[0]) for i in indices]


class RegressionFigureWriter(RunFileWriter):
    """Evaluation pictures of regression: ``scatter.png`` (predicted against true, identity
    line, MAE ± SE and Pearson r) and ``bland_altman.png`` (difference against mean, bias and
    95 % limits of agreement) in ``output_dir``, over the whole run.

    Args:
        output_dir: folder of the pictures (``<output_dir>/eval``).
        name: what is regressed, for the axis labels (``EF``, ``HC``).
        unit: its unit (``%``, ``mm``).
    """

    def __init__(self, output_dir: str | os.PathLike[str], name: str = "value", unit: str = "") -> None:
        self.name, self.unit = name, unit
        super().__init__(output_dir)

    def reset(self) -> None:
        self.pred: list[float] = []
        self.true: list[float] = []

    def write_pair(self, source: dict[str, Any], output: dict[str, Any]) -> None:
        self.pred.append(_value(output["predicted"]))
        self.true.append(_value(output["true"]))

    def finish(self) -> None:
        if not self.pred:
            return
        save_regression_scatter(self.pred, self.true, self.output_dir / "scatter.png", unit=self.unit, name=self.name)
        save_bland_altman(self.pred, self.true, self.output_dir / "bland_altman.png", unit=self.unit, name=self.name)


class RegressionPredictionWriter(PredictionWriter):
    """Inference output of regression, one result per input (a sequence or an image), named
    after it: ``<stem>.json`` with the predicted value in the task's unit, the unit, and the
    frame indices the network saw (sequences), plus ``predictions.json`` / ``.csv``.

    Args:
        output_dir: the predictions folder.
        name: what is regressed (the JSON key of the value, e.g. ``ef``, ``hc``).
        unit: its unit (``%``, ``mm``); ``unit_without_spacing`` is used instead for items
            whose pixel size was unknown (``has_spacing`` false), whose value is in pixels.
    """

    def __init__(self, output_dir: str | os.PathLike[str], name: str = "value", unit: str = "", unit_without_spacing: str | None = None) -> None:
        super().__init__(output_dir, class_names=[])
        self.name, self.unit = name, unit
        self.unit_without_spacing = unit_without_spacing

    def write_item(self, source: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
        path, stem, _ = self._name(source)
        unit = self.unit
        known = source.get("has_spacing", output.get("has_spacing"))
        if self.unit_without_spacing is not None and known is not None and not bool(torch.as_tensor(known).reshape(-1)[0]):
            unit = self.unit_without_spacing
        record: dict[str, Any] = {"image": path, self.name: round(_value(output["predicted"]), 4), "unit": unit}
        frames = _frames_used(source)
        if frames is not None:
            record["frames_used"] = frames
        (self.output_dir / f"{stem}.json").write_text(json.dumps(record, indent=1))
        return record
