"""Segmentation and classification metrics against hand-computed cases and reference implementations."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.metrics import ConfusionMatrixMetric, compute_roc_auc
from scipy.ndimage import binary_erosion
from scipy.stats import mannwhitneyu
from sklearn.metrics import balanced_accuracy_score, f1_score

from echocare.tasks.supervised import (
    ClassificationScore,
    SegmentationScored,
    SegmentationScoredAtOriginalSize,
    binary_classification_scores,
    classification_scores,
    confusion_matrix,
    multiclass_classification_scores,
    roc_auc,
    roc_curve,
    segmentation_scores,
    youden_threshold,
)
from echocare.engines.metrics import MeanOfOutput

# ----------------------------------------------------------------------------- segmentation


def shifted_rectangles(shift_rows: int = 0, shift_cols: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Prediction: 6 x 8 rectangle at rows 5..10, cols 5..12; label: the same shifted."""
    pred = np.zeros((20, 24), dtype=np.int64)
    label = np.zeros_like(pred)
    pred[5:11, 5:13] = 1
    label[5 + shift_rows : 11 + shift_rows, 5 + shift_cols : 13 + shift_cols] = 1
    return pred, label


def test_dice_of_shifted_rectangle_and_of_squares_with_known_overlap():
    pred, label = shifted_rectangles()
    # 6 x 8 = 48 pixels each, overlap 6 x 7 = 42: 2 * 42 / 96
    scores = segmentation_scores(pred, label, ["background", "nodule"])
    assert scores["dice_nodule"] == pytest.approx(84 / 96)
    assert scores["mean_dice"] == pytest.approx(84 / 96)

    # two 4 x 4 squares overlapping in a 2 x 2 corner: 2 * 4 / 32
    a = np.zeros((12, 12), dtype=np.int64)
    b = np.zeros_like(a)
    a[2:6, 2:6] = 1
    b[4:8, 4:8] = 1
    assert segmentation_scores(a, b, ["background", "x"])["dice_x"] == pytest.approx(0.25)
    assert segmentation_scores(a, a, ["background", "x"])["dice_x"] == 1.0


# Boundary distances of shifted_rectangles() with a 1-column shift, spacing (row, col) = (sr, sc).
# Each boundary has 2 * 8 + 2 * 4 = 24 pixels. Of the prediction's: the top and bottom rows at
# cols 6..12 lie on the label's top/bottom rows (distance 0): 14 pixels; the two left corners are
# sc away from the label's top/bottom row; the left column (rows 6..9) is sc away from the label's
# left column (and farther from anything else); the right column (rows 6..9, col 12) is inside
# the label, sc from its right column but also 1 or 2 rows (sr, 2 sr) from its top/bottom rows.
# The label's boundary mirrors this. So at tolerance t:
#   t < min(sr, sc)                  -> 2 * 14 / 48 = 7/12
#   sr = 1, sc = 3, t = 2            -> (14 + 4) * 2 / 48 = 3/4 (right column reaches the rows)
#   t >= sc                          -> 1
@pytest.mark.parametrize(
    ("spacing", "tolerance", "expected"),
    [
        (None, 0.5, 7 / 12),
        (None, 1.0, 1.0),  # distance == tolerance counts as within
        ((1.0, 3.0), 2.0, 3 / 4),
        ((1.0, 3.0), 2.9, 3 / 4),
        ((1.0, 3.0), 3.0, 1.0),
        ((3.0, 1.0), 2.0, 1.0),  # the shift is along the fine axis: all within
        ((3.0, 1.0), 0.9, 7 / 12),
    ],
)
def test_nsd_of_shifted_rectangle_with_anisotropic_spacing(spacing, tolerance, expected):
    pred, label = shifted_rectangles()
    scores = segmentation_scores(pred, label, ["background", "nodule"], spacing=spacing, tolerance=tolerance)
    assert scores["nsd_nodule"] == pytest.approx(expected)
    assert scores["mean_nsd"] == pytest.approx(expected)


def test_nsd_row_shift_depends_on_row_spacing():
    pred, label = shifted_rectangles(shift_rows=1, shift_cols=0)
    # now the shift is one row: (2, 1) mm pixels put it 2 mm away
    assert segmentation_scores(pred, label, ["bg", "n"], spacing=(2.0, 1.0), tolerance=1.5)["nsd_n"] < 1.0
    assert segmentation_scores(pred, label, ["bg", "n"], spacing=(2.0, 1.0), tolerance=2.0)["nsd_n"] == 1.0
    assert segmentation_scores(pred, label, ["bg", "n"], spacing=(1.0, 2.0), tolerance=1.0)["nsd_n"] == 1.0


def reference_nsd(pred: np.ndarray, label: np.ndarray, spacing: tuple[float, float], tolerance: float) -> float:
    """Brute-force NSD: boundary = mask minus its 4-neighbour erosion, all pairwise distances."""
    def boundary(mask: np.ndarray) -> np.ndarray:
        return np.argwhere(mask & ~binary_erosion(mask)) * np.asarray(spacing)

    bp, bl = boundary(pred), boundary(label)
    d = np.sqrt(((bp[:, None, :] - bl[None, :, :]) ** 2).sum(-1))
    within = (d.min(1) <= tolerance).sum() + (d.min(0) <= tolerance).sum()
    return within / (len(bp) + len(bl))


def test_nsd_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(3)
    for _ in range(5):
        yy, xx = np.mgrid[:40, :48]
        blobs = []
        for _ in range(2):
            cy, cx, r = rng.uniform(12, 28), rng.uniform(12, 36), rng.uniform(5, 10)
            blobs.append((yy - cy) ** 2 / r**2 + (xx - cx) ** 2 / (0.7 * r) ** 2 < 1)
        spacing = (float(rng.uniform(0.5, 2)), float(rng.uniform(0.5, 2)))
        tolerance = float(rng.uniform(0.5, 3))
        scores = segmentation_scores(blobs[0].astype(int), blobs[1].astype(int), ["bg", "c"], spacing, tolerance)
        assert scores["nsd_c"] == pytest.approx(reference_nsd(blobs[0], blobs[1], spacing, tolerance))


def test_empty_class_conventions_and_means():
    names = ["background", "Left Kidney", "liver", "spleen", "bladder"]
    pred = np.zeros((16, 16), dtype=np.int64)
    label = np.zeros_like(pred)
    pred[2:6, 2:6] = 1
    label[2:6, 2:6] = 1  # class 1: perfect
    pred[10:12, 10:12] = 2  # class 2: predicted, absent in the label
    label[10:12, 2:4] = 3  # class 3: in the label, not predicted
    # class 4: absent in both
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no MONAI "class is all 0" warnings either
        scores = segmentation_scores(pred, label, names)
    assert scores == pytest.approx(
        {
            "dice_left_kidney": 1.0,
            "nsd_left_kidney": 1.0,
            "dice_liver": 0.0,
            "nsd_liver": 0.0,
            "dice_spleen": 0.0,
            "nsd_spleen": 0.0,
            "dice_bladder": 1.0,
            "nsd_bladder": 1.0,
            "mean_dice": 0.5,
            "mean_nsd": 0.5,
        }
    )


def test_segmentation_scores_input_forms_and_errors():
    pred, label = shifted_rectangles()
    ref = segmentation_scores(pred, label, ["bg", "n"], spacing=(1.0, 3.0))
    as_torch = segmentation_scores(
        torch.from_numpy(pred)[None],
        torch.from_numpy(label).float()[None],
        ["bg", "n"],
        spacing=torch.tensor([1.0, 3.0]),
    )
    assert as_torch == ref
    with pytest.raises(ValueError, match="outside"):
        segmentation_scores(pred * 2, label, ["bg", "n"])
    with pytest.raises(ValueError, match="shape"):
        segmentation_scores(pred[:-1], label, ["bg", "n"])
    with pytest.raises(ValueError, match="spacing"):
        segmentation_scores(pred, label, ["bg", "n"], spacing=(1.0, 1.0, 1.0))


def test_segmentation_scored_in_an_evaluator_with_mean_of_output():
    names = ["background", "artery", "vein"]
    pred1, label1 = shifted_rectangles()
    label1 = label1.copy()
    label1[15:18, 15:18] = 2  # vein: missed
    pred2 = np.zeros((20, 24), dtype=np.int64)
    pred2[3:7, 3:7] = 2
    label2 = pred2.copy()  # artery absent in both, vein perfect

    def logits(labels: np.ndarray) -> torch.Tensor:  # (C, H, W) scores whose argmax is `labels`
        return torch.nn.functional.one_hot(torch.from_numpy(labels), 3).permute(2, 0, 1).float() * 5 - 1

    items = [
        # spacing as decollation leaves a datalist list: a list of 0-d tensors
        {
            "pred": MetaTensor(logits(pred1)),  # as MONAI's postprocessing leaves it
            "label": torch.from_numpy(label1)[None],
            "eval_spacing": [torch.tensor(1.0), torch.tensor(3.0)],
        },
        {"pred": torch.from_numpy(pred2)[None].float(), "label": logits(label2)},  # no spacing: pixels
    ]
    scored = SegmentationScored(names)
    expected1 = segmentation_scores(pred1, label1, names, spacing=(1.0, 3.0))
    expected2 = segmentation_scores(pred2, label2, names)
    assert expected1["nsd_artery"] == pytest.approx(3 / 4) and expected1["dice_vein"] == 0.0
    assert expected2["dice_artery"] == 1.0 and expected2["mean_dice"] == 1.0

    engine = Engine(lambda e, batch: [scored(item) for item in batch])
    MeanOfOutput("mean_dice").attach(engine, "mean_dice")
    MeanOfOutput("nsd_artery").attach(engine, "nsd_artery")
    engine.run([items], max_epochs=1)
    out = engine.state.output
    for key, value in expected1.items():
        assert out[0][key] == pytest.approx(value)
    assert isinstance(out[0]["mean_dice"], float)
    assert engine.state.metrics["mean_dice"] == pytest.approx((expected1["mean_dice"] + 1.0) / 2)
    assert engine.state.metrics["nsd_artery"] == pytest.approx((3 / 4 + 1.0) / 2)


def _circle_through_grid(tmp_path: Path, original: tuple[int, int], grid: int) -> dict:
    """An evaluation item whose reference is a disc saved at ``original`` (H, W) size and whose
    prediction is that disc area-downsampled to the ``grid`` x ``grid`` network grid (as the bundles'
    ``Resized`` does to images), as one-hot class probabilities on that grid; the item's ``label`` is
    the reference resized to the grid by nearest neighbour, as the bundles resize masks."""
    from PIL import Image

    rows, cols = np.mgrid[: original[0], : original[1]]
    disc = ((rows - 0.45 * original[0]) ** 2 + (cols - 0.55 * original[1]) ** 2 <= (0.3 * min(original)) ** 2)
    mask_file = tmp_path / "disc.png"
    Image.fromarray(disc.astype(np.uint8) * 255).save(mask_file)
    small = torch.nn.functional.interpolate(torch.from_numpy(disc).float()[None, None], size=(grid, grid), mode="area")
    labels = (small[0, 0] >= 0.5).long()
    probabilities = torch.nn.functional.one_hot(labels, 2).permute(2, 0, 1).float()
    return {
        "pred": MetaTensor(probabilities),
        "label": MetaTensor(
            torch.nn.functional.interpolate(torch.from_numpy(disc).float()[None, None], size=(grid, grid))[0],
            meta={"filename_or_obj": str(mask_file)},
        ),
        "original_size": torch.tensor(original),
        "spacing": [torch.tensor(float("nan")), torch.tensor(float("nan"))],  # unknown: original pixels
        "eval_spacing": torch.tensor([original[0] / grid, original[1] / grid], dtype=torch.float64),
    }


def test_segmentation_scored_at_original_size_reads_the_reference_at_full_size(tmp_path: Path) -> None:
    """#18: a prediction that is the reference down- and up-sampled through a 128 px grid is near
    perfect at the original 300x300 size (NSD >= 0.9 at 2 original pixels), where scoring on the grid
    against the resized reference, with a tolerance under one grid pixel, gives it about half."""
    item = _circle_through_grid(tmp_path, (300, 300), 128)
    names = ["background", "nodule"]
    at_original = SegmentationScoredAtOriginalSize(names, tolerance=2.0)(item)
    on_grid = SegmentationScored(names, tolerance=2.0)(item)
    assert at_original["nsd_nodule"] >= 0.9 and at_original["dice_nodule"] >= 0.98
    assert on_grid["nsd_nodule"] < 0.7 < at_original["nsd_nodule"]
    assert at_original["mean_nsd"] == at_original["nsd_nodule"]

    # spacing known (mm): the tolerance is in mm; 0.1 mm pixels make 2 mm = 20 pixels, so the
    # resampling steps fall well inside it, and a tolerance of 0.05 mm (half a pixel) cuts NSD
    mm = {**item, "spacing": [torch.tensor(0.1), torch.tensor(0.1)]}
    assert SegmentationScoredAtOriginalSize(names, tolerance=2.0)(mm)["nsd_nodule"] == 1.0
    assert SegmentationScoredAtOriginalSize(names, tolerance=0.05)(mm)["nsd_nodule"] < at_original["nsd_nodule"]

    # an image of another size than its mask, and a label that does not name its file, are refused
    with pytest.raises(ValueError, match="disc.png: mask is 300x300 pixels but its image's original size is 200x300"):
        SegmentationScoredAtOriginalSize(names)({**item, "original_size": torch.tensor([200, 300])})
    with pytest.raises(ValueError, match="does not name its mask file"):
        SegmentationScoredAtOriginalSize(names)({**item, "label": torch.zeros(1, 128, 128)})


# --------------------------------------------------------------------------- classification


def test_confusion_matrix_rows_true_columns_predicted():
    cm = confusion_matrix([0, 1, 1, 1, 0, 2], [0, 0, 1, 1, 2, 2], 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)


def test_auc_hand_cases():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # tie counted half
    # positives 0.5, 0.9 vs negatives 0.2, 0.5: wins 1 + 0.5 (tie) + 1 + 1 = 3.5 of 4
    assert roc_auc([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(3.5 / 4)
    assert math.isnan(roc_auc([0.2, 0.3], [1, 1]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_monai_and_mann_whitney_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 80)
    # coarse scores (5 levels) so that ties between positives and negatives are common
    probs = np.clip(np.round(rng.normal(0.5 + 0.15 * labels, 0.2) * 4) / 4, 0, 1)
    auc = roc_auc(probs, labels)
    assert auc == pytest.approx(float(compute_roc_auc(torch.tensor(probs), torch.tensor(labels))))
    u = mannwhitneyu(probs[labels == 1], probs[labels == 0]).statistic
    assert auc == pytest.approx(u / ((labels == 1).sum() * (labels == 0).sum()))


def test_roc_curve_points():
    fpr, tpr, thr = roc_curve([0.9, 0.8, 0.8, 0.3], [1, 0, 1, 0])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.8, 0.3])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])


def test_youden_on_tiny_roc_with_tie_takes_higher_threshold():
    # scores 0.9 .. 0.4, labels P P N P N N; J at each cut-off:
    # 0.9: 1/3 - 0, 0.8: 2/3 - 0, 0.7: 2/3 - 1/3, 0.6: 1 - 1/3, 0.5: 1 - 2/3, 0.4: 0
    # maximum 2/3 at 0.8 and 0.6 (2/3 and 1 - 1/3 differ in floating point) -> 0.8
    probs = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    labels = [1, 1, 0, 1, 0, 0]
    assert youden_threshold(probs, labels) == 0.8
    # without the tie: swap the 0.7 and 0.6 labels -> J(0.7) = 1 is the unique maximum
    assert youden_threshold(probs, [1, 1, 1, 0, 0, 0]) == 0.7
    assert youden_threshold([0.3, 0.6], [0, 0]) == 0.5  # degenerate: fixed cut-off
    assert math.isnan(youden_threshold([], []))


def test_binary_scores_hand_case():
    # at the Youden cut-off 0.8: predicted P P N N N N vs true P P N P N N
    # TP 2, FP 0, FN 1, TN 3
    scores = binary_classification_scores([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [1, 1, 0, 1, 0, 0])
    f1_neg = 2 * 3 / (2 * 3 + 1 + 0)
    assert scores == pytest.approx(
        {
            "auc": 8 / 9,  # positives 0.9, 0.8, 0.6 beat 3 + 3 + 2 of the 9 pairs
            "threshold": 0.8,
            "f1": 2 * 2 / (2 * 2 + 0 + 1),
            "accuracy": 5 / 6,
            "sensitivity": 2 / 3,
            "specificity": 1.0,
            "balanced_accuracy": (2 / 3 + 1) / 2,
            "macro_f1": (0.8 + f1_neg) / 2,
        }
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_sensitivity_specificity_match_monai_confusion_matrix(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    probs = np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1)
    scores = binary_classification_scores(probs, labels)
    pred = (probs >= scores["threshold"]).astype(np.float32)
    metric = ConfusionMatrixMetric(metric_name=["sensitivity", "specificity", "accuracy", "f1 score"])
    metric(torch.tensor(pred)[:, None], torch.tensor(labels, dtype=torch.float32)[:, None])
    sens, spec, acc, f1 = (float(v) for v in metric.aggregate())
    assert scores["sensitivity"] == pytest.approx(sens)
    assert scores["specificity"] == pytest.approx(spec)
    assert scores["accuracy"] == pytest.approx(acc)
    assert scores["f1"] == pytest.approx(f1)
    # and the cut-off really maximises J over every observed score
    pos, neg = labels == 1, labels == 0
    best = max((probs[pos] >= t).mean() - (probs[neg] >= t).mean() for t in np.unique(probs))
    assert sens + spec - 1 == pytest.approx(best)


def test_binary_degenerate_inputs_do_not_crash():
    only_neg = binary_classification_scores([0.2, 0.7, 0.1, 0.3], [0, 0, 0, 0])
    assert math.isnan(only_neg["auc"]) and math.isnan(only_neg["sensitivity"])
    assert only_neg["threshold"] == 0.5
    assert only_neg["specificity"] == pytest.approx(3 / 4)  # fraction predicted negative at 0.5
    assert only_neg["accuracy"] == pytest.approx(3 / 4)
    assert only_neg["f1"] == 0.0  # one false positive, no true positive
    only_pos = binary_classification_scores([0.2, 0.7], [1, 1])
    assert math.isnan(only_pos["auc"]) and math.isnan(only_pos["specificity"])
    assert only_pos["sensitivity"] == pytest.approx(0.5)
    empty = binary_classification_scores([], [])
    assert all(math.isnan(v) for v in empty.values())


def test_multiclass_hand_case_and_absent_class_excluded_from_macro_f1():
    labels = [0, 0, 1, 1, 2, 2]
    predicted = [0, 1, 1, 1, 0, 2]
    # per-class F1: class 0 (TP 1, FP 1, FN 1) 1/2; class 1 (TP 2, FP 1) 4/5; class 2 (TP 1, FN 1) 2/3
    expected = {
        "accuracy": 4 / 6,
        "macro_f1": (1 / 2 + 4 / 5 + 2 / 3) / 3,
        "balanced_accuracy": (1 / 2 + 1 + 1 / 2) / 3,
    }
    probs3 = np.eye(3)[predicted] * 0.6 + 0.1
    assert multiclass_classification_scores(probs3, labels) == pytest.approx(expected)
    # a 4th class never true nor predicted is left out of macro-F1 (else it would be 0.49)
    probs4 = np.eye(4)[predicted] * 0.6 + 0.1
    assert multiclass_classification_scores(probs4, labels) == pytest.approx(expected)


def test_multiclass_matches_sklearn():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4, 50)
    probs = rng.dirichlet(np.ones(4), 50) + np.eye(4)[labels] * 0.3
    scores = multiclass_classification_scores(probs, labels)
    predicted = probs.argmax(1)
    assert scores["accuracy"] == pytest.approx(np.mean(predicted == labels))
    assert scores["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))


def test_classification_scores_dispatch():
    probs2 = np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.5, 0.5], [0.6, 0.4]])
    labels = [1, 1, 0, 1, 0, 0]
    binary = classification_scores(probs2, labels, class_names=["benign", "malignant"])
    assert binary == binary_classification_scores(probs2[:, 1], labels)
    assert {"auc", "f1", "accuracy", "sensitivity", "specificity", "macro_f1"} <= set(binary)
    assert classification_scores(probs2[:, 1], labels) == binary  # (N,) positive-class probabilities
    multi = classification_scores(np.eye(3)[[0, 1, 2]], [0, 1, 1])
    assert set(multi) == {"accuracy", "macro_f1", "balanced_accuracy"}
    with pytest.raises(ValueError, match="class names"):
        classification_scores(probs2, labels, class_names=["a", "b", "c"])


def run_epochs(metric: ClassificationScore, batches: list, epochs: int = 1) -> Engine:
    engine = Engine(lambda e, batch: batch)
    metric.attach(engine, metric.name)
    engine.run(batches, max_epochs=epochs)
    return engine


def test_classification_score_ignite_metric_on_decollated_output():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(2), 10)
    labels = rng.integers(0, 2, 10)
    label_forms = [int, torch.tensor, lambda v: torch.tensor([v])]  # int, 0-d, 1-element
    items = [
        {"pred": torch.tensor(p, dtype=torch.float32), "label": label_forms[i % 3](int(y))}
        for i, (p, y) in enumerate(zip(probs, labels))
    ]
    batches = [items[:4], items[4:7], items[7:]]
    expected = classification_scores(probs, labels)
    for name in ("auc", "f1", "accuracy", "sensitivity", "specificity", "macro_f1", "balanced_accuracy"):
        metric = ClassificationScore(name)
        engine = run_epochs(metric, batches, epochs=2)  # reset between epochs: not accumulated twice
        assert engine.state.metrics[name] == pytest.approx(expected[name], rel=1e-6)
        got_probs, got_labels = metric.arrays()
        assert got_probs.shape == (10, 2)
        np.testing.assert_allclose(got_probs, probs, rtol=1e-6)
        np.testing.assert_array_equal(got_labels, labels)
        np.testing.assert_array_equal(metric.labels, labels)

    # an (y_pred, y) batch pair works as well
    metric = ClassificationScore("auc")
    pairs = [(torch.tensor(probs[:5]), torch.tensor(labels[:5])), (torch.tensor(probs[5:]), torch.tensor(labels[5:]))]
    assert run_epochs(metric, pairs).state.metrics["auc"] == pytest.approx(expected["auc"])


def test_classification_score_errors():
    with pytest.raises(ValueError, match="valid: auc, f1"):
        ClassificationScore("precision")
    metric = ClassificationScore("auc")
    items = [{"pred": torch.tensor([0.2, 0.5, 0.3]), "label": 1}, {"pred": torch.tensor([0.6, 0.2, 0.2]), "label": 0}]
    with pytest.raises(ValueError, match="not defined for 3 classes"):
        run_epochs(metric, [items])
    macro = ClassificationScore("macro_f1")
    assert run_epochs(macro, [items]).state.metrics["macro_f1"] == pytest.approx(1.0)


def _ddp_worker(local_rank: int, out_dir: str) -> None:
    rank = idist.get_rank()
    rng = np.random.default_rng(11)
    probs = rng.dirichlet(np.ones(3), 7)
    labels = rng.integers(0, 3, 7)
    mine = range(0, 5) if rank == 0 else range(5, 7)  # unequal shares: 5 and 2 items
    items = [{"pred": torch.tensor(probs[i]), "label": int(labels[i])} for i in mine]
    metric = ClassificationScore("macro_f1")
    engine = Engine(lambda e, batch: batch)
    metric.attach(engine, "macro_f1")
    engine.run([items], max_epochs=1)
    value = engine.state.metrics["macro_f1"]
    np.savez(Path(out_dir) / f"rank{rank}.npz", value=value, probs=metric.probs, labels=metric.labels)


@pytest.mark.slow
def test_classification_score_gathers_unequal_shares_across_processes(tmp_path):
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(_ddp_worker, str(tmp_path))
    rng = np.random.default_rng(11)
    probs = rng.dirichlet(np.ones(3), 7)
    labels = rng.integers(0, 3, 7)
    expected = classification_scores(probs, labels)["macro_f1"]
    for rank in (0, 1):
        result = np.load(tmp_path / f"rank{rank}.npz")
        assert float(result["value"]) == pytest.approx(expected)
        np.testing.assert_allclose(result["probs"], probs)
        np.testing.assert_array_equal(result["labels"], labels)
