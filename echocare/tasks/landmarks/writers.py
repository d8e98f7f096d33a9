"""Ignite handlers of the landmark bundle: evaluation pictures and inference writers.

Points are (x, y) in pixels of the original image; heatmaps come at the network's grid and
are decoded with :func:`~echocare.tasks.landmarks.network.decode_heatmaps`, then mapped back by
the item's ``original_size`` (:func:`~echocare.tasks.landmarks.data.grid_to_original`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from echocare.engines.handlers import item_source
from echocare.tasks.landmarks.data import grid_to_original
from echocare.tasks.landmarks.network import decode_heatmaps
from echocare.tasks.supervised.data import read_clip
from echocare.tasks.supervised.segmentation_scoring import class_key
from echocare.engines.writers import PredictionWriter, RunFileWriter
from echocare.visualize import new_figure, save_figure

__all__ = [
    "LandmarkOverlayWriter",
    "LandmarkPredictionWriter",
    "landmark_error_boxplot_figure",
    "landmark_label_map",
    "landmark_overlay_figure",
    "predicted_landmarks",
]

logger = logging.getLogger(__name__)


def predicted_landmarks(heatmaps: Any, original_size: Any) -> torch.Tensor:
    """(K, h, w) heatmaps -> (K, 2) float64 points (x, y) in pixels of an image of
    ``original_size`` (H, W)."""

    hm = torch.as_tensor(heatmaps).detach().float().cpu()
    return grid_to_original(decode_heatmaps(hm[None])[0], tuple(hm.shape[-2:]), original_size)


def landmark_label_map(points: Any, size: Sequence[int], radius: float | None = None) -> np.ndarray:
    """A small filled disc per landmark as an (H, W) uint8 label map: 0 background, landmark
    ``k`` (0-based, in the given order) as ``k + 1``; a later disc covers an earlier one.

    Args:
        points: (K, 2) points (x, y) in pixels of the image, K below 255.
        size: (H, W) of the image.
        radius: disc radius in pixels; default 1 % of the longer side, at least 2 pixels.
    """
    from PIL import Image, ImageDraw

    height, width = (int(s) for s in size[:2])
    p = np.asarray(torch.as_tensor(points, dtype=torch.float64)).reshape(-1, 2)
    if len(p) >= 255:
        raise ValueError(f"{len(p)} landmarks do not fit a uint8 label map")
    r = float(radius) if radius is not None else max(2.0, 0.01 * max(height, width))
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for k, (x, y) in enumerate(p):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=k + 1)
    return np.asarray(canvas, dtype=np.uint8)


def _grey(image: Any) -> np.ndarray:
    """(3, H, W) / (1, H, W) / (H, W) / (H, W, 3) in [0, 1] -> (H, W) float."""
    a = np.asarray(torch.as_tensor(image).detach().float().cpu())
    if a.ndim == 3:
        a = a.mean(0) if a.shape[0] in (1, 3) else a.mean(-1)
    return a


def landmark_overlay_figure(
    image: Any, pred: Any, true: Any | None, landmark_names: Sequence[str] | None = None, title: str | None = None
) -> Figure:
    """The image with true points (green circles), predicted points (red crosses), a yellow
    line from each true point to its prediction and the landmark numbers (1-based, in the
    order of ``landmark_names``, listed under the picture).

    Args:
        image: the original image, (H, W), (1|3, H, W) or (H, W, 3) in [0, 1].
        pred, true: (K, 2) points (x, y) in the image's pixels; ``true`` may be None.
    """
    grey = _grey(image)
    h, w = grey.shape
    p = np.asarray(torch.as_tensor(pred, dtype=torch.float64))
    fig = new_figure(6.0, 6.0 * h / w + 0.9)
    ax = fig.add_axes((0.0, 0.12, 1.0, 0.8))
    ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, interpolation="bilinear")
    if true is not None:
        t = np.asarray(torch.as_tensor(true, dtype=torch.float64))
        for (x0, y0), (x1, y1) in zip(t, p):
            ax.plot([x0, x1], [y0, y1], color="yellow", linewidth=0.8)
        ax.scatter(t[:, 0], t[:, 1], s=22, facecolors="none", edgecolors="lime", linewidths=1.0, label="true")
    ax.scatter(p[:, 0], p[:, 1], s=22, marker="x", color="red", linewidths=1.0, label="predicted")
    for k, (x, y) in enumerate(p, 1):
        ax.text(x + 2, y - 2, str(k), color="white", fontsize=6)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    ax.legend(loc="lower right", fontsize=7, framealpha=0.6)
    if landmark_names:
        text = "  ".join(f"{k}:{n}" for k, n in enumerate(landmark_names, 1))
        fig.text(0.01, 0.01, text, fontsize=5, wrap=True, va="bottom")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def landmark_error_boxplot_figure(errors: dict[str, Sequence[float]], unit: str = "px") -> Figure:
    """Box plot of the radial errors of each landmark (one box per name, over images)."""
    names = list(errors)
    fig = new_figure(max(6.0, 0.35 * len(names) + 2.0), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot([list(errors[n]) for n in names], showfliers=True)
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"radial error ({unit}, original image)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


class LandmarkOverlayWriter(RunFileWriter):
    """Evaluation pictures of landmarks: per image (the first ``max_images``) the ORIGINAL
    image with true and predicted points and error lines (``<output_dir>/<stem>.png``), and
    when the run completes a box plot of the radial errors per landmark over all evaluated
    images (``boxplot_path``).

    Reads from each evaluated item ``pred_landmarks`` and ``error_px_<name>`` (written by
    :class:`~echocare.tasks.landmarks.metrics.LandmarkScored`) and ``landmarks`` (true points).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        landmark_names: Sequence[str],
        boxplot_path: str | os.PathLike[str] | None = None,
        max_images: int = 16,
    ) -> None:
        self.landmark_names = list(landmark_names)
        self.boxplot_path = Path(boxplot_path) if boxplot_path else None
        super().__init__(output_dir, max_images)

    def reset(self) -> None:
        self.errors: dict[str, list[float]] = {n: [] for n in self.landmark_names}

    def write_pair(self, source: dict[str, Any], output: dict[str, Any]) -> None:

        merged = {**source, **output}
        for n in self.landmark_names:
            self.errors[n].append(float(merged[f"error_px_{class_key(n)}"]))
        name = self.picture_name(source, output)
        if name is None:
            return
        image = read_clip(item_source(merged, default=name), [0])[0]
        fig = landmark_overlay_figure(
            image, merged["pred_landmarks"], merged.get("landmarks"), self.landmark_names,
            title=f"{name}: MRE {float(merged['mre_px']):.2f} px",
        )
        save_figure(fig, self.output_dir / f"{name}.png")

    def finish(self) -> None:
        if self.boxplot_path is None or not any(self.errors.values()):
            return
        save_figure(landmark_error_boxplot_figure(self.errors), self.boxplot_path)


class LandmarkPredictionWriter(PredictionWriter):
    """Inference output of landmarks, one result per input frame, named after the input:
    ``<stem>[_frameNNNN].json`` (``landmarks``: name -> [x, y] in pixels of the original
    image, and ``image_size`` [H, W]) and ``<stem>[_frameNNNN].csv`` (``landmark, x, y``),
    plus ``predictions.json`` / ``predictions.csv`` (one row per input: ``x_<name>``,
    ``y_<name>``). ``class_names`` of the base writer are the landmark names."""

    def write_item(self, source: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
        import csv
        import json

        path, name, frame = self._name(source)
        size = source.get("original_size")
        if size is None:
            size = torch.as_tensor(output["pred"]).shape[-2:]
        points = predicted_landmarks(output["pred"], size).tolist()
        if len(points) != len(self.class_names):
            raise ValueError(f"{path}: {len(points)} heatmaps but {len(self.class_names)} landmark names")
        coords = {n: [round(x, 2), round(y, 2)] for n, (x, y) in zip(self.class_names, points)}
        height, width = (int(s) for s in torch.as_tensor(size).reshape(-1)[:2])
        record = {"image": path, "frame": frame if frame is not None else 0, "image_size": [height, width],
                  "landmarks": coords}
        (self.output_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
        with (self.output_dir / f"{name}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["landmark", "x", "y"])
            writer.writerows([n, x, y] for n, (x, y) in coords.items())
        flat = {f"{axis}_{class_key(n)}": xy[i] for n, xy in coords.items() for i, axis in enumerate("xy")}
        return {**record, **flat}
