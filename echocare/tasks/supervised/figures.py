"""Classification pictures: confusion matrices and ROC curves (PNG), on the figure helpers of
:mod:`echocare.visualize`. Each ``save_*`` has a ``*_figure`` twin returning the ``Figure``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from echocare.tasks.supervised.classification_scoring import roc_auc, roc_curve
from echocare.visualize import PALETTE, as_numpy, new_figure, save_figure

__all__ = ["confusion_matrix_figure", "roc_curve_figure", "save_confusion_matrix", "save_roc_curve"]


def confusion_matrix_figure(cm: Any, class_names: Sequence[str], normalize: bool = False) -> Figure:
    """Confusion matrix (rows = true, columns = predicted) with the counts written in the cells.

    With ``normalize`` the colours show each row's fractions (per-class recall on the diagonal)
    and the cells read ``fraction`` over ``(count)``; otherwise colours and text are counts.
    """
    counts = as_numpy(cm).astype(np.int64)
    k = counts.shape[0]
    if counts.shape != (k, k) or len(class_names) != k:
        raise ValueError(f"cm must be (C, C) with C = len(class_names) = {len(class_names)}, got {counts.shape}")
    row = counts.sum(1, keepdims=True)
    fractions = np.divide(counts, row, out=np.zeros(counts.shape, np.float64), where=row > 0)
    values = fractions if normalize else counts.astype(np.float64)
    vmax = 1.0 if normalize else max(float(values.max()), 1.0)

    side = max(4.0, 0.8 * k + 2.5)
    fig = new_figure(side + 1.0, side)
    ax = fig.subplots()
    im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            text = f"{fractions[i, j]:.2f}\n({counts[i, j]})" if normalize else str(counts[i, j])
            # white on dark cells, black on light ones
            colour = "white" if values[i, j] > 0.5 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour)
    fig.tight_layout()
    return fig


def save_confusion_matrix(cm: Any, class_names: Sequence[str], path: str | Path, normalize: bool = False) -> Path:
    """Write ``confusion_matrix_figure(cm, class_names, normalize)`` as a PNG at ``path``; returns the path."""
    return save_figure(confusion_matrix_figure(cm, class_names, normalize=normalize), path)


def roc_curve_figure(prob_pos: Any, labels: Any, threshold: float | None = None) -> Figure:
    """ROC curve of ``prob_pos`` (N,) against binary ``labels`` (N,), chance diagonal, AUC in the legend.

    When ``threshold`` is given (e.g. the Youden cut-off) its operating point (rule "positive
    when ``prob >= threshold``") is marked. With one class only the curve is undefined: the
    figure then shows the diagonal and says so instead of failing.
    """
    p = as_numpy(prob_pos).astype(np.float64).reshape(-1)
    y = as_numpy(labels).reshape(-1).astype(bool)
    fpr, tpr, _ = roc_curve(p, y)
    auc = roc_auc(p, y)

    fig = new_figure(5.0, 5.0)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    if np.isfinite(auc):
        ax.plot(fpr, tpr, color=PALETTE[2], linewidth=2, label=f"ROC (AUC = {auc:.3f})")
        if threshold is not None:
            pred = p >= threshold
            sens = float(np.sum(pred & y)) / float(np.sum(y))
            fp_rate = float(np.sum(pred & ~y)) / float(np.sum(~y))
            ax.plot(
                [fp_rate],
                [sens],
                marker="o",
                markersize=9,
                linestyle="none",
                color=PALETTE[0],
                label=f"cut-off {threshold:.3g} (sens {sens:.2f}, spec {1 - fp_rate:.2f})",
            )
    else:
        ax.plot([], [], linestyle="none", label="AUC n/a (one class only)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def save_roc_curve(prob_pos: Any, labels: Any, path: str | Path, threshold: float | None = None) -> Path:
    """Write ``roc_curve_figure(prob_pos, labels, threshold)`` as a PNG at ``path``; returns the path."""
    return save_figure(roc_curve_figure(prob_pos, labels, threshold=threshold), path)
