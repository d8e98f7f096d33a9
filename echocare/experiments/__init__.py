"""Repeated trials of a bundle and their statistics: ``echocare experiment`` and ``echocare compare``.

The paper's evaluation protocol: every model (an initialisation of the encoder: from scratch
or from pretrained weights) is fine-tuned several times with different seeds and fractions of
the training labels, and models are compared by the mean and spread of their scores,
significance tests against the best one, box plots and label-efficiency curves.

- :mod:`~echocare.experiments.run`: the grid init x seed x fraction, one MLflow run per cell
  (:func:`run_experiment`, ``echocare experiment``);
- :mod:`~echocare.experiments.compare`: tables, tests, plots and report over the finished runs
  (:func:`compare_experiment`, ``echocare compare``), with the statistics in
  :mod:`~echocare.experiments.stats` and the figures in :mod:`~echocare.experiments.plots`;
- :mod:`~echocare.experiments.common`: run tags, names, number formats and MLflow look-ups both use.
"""

from __future__ import annotations

from echocare.experiments.common import markdown_table
from echocare.experiments.compare import compare_experiment
from echocare.experiments.plots import boxplot_figure, label_efficiency_figure, model_colours
from echocare.experiments.run import (
    GridCell,
    format_run_table,
    grid_cells,
    parse_fractions,
    parse_inits,
    parse_overrides,
    parse_seeds,
    run_experiment,
)
from echocare.experiments.stats import (
    LOWER_IS_BETTER,
    MIN_WILCOXON_PAIRS,
    describe,
    infer_lower_is_better,
    stars,
    time_to_fraction_of_best,
    welch_ttest,
    wilcoxon_paired,
)

__all__ = [
    "LOWER_IS_BETTER",
    "MIN_WILCOXON_PAIRS",
    "GridCell",
    "boxplot_figure",
    "compare_experiment",
    "describe",
    "format_run_table",
    "grid_cells",
    "infer_lower_is_better",
    "label_efficiency_figure",
    "markdown_table",
    "model_colours",
    "parse_fractions",
    "parse_inits",
    "parse_overrides",
    "parse_seeds",
    "run_experiment",
    "stars",
    "time_to_fraction_of_best",
    "welch_ttest",
    "wilcoxon_paired",
]
