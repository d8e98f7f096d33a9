"""Scalar regression scores (ejection fraction in percent, head circumference in mm, ...).

Plain numpy functions score a whole evaluation set; :class:`RegressionScore` accumulates
the decollated evaluator outputs of an epoch (gathered across processes under DDP) and
returns one of them. Predictions and targets are in the task's physical unit (EF points,
mm): the bundles' postprocessing undoes the target normalisation before the metrics.

Definitions, with errors ``e_i = pred_i - true_i`` over ``n`` items:

- ``mae``: mean of ``|e_i|``.
- ``mae_se``: standard error of that mean, ``sd(|e_i|, ddof=1) / sqrt(n)`` (the sample
  standard deviation of the absolute errors, Bessel-corrected); NaN when ``n < 2``.
- ``rmse``: ``sqrt(mean(e_i^2))``.
- ``bias``: mean signed error ``mean(e_i)`` (positive: the model overestimates), the
  centre line of a Bland-Altman plot.
- ``loa_low``, ``loa_high``: Bland-Altman 95 % limits of agreement,
  ``bias -/+ 1.96 sd(e_i, ddof=1)``; NaN when ``n < 2``.
- ``pearson_r``: Pearson correlation of predictions and targets; NaN when either is constant
  or ``n < 2``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from echocare.engines.distributed import gather_rows
from echocare.tasks.regression.data import load_regression_datalist

__all__ = ["REGRESSION_SCORE_NAMES", "RegressionScore", "mean_value_baseline", "regression_metrics", "regression_scores"]

#: names :class:`RegressionScore` accepts (keys of :func:`regression_scores`).
REGRESSION_SCORE_NAMES = ("mae", "mae_se", "rmse", "bias", "loa_low", "loa_high", "pearson_r")


def _vector(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    array = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.isfinite(array).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return array


def regression_scores(pred: Any, true: Any) -> dict[str, float]:
    """Every score of :data:`REGRESSION_SCORE_NAMES` for predictions ``pred`` (N,) against
    targets ``true`` (N,), both in the task's unit (see the module docstring).

    Raises:
        ValueError: different lengths, or NaN/infinite values.
    """
    p, t = _vector(pred, "predictions"), _vector(true, "targets")
    if p.shape != t.shape:
        raise ValueError(f"{p.size} predictions but {t.size} targets")
    n = p.size
    if n == 0:
        return {name: float("nan") for name in REGRESSION_SCORE_NAMES}
    error = p - t
    absolute = np.abs(error)
    nan = float("nan")
    sd_error = float(np.std(error, ddof=1)) if n > 1 else nan
    bias = float(error.mean())
    pearson = nan
    if n > 1 and np.ptp(p) > 0 and np.ptp(t) > 0:
        pc, tc = p - p.mean(), t - t.mean()
        pearson = float(np.sum(pc * tc) / np.sqrt(np.sum(pc * pc) * np.sum(tc * tc)))
    return {
        "mae": float(absolute.mean()),
        "mae_se": float(np.std(absolute, ddof=1) / np.sqrt(n)) if n > 1 else nan,
        "rmse": float(np.sqrt(np.mean(error * error))),
        "bias": bias,
        "loa_low": bias - 1.96 * sd_error,
        "loa_high": bias + 1.96 * sd_error,
        "pearson_r": pearson,
    }


def mean_value_baseline(
    datalist: str | os.PathLike[str],
    target_key: str = "value",
    base_dir: str | os.PathLike[str] | None = None,
    key: str = "validation",
) -> dict[str, float]:
    """The trivial baseline: every item of the list ``key`` gets the mean training target.

    Returns :func:`regression_scores` of that constant against the targets of ``key``, in the
    targets' unit (``mae`` in mm for head circumference, EF points for ``ef``); ``pearson_r``
    is NaN (a constant).
    """
    training = load_regression_datalist(datalist, "training", target_key, base_dir=base_dir, check_images=False)
    evaluated = load_regression_datalist(datalist, key, target_key, base_dir=base_dir, check_images=False)
    mean = float(np.mean([item["value"] for item in training]))
    return regression_scores([mean] * len(evaluated), [item["value"] for item in evaluated])


def _identity(output: Any) -> Any:
    return output


def _scalar(value: Any) -> float:
    t = torch.as_tensor(value).detach().reshape(-1)
    if t.numel() != 1:
        raise ValueError(f"expected one value per item, got {t.numel()}")
    return float(t[0])


class RegressionScore(Metric):
    """One regression score over an epoch, as an Ignite metric.

    Reads ``engine.state.output`` as MONAI leaves it after decollation: a list of per-item
    dicts whose ``pred_key`` and ``label_key`` hold one value each (in the task's unit). A
    ``(y_pred (B,), y (B,))`` pair of tensors is accepted too. Values of every process are
    gathered under DDP; ``compute()`` returns ``regression_scores(pred, true)[name]``, and
    the gathered arrays stay in ``pred`` and ``true`` (for the evaluation plots).

    Args:
        name: one of :data:`REGRESSION_SCORE_NAMES`.
        pred_key, label_key: output keys of the prediction and of the target.
    """

    def __init__(
        self,
        name: str,
        pred_key: str = "predicted",
        label_key: str = "true",
        output_transform: Callable = _identity,
        device: str | torch.device = "cpu",
    ) -> None:
        if name not in REGRESSION_SCORE_NAMES:
            raise ValueError(f"unknown regression score {name!r}; valid: {', '.join(REGRESSION_SCORE_NAMES)}")
        self.name = name
        self.pred_key, self.label_key = pred_key, label_key
        self.pred: np.ndarray | None = None
        self.true: np.ndarray | None = None
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._pairs: list[tuple[float, float]] = []

    @reinit__is_reduced
    def update(self, output: Any) -> None:
        if isinstance(output, (tuple, list)) and len(output) == 2 and all(isinstance(o, torch.Tensor) for o in output):
            y_pred, y = output
            self._pairs.extend(zip(y_pred.reshape(-1).tolist(), y.reshape(-1).tolist()))
            return
        for item in output:
            self._pairs.append((_scalar(item[self.pred_key]), _scalar(item[self.label_key])))

    def compute(self) -> float:
        pairs = torch.tensor(self._pairs, dtype=torch.float64, device=self._device).reshape(-1, 2)
        pairs = gather_rows(pairs).cpu().numpy()
        self.pred, self.true = pairs[:, 0], pairs[:, 1]
        return float(regression_scores(self.pred, self.true)[self.name])


def regression_metrics(key_metric: bool, pred_key: str = "predicted", label_key: str = "true") -> dict[str, Metric]:
    """The regression bundles' metric set for MONAI's ``SupervisedEvaluator``: ``{"mae"}``
    (the key metric; lower is better, so checkpoint savers need ``key_metric_negative_sign``)
    or the others, ``mae_se``, ``rmse``, ``bias``, ``loa_low``, ``loa_high``, ``pearson_r``."""
    names = ["mae"] if key_metric else [n for n in REGRESSION_SCORE_NAMES if n != "mae"]
    return {name: RegressionScore(name, pred_key=pred_key, label_key=label_key) for name in names}
