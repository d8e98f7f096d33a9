"""focus_det: the four-chamber phantom, the detector's targets and decoding, and the bundle end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bundle_helpers import REPO, bundles_in_one_process, mlflow_runs
from echocare.phantoms import generate_demo_data
from echocare.datasets.datalist import DatalistError
from echocare.datasets.converters import fit_ellipse
from echocare.tasks.detection.data import (
    DecodeEllipsesd,
    EllipseTargetsd,
    RandEllipseAffined,
    load_detection_datalist,
    resize_matrix,
)
from echocare.tasks.detection.metrics import ellipse_iou, mean_ellipse_baseline
from echocare.networks import build_encoder, initialise_network, save_encoder_weights
from echocare.tasks.detection.network import EchoCareEllipseDetector, EllipseDetectionLoss, encode_ellipses

SMALL = ["--network_size", "tiny", "--image_size", "64", "--batch_size", "4", "--num_workers", "0", "--progress_bar", "False"]
# A phantom whose thorax wanders over the whole fan: the mean-ellipse baseline is weak there,
# and a tiny detector learns it in a few epochs at 64 px.
SPREAD = {"thorax_size": (0.15, 0.2), "depth_range": (0.3, 0.75), "lateral_range": (-0.55, 0.55)}


def _configs(*files: str) -> str:
    paths = [str(REPO / "bundles" / "focus_det" / "configs" / f) for f in files]
    return paths[0] if len(paths) == 1 else repr(paths)


def _ellipse_mask(shape, e):
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    t = math.radians(e[4])
    u = (xx - e[0]) * math.cos(t) + (yy - e[1]) * math.sin(t)
    v = -(xx - e[0]) * math.sin(t) + (yy - e[1]) * math.cos(t)
    return (u / e[2]) ** 2 + (v / e[3]) ** 2 <= 1


def test_phantom_in_focus_layout(tmp_path: Path) -> None:
    from echocare.phantoms.renderer import make_canvas
    from echocare.phantoms.detection import _ellipse

    path = generate_demo_data("focus_det", tmp_path, n=10, seed=1, image_size=64)
    lists = json.loads(path.read_text())
    items = lists["training"] + lists["validation"]
    assert len(items) == 10 and lists["validation"] and lists["class_names"] == ["thorax", "heart"]
    assert {i["image"].split("/")[1] for i in lists["validation"]} == {"val"}
    assert not {i["case"] for i in lists["training"]} & {i["case"] for i in lists["validation"]}
    ratios = []
    for item in items:
        assert item["classes"] == [0, 1] and Image.open(tmp_path / item["image"]).size == (64, 64)
        thorax, heart = item["ellipses"]
        assert ellipse_iou(thorax, heart) < 0.7 and heart[2] < thorax[2]
        ratios.append(item["ctr"])
    assert 0.38 <= min(ratios) and max(ratios) <= 0.62 and np.std(ratios) > 0.02
    # The annotation convention (angle from +x towards +y, a = semi-major) is what the canvas draws.
    canvas = make_canvas(np.random.default_rng(0), 128, "linear")
    np.testing.assert_allclose(fit_ellipse(_ellipse(canvas, [60.0, 50.0, 30.0, 15.0, 30.0])), [60, 50, 30, 15, 30], atol=0.5)


def test_targets_resize_and_decoding_round_trip() -> None:
    # a 40 x 100 original resized to 64 x 64: ellipses change shape, and must come back exactly
    ellipses = [[30.0, 20.0, 14.0, 6.0, 25.0], [70.0, 18.0, 8.0, 5.0, -60.0]]
    image = torch.zeros(3, 40, 100)
    item = EllipseTargetsd((64, 64), max_objects=3)({"image": image, "ellipses": ellipses, "classes": [0, 1]})
    assert item["label"].shape == (3, 6) and item["label"][2, 5] == -1 and "ellipses" not in item
    assert item["original_size"].tolist() == [40, 100]
    # the resized label is the image of the original ellipse under the resize map
    assert resize_matrix((40, 100), (64, 64))[0].tolist() == pytest.approx([0.64, 0.0, -0.18])
    mask = _ellipse_mask((40, 100), ellipses[0])
    big = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((64, 64), Image.BILINEAR)) > 127
    assert ellipse_iou(fit_ellipse(big), item["label"][0, :5].tolist()) > 0.95
    # a perfect network output: peaks at the centre cells, exact codes there
    stride, num_classes = 8, 2
    pred = torch.full((num_classes * 6, 8, 8), 0.0)
    pred[:num_classes] = -10.0
    cell, _, code = encode_ellipses(item["label"][:2, :5], stride)
    for k, ((j, i), c) in enumerate(zip(cell.tolist(), code)):
        pred[k, i, j] = 10.0
        pred[num_classes + 5 * k : num_classes + 5 * k + 5, i, j] = c
    out = DecodeEllipsesd(num_classes, stride, score_threshold=0.5)({"pred": pred, **item})
    assert out["pred_classes"].tolist() == [0, 1]
    for found, true in zip(out["pred_ellipses"].tolist(), ellipses):
        assert ellipse_iou(found, true) > 0.999
    assert out["true_classes"].tolist() == [0, 1, -1]


def test_augmentation_moves_image_and_ellipses_together() -> None:
    ellipse = [26.0, 34.0, 14.0, 7.0, 30.0]
    image = torch.from_numpy(np.repeat(_ellipse_mask((64, 64), ellipse)[None].astype(np.float32), 3, 0))
    label = torch.tensor([ellipse + [0.0]], dtype=torch.float32)
    augment = RandEllipseAffined(prob=1.0, flip_prob=1.0, rotate_deg=30, zoom=0.15, shift=0.1)
    for seed in range(3):
        augment.set_random_state(seed)
        out = augment({"image": image, "label": label})
        moved = out["label"][0, :5].tolist()
        assert ellipse_iou(moved, ellipse) < 0.9  # it did move
        assert ellipse_iou(fit_ellipse(out["image"][0].numpy() > 0.5), moved) > 0.93


def test_network_loss_and_encoder_init(tmp_path: Path) -> None:
    network = EchoCareEllipseDetector("tiny", num_classes=2)
    out = network(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 12, 8, 8)
    target = torch.tensor([[[30.0, 30.0, 12.0, 9.0, 10.0, 0.0], [32.0, 28.0, 5.0, 4.0, 0.0, 1.0]]] * 2)
    loss = EllipseDetectionLoss(2, stride=8)(out, target)
    loss.backward()
    assert torch.isfinite(loss) and network.lateral[0].weight.grad.abs().sum() > 0
    # the heatmap target peaks at 1 in each centre cell only
    heat = EllipseDetectionLoss(2, stride=8).heatmap_target(target[:1], 8, 8)
    assert heat[0, 0, 3, 3] == 1.0 and heat[0, 1, 3, 4] == 1.0 and (heat == 1.0).sum() == 2
    # pretrained_path: the encoder of the released layout goes into the detector
    encoder = build_encoder("tiny")
    save_encoder_weights(encoder, tmp_path / "enc.pt")
    fresh = initialise_network(EchoCareEllipseDetector("tiny", num_classes=2), tmp_path / "enc.pt")
    for name, value in encoder.state_dict().items():
        assert torch.equal(fresh.encoder.state_dict()[name], value)


def test_bad_items_are_reported_with_their_names(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    items = [
        {"image": "a.png", "ellipses": [[10, 10, 5, 3, 0]], "classes": [0]},
        {"image": "a.png", "ellipses": [[10, 10, -5, 3, 0]], "classes": [0]},
        {"image": "a.png", "ellipses": [[10, 10, 5, 3, 0]], "classes": [2]},
        {"image": "a.png", "ellipses": [[10, 10, 5, 3, 0]], "classes": []},
    ]
    (tmp_path / "dl.json").write_text(json.dumps({"training": items}))
    with pytest.raises(DatalistError) as error:
        load_detection_datalist(tmp_path / "dl.json", "training", ["thorax", "heart"])
    message = str(error.value)
    assert "3 problem(s)" in message and "item 1" in message and "semi-axes must be positive" in message
    assert "class 2 of ellipse 0" in message and "1 ellipses but 0 classes" in message


@pytest.mark.slow
@pytest.mark.e2e
def test_bundle_beats_the_mean_ellipse_baseline(tmp_path: Path) -> None:
    """Train (4 epochs, tiny, 64 px), evaluate and infer from the command line, tracked in MLflow;
    the detector beats the mean training ellipse placed at the mean centre."""
    data = tmp_path / "data"
    generate_demo_data("focus_det", data, n=32, seed=0, image_size=64, val_fraction=0.25, **SPREAD)
    lists = json.loads((data / "datalist.json").read_text())
    out = tmp_path / "out"
    common = [*SMALL, "--dataset_dir", str(data), "--datalist", str(data / "datalist.json"), "--output_dir", str(out)]
    fast = ["--encoder_lr", "1e-3", "--head_lr", "3e-3"]
    bundles_in_one_process(
        ["training", "--config_file", _configs("train.yaml"), *common, *fast, "--max_epochs", "4",
         "--tracking", "mlflow", "--run_name", "focus_train"],
        ["evaluating", "--config_file", _configs("train.yaml", "evaluate.yaml"), *common,
         "--tracking", "mlflow", "--run_name", "focus_eval"],
        ["inferring", "--config_file", _configs("inference.yaml"), "--input_dir", str(data / "datalist.json"),
         "--dataset_dir", str(data), "--output_dir", str(out), *SMALL[:4], "--num_workers", "0"],
    )
    summary = json.loads((out / "eval" / "summary.json").read_text())
    baseline = mean_ellipse_baseline(lists["training"], lists["validation"], ["thorax", "heart"])
    assert {"map", "map50", "ap_thorax", "ap_heart", "ctr_accuracy", "ctr_mae", "iou_thorax"} <= set(summary)
    assert baseline["mean_iou"] < 0.3 and baseline["map50"] < 0.15
    assert summary["mean_iou"] > baseline["mean_iou"] + 0.1, (summary, baseline)
    assert summary["map50"] > baseline["map50"] + 0.1, (summary, baseline)
    assert summary["ctr_accuracy"] > 0.6

    with (out / "eval" / "per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(lists["validation"])
    assert set(rows[0]) == {"image", "case", "iou_thorax", "iou_heart", "pred_ctr", "true_ctr"}
    true_ctr = {Path(i["image"]).name: i["ctr"] for i in lists["validation"]}
    for row in rows:  # the true ratio in original pixels is the converter's
        assert float(row["true_ctr"]) == pytest.approx(true_ctr[Path(row["image"]).name], abs=1e-3)
    assert len(list((out / "eval" / "overlays").glob("*.png"))) == len(rows)

    client, runs = mlflow_runs(out / "mlruns.db")
    by_name = {r.info.run_name: r for r in runs}
    assert len(client.get_metric_history(by_name["focus_train"].info.run_id, "map")) == 4
    assert by_name["focus_train"].data.params["num_training_items"] == str(len(lists["training"]))
    artifacts = {a.path for a in client.list_artifacts(by_name["focus_eval"].info.run_id, "eval")}
    assert {"eval/summary.json", "eval/per_case.csv", "eval/overlays"} <= artifacts

    predictions = json.loads((out / "predictions" / "predictions.json").read_text())
    assert len(predictions) == len(lists["validation"])
    first = json.loads((out / "predictions" / f"{Path(predictions[0]['image']).stem}.json").read_text())
    assert set(first["best"]) == {"thorax", "heart"} and 0 < first["ctr"] < 2
    assert Image.open(first["overlay"]).size == (64, 64)
    thorax = first["best"]["thorax"]
    assert thorax["class"] == "thorax" and thorax["semi_major"] >= thorax["semi_minor"] > 0


def test_metadata_is_valid() -> None:
    from monai.bundle import ConfigParser, verify_metadata

    configs = REPO / "bundles" / "focus_det" / "configs"
    verify_metadata(meta_file=str(configs / "metadata.json"), filepath=str(REPO / "bundles" / "metadata_schema.json"))
    metadata = json.loads((configs / "metadata.json").read_text())
    classes = ConfigParser(ConfigParser.load_config_file(configs / "train.yaml")).get_parsed_content("class_names")
    assert metadata["network_data_format"]["outputs"]["pred"]["num_channels"] == 6 * len(classes)
    for part in ("evaluate.yaml", "inference.yaml", "multi_gpu_train.yaml", "hc18.yaml", "logging.conf"):
        assert (configs / part).is_file()
    assert (REPO / "bundles" / "focus_det" / "docs" / "README.md").is_file()


@pytest.mark.slow
@pytest.mark.e2e
def test_hc18_variant_runs(real_data_dir: Path, tmp_path: Path) -> None:
    from echocare.datasets.converters import convert_datalist

    root = real_data_dir / "hc18"
    lists = convert_datalist("hc18", root)
    small = {**lists, "training": lists["training"][:8], "validation": lists["validation"][:4]}
    (tmp_path / "datalist.json").write_text(json.dumps(small))
    common = [*SMALL, "--dataset_dir", str(root), "--datalist", str(tmp_path / "datalist.json"), "--output_dir", str(tmp_path)]
    bundles_in_one_process(
        ["training", "--config_file", _configs("train.yaml", "hc18.yaml"), *common, "--max_epochs", "1"],
        ["evaluating", "--config_file", _configs("train.yaml", "hc18.yaml", "evaluate.yaml"), *common],
        ["inferring", "--config_file", _configs("inference.yaml", "hc18.yaml"), "--input_dir", str(tmp_path / "datalist.json"),
         "--dataset_dir", str(root), "--output_dir", str(tmp_path), *SMALL[:4], "--num_workers", "0"],
    )
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert {"map", "map50", "ap_head", "iou_head"} <= set(summary) and "ctr_accuracy" not in summary
    predictions = json.loads((tmp_path / "predictions" / "predictions.json").read_text())
    assert len(predictions) == 4 and "ctr" not in predictions[0]
    overlay = Image.open(predictions[0]["overlay"])
    assert overlay.size == Image.open(predictions[0]["image"]).size  # drawn on the original 800 x 540 image
