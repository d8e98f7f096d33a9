"""Data of the oriented-ellipse detection bundle (``focus_det``): checked datalists, targets,
augmentation and decoding of the network output to ellipses in original-image pixels.

Items (docs/architecture.md, "Datalist keys"): ``image``, ``ellipses`` [[cx, cy, semi_major,
semi_minor, angle_deg], ...] in pixels of the original image (x right, y down, pixel
centres at integers, angle from +x towards +y) and ``classes`` [int, ...].

Pipeline: ``LoadUltrasoundd`` -> :class:`EllipseTargetsd` (before resizing: it needs the
original size) -> ``Resized`` -> (training) :class:`RandEllipseAffined` -> network ->
(evaluation and inference) :class:`DecodeEllipsesd` -> (evaluation) :class:`DetectionCased`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, Randomizable

from echocare.datasets.datalist import load_datalist, raise_problems
from echocare.tasks.detection.metrics import affine_ellipses, cardiothoracic_ratio, ellipse_iou_matrix
from echocare.tasks.detection.network import decode_ellipses
from echocare.tasks.supervised.data import subsample_training
from echocare.tasks.supervised.segmentation_scoring import class_key

__all__ = [
    "DecodeEllipsesd",
    "DetectionCased",
    "EllipseTargetsd",
    "RandEllipseAffined",
    "detection_case_fields",
    "ellipse_rows",
    "load_detection_datalist",
    "resize_matrix",
]


def resize_matrix(from_size: Sequence[int], to_size: Sequence[int]) -> np.ndarray:
    """The 2x3 affine map of pixel coordinates (x, y) from an image of ``from_size`` (H, W) to
    its resized copy of ``to_size`` (h, w): ``x' = (x + 0.5) w / W - 0.5`` (pixel centres at
    integers; the pixel grids share their outer edges, as ``Resized`` does)."""
    (h0, w0), (h1, w1) = (float(s) for s in from_size[:2]), (float(s) for s in to_size[:2])
    sx, sy = w1 / w0, h1 / h0
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])


# ----------------------------------------------------------------------------- datalists


def _check_objects(item: Mapping[str, Any], num_classes: int) -> str | None:
    ellipses, classes = item.get("ellipses"), item.get("classes")
    if not isinstance(ellipses, list) or not isinstance(classes, list):
        return "needs 'ellipses' [[cx, cy, semi_major, semi_minor, angle], ...] and 'classes' [int, ...] lists"
    if len(ellipses) != len(classes):
        return f"{len(ellipses)} ellipses but {len(classes)} classes"
    for k, (e, c) in enumerate(zip(ellipses, classes)):
        if not isinstance(e, (list, tuple)) or len(e) != 5:
            return f"ellipse {k} is {e!r}, not [cx, cy, semi_major, semi_minor, angle]"
        try:
            values = [float(v) for v in e]
        except (TypeError, ValueError):
            return f"ellipse {k} is {e!r}: not numbers"
        if not all(math.isfinite(v) for v in values) or values[2] <= 0 or values[3] <= 0:
            return f"ellipse {k} is {e!r}: semi-axes must be positive and all values finite"
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) < num_classes:
            return f"class {c!r} of ellipse {k} is not an index of the class list (0..{num_classes - 1})"
    return None


def load_detection_datalist(
    datalist: str | os.PathLike[str],
    key: str,
    class_names: Sequence[str],
    base_dir: str | os.PathLike[str] | None = None,
    train_fraction: float = 1.0,
    seed: int = 0,
    check_images: bool = True,
    keep_keys: Sequence[str] = ("case",),
) -> list[dict[str, Any]]:
    """Read and check one list of a detection datalist, raising one error for all problems.

    Every item needs ``image``, ``ellipses`` and ``classes`` of the same length (an image
    with no object has two empty lists), positive semi-axes and class indices of
    ``class_names``; with ``check_images`` every image is decoded once.

    Args:
        datalist: MONAI datalist JSON.
        key: ``training``, ``validation`` or ``test``.
        class_names: the bundle's classes (no background).
        base_dir: root of relative paths (``dataset_dir``); default the datalist's folder.
        train_fraction: keep this fraction, stratified by the set of classes present
            (:func:`~echocare.tasks.supervised.data.subsample_training`).
        seed: seed of the subsample.
        check_images: decode every image now.
        keep_keys: item keys kept besides the three above (missing ones become ``""``).

    Returns:
        Items ``{"image": abs path, "ellipses": [[5 floats]], "classes": [int], **keep_keys}``.

    Raises:
        DatalistError: naming the datalist, each bad item and its problem.
    """
    raw = load_datalist(datalist, key, base_dir=base_dir, image_keys=("image",), check_images=check_images)
    problems, items = [], []
    for position, source in enumerate(raw):
        problem = _check_objects(source, len(class_names))
        if problem:
            problems.append(f"item {position} ({source.get('image')}): {problem}")
            continue
        item = {
            "image": source["image"],
            "ellipses": [[float(v) for v in e] for e in source["ellipses"]],
            "classes": [int(c) for c in source["classes"]],
            "classes_present": sorted(set(int(c) for c in source["classes"])),
        }
        for name in keep_keys:
            value = source.get(name, "")
            item[name] = "" if value is None else str(value)
        items.append(item)
    if not items and not problems:
        problems.append("the list is empty")
    raise_problems(datalist, key, problems)
    kept = subsample_training(items, train_fraction, seed, "classes_present")
    for item in kept:
        item.pop("classes_present")
    return kept


# ----------------------------------------------------------------------------- transforms


class EllipseTargetsd(MapTransform):
    """Turn an item's ``ellipses`` / ``classes`` into fixed-size tensors (so batches collate).

    Run after loading the image and before resizing it. Sets

    - ``label``: (max_objects, 6) float32 rows ``[cx, cy, a, b, angle, class]`` in pixels of
      the network grid ``spatial_size`` (the loss's target), padding rows with class -1;
    - ``gt_ellipses`` (max_objects, 5) float64 in original pixels and ``gt_classes``
      (max_objects,) int64 (-1 padding), which :class:`DecodeEllipsesd` passes on to the
      metrics as ``true_ellipses`` / ``true_classes``;
    - ``original_size`` (H, W);

    and removes ``ellipses`` and ``classes`` (lists of varying length do not collate).

    Args:
        spatial_size: (h, w) of the network input.
        max_objects: rows per item; more objects in one image is an error naming it.
        image_key: the loaded image.
    """

    def __init__(self, spatial_size: Sequence[int], max_objects: int = 8, image_key: str = "image") -> None:
        super().__init__(image_key)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.max_objects = int(max_objects)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        height, width = (int(s) for s in d[self.image_key].shape[-2:])
        ellipses = np.asarray(d.pop("ellipses", []), dtype=np.float64).reshape(-1, 5)
        classes = np.asarray(d.pop("classes", []), dtype=np.int64).reshape(-1)
        if len(classes) > self.max_objects:
            source = getattr(d[self.image_key], "meta", {}).get("filename_or_obj", "an image")
            raise ValueError(f"{source}: {len(classes)} objects, more than max_objects={self.max_objects}")
        label = np.zeros((self.max_objects, 6), dtype=np.float32)
        label[:, 5] = -1
        true_ellipses = np.zeros((self.max_objects, 5))
        true_classes = np.full(self.max_objects, -1, dtype=np.int64)
        if len(classes):
            label[: len(classes), :5] = affine_ellipses(ellipses, resize_matrix((height, width), self.spatial_size))
            label[: len(classes), 5] = classes
            true_ellipses[: len(classes)] = ellipses
            true_classes[: len(classes)] = classes
        d["label"] = torch.from_numpy(label)
        d["gt_ellipses"] = torch.from_numpy(true_ellipses)
        d["gt_classes"] = torch.from_numpy(true_classes)
        d["original_size"] = torch.tensor([height, width])
        return d


class RandEllipseAffined(Randomizable, MapTransform):
    """Random horizontal flip, rotation, zoom and shift of the image with its ``label`` ellipses.

    Run on the resized (C, h, w) image and the ``label`` of :class:`EllipseTargetsd` (network
    pixels). The image is resampled bilinearly (zeros outside); each ellipse is mapped by
    the same affine map (:func:`~echocare.tasks.detection.metrics.affine_ellipses`), so the targets
    stay exact.

    Args:
        prob: probability of the rotation/zoom/shift.
        flip_prob: probability of a horizontal flip (independent of ``prob``).
        rotate_deg: rotation drawn from [-rotate_deg, rotate_deg] about the image centre.
        zoom: scale drawn from [1 - zoom, 1 + zoom].
        shift: shift drawn from [-shift, shift] times the side, per axis.
    """

    def __init__(
        self,
        prob: float = 0.5,
        flip_prob: float = 0.5,
        rotate_deg: float = 15.0,
        zoom: float = 0.1,
        shift: float = 0.05,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        MapTransform.__init__(self, [image_key, label_key])
        self.prob, self.flip_prob = float(prob), float(flip_prob)
        self.rotate_deg, self.zoom, self.shift = float(rotate_deg), float(zoom), float(shift)
        self.image_key, self.label_key = image_key, label_key

    def randomize(self, size: tuple[int, int]) -> np.ndarray:
        """The 3x3 forward map of pixel coordinates for this item."""
        height, width = size
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        matrix = np.eye(3)
        if self.R.random() < self.flip_prob:
            matrix = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ matrix
        if self.R.random() < self.prob:
            t = math.radians(self.R.uniform(-self.rotate_deg, self.rotate_deg))
            s = self.R.uniform(1 - self.zoom, 1 + self.zoom)
            dx, dy = self.R.uniform(-self.shift, self.shift) * width, self.R.uniform(-self.shift, self.shift) * height
            rot = np.array([[s * math.cos(t), -s * math.sin(t)], [s * math.sin(t), s * math.cos(t)]])
            centre = np.array([cx, cy])
            about = np.eye(3)
            about[:2, :2] = rot
            about[:2, 2] = centre - rot @ centre + [dx, dy]
            matrix = about @ matrix
        return matrix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        height, width = (int(s) for s in image.shape[-2:])
        matrix = self.randomize((height, width))
        if np.allclose(matrix, np.eye(3)):
            return d
        # grid_sample reads, for each output pixel, the input at the inverse map.
        inverse = np.linalg.inv(matrix)
        ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij")
        src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
        src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
        grid = torch.stack([(2 * src_x + 1) / width - 1, (2 * src_y + 1) / height - 1], dim=-1).float()
        pixels = torch.as_tensor(image).as_subclass(torch.Tensor).float()
        warped = F.grid_sample(pixels[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        if hasattr(image, "meta"):
            from monai.data import MetaTensor

            warped = MetaTensor(warped, meta=dict(image.meta))
        d[self.image_key] = warped
        label = torch.as_tensor(d[self.label_key]).clone()
        valid = label[:, 5] >= 0
        if valid.any():
            moved = affine_ellipses(label[valid, :5].double().numpy(), matrix[:2])
            label[valid, :5] = torch.from_numpy(moved).float()
        d[self.label_key] = label
        return d


class DecodeEllipsesd(MapTransform):
    """Network output -> ellipses in original-image pixels (postprocessing of evaluation and inference).

    Reads ``pred`` (6 C, h, w) and ``original_size`` (H, W; the network grid itself when
    absent) and writes ``pred_ellipses`` (K, 5), ``pred_classes`` (K,), ``pred_scores`` (K,)
    (float64/int64 tensors, decreasing score; see
    :func:`~echocare.tasks.detection.network.decode_ellipses`). Copies ``gt_ellipses`` and
    ``gt_classes`` of the input item (:class:`EllipseTargetsd`), when present, into the
    output as ``true_ellipses`` and ``true_classes`` for the metrics (MONAI passes only
    output keys, and keys new to the batch, on to metrics and handlers).

    Args:
        num_classes: C.
        stride: the network's output stride.
        max_detections: candidates per class and image.
        score_threshold: lowest score kept.
        nms_iou: rotated-IoU threshold of the non-maximum suppression.
    """

    def __init__(
        self,
        num_classes: int,
        stride: int = 8,
        max_detections: int = 10,
        score_threshold: float = 0.0,
        nms_iou: float = 0.5,
        pred_key: str = "pred",
    ) -> None:
        super().__init__(pred_key)
        self.num_classes, self.stride = int(num_classes), int(stride)
        self.max_detections, self.score_threshold, self.nms_iou = int(max_detections), float(score_threshold), float(nms_iou)
        self.pred_key = pred_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        pred = d[self.pred_key]
        ellipses, classes, scores = decode_ellipses(
            pred, self.num_classes, self.stride, self.max_detections, self.score_threshold, self.nms_iou
        )
        grid = (int(pred.shape[-2]) * self.stride, int(pred.shape[-1]) * self.stride)
        original = d.get("original_size")
        original = grid if original is None else tuple(int(s) for s in torch.as_tensor(original).reshape(-1)[:2])
        if len(ellipses):
            ellipses = affine_ellipses(ellipses, np.linalg.inv(np.vstack([resize_matrix(original, grid), [0, 0, 1]]))[:2])
        d["pred_ellipses"] = torch.from_numpy(ellipses.reshape(-1, 5))
        d["pred_classes"] = torch.from_numpy(classes)
        d["pred_scores"] = torch.from_numpy(scores)
        for source, target in (("gt_ellipses", "true_ellipses"), ("gt_classes", "true_classes")):
            if source in d:
                d[target] = torch.as_tensor(d[source])
        return d


def detection_case_fields(class_names: Sequence[str], ctr_classes: Sequence[int] | None = None) -> list[str]:
    """Columns of a detection evaluation's ``per_case.csv``: ``case``, ``iou_<class>`` per class
    and, with ``ctr_classes``, ``pred_ctr`` and ``true_ctr``, as :class:`DetectionCased` writes them."""
    return ["case"] + [f"iou_{class_key(c)}" for c in class_names] + (["pred_ctr", "true_ctr"] if ctr_classes is not None else [])


class DetectionCased(MapTransform):
    """Per-image scores for ``per_case.csv`` after :class:`DecodeEllipsesd`.

    Writes ``iou_<class>``: IoU of the class's highest-scoring predicted ellipse with its
    true ellipse (best over true ellipses; 0 when none is predicted; NaN when the class is
    not in the image); with ``ctr_classes``, ``pred_ctr`` and ``true_ctr`` (heart over
    thorax circumference; NaN when undefined).

    Args:
        class_names: the classes.
        ctr_classes: (thorax, heart) class indices, or ``None``.
    """

    def __init__(self, class_names: Sequence[str], ctr_classes: Sequence[int] | None = (0, 1)) -> None:
        super().__init__("pred_ellipses")
        self.class_names = list(class_names)
        self.ctr_classes = tuple(int(c) for c in ctr_classes) if ctr_classes is not None else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        pe = np.asarray(d["pred_ellipses"], dtype=np.float64).reshape(-1, 5)
        pc = np.asarray(d["pred_classes"], dtype=np.int64).reshape(-1)
        ps = np.asarray(d["pred_scores"], dtype=np.float64).reshape(-1)
        te = np.asarray(d["true_ellipses"], dtype=np.float64).reshape(-1, 5)
        tc = np.asarray(d["true_classes"], dtype=np.int64).reshape(-1)
        te, tc = te[tc >= 0], tc[tc >= 0]
        for k, name in enumerate(self.class_names):
            truth, guesses = te[tc == k], np.flatnonzero(pc == k)
            if not len(truth):
                value = float("nan")
            elif not len(guesses):
                value = 0.0
            else:
                best = guesses[int(np.argmax(ps[guesses]))]
                value = float(ellipse_iou_matrix(pe[best : best + 1], truth).max())
            d[f"iou_{class_key(name)}"] = value
        if self.ctr_classes is not None:
            d["pred_ctr"] = cardiothoracic_ratio(pe, pc, ps, *self.ctr_classes)
            d["true_ctr"] = cardiothoracic_ratio(te, tc, None, *self.ctr_classes)
        return d


def ellipse_rows(
    ellipses: Any, classes: Any, scores: Any, class_names: Sequence[str], min_score: float = 0.0
) -> list[dict[str, Any]]:
    """Detections as JSON-ready rows ``{"class", "class_index", "score", "cx", "cy",
    "semi_major", "semi_minor", "angle"}`` (pixels, degrees), those with score >= ``min_score``."""
    rows = []
    for e, c, s in zip(np.asarray(ellipses).reshape(-1, 5), np.asarray(classes).reshape(-1), np.asarray(scores).reshape(-1)):
        if float(s) < min_score:
            continue
        cx, cy, a, b, angle = (round(float(v), 3) for v in e)
        rows.append({"class": class_names[int(c)], "class_index": int(c), "score": round(float(s), 5),
                     "cx": cx, "cy": cy, "semi_major": a, "semi_minor": b, "angle": angle})
    return rows
