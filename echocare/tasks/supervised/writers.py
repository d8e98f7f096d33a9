"""Handlers of the segmentation and classification bundles: evaluation pictures and inference writers.

All read MONAI's decollated ``engine.state.batch`` / ``engine.state.output`` lists (one
dict per item): ``pred`` holds class probabilities (the bundles' postprocessing applies the
softmax), ``label`` the ground truth, the batch item the input (``image`` with its meta,
``frame``, ``num_frames``, ``original_size``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from echocare.engines.writers import PredictionWriter, RunFileWriter

__all__ = [
    "ClassificationFigureWriter",
    "ClassificationPredictionWriter",
    "SegmentationOverlayWriter",
    "SegmentationPredictionWriter",
    "probabilities_to_mask",
]

logger = logging.getLogger(__name__)


def _labels_of(pred: torch.Tensor) -> np.ndarray:
    """(C, H, W) probabilities -> (H, W) class indices; (1, H, W) labels pass through."""
    pred = torch.as_tensor(pred).detach().float().cpu()
    if pred.ndim == 3 and pred.shape[0] > 1:
        return pred.argmax(0).numpy().astype(np.int64)
    return pred.reshape(pred.shape[-2:]).round().numpy().astype(np.int64)


class SegmentationOverlayWriter(RunFileWriter):
    """Evaluation pictures of segmentation: image, ground truth and prediction side by side.

    Writes ``<output_dir>/<stem>.png`` for the first ``max_images`` items of a run (the
    same items every run, as the validation loader does not shuffle).

    Args:
        output_dir: folder of the pictures (``<output_dir>/eval/overlays``).
        class_names: class names, background first.
        max_images: how many items to draw.
    """

    def __init__(self, output_dir: str | os.PathLike[str], class_names: Sequence[str], max_images: int = 16) -> None:
        self.class_names = list(class_names)
        super().__init__(output_dir, max_images)

    def write_pair(self, source: dict[str, Any], output: dict[str, Any]) -> None:
        from echocare.visualize import save_segmentation_overlay

        name = self.picture_name(source, output)
        if name is None:
            return
        merged = {**source, **output}
        label = merged.get("label")
        save_segmentation_overlay(
            torch.as_tensor(merged["image"]).detach().float().cpu(),
            _labels_of(output["pred"]),
            _labels_of(label) if label is not None else None,
            self.output_dir / f"{name}.png",
            class_names=self.class_names,
            title=name,
        )


class ClassificationFigureWriter(RunFileWriter):
    """Evaluation pictures of classification: the confusion matrix and, for two classes, the
    ROC curve with the Youden cut-off marked (``confusion_matrix.png``, ``roc_curve.png`` in
    ``output_dir``). Collects ``pred`` (probabilities) and ``label`` over the run."""

    def __init__(self, output_dir: str | os.PathLike[str], class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        super().__init__(output_dir)

    def reset(self) -> None:
        self.probs: list[np.ndarray] = []
        self.labels: list[int] = []

    def write_pair(self, source: dict[str, Any], output: dict[str, Any]) -> None:
        self.probs.append(torch.as_tensor(output["pred"]).detach().float().cpu().reshape(-1).numpy())
        self.labels.append(int(torch.as_tensor(output["label"]).reshape(-1)[0]))

    def finish(self) -> None:
        from echocare.tasks.supervised.classification_scoring import confusion_matrix, youden_threshold
        from echocare.tasks.supervised.figures import save_confusion_matrix, save_roc_curve

        if not self.probs:
            return
        probs, labels = np.stack(self.probs), np.asarray(self.labels)
        num_classes = probs.shape[1]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if num_classes == 2 and len(set(labels.tolist())) == 2:
            threshold = youden_threshold(probs[:, 1], labels)
            predicted = (probs[:, 1] >= threshold).astype(np.int64)
            save_roc_curve(probs[:, 1], labels, self.output_dir / "roc_curve.png", threshold=threshold)
        else:
            predicted = probs.argmax(1)
        cm = confusion_matrix(predicted, labels, num_classes)
        save_confusion_matrix(cm, self.class_names, self.output_dir / "confusion_matrix.png")


def probabilities_to_mask(probabilities: torch.Tensor, size: Sequence[int] | torch.Tensor | None = None) -> np.ndarray:
    """(C, h, w) class probabilities -> (H, W) uint8 class indices at ``size`` = (H, W).

    The probabilities are resampled bilinearly to ``size`` before the argmax, so masks follow
    the prediction rather than a nearest-neighbour staircase; ``None`` keeps (h, w).
    """
    probs = torch.as_tensor(probabilities).detach().float().cpu()
    if size is not None:
        height, width = (int(s) for s in torch.as_tensor(size).reshape(-1)[:2])
        probs = F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return probs.argmax(0).numpy().astype(np.uint8)


class SegmentationPredictionWriter(PredictionWriter):
    """Inference output of segmentation, one result per input frame, named after the input:
    ``<stem>[_frameNNNN].png`` (8-bit class indices at the input's original size) and
    ``.nii.gz`` (the same mask, NIfTI axes (x=column, y=row)), plus ``predictions.json`` /
    ``.csv`` listing each input, its files and the pixel count of each class.

    The class probabilities are resampled bilinearly to the original size before the
    argmax, so masks follow the prediction rather than a nearest-neighbour staircase.
    """

    def write_item(self, source: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
        import nibabel
        from PIL import Image

        path, name, frame = self._name(source)
        mask = probabilities_to_mask(output["pred"], source.get("original_size"))
        png = self.output_dir / f"{name}.png"
        Image.fromarray(mask).save(png)
        nifti = self.output_dir / f"{name}.nii.gz"
        nibabel.save(nibabel.Nifti1Image(mask.T[:, :, None], np.eye(4)), str(nifti))
        counts = {n: int((mask == k).sum()) for k, n in enumerate(self.class_names) if k > 0}
        return {"image": path, "frame": frame if frame is not None else 0, "mask_png": str(png),
                "mask_nifti": str(nifti), **{f"pixels_{k}": v for k, v in counts.items()}}


class ClassificationPredictionWriter(PredictionWriter):
    """Inference output of classification, one result per input frame (per clip for clip
    models), named after the input: ``<stem>[_frameNNNN].json`` with the class
    probabilities and the predicted class, plus ``predictions.json`` / ``.csv``."""

    def write_item(self, source: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
        path, name, frame = self._name(source)
        probs = torch.as_tensor(output["pred"]).detach().float().cpu().reshape(-1).tolist()
        best = int(np.argmax(probs))
        record = {
            "image": path,
            "frame": frame if frame is not None else 0,
            "predicted": self.class_names[best],
            "predicted_index": best,
            "probabilities": {n: round(p, 6) for n, p in zip(self.class_names, probs)},
        }
        (self.output_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
        return {**record, **{f"p_{n}": p for n, p in record["probabilities"].items()}}
