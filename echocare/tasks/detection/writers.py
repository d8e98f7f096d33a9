"""Handlers of the oriented-ellipse detection bundle (``focus_det``): evaluation overlays and
the inference writer.

Both read MONAI's decollated ``engine.state.batch`` / ``engine.state.output`` after
:class:`~echocare.tasks.detection.data.DecodeEllipsesd`: ``pred_ellipses`` (K, 5) in pixels of
the original image, ``pred_classes``, ``pred_scores`` and, in evaluation, ``true_ellipses``
/ ``true_classes``. Pictures are drawn on the original image, read again from its file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from echocare.engines.handlers import item_source
from echocare.tasks.detection.data import ellipse_rows
from echocare.tasks.detection.metrics import cardiothoracic_ratio, ellipse_polygon
from echocare.tasks.supervised.data import read_clip
from echocare.engines.writers import PredictionWriter, RunFileWriter

__all__ = ["EllipseOverlayWriter", "EllipsePredictionWriter", "draw_ellipses", "ellipse_label_map"]

_CLASS_COLOURS = [(255, 80, 80), (80, 160, 255), (255, 200, 0), (200, 80, 255), (0, 220, 200)]
_TRUE_COLOUR = (0, 255, 0)


def _original_image(source: dict[str, Any], output: dict[str, Any]) -> np.ndarray:
    """The item's original frame as (H, W, 3) uint8 (read again from its file)."""
    path = item_source({**source, **output})
    frame = int(np.asarray(source.get("frame", 0)).reshape(-1)[0]) if source.get("frame") is not None else 0
    pixels = read_clip(path, [frame])[0]
    return (np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8)


def draw_ellipses(
    image: np.ndarray,
    predicted: Sequence[dict[str, Any]],
    true: Sequence[tuple[Sequence[float], int]] = (),
    class_names: Sequence[str] = (),
    path: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Draw true ellipses (green) and predicted ones (one colour per class, with class and
    score) on ``image`` (H, W, 3) uint8; ``predicted`` are rows of
    :func:`~echocare.tasks.detection.data.ellipse_rows`, ``true`` ``(ellipse, class)`` pairs.
    Saves a PNG at ``path`` when given; returns the drawn (H, W, 3) uint8 array."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 256))
    for ellipse, _ in true:
        draw.polygon([tuple(p) for p in ellipse_polygon(ellipse, 72)], outline=_TRUE_COLOUR, width=width)
    for row in predicted:
        colour = _CLASS_COLOURS[row["class_index"] % len(_CLASS_COLOURS)]
        ellipse = [row["cx"], row["cy"], row["semi_major"], row["semi_minor"], row["angle"]]
        draw.polygon([tuple(p) for p in ellipse_polygon(ellipse, 72)], outline=colour, width=width)
        draw.text((row["cx"] + 2, row["cy"] + 2), f"{row['class']} {row['score']:.2f}", fill=colour)
    legend = "green: truth; " if true else ""
    legend += ", ".join(f"{n}" for n in class_names)
    draw.text((2, 2), legend, fill=(255, 255, 255))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path)
    return np.asarray(canvas)


def ellipse_label_map(ellipses: Any, classes: Any, size: Sequence[int]) -> np.ndarray:
    """Filled ellipses as an (H, W) uint8 label map: 0 background, class index + 1 inside
    each ellipse, drawn in the given order (a later ellipse covers an earlier one: give the
    heart after the thorax).

    Args:
        ellipses: (K, 5) ``[cx, cy, semi_major, semi_minor, angle]`` in pixels of the image
            (x right, y down, degrees).
        classes: (K,) class indices, below 255.
        size: (H, W) of the image.
    """
    from PIL import Image, ImageDraw

    height, width = (int(s) for s in size[:2])
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for ellipse, index in zip(np.asarray(ellipses, dtype=np.float64).reshape(-1, 5), np.asarray(classes).reshape(-1)):
        if not 0 <= int(index) < 255:
            raise ValueError(f"class index {int(index)} does not fit a uint8 label map")
        draw.polygon([tuple(p) for p in ellipse_polygon(ellipse, 96)], fill=int(index) + 1)
    return np.asarray(canvas, dtype=np.uint8)


def _detections(output: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.asarray(output["pred_ellipses"], dtype=np.float64).reshape(-1, 5),
        np.asarray(output["pred_classes"], dtype=np.int64).reshape(-1),
        np.asarray(output["pred_scores"], dtype=np.float64).reshape(-1),
    )


def _best_per_class(classes: np.ndarray, scores: np.ndarray, min_score: float) -> np.ndarray:
    """Indices to draw: every detection scoring >= min_score, and the best one of each class."""
    keep = set(np.flatnonzero(scores >= min_score).tolist())
    for k in np.unique(classes):
        members = np.flatnonzero(classes == k)
        keep.add(int(members[np.argmax(scores[members])]))
    return np.asarray(sorted(keep), dtype=np.int64)


class EllipseOverlayWriter(RunFileWriter):
    """Evaluation pictures: the original image with true (green) and predicted ellipses.

    Writes ``<output_dir>/<stem>.png`` for the first ``max_images`` items of a run; drawn are
    the predictions scoring >= ``min_score`` and the best of each class.
    """

    def __init__(
        self, output_dir: str | os.PathLike[str], class_names: Sequence[str], max_images: int = 16, min_score: float = 0.3
    ) -> None:
        self.class_names = list(class_names)
        self.min_score = float(min_score)
        super().__init__(output_dir, max_images)

    def write_pair(self, source: dict[str, Any], output: dict[str, Any]) -> None:
        name = self.picture_name(source, output)
        if name is None:
            return
        ellipses, classes, scores = _detections(output)
        shown = _best_per_class(classes, scores, self.min_score)
        rows = ellipse_rows(ellipses[shown], classes[shown], scores[shown], self.class_names)
        true_e = np.asarray(output.get("true_ellipses", np.zeros((0, 5))), dtype=np.float64).reshape(-1, 5)
        true_c = np.asarray(output.get("true_classes", np.zeros(0)), dtype=np.int64).reshape(-1)
        true = [(e, int(c)) for e, c in zip(true_e, true_c) if c >= 0]
        draw_ellipses(_original_image(source, output), rows, true, self.class_names, self.output_dir / f"{name}.png")


class EllipsePredictionWriter(PredictionWriter):
    """Inference output of detection, one result per input frame, named after the input:
    ``<stem>[_frameNNNN].json`` with the detected ellipses (original pixels, class name,
    score; those scoring >= ``min_score``) and, with ``ctr_classes``, the cardiothoracic
    ratio from the best thorax and heart; ``<stem>[_frameNNNN].png`` the overlay; plus
    ``predictions.json`` / ``.csv``.

    Args:
        output_dir: folder of the outputs.
        class_names: the classes.
        min_score: lowest score listed and drawn (the best of each class is always drawn and
            used for the ratio).
        ctr_classes: (thorax, heart) class indices, or ``None``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        class_names: Sequence[str],
        min_score: float = 0.3,
        ctr_classes: Sequence[int] | None = (0, 1),
    ) -> None:
        super().__init__(output_dir, class_names)
        self.min_score = float(min_score)
        self.ctr_classes = tuple(int(c) for c in ctr_classes) if ctr_classes is not None else None

    def write_item(self, source: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
        path, name, frame = self._name(source)
        ellipses, classes, scores = _detections(output)
        listed = ellipse_rows(ellipses, classes, scores, self.class_names, self.min_score)
        shown = _best_per_class(classes, scores, self.min_score)
        overlay = self.output_dir / f"{name}.png"
        draw_ellipses(_original_image(source, output), ellipse_rows(ellipses[shown], classes[shown], scores[shown], self.class_names),
                      (), self.class_names, overlay)
        record: dict[str, Any] = {"image": path, "frame": frame if frame is not None else 0, "overlay": str(overlay)}
        best = {}
        for k, class_name in enumerate(self.class_names):
            members = np.flatnonzero(classes == k)
            if len(members):
                i = int(members[np.argmax(scores[members])])
                best[class_name] = ellipse_rows(ellipses[i : i + 1], classes[i : i + 1], scores[i : i + 1], self.class_names)[0]
        if self.ctr_classes is not None:
            ratio = cardiothoracic_ratio(ellipses, classes, scores, *self.ctr_classes)
            record["ctr"] = round(ratio, 5) if np.isfinite(ratio) else None
        for class_name, row in best.items():
            record[f"score_{class_name}"] = row["score"]
        record["ellipses"] = listed
        record["best"] = best
        (self.output_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
        return record
