"""The brain_landmark bundle: metrics on hand cases, sub-pixel decoding, the coordinate map
through the resize, the phantom, the network, and the bundle end to end (phantom-trained
model against the mean-position baseline; HC18 variant on real data when present)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.transforms import Resize

from bundle_helpers import REPO, bundles_in_one_process, mlflow_runs
from echocare.datasets import DatalistError
from echocare.phantoms import generate_demo_data
from echocare.tasks.landmarks.data import (
    LandmarkHeatmapd,
    gaussian_heatmaps,
    grid_to_original,
    load_landmark_datalist,
    original_to_grid,
)
from echocare.phantoms.landmarks import BRAIN_LANDMARK_NAMES, make_brain_landmark_image
from echocare.tasks.landmarks.metrics import (
    LandmarkScored,
    NanMeanOfOutput,
    landmark_metrics,
    landmark_scores,
    mean_position_baseline,
)
from echocare.tasks.supervised import EchoCareSegNet
from echocare.tasks.landmarks.network import (
    EchoCareLandmarkNet,
    LandmarkHeatmapLoss,
    coordinate_channels,
    decode_heatmaps,
    order_symmetric_pairs,
    soft_argmax,
)

CONFIGS = REPO / "bundles" / "brain_landmark" / "configs"
SMALL = ["--network_size", "tiny", "--image_size", "64", "--batch_size", "4", "--num_workers", "0", "--progress_bar", "False"]

# ----------------------------------------------------------------------------- metrics


def test_landmark_scores_on_a_hand_case():
    true = [[10.0, 10.0], [0.0, 0.0], [5.0, 5.0], [100.0, 50.0]]
    # radial errors 0, 2 (exactly on the 2 px radius), 5 (3-4-5), 10.5
    pred = [[10.0, 10.0], [2.0, 0.0], [8.0, 9.0], [100.0, 60.5]]
    s = landmark_scores(pred, true, ["a", "b", "c", "Far Point"])
    assert s["mre_px"] == pytest.approx((0 + 2 + 5 + 10.5) / 4)
    assert s["mse_px2"] == pytest.approx((0 + 4 + 25 + 110.25) / 4)
    assert s["sdr_2px"] == 0.5  # <=: the error of exactly 2 px counts
    assert s["sdr_4px"] == 0.5
    assert s["sdr_10px"] == 0.75
    assert s["error_px_c"] == pytest.approx(5.0) and s["error_px_far_point"] == pytest.approx(10.5)
    assert "mre_mm" not in s
    # (row, col) = (0.5, 0.25) mm: dx scaled by 0.25, dy by 0.5
    mm = landmark_scores(pred, true, spacing=(0.5, 0.25))
    expected = (0 + 0.5 + math.hypot(0.75, 2.0) + 5.25) / 4
    assert mm["mre_mm"] == pytest.approx(expected)
    assert mm["mre_px"] == s["mre_px"] and "error_px_l4" in mm
    with pytest.raises(ValueError, match="true has 2"):
        landmark_scores(pred, true[:2])


def test_dataset_metrics_are_means_over_items_and_mm_skips_unknown_spacing():
    items = [
        landmark_scores([[0, 0], [3, 4]], [[0, 0], [0, 0]], ["p", "q"], spacing=(1.0, 1.0)),  # errors 0, 5
        landmark_scores([[1, 0], [0, 0]], [[0, 0], [0, 0]], ["p", "q"]),  # errors 1, 0
    ]
    items[1]["mre_mm"] = float("nan")
    key = landmark_metrics(["p", "q"], key_metric=True)
    others = landmark_metrics(["p", "q"], key_metric=False, report_mm=True)
    assert list(key) == ["mre_px"]
    assert set(others) == {"mse_px2", "sdr_2px", "sdr_4px", "sdr_10px", "mre_px_p", "mre_px_q", "mre_mm"}
    values = {}
    for name, metric in {**key, **others}.items():
        metric.reset()
        metric.update(items)
        values[name] = metric.compute()
    assert values["mre_px"] == pytest.approx((2.5 + 0.5) / 2)
    assert values["mre_px_q"] == pytest.approx(2.5) and values["mre_px_p"] == pytest.approx(0.5)
    assert values["sdr_4px"] == pytest.approx(0.75)
    assert values["mse_px2"] == pytest.approx((12.5 + 0.5) / 2)
    assert values["mre_mm"] == pytest.approx(2.5)  # the NaN item is left out
    assert isinstance(others["mre_mm"], NanMeanOfOutput)


def test_mean_position_baseline_on_a_hand_case(tmp_path: Path):
    from PIL import Image

    for name, (h, w) in {"a": (20, 40), "b": (40, 80), "v": (30, 30)}.items():
        Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / f"{name}.png")
    # normalised pixel-centre positions: a -> (1/40, 3/20) = (0.025, 0.15), b -> (2/80, 6/40) the same;
    # second landmark a: (21/40, 11/20) = (0.525, 0.55), b: (43/80, 23/40) = (0.5375, 0.575)
    content = {
        "training": [
            {"image": "a.png", "landmarks": [[0.5, 2.5], [20.5, 10.5]]},
            {"image": "b.png", "landmarks": [[1.5, 5.5], [42.5, 22.5]]},
        ],
        "validation": [{"image": "v.png", "landmarks": [[1, 4], [15, 17]], "spacing": [0.5, 0.5]}],
    }
    (tmp_path / "dl.json").write_text(json.dumps(content))
    scores = mean_position_baseline(tmp_path / "dl.json")
    # predicted on 30x30: (0.025*30-0.5, 0.15*30-0.5) = (0.25, 4.0); (0.53125*30-0.5, 0.5625*30-0.5) = (15.4375, 16.375)
    e1, e2 = math.hypot(0.75, 0.0), math.hypot(0.4375, 0.625)
    assert scores["mre_px"] == pytest.approx((e1 + e2) / 2)
    assert scores["mre_mm"] == pytest.approx((e1 + e2) / 4)
    assert scores["sdr_2px"] == 1.0


# ----------------------------------------------------------------------------- decoding and coordinates


def test_decoding_recovers_sub_pixel_peaks():
    points = torch.tensor([[10.3, 7.8], [3.71, 15.26], [20.5, 2.49], [12.0, 12.0], [1.2, 18.9]])
    for sigma in (1.0, 2.0, 3.5):
        heatmaps = gaussian_heatmaps(points, (20, 24), sigma)
        decoded = decode_heatmaps(3.0 * heatmaps[None])[0]  # any peak height
        assert (decoded - points).abs().max() < 0.05, (sigma, decoded)
    # soft-argmax (the differentiable read-out of the coordinate loss) is near, not exact
    assert (soft_argmax(gaussian_heatmaps(points[:4], (20, 24), 2.0)[None], beta=20.0)[0] - points[:4]).abs().max() < 0.15


def test_coordinate_map_matches_monai_area_resize():
    # a blob on a 60 x 80 image, area-resized to 20 x 20 (x3 rows, x4 columns): the centroid on the grid,
    # mapped back, is the original centroid; and the map is invertible
    yy, xx = np.mgrid[:60, :80]
    blob = np.exp(-((xx - 37.3) ** 2 + (yy - 21.6) ** 2) / (2 * 5.0**2))
    small = Resize((20, 20), mode="area")(torch.tensor(blob[None], dtype=torch.float32))[0].numpy().astype(np.float64)
    gy, gx = np.mgrid[:20, :20]
    centroid = [(small * gx).sum() / small.sum(), (small * gy).sum() / small.sum()]
    original = [(blob * xx).sum() / blob.sum(), (blob * yy).sum() / blob.sum()]
    back = grid_to_original(torch.tensor([centroid]), (20, 20), (60, 80))[0]
    assert np.allclose(back.numpy(), original, atol=1e-4)
    p = torch.tensor([[3.3, 7.7], [799.0, 0.0]])
    assert torch.allclose(grid_to_original(original_to_grid(p, (540, 800), (64, 64)), (64, 64), (540, 800)), p.double())


def test_heatmap_targets_decode_back_to_the_original_points():
    points = [[12.25, 40.5], [70.0, 3.75], [41.6, 30.2]]
    item = {"image": torch.zeros(3, 60, 80), "landmarks": points, "spacing": [0.2, 0.1]}
    d = LandmarkHeatmapd((32, 32), sigma=1.5, output_key="label")(item)
    assert d["label"].shape == (3, 32, 32) and float(d["label"].max()) <= 1.0
    assert d["original_size"].tolist() == [60, 80] and d["landmarks"].shape == (3, 2)
    scored = LandmarkScored(["a", "b", "c"], report_mm=True)({**d, "pred": d["label"]})
    assert scored["mre_px"] < 0.05 and scored["mre_mm"] < 0.01 and scored["sdr_2px"] == 1.0
    assert torch.allclose(scored["pred_landmarks"], torch.tensor(points, dtype=torch.float64), atol=0.1)
    with pytest.raises(ValueError, match="sigma"):
        LandmarkHeatmapd((32, 32), sigma=0)


def test_loss_prefers_the_right_heatmap_and_coordinate_term_counts():
    target = gaussian_heatmaps(torch.tensor([[10.0, 12.0]]), (32, 32), 2.0)[None]
    shifted = gaussian_heatmaps(torch.tensor([[14.0, 12.0]]), (32, 32), 2.0)[None]
    mse = LandmarkHeatmapLoss()
    assert float(mse(target, target)) == 0.0 and float(mse(shifted, target)) > 0.0
    combo = LandmarkHeatmapLoss(coord_weight=1.0, beta=40.0)
    assert float(combo(shifted, target)) - float(mse(shifted, target)) == pytest.approx(4.0, abs=0.2)


def test_symmetric_pairs_are_matched_in_the_loss_and_ordered_at_evaluation():
    # landmarks 0, 1: a pair ordered by x (0 = the right one); 2, 3 by y (2 = the lower one); 4 alone
    points = torch.tensor([[20.0, 5.0], [4.0, 6.0], [10.0, 25.0], [11.0, 3.0], [16.0, 16.0]])
    pairs = [[0, 1, "x"], [2, 3, "y"]]
    target = gaussian_heatmaps(points, (32, 32), 2.0)[None]
    crossed = target[:, [1, 0, 2, 3, 4]]  # the major pair swapped
    plain, free = LandmarkHeatmapLoss(), LandmarkHeatmapLoss(symmetric_pairs=pairs)
    per_map = float(F.mse_loss(target[0, 0], target[0, 1], reduction="sum"))
    assert float(plain(crossed, target)) == pytest.approx(2 * per_map / 5, rel=1e-5)
    assert float(free(crossed, target)) == 0.0 and float(free(target, target)) == 0.0
    both = LandmarkHeatmapLoss(coord_weight=1.0, beta=40.0, symmetric_pairs=pairs)
    assert float(both(crossed, target)) == pytest.approx(float(both(target, target)), rel=1e-6)
    assert float(both(crossed, target)) < float(LandmarkHeatmapLoss(coord_weight=1.0, beta=40.0)(crossed, target)) - 5
    # evaluation order: the swapped pair is put back, the ordered image is left as it is
    batch = torch.cat([crossed, target[:, [0, 1, 3, 2, 4]]])  # image 1: minor pair swapped
    ordered = order_symmetric_pairs(batch, pairs)
    assert torch.equal(ordered, torch.cat([target, target])) and not torch.equal(batch, ordered)
    net = EchoCareLandmarkNet("tiny", num_landmarks=5, symmetric_pairs=pairs)
    assert net.state_dict().keys() == EchoCareSegNet("tiny", out_channels=5).state_dict().keys()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        raw = net.train()(x)  # training: the maps as they are (the loss matches them)
        ready = net.eval()(x)  # (no dropout or batch statistics: the same maps, then ordered)
    assert torch.equal(ready, order_symmetric_pairs(raw, pairs))
    with pytest.raises(ValueError, match="symmetric pair"):
        LandmarkHeatmapLoss(symmetric_pairs=[[0, 1, "z"]])
    with pytest.raises(ValueError, match="distinct landmarks"):
        EchoCareLandmarkNet("tiny", num_landmarks=2, symmetric_pairs=[[0, 2, "x"]])


# ----------------------------------------------------------------------------- data


def test_landmark_datalist_reports_every_bad_item(tmp_path: Path):
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "x.png")
    good = {"image": "x.png", "landmarks": [[1, 2], [3, 4]]}
    content = {"training": [good, {"image": "x.png", "landmarks": [[1, 2]]}, {"image": "x.png"},
                            {"image": "x.png", "landmarks": [[1, None], [2, 3]]}]}
    (tmp_path / "dl.json").write_text(json.dumps(content))
    with pytest.raises(DatalistError) as error:
        load_landmark_datalist(tmp_path / "dl.json", "training", num_landmarks=2)
    message = str(error.value)
    assert "dl.json" in message and "3 problem" in message
    assert "item 1" in message and "1 landmarks, expected 2" in message
    assert "item 2" in message and "no 'landmarks'" in message and "item 3" in message
    (tmp_path / "ok.json").write_text(json.dumps({"training": [good]}))
    items = load_landmark_datalist(tmp_path / "ok.json", "training", with_sizes=True)
    assert items[0]["landmarks"] == [[1.0, 2.0], [3.0, 4.0]] and items[0]["original_size"] == [16, 16]
    assert all(math.isnan(s) for s in items[0]["spacing"])


def test_phantom_writes_the_converter_layout_with_visible_landmarks(tmp_path: Path):
    path = generate_demo_data("brain_landmark", tmp_path, n=8, seed=3, image_size=96)
    dl = json.loads(path.read_text())
    assert dl["landmark_names"] == BRAIN_LANDMARK_NAMES and len(BRAIN_LANDMARK_NAMES) == 24
    items = dl["training"] + dl["validation"]
    assert len(items) == 8 and dl["validation"]
    assert not {i["case"] for i in dl["training"]} & {i["case"] for i in dl["validation"]}
    with open(tmp_path / "brain_landmark" / "landmarks.csv") as handle:
        header = next(csv.reader(handle))
    assert header[:4] == ["image", "case", "x1", "y1"] and header[-1] == "y24"
    for item in items:
        pts = np.asarray(item["landmarks"])
        assert pts.shape == (24, 2) and (pts > 0).all() and (pts < 95).all()
    # the same seed draws the same image and points; structures sit where the points say
    a, pa = make_brain_landmark_image(np.random.default_rng(5), 128)
    b, pb = make_brain_landmark_image(np.random.default_rng(5), 128)
    assert np.array_equal(a, b) and np.array_equal(pa, pb)
    names = BRAIN_LANDMARK_NAMES
    skull = [a[int(round(y)), int(round(x))] for x, y in pa[[names.index(n) for n in names if n.startswith("skull_inner")]]]
    x, y = pa[names.index("cisterna_magna")]
    assert min(skull) > 2 * a[int(round(y)), int(round(x))] + 20  # bone is bright, the cisterna magna anechoic
    # the anterior end is told by content: mirrored heads exist in a set
    facings = set()
    for k in range(6):
        _, p = make_brain_landmark_image(np.random.default_rng(k), 64)
        facings.add(np.sign(p[names.index("skull_outer_anterior"), 0] - p[names.index("skull_outer_posterior"), 0]))
    assert facings == {-1.0, 1.0}


# ----------------------------------------------------------------------------- network


def test_landmark_net_is_the_seg_net_with_one_channel_per_landmark():
    torch.manual_seed(0)
    net = EchoCareLandmarkNet("tiny", num_landmarks=5)
    seg = EchoCareSegNet("tiny", out_channels=5)
    assert net.state_dict().keys() == seg.state_dict().keys()
    seg.load_state_dict(net.state_dict())  # checkpoints move both ways
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 5, 64, 64)
    assert float(out.abs().max()) < 5.0  # starts near zero, the scale of the targets
    with pytest.raises(ValueError, match="num_landmarks"):
        EchoCareLandmarkNet("tiny", num_landmarks=0)


def test_coordinate_channels_reach_the_decoder():
    coords = coordinate_channels(torch.zeros(2, 3, 3, 5))
    assert coords.shape == (2, 2, 3, 5)
    assert coords[1, 0, 2].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]  # x across the columns
    assert coords[0, 1, :, 4].tolist() == [-1.0, 0.0, 1.0]  # y down the rows
    torch.manual_seed(0)
    net = EchoCareLandmarkNet("tiny", num_landmarks=2, coord_channels=True).eval()
    assert net.decoder.skip_image.layer.conv1.conv.in_channels == 5  # the image's 3 + x, y
    assert net.state_dict().keys() == EchoCareSegNet("tiny", out_channels=2).state_dict().keys()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        features = net.encoder(x)
        out = net(x)
        with_coords = net.decoder(torch.cat([x, coordinate_channels(x)], 1), features)
        blind = net.decoder(torch.cat([x, torch.zeros(1, 2, 64, 64)], 1), features)
    assert torch.equal(out, with_coords)
    assert float((out - blind).abs().max()) > 1e-3 * float(out.abs().max())  # the maps depend on them


# ----------------------------------------------------------------------------- bundle


@pytest.mark.slow
@pytest.mark.e2e
def test_bundle_trains_evaluates_infers_and_beats_the_mean_position_baseline(tmp_path: Path):
    data = tmp_path / "data"
    generate_demo_data("brain_landmark", data, n=30, seed=0, image_size=64)
    out = tmp_path / "out"
    small = [*SMALL[:4], "--batch_size", "2", *SMALL[6:]]
    common = [*small, "--dataset_dir", str(data), "--datalist", str(data / "datalist.json"), "--output_dir", str(out)]
    train = [str(CONFIGS / "train.yaml")]
    bundles_in_one_process(
        # settings measured on this phantom's validation split: 9.0 px against the baseline's 11.1 (9.5 with no shift)
        ["training", "--config_file", train[0], *common, "--max_epochs", "10", "--heatmap_sigma", "3",
         "--encoder_lr", "2e-3", "--head_lr", "2e-3", "--tracking", "mlflow", "--run_name", "bl_train"],
        ["evaluating", "--config_file", repr([train[0], str(CONFIGS / "evaluate.yaml")]), *common,
         "--tracking", "mlflow", "--run_name", "bl_eval"],
        ["inferring", "--config_file", str(CONFIGS / "inference.yaml"), "--input_dir", str(data / "datalist.json"),
         "--dataset_dir", str(data), "--output_dir", str(out), *SMALL[:4], "--num_workers", "0"],
    )
    assert (out / "models" / "model.pt").is_file()
    summary = json.loads((out / "eval" / "summary.json").read_text())
    baseline = mean_position_baseline(data / "datalist.json")
    assert summary["mre_px"] < baseline["mre_px"], (summary["mre_px"], baseline["mre_px"])
    assert {"mse_px2", "sdr_2px", "sdr_4px", "sdr_10px", "mre_px_cisterna_magna"} <= set(summary)
    assert 0.0 <= summary["sdr_2px"] <= summary["sdr_4px"] <= summary["sdr_10px"] <= 1.0
    validation = json.loads((data / "datalist.json").read_text())["validation"]
    with open(out / "eval" / "per_case.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(validation) and "error_px_vermis" in rows[0]
    assert np.mean([float(r["mre_px"]) for r in rows]) == pytest.approx(summary["mre_px"])
    assert len(list((out / "eval" / "overlays").glob("*.png"))) == len(validation)
    assert (out / "eval" / "landmark_errors.png").is_file()
    record = json.loads((out / "predictions" / f"{Path(validation[0]['image']).stem}.json").read_text())
    assert list(record["landmarks"]) == BRAIN_LANDMARK_NAMES and record["image_size"] == [64, 64]
    index = json.loads((out / "predictions" / "predictions.json").read_text())
    assert len(index) == len(validation)
    client, runs = mlflow_runs(out / "mlruns.db")
    by_name = {r.info.run_name: r for r in runs}
    assert len(client.get_metric_history(by_name["bl_train"].info.run_id, "mre_px")) == 10
    assert by_name["bl_eval"].data.metrics["mre_px"] == pytest.approx(summary["mre_px"])
    artifacts = {a.path for a in client.list_artifacts(by_name["bl_eval"].info.run_id, "eval")}
    assert {"eval/summary.json", "eval/per_case.csv", "eval/landmark_errors.png"} <= artifacts


@pytest.mark.slow
@pytest.mark.e2e
def test_hc18_variant_on_real_data(real_data_dir: Path, tmp_path: Path):
    from echocare.datasets.converters import convert_datalist

    root = real_data_dir / "hc18"
    dl = convert_datalist("hc18", root, tmp_path / "hc18.json")
    # the converter's order is canonical: major end 1 has the larger x, minor end 1 the larger y
    for item in dl["training"] + dl["validation"]:
        (x1, _), (x2, _), (_, y3), (_, y4) = item["landmarks"]
        assert x1 > x2 and y3 > y4, item["image"]
    out = tmp_path / "out"
    files = [str(CONFIGS / "train.yaml"), str(CONFIGS / "hc18.yaml")]
    common = [*SMALL, "--dataset_dir", str(root), "--datalist", str(tmp_path / "hc18.json"), "--output_dir", str(out)]
    bundles_in_one_process(
        ["training", "--config_file", repr(files), *common, "--max_epochs", "1", "--train_fraction", "0.1"],
        ["evaluating", "--config_file", repr([*files, str(CONFIGS / "evaluate.yaml")]), *common, "--num_overlays", "2"],
        ["inferring", "--config_file", repr([str(CONFIGS / "inference.yaml"), str(CONFIGS / "hc18.yaml")]), *SMALL[:8],
         "--input_dir", str(tmp_path / "hc18.json"), "--dataset_dir", str(root), "--output_dir", str(out)],
    )
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert {"mre_px", "mre_mm", "mre_px_major_axis_end_1", "sdr_10px"} <= set(summary)
    # inference: the four axis ends of every validation image, inside its original pixels
    predictions = json.loads((out / "predictions" / "predictions.json").read_text())
    assert len(predictions) == len(dl["validation"])
    for record in predictions:
        height, width = record["image_size"]
        assert list(record["landmarks"]) == ["major_axis_end_1", "major_axis_end_2", "minor_axis_end_1", "minor_axis_end_2"]
        assert all(0 <= x <= width and 0 <= y <= height for x, y in record["landmarks"].values())
    # mm and px agree through the pixel sizes (0.05 to 0.3 mm in HC18)
    assert 0.04 * summary["mre_px"] < summary["mre_mm"] < 0.35 * summary["mre_px"]
