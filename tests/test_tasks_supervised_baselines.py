"""The trivial baselines every segmentation and classification bundle test must beat."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echocare.tasks.supervised import segmentation_scores
from echocare.tasks.supervised.baselines import all_foreground_baseline, majority_class_baseline


def _masks(root: Path, masks: list[np.ndarray], values: dict | None = None) -> Path:
    items = []
    for i, mask in enumerate(masks):
        Image.fromarray(np.zeros(mask.shape, np.uint8)).save(root / f"i{i}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / f"m{i}.png")
        items.append({"image": f"i{i}.png", "label": f"m{i}.png"})
    content = {"training": items[:1], "validation": items[1:], **({"mask_values": values} if values else {})}
    (root / "dl.json").write_text(json.dumps(content))
    return root / "dl.json"


def test_all_foreground_baseline_is_the_dice_of_predicting_each_class_everywhere(tmp_path: Path) -> None:
    quarter = np.zeros((8, 10), np.uint8)
    quarter[:4, :5] = 255  # 20 of 80 pixels: Dice 2*20 / (20 + 80) = 0.4
    tenth = np.zeros((8, 10), np.uint8)
    tenth[0, :8] = 255  # 8 of 80: 16 / 88
    datalist = _masks(tmp_path, [quarter, quarter, tenth], {"background": 0, "nodule": 255})
    baseline = all_foreground_baseline(datalist, ["background", "nodule"], mask_values=[0, 255])
    assert baseline == pytest.approx({"dice_nodule": (0.4 + 16 / 88) / 2, "mean_dice": (0.4 + 16 / 88) / 2})
    # a model that finds the nodules exactly beats it; an empty prediction does not
    assert segmentation_scores(quarter // 255, quarter // 255, ["background", "nodule"])["mean_dice"] > baseline["mean_dice"]
    assert segmentation_scores(np.zeros_like(quarter), quarter // 255, ["background", "nodule"])["mean_dice"] < baseline["mean_dice"]


def test_all_foreground_baseline_of_several_classes_scores_an_absent_class_zero(tmp_path: Path) -> None:
    both = np.zeros((4, 5), np.uint8)
    both[0, :] = 1  # class 1: 5 of 20 pixels -> 10 / 25
    both[1, :2] = 2  # class 2: 2 of 20 -> 4 / 22
    only_one = np.zeros((4, 5), np.uint8)
    only_one[:, 0] = 1  # class 1: 4 of 20 -> 8 / 24; class 2 absent -> 0
    datalist = _masks(tmp_path, [both, both, only_one])
    baseline = all_foreground_baseline(datalist, ["background", "artery", "vein"])
    artery, vein = (10 / 25 + 8 / 24) / 2, (4 / 22 + 0.0) / 2
    assert baseline == pytest.approx({"dice_artery": artery, "dice_vein": vein, "mean_dice": (artery + vein) / 2})


def test_majority_class_baseline(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    content = {"training": [{"image": "a.png", "label": 0}],
               "validation": [{"image": "a.png", "label": k, "malignant": k % 2} for k in (2, 2, 2, 1, 0)]}
    (tmp_path / "dl.json").write_text(json.dumps(content))
    four = majority_class_baseline(tmp_path / "dl.json", ["2", "3", "4", "5"])
    assert four == pytest.approx({"accuracy": 3 / 5, "balanced_accuracy": 1 / 3})  # no AUC for four classes
    two = majority_class_baseline(tmp_path / "dl.json", ["benign", "malignant"], label_key="malignant")
    assert two == pytest.approx({"accuracy": 4 / 5, "balanced_accuracy": 1 / 2, "auc": 0.5})  # labels 0, 0, 0, 1, 0
