"""Picture helpers every task uses: class colours, label overlays, segmentation overlay figures (PNG).

Task pictures build on these: confusion matrices and ROC curves in
:mod:`echocare.tasks.supervised.figures`, scatter and Bland-Altman plots in
:mod:`echocare.tasks.regression.figures`.

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

__all__ = [
    "PALETTE",
    "as_numpy",
    "class_colour",
    "new_figure",
    "overlay_rgb",
    "save_figure",
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


def as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().as_subclass(torch.Tensor).numpy()
    return np.asarray(x)


def _image_rgb(image: Any) -> np.ndarray:
    """(3, H, W), (1, H, W) or (H, W) image in [0, 1] -> (H, W, 3) float in [0, 1]."""
    a = as_numpy(image).astype(np.float64)
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
    a = as_numpy(x)
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


def new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
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
    fig = new_figure(panel_in * len(panels), panel_in * h / w + 1.0)
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
    return save_figure(segmentation_overlay_figure(image, pred, label, class_names=class_names, title=title), path)


