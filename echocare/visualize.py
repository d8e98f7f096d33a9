"""Evaluation pictures: segmentation overlays, confusion matrices, ROC curves (PNG).

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through
``pyplot``: no global figure state, so it is safe in evaluator handlers and worker threads
and needs no display. Each ``save_*`` has a ``*_figure`` twin returning the ``Figure``
(e.g. for ``mlflow.log_figure``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from echocare.tasks.supervised.classification_metrics import roc_auc, roc_curve

__all__ = [
    "PALETTE",
    "class_colour",
    "confusion_matrix_figure",
    "overlay_rgb",
    "bland_altman_figure",
    "regression_scatter_figure",
    "roc_curve_figure",
    "save_confusion_matrix",
    "save_bland_altman",
    "save_regression_scatter",
    "save_roc_curve",
    "save_segmentation_overlay",
    "segmentation_overlay_figure",
]

#: class colours (RGB in [0, 1]) for foreground classes 1, 2, ...: saturated and mutually
#: distinct (Trubetskoy's list), none grey, so they stand out on a grey-scale ultrasound image.
PALETTE: tuple[tuple[float, float, float], ...] = tuple(
    (r / 255.0, g / 255.0, b / 255.0)
    for r, g, b in (
        (230, 25, 75),  # red
        (60, 180, 75),  # green
        (0, 130, 200),  # blue
        (255, 225, 25),  # yellow
        (245, 130, 48),  # orange
        (145, 30, 180),  # purple
        (70, 240, 240),  # cyan
        (240, 50, 230),  # magenta
        (210, 245, 60),  # lime
        (0, 128, 128),  # teal
    )
)

FILL_ALPHA = 0.35
DPI = 100


def class_colour(c: int) -> tuple[float, float, float]:
    """RGB in [0, 1] of foreground class ``c`` >= 1 (the palette repeats after 10 classes)."""
    if c < 1:
        raise ValueError("background (class 0) has no colour")
    return PALETTE[(c - 1) % len(PALETTE)]


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().as_subclass(torch.Tensor).numpy()
    return np.asarray(x)


def _image_rgb(image: Any) -> np.ndarray:
    """(3, H, W), (1, H, W) or (H, W) image in [0, 1] -> (H, W, 3) float in [0, 1]."""
    a = _np(image).astype(np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.moveaxis(a, 0, -1)
    elif a.ndim == 2:
        a = a[..., None]
    else:
        raise ValueError(f"image must be (3, H, W), (1, H, W) or (H, W), got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.clip(np.nan_to_num(a), 0.0, 1.0)


def _labels(x: Any, shape: tuple[int, int], what: str) -> np.ndarray:
    a = _np(x)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.shape != shape:
        raise ValueError(f"{what} must be (H, W) = {shape} like the image, got shape {a.shape}")
    return np.rint(a).astype(np.int64)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def overlay_rgb(image: Any, labels: Any, alpha: float = FILL_ALPHA) -> np.ndarray:
    """Image with each foreground class filled (``alpha`` blend) and outlined (opaque) in its colour.

    Args:
        image: (3, H, W), (1, H, W) or (H, W) in [0, 1].
        labels: (H, W) integer label map (0 = background, left untouched).

    Returns:
        (H, W, 3) float RGB in [0, 1]: inside class c, ``(1 - alpha) * image + alpha *
        class_colour(c)``; on its outline, ``class_colour(c)`` exactly.
    """
    rgb = _image_rgb(image)
    lab = _labels(labels, rgb.shape[:2], "labels")
    out = rgb.copy()
    for c in np.unique(lab):
        if c <= 0:
            continue
        mask = lab == c
        colour = np.asarray(class_colour(int(c)))
        out[mask] = (1 - alpha) * rgb[mask] + alpha * colour
        out[_outline(mask)] = colour
    return out


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def segmentation_overlay_figure(
    image: Any,
    pred: Any,
    label: Any | None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Panels image | ground truth | prediction (no ground-truth panel when ``label`` is None).

    Args:
        image: (3, H, W), (1, H, W) or (H, W) float in [0, 1], numpy or torch.
        pred: (H, W) (or (1, H, W)) integer predicted labels.
        label: same for the reference, or None.
        class_names: all class names, background first; default ``class 1``, ``class 2``, ...
        title: figure title.
    """
    rgb = _image_rgb(image)
    h, w = rgb.shape[:2]
    p = _labels(pred, (h, w), "pred")
    y = None if label is None else _labels(label, (h, w), "label")
    present = set(np.unique(p).tolist()) | (set() if y is None else set(np.unique(y).tolist()))
    num_classes = max(len(class_names) if class_names else 0, max(present) + 1, 2)
    names = list(class_names) if class_names else ["background"] + [f"class {c}" for c in range(1, num_classes)]
    names += [f"class {c}" for c in range(len(names), num_classes)]

    panels = [("image", rgb)]
    if y is not None:
        panels.append(("ground truth", overlay_rgb(rgb.transpose(2, 0, 1), y)))
    panels.append(("prediction", overlay_rgb(rgb.transpose(2, 0, 1), p)))

    panel_in = 4.0
    fig = _new_figure(panel_in * len(panels), panel_in * h / w + 1.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, picture) in zip(axes, panels):
        # nearest: a resampled mask would blend class colours into the image at the edges
        ax.imshow(picture, interpolation="nearest", vmin=0.0, vmax=1.0)
        ax.set_title(name)
        ax.set_axis_off()
    handles = [
        Patch(facecolor=class_colour(c), edgecolor=class_colour(c), label=names[c]) for c in range(1, num_classes)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def save_segmentation_overlay(
    image: Any,
    pred: Any,
    label: Any | None,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write ``segmentation_overlay_figure(...)`` as a PNG at ``path`` (parents created); returns the path."""
    return _save(segmentation_overlay_figure(image, pred, label, class_names=class_names, title=title), path)


def confusion_matrix_figure(cm: Any, class_names: Sequence[str], normalize: bool = False) -> Figure:
    """Confusion matrix (rows = true, columns = predicted) with the counts written in the cells.

    With ``normalize`` the colours show each row's fractions (per-class recall on the diagonal)
    and the cells read ``fraction`` over ``(count)``; otherwise colours and text are counts.
    """
    counts = _np(cm).astype(np.int64)
    k = counts.shape[0]
    if counts.shape != (k, k) or len(class_names) != k:
        raise ValueError(f"cm must be (C, C) with C = len(class_names) = {len(class_names)}, got {counts.shape}")
    row = counts.sum(1, keepdims=True)
    fractions = np.divide(counts, row, out=np.zeros(counts.shape, np.float64), where=row > 0)
    values = fractions if normalize else counts.astype(np.float64)
    vmax = 1.0 if normalize else max(float(values.max()), 1.0)

    side = max(4.0, 0.8 * k + 2.5)
    fig = _new_figure(side + 1.0, side)
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
    return _save(confusion_matrix_figure(cm, class_names, normalize=normalize), path)


def roc_curve_figure(prob_pos: Any, labels: Any, threshold: float | None = None) -> Figure:
    """ROC curve of ``prob_pos`` (N,) against binary ``labels`` (N,), chance diagonal, AUC in the legend.

    When ``threshold`` is given (e.g. the Youden cut-off) its operating point (rule "positive
    when ``prob >= threshold``") is marked. With one class only the curve is undefined: the
    figure then shows the diagonal and says so instead of failing.
    """
    p = _np(prob_pos).astype(np.float64).reshape(-1)
    y = _np(labels).reshape(-1).astype(bool)
    fpr, tpr, _ = roc_curve(p, y)
    auc = roc_auc(p, y)

    fig = _new_figure(5.0, 5.0)
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
    return _save(roc_curve_figure(prob_pos, labels, threshold=threshold), path)


def regression_scatter_figure(pred: Any, true: Any, unit: str = "", name: str = "value") -> Figure:
    """Predicted against true values (N,) with the identity line; MAE, its standard error and
    Pearson r in the title (see :mod:`echocare.tasks.regression.metrics`)."""
    from echocare.tasks.regression.metrics import regression_scores

    p, t = _np(pred).astype(np.float64).reshape(-1), _np(true).astype(np.float64).reshape(-1)
    scores = regression_scores(p, t)
    suffix = f" ({unit})" if unit else ""
    fig = _new_figure(5.0, 5.0)
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
    return _save(regression_scatter_figure(pred, true, unit=unit, name=name), path)


def bland_altman_figure(pred: Any, true: Any, unit: str = "", name: str = "value") -> Figure:
    """Bland-Altman plot: difference (predicted - true) against the mean of the two, with the
    bias and the 95 % limits of agreement (bias ± 1.96 sd of the differences, ddof=1)."""
    from echocare.tasks.regression.metrics import regression_scores

    p, t = _np(pred).astype(np.float64).reshape(-1), _np(true).astype(np.float64).reshape(-1)
    scores = regression_scores(p, t)
    suffix = f" ({unit})" if unit else ""
    fig = _new_figure(6.0, 4.5)
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
    return _save(bland_altman_figure(pred, true, unit=unit, name=name), path)
