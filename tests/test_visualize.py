"""Evaluation pictures: exact overlay colours, PNG content, figure texts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from echocare.tasks.supervised import confusion_matrix, youden_threshold
from echocare.tasks.supervised.figures import confusion_matrix_figure, roc_curve_figure, save_confusion_matrix, save_roc_curve
from echocare.visualize import FILL_ALPHA, class_colour, overlay_rgb, save_segmentation_overlay


def png(path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def rgb255(c: int) -> np.ndarray:
    return np.round(np.asarray(class_colour(c)) * 255).astype(int)


def colour_mask(pixels: np.ndarray, colour: np.ndarray, tol: int = 2) -> np.ndarray:
    return (np.abs(pixels.astype(int) - colour) <= tol).all(-1)


def masks() -> tuple[np.ndarray, np.ndarray]:
    pred = np.zeros((48, 64), dtype=np.int64)
    label = np.zeros_like(pred)
    pred[8:24, 30:56] = 1  # class 1 only in the prediction
    label[28:40, 6:20] = 2  # class 2 only in the ground truth
    return pred, label


def test_overlay_rgb_fills_and_outlines_exactly():
    image = np.full((6, 6), 0.5)
    labels = np.zeros((6, 6), dtype=np.int64)
    labels[1:5, 1:5] = 2
    out = overlay_rgb(image, labels)
    colour = np.asarray(class_colour(2))
    np.testing.assert_allclose(out[0, 0], [0.5, 0.5, 0.5])  # background untouched
    np.testing.assert_allclose(out[1, 1], colour)  # outline: opaque class colour
    np.testing.assert_allclose(out[2, 2], (1 - FILL_ALPHA) * 0.5 + FILL_ALPHA * colour)  # interior: blend
    assert np.isclose(out, colour).all(-1).sum() == 12  # the 4 x 4 square's 12 boundary pixels
    assert class_colour(1) != class_colour(2)
    with pytest.raises(ValueError):
        overlay_rgb(image, labels[:5])


def test_segmentation_overlay_png_shows_classes_in_their_panels(tmp_path):
    pred, label = masks()
    image = np.zeros((1, 48, 64), dtype=np.float32)  # black, so only overlays are coloured
    names = ["background", "nodule", "cyst"]
    path = save_segmentation_overlay(image, pred, label, tmp_path / "sub" / "case.png", names)
    assert path == tmp_path / "sub" / "case.png"
    pixels = png(path)
    height, width = pixels.shape[:2]
    assert width == 1200  # three 4-inch panels at 100 dpi
    top = pixels[: int(0.8 * height)]  # the panels; the legend is below
    panel = np.arange(width) // (width // 3)  # 0 image, 1 ground truth, 2 prediction

    nodule = colour_mask(top, rgb255(1))
    cyst = colour_mask(top, rgb255(2))
    assert nodule.sum() > 100 and cyst.sum() > 100
    assert set(panel[np.nonzero(nodule)[1]]) == {2}  # predicted class: prediction panel only
    assert set(panel[np.nonzero(cyst)[1]]) == {1}  # reference class: ground truth panel only
    # the fill over black is alpha * colour, inside the outline of the predicted rectangle
    fill = colour_mask(top, np.round(FILL_ALPHA * rgb255(1)).astype(int), tol=3)
    rows, cols = np.nonzero(nodule)
    inside = fill[rows.min() + 5 : rows.max() - 5, cols.min() + 5 : cols.max() - 5]
    assert inside.mean() > 0.95
    # the predicted rectangle spans cols 30..55 of 64 and rows 8..23 of 48: same aspect in the PNG
    assert (cols.max() - cols.min()) / (rows.max() - rows.min()) == pytest.approx(26 / 16, rel=0.1)
    # legend: both class colours below the panels
    legend = pixels[int(0.8 * height) :]
    assert colour_mask(legend, rgb255(1)).any() and colour_mask(legend, rgb255(2)).any()


def test_segmentation_overlay_inputs_and_differences(tmp_path):
    pred, label = masks()
    gray = np.random.default_rng(0).random((48, 64)).astype(np.float32)
    a = png(save_segmentation_overlay(gray, pred, label, tmp_path / "a.png", title="case"))
    # the same picture from torch tensors, RGB (3, H, W) image and (1, H, W) masks
    b = png(
        save_segmentation_overlay(
            torch.from_numpy(gray).expand(3, -1, -1), torch.from_numpy(pred)[None], torch.from_numpy(label)[None],
            tmp_path / "b.png", title="case",
        )
    )
    np.testing.assert_array_equal(a, b)
    moved = np.roll(pred, 5, axis=1)
    c = png(save_segmentation_overlay(gray, moved, label, tmp_path / "c.png", title="case"))
    assert c.shape == a.shape and (c != a).any(-1).sum() > 100
    no_label = png(save_segmentation_overlay(gray, pred, None, tmp_path / "d.png"))
    assert no_label.shape[1] == 800  # image and prediction panels only


def test_confusion_matrix_figure_writes_counts_and_shades_by_value(tmp_path):
    cm = confusion_matrix([0, 0, 0, 0, 0, 1, 1, 2, 0], [0, 0, 0, 0, 0, 1, 0, 2, 2], 3)  # [[5,1,0],[0,1,0],[1,0,1]]
    fig = confusion_matrix_figure(cm, ["a", "b", "c"])
    ax = fig.axes[0]
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts == {(i, j): str(cm[i, j]) for i in range(3) for j in range(3)}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]

    normalized = confusion_matrix_figure(cm, ["a", "b", "c"], normalize=True).axes[0]
    assert {t.get_text() for t in normalized.texts} >= {"0.83\n(5)", "0.17\n(1)", "1.00\n(1)", "0.50\n(1)"}

    # shading: the cell holding 5 is darker than the empty ones
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    height = pixels.shape[0]

    def cell(i: int, j: int) -> np.ndarray:  # a corner of the cell, away from its text
        x, y = ax.transData.transform((j + 0.35, i + 0.35))
        return pixels[int(height - y), int(x)]

    assert cell(0, 0).sum() < cell(0, 1).sum() < cell(0, 2).sum()
    np.testing.assert_array_equal(cell(0, 2), cell(1, 0))  # both 0

    first = png(save_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm.png"))
    second = png(save_confusion_matrix(cm.T, ["a", "b", "c"], tmp_path / "cm_t.png"))
    assert first.shape == second.shape and (first != second).any()
    with pytest.raises(ValueError):
        save_confusion_matrix(cm, ["a", "b"], tmp_path / "bad.png")


def test_roc_figure_curve_auc_and_youden_point(tmp_path):
    probs = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = np.array([1, 1, 0, 1, 0, 0])
    threshold = youden_threshold(probs, labels)  # 0.8: sensitivity 2/3, specificity 1
    fig = roc_curve_figure(probs, labels, threshold=threshold)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "ROC (AUC = 0.889)" in legend
    assert "cut-off 0.8 (sens 0.67, spec 1.00)" in legend
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["ROC (AUC = 0.889)"].get_xdata(), [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(lines["ROC (AUC = 0.889)"].get_ydata(), [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    point = lines["cut-off 0.8 (sens 0.67, spec 1.00)"]
    assert (point.get_xdata()[0], point.get_ydata()[0]) == pytest.approx((0.0, 2 / 3))

    with_point = png(save_roc_curve(probs, labels, tmp_path / "roc.png", threshold=threshold))
    without = png(save_roc_curve(probs, labels, tmp_path / "roc_plain.png"))
    assert with_point.shape == without.shape and (with_point != without).any()
    # the marked point is drawn in the first palette colour; the plain curve has none of it
    assert colour_mask(with_point, rgb255(1)).sum() > 20 and not colour_mask(without, rgb255(1)).any()


def test_roc_figure_with_one_class_does_not_fail(tmp_path):
    pixels = png(save_roc_curve([0.2, 0.4, 0.9], [0, 0, 0], tmp_path / "roc.png", threshold=0.5))
    assert pixels.size > 0
    legend = [t.get_text() for t in roc_curve_figure([0.2, 0.4], [1, 1]).axes[0].get_legend().get_texts()]
    assert "AUC n/a (one class only)" in legend
