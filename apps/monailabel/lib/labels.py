"""Annotators' labels in the MONAI Label datastore -> a datalist for a bundle's own ``train.yaml``.

MONAI Label lists the images that have a final label as ``[{"image": path, "label": path}, ...]``
(``datastore.datalist()``). What a label file holds depends on the model:

* segmentation: a mask file of class indices at the image's size (PNG, GIF, BMP, TIFF, NIfTI or
  ``.npy``; a two-class mask stored as 0/255 reads as 0/1), what the segmentation models return;
* classification: a JSON file ``{"label": "BI-RADS 4"}`` holding a class name (or its index),
  what the classifiers return as their result file (which also holds the probabilities).

This module imports nothing from MONAI Label, so that the conversion is tested in the project's
own environment too.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from echocare.tasks.supervised.data import check_task_item

__all__ = ["LabelFileError", "labelled_items", "read_class_label", "split_items", "task_datalist"]

logger = logging.getLogger(__name__)


class LabelFileError(ValueError):
    """A label file that cannot be used: the message names the file and the problem."""


def read_class_label(path: str | os.PathLike[str], class_names: Sequence[str]) -> int:
    """The class index held by a classification label file ``{"label": NAME_OR_INDEX}``.

    Names match case-insensitively; an index must be in ``0 .. len(class_names) - 1``.

    Raises:
        LabelFileError: unreadable or malformed file, unknown class name, index out of range.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LabelFileError(f"{path}: not a readable JSON label file ({error})") from None
    if not isinstance(content, dict) or "label" not in content:
        raise LabelFileError(f'{path}: a classification label is a JSON object {{"label": CLASS_NAME}}')
    value = content["label"]
    if isinstance(value, bool):
        raise LabelFileError(f"{path}: label {value!r} is neither a class name nor a class index")
    if isinstance(value, (int, np.integer)):
        index = int(value)
        if not 0 <= index < len(class_names):
            raise LabelFileError(
                f"{path}: label {index} is outside the class list {list(class_names)} (0..{len(class_names) - 1})"
            )
        return index
    if isinstance(value, str):
        lowered = [name.lower() for name in class_names]
        if value.strip().lower() in lowered:
            return lowered.index(value.strip().lower())
        raise LabelFileError(f"{path}: unknown class {value!r}; the model's classes are {list(class_names)}")
    raise LabelFileError(f"{path}: label {value!r} is neither a class name nor a class index")


def labelled_items(datastore: Any, tag: str = "final") -> list[dict[str, str]]:
    """``[{"image": path, "label": path}, ...]`` of the images of a MONAI Label datastore that
    have a label with ``tag``. ``final`` (what annotators save) gives what ``datastore.datalist()``
    lists; another tag keeps, e.g., class labels apart from masks saved for the same images.
    (``LocalDatastore.get_labeled_images`` ignores its tag and lists final labels only.)"""
    items = []
    for image_id in datastore.list_images():
        label_id = datastore.get_labels_by_image_id(image_id).get(tag)
        if label_id:
            items.append({"image": datastore.get_image_uri(image_id), "label": datastore.get_label_uri(label_id, tag)})
    return items


def split_items(items: Sequence[dict[str, Any]], val_split: float, seed: int = 0) -> tuple[list, list]:
    """Seeded split into (training, validation); at least one item in each.

    ``val_split`` <= 0 validates on the training items themselves (the bundles keep the best
    checkpoint by a validation metric, so they need a validation list).

    Raises:
        ValueError: fewer than two items with ``val_split`` > 0, or ``val_split`` >= 1.
    """
    items = list(items)
    if val_split <= 0:
        return items, list(items)
    if val_split >= 1:
        raise ValueError(f"val_split must be below 1, got {val_split}")
    if len(items) < 2:
        raise ValueError(f"training needs at least 2 labelled images (1 for validation), found {len(items)}")
    order = np.random.default_rng(seed).permutation(len(items))
    num_val = min(len(items) - 1, max(1, int(round(val_split * len(items)))))
    val = sorted(order[:num_val].tolist())
    train = sorted(order[num_val:].tolist())
    return [items[i] for i in train], [items[i] for i in val]


def task_datalist(
    labelled: Sequence[dict[str, Any]],
    task: str,
    class_names: Sequence[str],
    val_split: float = 0.2,
    seed: int = 0,
) -> tuple[dict[str, Any], list[str]]:
    """A bundle datalist from the datastore's ``[{"image": path, "label": path}, ...]``.

    Every item is checked as the bundle would check it (images decode; masks read, hold only
    known classes and have their image's size; class labels parse); a bad item is reported
    and skipped, so one broken label does not stop the training of the others.

    Args:
        labelled: MONAI Label's ``datastore.datalist()`` (absolute paths).
        task: ``segmentation`` or ``classification``.
        class_names: the bundle's classes (segmentation: background first).
        val_split: fraction of the items held out for validation (see :func:`split_items`).
        seed: seed of the split.

    Returns:
        (datalist, problems): ``{"training": [...], "validation": [...], "class_names": [...]}``
        with absolute paths (segmentation ``label`` = mask path, classification ``label`` =
        class index), and one line per skipped item naming its file and problem.

    Raises:
        ValueError: unknown task, or too few usable items to train and validate.
    """
    if task not in ("segmentation", "classification"):
        raise ValueError(f"unknown task {task!r}; choose segmentation or classification")
    usable: list[dict[str, Any]] = []
    problems: list[str] = []
    for item in labelled:
        image, label = item.get("image"), item.get("label")
        if not image or not label:
            problems.append(f"{image or item}: no label file")
            continue
        entry: dict[str, Any] = {"image": str(image)}
        if task == "classification":
            try:
                entry["label"] = read_class_label(label, class_names)
            except LabelFileError as error:
                problems.append(str(error))
                continue
        else:
            entry["label"] = str(label)
        problem = check_task_item(entry, task, len(class_names))
        if problem is not None:
            problems.append(problem)
            continue
        entry.pop("classes_present", None)
        usable.append(entry)
    for problem in problems:
        logger.warning("skipped label: %s", problem)
    training, validation = split_items(usable, val_split, seed)
    return {"training": training, "validation": validation, "class_names": list(class_names)}, problems
