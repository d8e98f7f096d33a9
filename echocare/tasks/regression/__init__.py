"""Scalar regression from sequences or images (``camus_ef``): data, network, metrics, writers."""

from echocare.tasks.regression.data import RegressionOutputd, RegressionTargetd, TARGET_UNITS, load_regression_datalist, regression_inputs
from echocare.tasks.regression.metrics import REGRESSION_SCORE_NAMES, RegressionScore, mean_value_baseline, regression_metrics, regression_scores
from echocare.tasks.regression.writers import RegressionFigureWriter, RegressionPredictionWriter
from echocare.tasks.regression.network import EchoCareRegressor, FRAME_NORMS, TEMPORAL_MODELS

__all__ = ["EchoCareRegressor", "FRAME_NORMS", "REGRESSION_SCORE_NAMES", "RegressionFigureWriter", "RegressionOutputd", "RegressionPredictionWriter", "RegressionScore", "RegressionTargetd", "TARGET_UNITS", "TEMPORAL_MODELS", "load_regression_datalist", "mean_value_baseline", "regression_inputs", "regression_metrics", "regression_scores"]
