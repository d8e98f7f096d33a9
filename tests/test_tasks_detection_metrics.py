"""Detection metrics of focus_det: rotated ellipse IoU, COCO AP, mAP, cardiothoracic ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest

from echocare.tasks.detection.metrics import (
    COCO_IOU_THRESHOLDS,
    DetectionScore,
    affine_ellipses,
    average_precision,
    cardiothoracic_ratio,
    detection_metrics,
    detection_scores,
    ellipse_iou,
    ellipse_polygon,
    match_detections,
    mean_ellipse_baseline,
    polygon_area,
)


def _inside(ellipse, x, y):
    cx, cy, a, b, angle = ellipse
    t = math.radians(angle)
    u = (x - cx) * math.cos(t) + (y - cy) * math.sin(t)
    v = -(x - cx) * math.sin(t) + (y - cy) * math.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def _grid_iou(e1, e2, step=0.04):
    """Independent reference: both ellipses rasterised on a dense grid of pixel centres."""
    reach = max(e1[2], e1[3], e2[2], e2[3])
    lo_x, hi_x = min(e1[0], e2[0]) - reach, max(e1[0], e2[0]) + reach
    lo_y, hi_y = min(e1[1], e2[1]) - reach, max(e1[1], e2[1]) + reach
    y, x = np.mgrid[lo_y:hi_y:step, lo_x:hi_x:step]
    a, b = _inside(e1, x, y), _inside(e2, x, y)
    return (a & b).sum() / (a | b).sum()


def test_iou_hand_cases() -> None:
    e = [30.0, 40.0, 12.0, 7.0, 25.0]
    assert ellipse_iou(e, e) == pytest.approx(1.0, abs=1e-9)
    assert ellipse_iou(e, [90.0, 40.0, 12.0, 7.0, 25.0]) == 0.0
    # concentric circles r1 < r2: (r1 / r2)^2
    assert ellipse_iou([0, 0, 3, 3, 0], [0, 0, 5, 5, 10]) == pytest.approx(9 / 25, abs=1e-4)
    # the same ellipse turned by 90 degrees: intersection 4ab atan(b/a)
    for a, b in ((10.0, 5.0), (9.0, 3.0)):
        inter = 4 * a * b * math.atan(b / a)
        expected = inter / (2 * math.pi * a * b - inter)
        assert ellipse_iou([0, 0, a, b, 0], [0, 0, a, b, 90]) == pytest.approx(expected, abs=1e-3)
    # ellipses are symmetric under 180 degrees and under swapping axes with a 90-degree turn
    assert ellipse_iou(e, [30.0, 40.0, 12.0, 7.0, 205.0]) == pytest.approx(1.0, abs=1e-9)
    assert ellipse_iou(e, [30.0, 40.0, 7.0, 12.0, 115.0]) == pytest.approx(1.0, abs=2e-3)
    # the polygon keeps the ellipse's area exactly
    assert polygon_area(ellipse_polygon(e)) == pytest.approx(math.pi * 12 * 7, rel=1e-12)


def test_iou_against_dense_grid() -> None:
    rng = np.random.default_rng(3)
    for _ in range(6):
        e1 = [rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(4, 9), rng.uniform(2, 4), rng.uniform(-90, 90)]
        e2 = [rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(4, 9), rng.uniform(2, 4), rng.uniform(-90, 90)]
        assert ellipse_iou(e1, e2) == pytest.approx(_grid_iou(e1, e2), abs=4e-3)


def test_affine_ellipses() -> None:
    # a circle stretched along x: semi-axes 2r and r, major axis horizontal
    np.testing.assert_allclose(affine_ellipses([[1, 2, 3, 3, 0]], [[2, 0, 5], [0, 1, -1]])[0], [7, 1, 6, 3, 0], atol=1e-9)
    # a rotation by 30 degrees (y down: from +x towards +y) adds 30 to the angle
    t = math.radians(30)
    rot = [[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0]]
    np.testing.assert_allclose(affine_ellipses([[0, 0, 5, 2, 10]], rot)[0], [0, 0, 5, 2, 40], atol=1e-9)
    # general map: the image of the boundary is the boundary of the image
    e = [4.0, -2.0, 6.0, 3.0, 20.0]
    m = np.array([[1.3, 0.4, 2.0], [-0.2, 0.7, 5.0]])
    new = affine_ellipses([e], m)[0]
    t_ = np.linspace(0, 2 * math.pi, 16, endpoint=False)
    th = math.radians(e[4])
    pts = np.stack([e[0] + e[2] * np.cos(t_) * math.cos(th) - e[3] * np.sin(t_) * math.sin(th),
                    e[1] + e[2] * np.cos(t_) * math.sin(th) + e[3] * np.sin(t_) * math.cos(th)], 1)
    mapped = pts @ m[:, :2].T + m[:, 2]
    th2 = math.radians(new[4])
    u = (mapped[:, 0] - new[0]) * math.cos(th2) + (mapped[:, 1] - new[1]) * math.sin(th2)
    v = -(mapped[:, 0] - new[0]) * math.sin(th2) + (mapped[:, 1] - new[1]) * math.cos(th2)
    np.testing.assert_allclose((u / new[2]) ** 2 + (v / new[3]) ** 2, 1.0, atol=1e-9)


def test_ap_hand_case() -> None:
    # 3 true objects; ranked TP, FP, TP, FP: precision 1 up to recall 1/3, 2/3 up to 2/3, none beyond
    ap = average_precision([0.9, 0.8, 0.7, 0.6], [True, False, True, False], 3)
    assert ap == pytest.approx((34 * 1.0 + 33 * 2 / 3) / 101, abs=1e-12)
    assert average_precision([0.5], [True], 1) == 1.0
    assert average_precision([], [], 2) == 0.0
    assert math.isnan(average_precision([0.5], [False], 0))
    # greedy matching takes the highest score first, then the best unmatched true ellipse
    ious = np.array([[0.6, 0.7], [0.9, 0.2], [0.55, 0.0]])
    assert match_detections([0.5, 0.9, 0.4], ious, 0.5).tolist() == [True, True, False]


def _brute_force_ap(scores, tp, num_true):
    """Interpolated precision at each recall point = max precision over every score cut-off
    reaching that recall (no envelope, no searchsorted)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    cut = [(sum(tp[j] for j in order[: k + 1]) / num_true, sum(tp[j] for j in order[: k + 1]) / (k + 1)) for k in range(len(order))]
    total = 0.0
    for r in np.linspace(0, 1, 101):
        total += max([p for rec, p in cut if rec >= r - 1e-12], default=0.0)
    return total / 101


def test_ap_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, g = int(rng.integers(1, 15)), int(rng.integers(1, 10))
        scores = rng.random(n).tolist()
        tp = (rng.random(n) < 0.5).tolist()
        if sum(tp) > g:
            continue
        assert average_precision(scores, tp, g) == pytest.approx(_brute_force_ap(scores, tp, g), abs=1e-12)


def test_cardiothoracic_ratio_and_scores() -> None:
    # circles: Ramanujan is exact, so the ratio is r_heart / r_thorax
    assert cardiothoracic_ratio([[0, 0, 10, 10, 0], [0, 0, 5, 5, 0]], [0, 1]) == pytest.approx(0.5)
    # the highest-scoring heart counts
    ratio = cardiothoracic_ratio([[0, 0, 10, 10, 0], [0, 0, 4, 4, 0], [0, 0, 6, 6, 0]], [0, 1, 1], [0.9, 0.3, 0.8])
    assert ratio == pytest.approx(0.6)
    assert math.isnan(cardiothoracic_ratio([[0, 0, 10, 10, 0]], [0]))

    thorax, heart = [50, 50, 20, 20, 0], [50, 50, 10, 10, 0]
    truths = [{"true_ellipses": [thorax, heart], "true_classes": [0, 1]}] * 3
    perfect = {"pred_ellipses": [thorax, heart], "pred_classes": [0, 1], "pred_scores": [0.9, 0.8]}
    heart_11 = {"pred_ellipses": [thorax, [50, 50, 11, 11, 0]], "pred_classes": [0, 1], "pred_scores": [0.9, 0.8]}
    no_heart = {"pred_ellipses": [thorax], "pred_classes": [0], "pred_scores": [0.9]}
    s = detection_scores([perfect, heart_11, no_heart], truths, ["thorax", "heart"])
    # CTR 0.5, 0.55 (accuracy 0.9) and missing (0)
    assert s["ctr_accuracy"] == pytest.approx((1 + 0.9 + 0) / 3)
    assert s["ctr_mae"] == pytest.approx(0.05 / 2)
    assert s["ap_thorax"] == pytest.approx(1.0) and s["ap50_thorax"] == pytest.approx(1.0)
    # heart: two of three found; IoU of the 11-px circle is 100/121 = 0.826: a hit up to 0.80
    iou = 100 / 121
    assert s["iou_heart"] == pytest.approx((1 + iou + 0) / 3, abs=1e-3)
    ap_heart_at = [(67 / 101 if t <= iou else 34 / 101) for t in COCO_IOU_THRESHOLDS]
    assert s["ap50_heart"] == pytest.approx(67 / 101)
    assert s["ap_heart"] == pytest.approx(np.mean(ap_heart_at))
    assert s["map50"] == pytest.approx((1 + 67 / 101) / 2)
    assert s["map"] == pytest.approx((1 + np.mean(ap_heart_at)) / 2)


def test_metric_objects_and_baseline() -> None:
    items = [
        {"pred_ellipses": [[20, 20, 8, 5, 10]], "pred_classes": [0], "pred_scores": [0.7],
         "true_ellipses": [[20, 20, 8, 5, 10], [0, 0, 0, 0, 0]], "true_classes": [0, -1]},
    ]
    metric = detection_metrics(["head"], key_metric=True, ctr_classes=None)["map"]
    metric.reset()
    metric.update(items)
    assert metric.compute() == pytest.approx(1.0)
    others = detection_metrics(["head"], key_metric=False, ctr_classes=None)
    assert set(others) == {"map50", "ap_head", "ap50_head", "iou_head", "mean_iou"}
    with pytest.raises(ValueError, match="ctr_accuracy"):
        DetectionScore("ctr_accuracy", ["head"], ctr_classes=None)
    # baseline: the mean of two ellipses (angles 80 and -80 average to 90 on the axial circle)
    train = [{"ellipses": [[10, 10, 6, 4, 80]], "classes": [0]}, {"ellipses": [[14, 10, 8, 4, -80]], "classes": [0]}]
    val = [{"ellipses": [[12, 10, 7, 4, 90]], "classes": [0]}]
    assert mean_ellipse_baseline(train, val, ["head"], None)["mean_iou"] == pytest.approx(1.0, abs=1e-6)
