"""Trivial baselines of segmentation and classification: what a model must beat to show it learnt.

Both are computed from the list that is evaluated (``validation`` by default), so they are the
scores a network that never looked at the images could reach on exactly that data:

- segmentation: every pixel predicted as class ``c``, scored for class ``c`` with the Dice of
  :func:`~echocare.tasks.supervised.segmentation_scores` at each mask's own (original) size.
  Done for each foreground class separately, so the baseline's ``mean_dice`` is at least that of
  any constant label map.
- classification: every item predicted as the most frequent class of the evaluated labels
  (``accuracy``), and, for two classes, one constant score for every item (``auc`` 0.5: it ranks
  no positive above a negative).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

import numpy as np

from echocare.tasks.supervised.data import load_task_datalist, read_label_map
from echocare.tasks.supervised.segmentation_scoring import class_key

__all__ = ["all_foreground_baseline", "majority_class_baseline"]


def all_foreground_baseline(
    datalist: str | os.PathLike[str],
    class_names: Sequence[str],
    base_dir: str | os.PathLike[str] | None = None,
    key: str = "validation",
    mask_values: Sequence[int] | None = None,
    label_key: str = "label",
) -> dict[str, float]:
    """Dice of the all-foreground prediction on the masks of the list ``key``.

    For each foreground class ``c`` and each mask, the prediction "every pixel is ``c``" is
    scored for class ``c`` (``2 |Y_c| / (|Y_c| + H W)``; 0 where the mask lacks ``c``), at the
    mask's own size.

    Args:
        datalist: MONAI datalist JSON.
        class_names: all class names, background first.
        base_dir: root of relative paths (the bundle's ``dataset_dir``); default the datalist's folder.
        key: the evaluated list.
        mask_values: stored value of each class in the masks (the bundle's ``mask_values``).
        label_key: the item key of the mask file.

    Returns:
        ``{"dice_<class>": mean over the masks, for each foreground class, "mean_dice": the mean
        of those}``, in [0, 1].
    """
    items = load_task_datalist(datalist, key, "segmentation", class_names, base_dir=base_dir,
                               check_images=False, mask_values=mask_values, label_key=label_key)
    per_class: dict[str, list[float]] = {f"dice_{class_key(name)}": [] for name in class_names[1:]}
    for item in items:
        label = read_label_map(item["label"], values=mask_values, num_classes=len(class_names))
        for index, name in enumerate(class_names[1:], start=1):
            # segmentation_scores' Dice of np.full(label.shape, index), without its surface distances
            present = int((label == index).sum())
            per_class[f"dice_{class_key(name)}"].append(2.0 * present / (present + label.size))
    baseline = {name: float(np.mean(values)) for name, values in per_class.items()}
    baseline["mean_dice"] = float(np.mean(list(baseline.values())))
    return baseline


def majority_class_baseline(
    datalist: str | os.PathLike[str],
    class_names: Sequence[str],
    base_dir: str | os.PathLike[str] | None = None,
    key: str = "validation",
    label_key: str = "label",
) -> dict[str, float]:
    """Scores of a constant answer on the labels of the list ``key``.

    Args:
        datalist: MONAI datalist JSON.
        class_names: the bundle's classes.
        base_dir: root of relative paths; default the datalist's folder.
        key: the evaluated list.
        label_key: the item key of the class index (``malignant`` for BUS-BRA's pathology).

    Returns:
        ``{"accuracy": fraction of the most frequent label, "balanced_accuracy": 1 / number of
        classes present}``, plus ``"auc": 0.5`` for two classes.
    """
    items = load_task_datalist(datalist, key, "classification", class_names, base_dir=base_dir,
                               check_images=False, label_key=label_key)
    counts = Counter(item["label"] for item in items)
    baseline = {"accuracy": max(counts.values()) / len(items), "balanced_accuracy": 1.0 / len(counts)}
    if len(class_names) == 2:
        baseline["auc"] = 0.5
    return baseline
