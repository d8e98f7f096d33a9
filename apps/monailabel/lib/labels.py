"""Annotators' labels in the MONAI Label datastore -> a datalist for a bundle's own ``train.yaml``.

MONAI Label lists the images that have a final label as ``[{"image": path, "label": path}, ...]``
(``datastore.datalist()``). What a label file holds depends on the model:

* segmentation: a mask file of class indices at the image's size (PNG, GIF, BMP, TIFF, NIfTI or
  ``.npy``; a two-class mask stored as 0/255 reads as 0/1), what the segmentation models return;
* classification: a JSON file ``{"label": "BI-RADS 4"}`` holding a class name (or its index),
  what the classifiers return as their result file (which also holds the probabilities);
* detection, landmarks, regression (EF), report: a JSON file holding the task's datalist keys
  (``ellipses`` and ``classes``; ``landmarks``; ``ef`` and optional ``ed_frame``, ``es_frame``;
  ``report`` and optional ``image2``, the second view's image id), see :data:`JSON_LABEL_KEYS`;
* enhancement: the high-quality ``target`` image, saved as a label under its own tag.

JSON labels are read as data (:func:`lib.validation.check_json_label`: size-limited, one object,
nothing evaluated) and checked key by key; other keys (what an infer result adds) are ignored.

This module imports nothing from MONAI Label, so that the conversion is tested in the project's
own environment too.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from echocare.io.readers import UltrasoundReadError
from echocare.tasks.regression.data import frame_index_problem
from echocare.tasks.supervised.data import check_task_item, first_frame_size
from lib.validation import JSON_LABEL_LIMIT, RequestFieldError, check_json_label, check_store_name

__all__ = [
    "JSON_LABEL_KEYS",
    "LabelFileError",
    "labelled_items",
    "read_class_label",
    "read_json_label",
    "split_items",
    "task_datalist",
]

#: The datalist keys a JSON label holds, by task (the datalist keys of docs/architecture.md; ``image2`` names the
#: report's second view, an image id of the studies folder).
JSON_LABEL_KEYS = {
    "detection": {"ellipses": "[[cx, cy, semi_major, semi_minor, angle], ...] in pixels, degrees",
                  "classes": "[class index or name, ...], one per ellipse"},
    "landmarks": {"landmarks": "[[x, y], ...] in the bundle's landmark order, or {name: [x, y]}"},
    "regression": {"ef": "ejection fraction in percent", "ed_frame": "optional frame index",
                   "es_frame": "optional frame index"},
    "report": {"report": "the report text", "image2": "optional image id of the second view"},
}
#: The longest report text a label may hold, in characters.
MAX_REPORT_CHARS = 20_000

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
        if path.stat().st_size > JSON_LABEL_LIMIT:
            raise LabelFileError(f"{path}: {path.stat().st_size} bytes; a JSON label holds at most {JSON_LABEL_LIMIT}")
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


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} {value!r} is not a number")
    return float(value)


def _frame_index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} {value!r} is not a frame index (an integer >= 0)")
    return value


def _point(value: Any, what: str) -> list[float]:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"{what} {value!r} is not a point [x, y]")
    return [_finite(v, what) for v in value]


def _detection_keys(content: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    ellipses, classes = content.get("ellipses"), content.get("classes")
    if not isinstance(ellipses, list) or not isinstance(classes, list) or len(ellipses) != len(classes):
        raise ValueError('a detection label is {"ellipses": [[cx, cy, semi_major, semi_minor, angle], ...], '
                         '"classes": [...]} with one class per ellipse')
    out_ellipses = []
    for k, ellipse in enumerate(ellipses):
        if not isinstance(ellipse, list) or len(ellipse) != 5:
            raise ValueError(f"ellipse {k} {ellipse!r} is not [cx, cy, semi_major, semi_minor, angle]")
        values = [_finite(v, f"ellipse {k}") for v in ellipse]
        if values[2] <= 0 or values[3] <= 0:
            raise ValueError(f"ellipse {k} has a semi-axis <= 0")
        out_ellipses.append(values)
    out_classes = [_class_index(value, names) for value in classes]
    return {"ellipses": out_ellipses, "classes": out_classes}


def _class_index(value: Any, names: Sequence[str]) -> int:
    if isinstance(value, str) and value.strip().lower() in [n.lower() for n in names]:
        return [n.lower() for n in names].index(value.strip().lower())
    if not isinstance(value, bool) and isinstance(value, int) and 0 <= value < len(names):
        return value
    raise ValueError(f"class {value!r} is not one of {list(names)} (or its index 0..{len(names) - 1})")


def _landmark_keys(content: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    points = content.get("landmarks")
    if isinstance(points, dict):  # {name: [x, y]}, what the landmark model returns
        if sorted(points) != sorted(names):
            missing, extra = sorted(set(names) - set(points)), sorted(set(points) - set(names))
            raise ValueError(f"landmarks must name each of the {len(names)} landmarks once (missing {missing}, "
                             f"unknown {extra})")
        points = [points[n] for n in names]
    if not isinstance(points, list) or len(points) != len(names):
        raise ValueError(f'a landmark label is {{"landmarks": [[x, y], ...]}} with {len(names)} points in the '
                         "bundle's order (or {name: [x, y]})")
    return {"landmarks": [_point(p, f"landmark {k}") for k, p in enumerate(points)]}


def _regression_keys(content: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    if "ef" not in content:
        raise ValueError('an EF label is {"ef": percent[, "ed_frame": i, "es_frame": j]}')
    ef = _finite(content["ef"], "ef")
    if not 0 <= ef <= 100:
        raise ValueError(f"ef {ef} is not a percentage in 0..100")
    keys: dict[str, Any] = {"ef": ef}
    for key in ("ed_frame", "es_frame"):
        if content.get(key) is not None:
            keys[key] = _frame_index(content[key], key)
    return keys


def _report_keys(content: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    report = content.get("report")
    if not isinstance(report, str) or not report.strip():
        raise ValueError('a report label is {"report": "the text"[, "image2": "second image id"]}')
    if len(report) > MAX_REPORT_CHARS:
        raise ValueError(f"report of {len(report)} characters; at most {MAX_REPORT_CHARS}")
    keys: dict[str, Any] = {"report": report}
    if content.get("image2") not in (None, ""):
        try:
            keys["image2"] = check_store_name(content["image2"], "image2")
        except RequestFieldError as error:
            raise ValueError(str(error)) from None
    return keys


_JSON_READERS: dict[str, Callable[[Mapping[str, Any], Sequence[str]], dict[str, Any]]] = {
    "detection": _detection_keys,
    "landmarks": _landmark_keys,
    "regression": _regression_keys,
    "report": _report_keys,
}


def read_json_label(path: str | os.PathLike[str], task: str, names: Sequence[str] = ()) -> dict[str, Any]:
    """The datalist keys of a JSON label file of ``task`` (see :data:`JSON_LABEL_KEYS`), checked.

    Args:
        path: the label file.
        task: ``detection``, ``landmarks``, ``regression`` or ``report``.
        names: the bundle's class names (detection) or landmark names (landmarks).

    Raises:
        LabelFileError: unreadable, too large, not an object, or a key that does not hold what
            the task reads; the message names the file.
    """
    try:
        content = check_json_label(path)
        return _JSON_READERS[task](content, names)
    except RequestFieldError as error:
        raise LabelFileError(f"{path}: {error.problem.split(': ', 1)[-1]}") from None
    except ValueError as error:
        raise LabelFileError(f"{path}: {error}") from None


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


def _image_problem(path: str) -> str | None:
    try:
        first_frame_size(path)
    except UltrasoundReadError as error:
        return str(error)
    return None


def _task_entry(
    image: str, label: str, task: str, names: Sequence[str], image_path: Callable[[str], str | None] | None
) -> dict[str, Any]:
    """One datalist item of ``task`` from an image and its label file.

    Raises:
        LabelFileError: the label or an image it names cannot be used (the message names the file).
    """
    if task == "classification":
        return {"image": image, "label": read_class_label(label, names)}
    if task == "segmentation":
        return {"image": image, "label": label}
    if task == "enhancement":  # the label is the high-quality image
        problem = _image_problem(image) or _image_problem(label)
        if problem is not None:
            raise LabelFileError(problem)
        sizes = first_frame_size(image), first_frame_size(label)
        if tuple(sizes[0]) != tuple(sizes[1]):
            raise LabelFileError(f"{label}: target of {sizes[1][0]}x{sizes[1][1]} pixels but its image {image} is "
                                 f"{sizes[0][0]}x{sizes[0][1]}")
        return {"image": image, "target": label}
    keys = read_json_label(label, task, names)
    if task != "report":
        return {"image": image, **keys}
    second = keys.pop("image2", None)
    second_path = image_path(second) if second and image_path is not None else None
    if second and not second_path:
        raise LabelFileError(f"{label}: image2 {second!r} is not an image of the studies folder")
    return {"images": [image, second_path or image], **keys}


def task_datalist(
    labelled: Sequence[dict[str, Any]],
    task: str,
    class_names: Sequence[str],
    val_split: float = 0.2,
    seed: int = 0,
    image_path: Callable[[str], str | None] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """A bundle datalist from the datastore's ``[{"image": path, "label": path}, ...]``.

    Every item is checked as the bundle would check it (images decode; masks read, hold only
    known classes and have their image's size; class labels parse; JSON labels hold the task's
    keys; EF frame indices lie inside their sequence; enhancement targets decode at their
    image's size); a bad item is reported and skipped, so one broken label does not stop the
    training of the others.

    Args:
        labelled: MONAI Label's ``datastore.datalist()`` (absolute paths).
        task: ``segmentation``, ``classification``, ``detection``, ``landmarks``,
            ``regression``, ``enhancement`` or ``report``.
        class_names: the bundle's classes (segmentation: background first) or landmark names.
        val_split: fraction of the items held out for validation (see :func:`split_items`).
        seed: seed of the split.
        image_path: image id of the studies folder -> its path, or None (the report's ``image2``).

    Returns:
        (datalist, problems): ``{"training": [...], "validation": [...], "class_names": [...]}``
        with absolute paths and the task's datalist keys (segmentation ``label`` = mask path,
        classification ``label`` = class index, enhancement ``target``, report ``images``), and
        one line per skipped item naming its file and problem.

    Raises:
        ValueError: unknown task, or too few usable items to train and validate.
    """
    known = ("segmentation", "classification", "enhancement", *_JSON_READERS)
    if task not in known:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(known)}")
    usable: list[dict[str, Any]] = []
    problems: list[str] = []
    for item in labelled:
        image, label = item.get("image"), item.get("label")
        if not image or not label:
            problems.append(f"{image or item}: no label file")
            continue
        try:
            entry = _task_entry(str(image), str(label), task, class_names, image_path)
        except LabelFileError as error:
            problems.append(str(error))
            continue
        if task in ("segmentation", "classification"):
            problem = check_task_item(entry, task, len(class_names))
        else:
            problem = next(filter(None, map(_image_problem, entry["images"] if "images" in entry else [entry["image"]])), None)
            if problem is None and task == "regression":
                problem = frame_index_problem(entry)  # an ED/ES index past the study's frames
        if problem is not None:
            problems.append(problem)
            continue
        entry.pop("classes_present", None)
        usable.append(entry)
    for problem in problems:
        logger.warning("skipped label: %s", problem)
    training, validation = split_items(usable, val_split, seed)
    return {"training": training, "validation": validation, "class_names": list(class_names)}, problems
