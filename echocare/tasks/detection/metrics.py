"""Oriented-ellipse detection metrics: rotated IoU, COCO-style AP, mAP and the cardiothoracic ratio.

Conventions (docs/architecture.md, "Datalist keys"): an ellipse is ``[cx, cy, semi_major,
semi_minor, angle]`` in pixels of the original image, x right, y down, the angle in degrees
of the first semi-axis from +x towards +y. (The first semi-axis is usually the major one;
nothing here relies on it.)

- **Rotated IoU** (:func:`ellipse_iou`): both ellipses as convex polygons of ``vertices``
  points whose radii are scaled so that each polygon has exactly the ellipse's area; the
  intersection is clipped exactly (Sutherland-Hodgman). With the default 96 vertices the
  error against the exact ellipse IoU is below 1e-3 (tested against a dense grid).
- **AP** (:func:`average_precision`): COCO's definition. Per class, detections of all images
  sorted by score (stable); each is matched greedily, in that order, to the not yet matched
  true ellipse of its image with the highest IoU >= the threshold; precision made
  monotone (the envelope) and read at the 101 recall points 0, 0.01, ..., 1 (0 beyond the
  largest recall reached). A class with no true ellipse in the set has AP NaN and is left
  out of the means.
- **Names** (the same in ``summary.json``, MLflow and ``echocare compare``): ``ap_<class>``
  is the class's AP averaged over the IoU thresholds 0.50:0.05:0.95 (COCO's AP),
  ``ap50_<class>`` its AP at IoU 0.5, ``map50`` the mean over classes of AP at 0.5, ``map``
  the mean over classes of ``ap_<class>``; ``iou_<class>`` the mean over images holding
  the class of the IoU between its highest-scoring predicted ellipse and the true one (0
  when none is predicted), ``mean_iou`` their mean over classes.
- **Cardiothoracic ratio** (:func:`cardiothoracic_ratio`): heart over thorax circumference
  (Ramanujan's approximation), from the highest-scoring heart and thorax of an image.
  ``ctr_accuracy`` = mean over images with a true ratio of ``1 - |predicted - true| /
  true``; an image where no thorax or no heart is predicted scores 0 there (and does not
  enter ``ctr_mae``, the mean absolute error of the ratio over the other images).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from echocare.datasets.converters import ramanujan_perimeter
from echocare.tasks.supervised.segmentation_scoring import class_key

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "DETECTION_SCORE_NAMES",
    "DetectionScore",
    "affine_ellipses",
    "average_precision",
    "cardiothoracic_ratio",
    "detection_metrics",
    "detection_score_names",
    "detection_scores",
    "ellipse_iou",
    "ellipse_iou_matrix",
    "ellipse_polygon",
    "match_detections",
    "mean_ellipse_baseline",
    "polygon_area",
]

#: IoU thresholds of COCO's AP (0.50, 0.55, ..., 0.95).
COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
#: Dataset-level names that do not depend on the classes (``ap_<class>`` etc. do).
DETECTION_SCORE_NAMES = ("map", "map50", "mean_iou", "ctr_accuracy", "ctr_mae")
_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


# ----------------------------------------------------------------------------- geometry


def _as_ellipses(x: Any) -> np.ndarray:
    """Anything (K, 5)-like -> float64 (K, 5) array; an empty input gives (0, 5)."""
    array = np.asarray(torch.as_tensor(x).detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 5))
    array = array.reshape(-1, array.shape[-1]) if array.ndim > 1 else array.reshape(1, -1)
    if array.shape[-1] != 5:
        raise ValueError(f"ellipses must be [cx, cy, semi_major, semi_minor, angle_deg] rows, got shape {array.shape}")
    return array


def ellipse_polygon(ellipse: Sequence[float], vertices: int = 96) -> np.ndarray:
    """A convex polygon with the ellipse's area: (vertices, 2) points (x, y), positively oriented.

    The points are ``c + r (a cos t u + b sin t v)`` at evenly spaced ``t``, with ``u`` the
    direction of the first semi-axis and ``r = sqrt(2 pi / (n sin(2 pi / n)))`` so that the
    polygon's area equals ``pi a b`` exactly.
    """
    cx, cy, a, b, angle = (float(v) for v in ellipse)
    n = int(vertices)
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    scale = math.sqrt(2.0 * math.pi / (n * math.sin(2.0 * math.pi / n)))
    th = math.radians(angle)
    ux, uy = math.cos(th), math.sin(th)
    ca, sb = scale * a * np.cos(t), scale * b * np.sin(t)
    return np.stack([cx + ca * ux - sb * uy, cy + ca * uy + sb * ux], axis=1)


def polygon_area(points: np.ndarray) -> float:
    """Signed shoelace area of an (N, 2) polygon (positive when positively oriented)."""
    if len(points) < 3:
        return 0.0
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _clip_convex(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman: the part of polygon ``subject`` inside the convex, positively
    oriented polygon ``clip`` (both (N, 2)); vectorised over the subject's vertices."""
    out = subject
    for p1, p2 in zip(clip, np.roll(clip, -1, axis=0)):
        if len(out) == 0:
            break
        d = p2 - p1
        side = d[0] * (out[:, 1] - p1[1]) - d[1] * (out[:, 0] - p1[0])  # > 0: inside (left of p1->p2)
        inside = side >= 0
        if inside.all():
            continue
        prev, side_prev, inside_prev = np.roll(out, 1, axis=0), np.roll(side, 1), np.roll(inside, 1)
        crossing = inside != inside_prev
        denominator = np.where(crossing, side_prev - side, 1.0)
        t = np.where(crossing, side_prev / denominator, 0.0)[:, None]
        cut = prev + t * (out - prev)
        # For each vertex in order: the crossing point of the edge arriving at it (if any),
        # then the vertex itself (if inside).
        points = np.stack([cut, out], axis=1).reshape(-1, 2)
        keep = np.stack([crossing, inside], axis=1).reshape(-1)
        out = points[keep]
    return out


def ellipse_iou(e1: Sequence[float], e2: Sequence[float], vertices: int = 96) -> float:
    """Intersection over union of two oriented ellipses ``[cx, cy, a, b, angle_deg]`` (see the module notes)."""
    e1, e2 = _as_ellipses(e1)[0], _as_ellipses(e2)[0]
    if min(e1[2], e1[3], e2[2], e2[3]) <= 0:
        return 0.0
    # Disjoint bounding circles: no overlap (cheap and common when matching).
    if math.hypot(e1[0] - e2[0], e1[1] - e2[1]) >= max(e1[2], e1[3]) + max(e2[2], e2[3]):
        return 0.0
    area1, area2 = math.pi * e1[2] * e1[3], math.pi * e2[2] * e2[3]
    inter = polygon_area(_clip_convex(ellipse_polygon(e1, vertices), ellipse_polygon(e2, vertices)))
    inter = min(max(inter, 0.0), area1, area2)
    return float(inter / (area1 + area2 - inter))


def ellipse_iou_matrix(first: Any, second: Any, vertices: int = 96) -> np.ndarray:
    """(N, M) rotated IoU between ellipses ``first`` (N, 5) and ``second`` (M, 5)."""
    a, b = _as_ellipses(first), _as_ellipses(second)
    out = np.zeros((len(a), len(b)))
    for i, ea in enumerate(a):
        for j, eb in enumerate(b):
            out[i, j] = ellipse_iou(ea, eb, vertices)
    return out


def affine_ellipses(ellipses: Any, matrix: Any) -> np.ndarray:
    """Ellipses mapped by the affine map ``p -> A p + t`` (``matrix`` = [A | t], 2x3).

    The image of an ellipse under an affine map is an ellipse: its shape matrix
    ``A R diag(a^2, b^2) R^T A^T`` is diagonalised to the new semi-axes (major first) and
    the angle of the major axis in [-90, 90). Used to move ellipses between an image and its
    resized or augmented copy. Returns (K, 5) float64.
    """
    e = _as_ellipses(ellipses)
    m = np.asarray(matrix, dtype=np.float64).reshape(2, 3)
    lin, shift = m[:, :2], m[:, 2]
    out = np.zeros_like(e)
    for k, (cx, cy, a, b, angle) in enumerate(e):
        th = math.radians(angle)
        rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        half = lin @ rot @ np.diag([a, b])
        evals, evecs = np.linalg.eigh(half @ half.T)  # ascending
        vx, vy = evecs[:, 1]
        new_angle = (math.degrees(math.atan2(vy, vx)) + 90.0) % 180.0 - 90.0
        centre = lin @ np.array([cx, cy]) + shift
        out[k] = [centre[0], centre[1], math.sqrt(max(evals[1], 0.0)), math.sqrt(max(evals[0], 0.0)), new_angle]
    return out


# ----------------------------------------------------------------------------- matching and AP


def match_detections(
    scores: Sequence[float], ious: np.ndarray, threshold: float
) -> np.ndarray:
    """COCO's greedy matching in one image for one class.

    Args:
        scores: (D,) detection scores.
        ious: (D, G) IoU of each detection with each true ellipse.
        threshold: a match needs IoU >= threshold.

    Returns:
        (D,) bool: whether each detection (in the given order) is a true positive. Detections
        are visited by decreasing score (stable); each takes the unmatched true ellipse of
        highest IoU.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    ious = np.asarray(ious, dtype=np.float64).reshape(len(scores), -1)
    matched = np.zeros(len(scores), dtype=bool)
    taken = np.zeros(ious.shape[1], dtype=bool)
    for d in np.argsort(-scores, kind="stable"):
        candidates = np.where(taken, -1.0, ious[d])
        if candidates.size == 0:
            continue
        g = int(np.argmax(candidates))
        if candidates[g] >= threshold:
            taken[g] = matched[d] = True
    return matched


def average_precision(scores: Sequence[float], true_positive: Sequence[bool], num_true: int) -> float:
    """COCO AP from all detections of one class over a data set.

    Args:
        scores: (D,) detection scores.
        true_positive: (D,) whether each detection was matched (:func:`match_detections`).
        num_true: number of true ellipses of the class (G).

    Returns:
        The mean of the interpolated precision at recall 0, 0.01, ..., 1; NaN when
        ``num_true`` is 0.
    """
    if num_true <= 0:
        return float("nan")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        return 0.0
    tp = np.asarray(true_positive, dtype=bool).reshape(-1)[np.argsort(-scores, kind="stable")]
    tp_cum = np.cumsum(tp)
    recall = tp_cum / float(num_true)
    precision = tp_cum / np.arange(1, len(tp) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    index = np.searchsorted(recall, _RECALL_POINTS, side="left")
    interpolated = np.where(index < len(envelope), envelope[np.minimum(index, len(envelope) - 1)], 0.0)
    return float(interpolated.mean())


# ----------------------------------------------------------------------------- cardiothoracic ratio


def cardiothoracic_ratio(
    ellipses: Any,
    classes: Sequence[int],
    scores: Sequence[float] | None = None,
    thorax_class: int = 0,
    heart_class: int = 1,
) -> float:
    """Heart over thorax circumference (Ramanujan) from the highest-scoring ellipse of each.

    Args:
        ellipses: (K, 5) ellipses.
        classes: (K,) class indices.
        scores: (K,) scores; ``None`` takes the first ellipse of each class (ground truth).
        thorax_class, heart_class: the two classes' indices.

    Returns:
        The ratio, or NaN when the thorax or the heart is missing.
    """
    e = _as_ellipses(ellipses)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    order = np.arange(len(e)) if scores is None else np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    best: dict[int, np.ndarray] = {}
    for k in order:
        best.setdefault(int(classes[k]), e[k])
    if thorax_class not in best or heart_class not in best:
        return float("nan")
    heart, thorax = best[heart_class], best[thorax_class]
    return ramanujan_perimeter(heart[2], heart[3]) / ramanujan_perimeter(thorax[2], thorax[3])


# ----------------------------------------------------------------------------- data-set scores


def _per_image(item: Mapping[str, Any], prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ellipses (K, 5), classes (K,), scores (K,)) of a prediction (``prefix`` ``pred``) or
    truth (``true``: scores all 1); classes < 0 are padding and dropped."""
    e = _as_ellipses(item[f"{prefix}_ellipses"] if f"{prefix}_ellipses" in item else item["ellipses"])
    c = np.asarray(torch.as_tensor(item.get(f"{prefix}_classes", item.get("classes", []))).cpu(), dtype=np.int64).reshape(-1)
    s_raw = item.get(f"{prefix}_scores", item.get("scores"))
    s = np.ones(len(c)) if s_raw is None else np.asarray(torch.as_tensor(s_raw).cpu(), dtype=np.float64).reshape(-1)
    keep = c >= 0
    return e[keep], c[keep], s[keep]


def detection_score_names(class_names: Sequence[str], ctr: bool) -> list[str]:
    """Every name :func:`detection_scores` returns for these classes."""
    names = [f"ap_{class_key(c)}" for c in class_names] + [f"ap50_{class_key(c)}" for c in class_names]
    names += [f"iou_{class_key(c)}" for c in class_names] + ["map", "map50", "mean_iou"]
    return names + (["ctr_accuracy", "ctr_mae"] if ctr else [])


def detection_scores(
    predictions: Sequence[Mapping[str, Any]],
    truths: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    ctr_classes: tuple[int, int] | None = (0, 1),
    vertices: int = 96,
) -> dict[str, float]:
    """All detection scores of a data set (names in the module notes).

    Args:
        predictions: per image ``{"pred_ellipses" (K, 5), "pred_classes" (K,), "pred_scores" (K,)}``
            (or ``ellipses``/``classes``/``scores``), original pixels.
        truths: per image ``{"true_ellipses", "true_classes"}`` (or ``ellipses``/``classes``).
        class_names: the classes, index order.
        ctr_classes: (thorax, heart) class indices for the cardiothoracic ratio; ``None``
            leaves ``ctr_accuracy`` and ``ctr_mae`` out.
        vertices: polygon vertices of the IoU.

    Returns:
        ``{name: value}``; NaN where undefined (a class absent from every truth).
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} images")
    num_classes = len(class_names)
    thresholds = np.asarray(COCO_IOU_THRESHOLDS)
    det_scores: list[list[float]] = [[] for _ in range(num_classes)]
    det_tp: list[list[np.ndarray]] = [[] for _ in range(num_classes)]  # (T,) per detection
    num_true = np.zeros(num_classes, dtype=np.int64)
    best_iou: list[list[float]] = [[] for _ in range(num_classes)]
    ctr_acc: list[float] = []
    ctr_err: list[float] = []
    for pred, truth in zip(predictions, truths):
        pe, pc, ps = _per_image(pred, "pred")
        te, tc, _ = _per_image(truth, "true")
        for k in range(num_classes):
            d_idx, g_idx = np.flatnonzero(pc == k), np.flatnonzero(tc == k)
            num_true[k] += len(g_idx)
            ious = ellipse_iou_matrix(pe[d_idx], te[g_idx], vertices) if len(d_idx) and len(g_idx) else np.zeros((len(d_idx), len(g_idx)))
            if len(d_idx):
                tp = np.stack([match_detections(ps[d_idx], ious, t) for t in thresholds], axis=1)  # (D, T)
                det_scores[k].extend(ps[d_idx].tolist())
                det_tp[k].extend(tp)
            if len(g_idx):
                top = int(np.argmax(ps[d_idx])) if len(d_idx) else -1
                best_iou[k].append(float(ious[top].max()) if top >= 0 else 0.0)
        if ctr_classes is not None:
            true_ctr = cardiothoracic_ratio(te, tc, None, *ctr_classes)
            if np.isfinite(true_ctr) and true_ctr > 0:
                pred_ctr = cardiothoracic_ratio(pe, pc, ps, *ctr_classes)
                if np.isfinite(pred_ctr):
                    ctr_acc.append(1.0 - abs(pred_ctr - true_ctr) / true_ctr)
                    ctr_err.append(abs(pred_ctr - true_ctr))
                else:
                    ctr_acc.append(0.0)
    out: dict[str, float] = {}
    ap_all, ap50_all, iou_all = [], [], []
    for k, name in enumerate(class_names):
        key = class_key(name)
        tp = np.asarray(det_tp[k], dtype=bool).reshape(-1, len(thresholds))
        per_t = [average_precision(det_scores[k], tp[:, t], int(num_true[k])) for t in range(len(thresholds))]
        out[f"ap_{key}"] = float(np.mean(per_t)) if num_true[k] else float("nan")
        out[f"ap50_{key}"] = per_t[0]
        out[f"iou_{key}"] = float(np.mean(best_iou[k])) if best_iou[k] else float("nan")
        if num_true[k]:
            ap_all.append(out[f"ap_{key}"])
            ap50_all.append(out[f"ap50_{key}"])
            iou_all.append(out[f"iou_{key}"])
    out["map"] = float(np.mean(ap_all)) if ap_all else float("nan")
    out["map50"] = float(np.mean(ap50_all)) if ap50_all else float("nan")
    out["mean_iou"] = float(np.mean(iou_all)) if iou_all else float("nan")
    if ctr_classes is not None:
        out["ctr_accuracy"] = float(np.mean(ctr_acc)) if ctr_acc else float("nan")
        out["ctr_mae"] = float(np.mean(ctr_err)) if ctr_err else float("nan")
    return out


def mean_ellipse_baseline(
    training: Sequence[Mapping[str, Any]],
    validation: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    ctr_classes: tuple[int, int] | None = (0, 1),
) -> dict[str, float]:
    """The trivial baseline: per class, the mean training ellipse placed at the mean centre.

    Each class's prediction on every validation image is the mean of the training
    ellipses' centres and semi-axes, with the axial mean of their angles (the mean of
    ``2 * angle`` on the circle, halved: ellipses are symmetric under 180 degrees), score 1.
    Items are datalist items (``ellipses``, ``classes``, original pixels). Returns
    :func:`detection_scores` of these predictions.
    """
    mean_of: dict[int, list[float]] = {}
    for k in range(len(class_names)):
        rows = [e for item in training for e, c in zip(item["ellipses"], item["classes"]) if int(c) == k]
        if not rows:
            continue
        e = np.asarray(rows, dtype=np.float64)
        doubled = np.radians(2.0 * e[:, 4])
        angle = 0.5 * math.degrees(math.atan2(np.sin(doubled).mean(), np.cos(doubled).mean()))
        mean_of[k] = [*e[:, :4].mean(axis=0).tolist(), angle]
    pred = {
        "pred_ellipses": [mean_of[k] for k in sorted(mean_of)],
        "pred_classes": sorted(mean_of),
        "pred_scores": [1.0] * len(mean_of),
    }
    truths = [{"true_ellipses": item["ellipses"], "true_classes": item["classes"]} for item in validation]
    return detection_scores([pred] * len(truths), truths, class_names, ctr_classes)


# ----------------------------------------------------------------------------- Ignite metric


def _identity(x: Any) -> Any:
    return x


class DetectionScore(Metric):
    """One data-set detection score (``map``, ``map50``, ``ap_<class>``, ``ctr_accuracy``, ...)
    for MONAI evaluators.

    ``update`` takes the decollated items of an iteration holding ``pred_ellipses``,
    ``pred_classes``, ``pred_scores``, ``true_ellipses``, ``true_classes`` (original pixels;
    see :class:`echocare.tasks.detection.data.DecodeEllipsesd`); ``compute`` runs
    :func:`detection_scores` on the epoch. Single process (detection evaluation is not
    gathered across DDP ranks).

    Args:
        name: one of :func:`detection_score_names`.
        class_names: the classes.
        ctr_classes: (thorax, heart) indices, or ``None`` (no cardiothoracic ratio).
    """

    def __init__(
        self,
        name: str,
        class_names: Sequence[str],
        ctr_classes: Sequence[int] | None = (0, 1),
        output_transform: Callable = _identity,
        device: str | torch.device = "cpu",
    ) -> None:
        self.class_names = list(class_names)
        self.ctr_classes = tuple(int(c) for c in ctr_classes) if ctr_classes is not None else None
        valid = detection_score_names(self.class_names, self.ctr_classes is not None)
        if name not in valid:
            raise ValueError(f"unknown detection score {name!r}; valid: {', '.join(valid)}")
        self.name = name
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._preds: list[dict[str, np.ndarray]] = []
        self._truths: list[dict[str, np.ndarray]] = []

    @reinit__is_reduced
    def update(self, output: Any) -> None:
        for item in output:
            pe, pc, ps = _per_image(item, "pred")
            te, tc, _ = _per_image(item, "true")
            self._preds.append({"pred_ellipses": pe, "pred_classes": pc, "pred_scores": ps})
            self._truths.append({"true_ellipses": te, "true_classes": tc})

    def compute(self) -> float:
        if not self._preds:
            return float("nan")
        return float(detection_scores(self._preds, self._truths, self.class_names, self.ctr_classes)[self.name])


def detection_metrics(
    class_names: Sequence[str], key_metric: bool, ctr_classes: Sequence[int] | None = (0, 1)
) -> dict[str, Metric]:
    """The key metric ``{"map": ...}`` (picks the best checkpoint) or the others: ``map50``,
    ``ap_<class>``, ``ap50_<class>``, ``iou_<class>``, ``mean_iou`` and, with
    ``ctr_classes``, ``ctr_accuracy`` and ``ctr_mae``."""
    ctr = tuple(ctr_classes) if ctr_classes is not None else None
    names = detection_score_names(class_names, ctr is not None)
    chosen = ["map"] if key_metric else [n for n in names if n != "map"]
    return {n: DetectionScore(n, class_names, ctr) for n in chosen}
