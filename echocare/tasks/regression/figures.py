"""Regression pictures: predicted against true values and Bland-Altman plots (PNG), on the figure
helpers of :mod:`echocare.visualize`. Each ``save_*`` has a ``*_figure`` twin returning the ``Figure``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from echocare.tasks.regression.metrics import regression_scores
from echocare.visualize import PALETTE, as_numpy, new_figure, save_figure

__all__ = ["bland_altman_figure", "regression_scatter_figure", "save_bland_altman", "save_regression_scatter"]


def regression_scatter_figure(pred: Any, true: Any, unit: str = "", name: str = "value") -> Figure:
    """Predicted against true values (N,) with the identity line; MAE, its standard error and
    Pearson r in the title (see :mod:`echocare.tasks.regression.metrics`)."""
    p, t = as_numpy(pred).astype(np.float64).reshape(-1), as_numpy(true).astype(np.float64).reshape(-1)
    scores = regression_scores(p, t)
    suffix = f" ({unit})" if unit else ""
    fig = new_figure(5.0, 5.0)
    ax = fig.subplots()
    both = np.concatenate([p, t]) if p.size else np.array([0.0, 1.0])
    lo, hi = float(both.min()), float(both.max())
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], linestyle="--", color="grey", label="identity")
    ax.scatter(t, p, s=18, color=PALETTE[2], alpha=0.8, label=f"{p.size} cases")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel(f"true {name}{suffix}")
    ax.set_ylabel(f"predicted {name}{suffix}")
    ax.set_title(f"MAE {scores['mae']:.2f} ± {scores['mae_se']:.2f} (SE), r = {scores['pearson_r']:.3f}", fontsize=10)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def save_regression_scatter(pred: Any, true: Any, path: str | Path, unit: str = "", name: str = "value") -> Path:
    """Write ``regression_scatter_figure(pred, true, unit, name)`` as a PNG at ``path``; returns the path."""
    return save_figure(regression_scatter_figure(pred, true, unit=unit, name=name), path)


def bland_altman_figure(pred: Any, true: Any, unit: str = "", name: str = "value") -> Figure:
    """Bland-Altman plot: difference (predicted - true) against the mean of the two, with the
    bias and the 95 % limits of agreement (bias ± 1.96 sd of the differences, ddof=1)."""
    p, t = as_numpy(pred).astype(np.float64).reshape(-1), as_numpy(true).astype(np.float64).reshape(-1)
    scores = regression_scores(p, t)
    suffix = f" ({unit})" if unit else ""
    fig = new_figure(6.0, 4.5)
    ax = fig.subplots()
    ax.scatter((p + t) / 2, p - t, s=18, color=PALETTE[2], alpha=0.8)
    ax.axhline(0.0, color="grey", linewidth=1)
    ax.axhline(scores["bias"], color=PALETTE[0], label=f"bias {scores['bias']:.2f}")
    if np.isfinite(scores["loa_low"]):
        for value in (scores["loa_low"], scores["loa_high"]):
            ax.axhline(value, color=PALETTE[0], linestyle="--")
        ax.plot([], [], color=PALETTE[0], linestyle="--", label=f"95 % limits {scores['loa_low']:.2f} .. {scores['loa_high']:.2f}")
    ax.set_xlabel(f"mean of predicted and true {name}{suffix}")
    ax.set_ylabel(f"predicted - true{suffix}")
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    return fig


def save_bland_altman(pred: Any, true: Any, path: str | Path, unit: str = "", name: str = "value") -> Path:
    """Write ``bland_altman_figure(pred, true, unit, name)`` as a PNG at ``path``; returns the path."""
    return save_figure(bland_altman_figure(pred, true, unit=unit, name=name), path)
