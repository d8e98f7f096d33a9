"""Regression metrics of the camus_ef bundle (mae, mae_se, rmse, bias, limits of agreement, Pearson r)
against hand-computed values and independent NumPy/SciPy implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from echocare.tasks.regression import RegressionScore, regression_metrics, regression_scores


def test_hand_made_case() -> None:
    # errors -2, 0, 1, 5: |e| = 2, 0, 1, 5 -> mean 2; sd(|e|, ddof=1) = sqrt(14/3)
    scores = regression_scores([48.0, 60.0, 31.0, 75.0], [50.0, 60.0, 30.0, 70.0])
    assert scores["mae"] == pytest.approx(2.0)
    assert scores["mae_se"] == pytest.approx(math.sqrt(14.0 / 3.0) / 2.0)
    assert scores["rmse"] == pytest.approx(math.sqrt((4 + 0 + 1 + 25) / 4))
    assert scores["bias"] == pytest.approx(1.0)
    sd = math.sqrt(((-3) ** 2 + (-1) ** 2 + 0 ** 2 + 4 ** 2) / 3)
    assert scores["loa_low"] == pytest.approx(1.0 - 1.96 * sd)
    assert scores["loa_high"] == pytest.approx(1.0 + 1.96 * sd)


def test_against_numpy_and_scipy() -> None:
    from scipy import stats

    rng = np.random.default_rng(3)
    true = rng.uniform(20, 75, 57)
    pred = true + rng.normal(1.5, 6.0, 57)
    scores = regression_scores(torch.tensor(pred), true)
    abs_err = np.abs(pred - true)
    assert scores["mae"] == pytest.approx(abs_err.mean())
    assert scores["mae_se"] == pytest.approx(stats.sem(abs_err))  # scipy: ddof=1
    assert scores["rmse"] == pytest.approx(np.sqrt(np.mean((pred - true) ** 2)))
    assert scores["pearson_r"] == pytest.approx(stats.pearsonr(pred, true).statistic)


def test_degenerate_inputs() -> None:
    one = regression_scores([3.0], [1.0])
    assert one["mae"] == 2.0 and math.isnan(one["mae_se"]) and math.isnan(one["pearson_r"])
    constant = regression_scores([5.0, 5.0, 5.0], [1.0, 2.0, 3.0])
    assert math.isnan(constant["pearson_r"]) and constant["mae"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="2 predictions but 3"):
        regression_scores([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        regression_scores([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown regression score"):
        RegressionScore("r2")


def test_ignite_metric_over_decollated_batches() -> None:
    batches = [
        [{"predicted": torch.tensor([48.0]), "true": torch.tensor(50.0)},
         {"predicted": torch.tensor([60.0]), "true": 60.0}],
        [{"predicted": 31.0, "true": torch.tensor([30.0])},
         {"predicted": torch.tensor(75.0), "true": torch.tensor([70.0])}],
    ]
    engine = Engine(lambda e, batch: batch)
    metrics = {**regression_metrics(key_metric=True), **regression_metrics(key_metric=False)}
    assert set(metrics) == {"mae", "mae_se", "rmse", "bias", "loa_low", "loa_high", "pearson_r"}
    for name, metric in metrics.items():
        metric.attach(engine, name)
    state = engine.run(batches)
    assert state.metrics["mae"] == pytest.approx(2.0)
    assert state.metrics["mae_se"] == pytest.approx(math.sqrt(14.0 / 3.0) / 2.0)
    np.testing.assert_allclose(metrics["mae"].pred, [48, 60, 31, 75])
    np.testing.assert_allclose(metrics["mae"].true, [50, 60, 30, 70])
    state = engine.run(batches[:1])  # reset between runs
    assert state.metrics["mae"] == pytest.approx(1.0)


def test_mean_value_baseline_predicts_the_training_mean(tmp_path) -> None:
    import json

    from PIL import Image

    from echocare.tasks.regression import mean_value_baseline

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    content = {
        "training": [{"image": "a.png", "value": v} for v in (100.0, 140.0, 180.0)],  # mean 140
        "validation": [{"image": "a.png", "value": v} for v in (120.0, 200.0)],
    }
    (tmp_path / "dl.json").write_text(json.dumps(content))
    baseline = mean_value_baseline(tmp_path / "dl.json")
    assert baseline["mae"] == pytest.approx((20 + 60) / 2) and baseline["bias"] == pytest.approx((20 - 60) / 2)
    assert math.isnan(baseline["pearson_r"])  # a constant correlates with nothing
